"""The publishing side of telemetry: what a cluster agent (or the load generator) uses.

    producer = AIOKafkaProducer(bootstrap_servers=..., acks="all", enable_idempotence=True)
    await producer.start()
    publisher = TelemetryPublisher(producer)
    await publisher.publish_node(node_update)      # NodeUpdate, pods included
    await publisher.flush()

Sequences: one counter per publisher, max(last + 1, wall clock in microseconds), so they
grow per node even across agent restarts (as long as the clock does not jump back by
more than the restart took).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fleetd.sources.codec import (
    encode_node,
    encode_node_deleted,
    encode_node_inventory,
    encode_pending_pod,
    encode_pending_pod_deleted,
    encode_pool,
    encode_pool_deleted,
    record_key,
)
from fleetd.sources.updates import NodePoolUpdate, NodeUpdate, PendingPod
from fleetd.v1 import telemetry_pb2 as pb

DEFAULT_TOPIC = "fleet.telemetry.v1"


class SequenceClock:
    """Hybrid sequence numbers: strictly increasing, and never below the wall clock (µs)."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._last = 0

    def next(self) -> int:
        """The next sequence number."""
        self._last = max(self._last + 1, int(self._wall_clock() * 1_000_000))
        return self._last


class TelemetryPublisher:
    """Publishes telemetry records on an aiokafka producer (started by the caller).

    `publish_*` queue a record and return once the producer accepted it; `flush` waits
    until the broker acknowledged everything queued.
    """

    def __init__(
        self,
        producer: Any,
        topic: str = DEFAULT_TOPIC,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self._wall_clock = wall_clock
        self.sequences = SequenceClock(wall_clock)
        self._pending: list[asyncio.Future[Any]] = []

    def _stamp(self) -> tuple[int, int]:
        return self.sequences.next(), int(self._wall_clock() * 1000)

    async def publish_record(self, record: pb.TelemetryRecord) -> None:
        """Queue one record under its key.

        Serialized deterministically (map entries sorted): a report that repeats a node's
        content repeats its bytes too, which the consumer's unchanged-report path relies on
        (`fleetd.sources.codec.unchanged_envelope`)."""
        future = await self.producer.send(
            self.topic, value=record.SerializeToString(deterministic=True), key=record_key(record)
        )
        self._pending.append(future)

    async def publish_node(self, update: NodeUpdate) -> None:
        """Queue a node report (with its pods, if `update.pods` is set)."""
        seq, ms = self._stamp()
        await self.publish_record(encode_node(update, sequence=seq, observed_unix_ms=ms))

    async def publish_node_deleted(self, cluster: str, name: str) -> None:
        """Queue a node deletion."""
        seq, ms = self._stamp()
        await self.publish_record(
            encode_node_deleted(cluster, name, sequence=seq, observed_unix_ms=ms)
        )

    async def publish_node_inventory(
        self, cluster: str, names: list[str], pools: list[str] | None = None
    ) -> None:
        """Queue the cluster's node inventory: `names` is every node the agent sees now
        (and `pools`, when given, every node pool it published and did not delete).

        Its sequence is drawn here, before anything is awaited, so the caller must take
        `names` from its picture with no `await` in between: every report published
        before then has a lower sequence, every report of a node added later a higher
        one (which is how a consumer tells a node deleted unseen from one added after
        the list was taken). One or more chunk records, all with that sequence
        (`codec.encode_node_inventory`)."""
        seq, ms = self._stamp()
        for record in encode_node_inventory(
            cluster, names, sequence=seq, observed_unix_ms=ms, pools=pools
        ):
            await self.publish_record(record)

    async def publish_pool(self, update: NodePoolUpdate) -> None:
        """Queue a node-pool report."""
        seq, ms = self._stamp()
        await self.publish_record(encode_pool(update, sequence=seq, observed_unix_ms=ms))

    async def publish_pool_deleted(self, cluster: str, name: str) -> None:
        """Queue a node-pool deletion."""
        seq, ms = self._stamp()
        await self.publish_record(
            encode_pool_deleted(cluster, name, sequence=seq, observed_unix_ms=ms)
        )

    async def publish_pending_pod(self, pod: PendingPod) -> None:
        """Queue a pending pod (one its cluster's scheduler marked Unschedulable)."""
        seq, ms = self._stamp()
        await self.publish_record(encode_pending_pod(pod, sequence=seq, observed_unix_ms=ms))

    async def publish_pending_pod_deleted(self, cluster: str, namespace: str, name: str) -> None:
        """Queue the end of a pending pod (bound, deleted or terminated)."""
        seq, ms = self._stamp()
        await self.publish_record(
            encode_pending_pod_deleted(cluster, namespace, name, sequence=seq, observed_unix_ms=ms)
        )

    async def flush(self) -> None:
        """Wait until the broker acknowledged every queued record (raises on failure)."""
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)
