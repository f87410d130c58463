"""Telemetry from Kafka: a consumer group on `fleet.telemetry.v1` feeding the fleet state.

Delivery contract:
- offsets are committed (manually) only after the batch they end was applied, so a crash
  or a broker restart redelivers, never loses;
- redelivery is harmless: a `SequenceGate` drops records at or below the last sequence
  applied for their node or pool;
- a record that does not decode or validate goes to the dead-letter topic with the reason
  in the `fleetd-dlq-reason` header (and is counted); the consumer goes on;
- a fresh source (a starting daemon: an empty fleet state) reads every partition from its
  beginning, a consumer restarted in the same process from the offsets it applied; the
  group's committed offsets are for Kafka's tools (`KafkaSource._assigned`);
- once the consumer has caught up with the end offsets its partitions had at assignment,
  it reports `ClusterSynced(cluster, "kafka")` for every cluster it has seen (readiness).

Staleness (a node with no report for `staleness.node_stale_after_s` is unschedulable until
it reports again) is swept by the state owner for every source alike (`FleetState.mark_stale`).
"""

from __future__ import annotations

import array
import asyncio
import bisect
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import aiokafka
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from google.protobuf.message import DecodeError

from fleetd import native
from fleetd.sources import collector, fetch, repeats
from fleetd.sources.base import Backoff, UpdateSink
from fleetd.sources.codec import (
    InvalidTelemetry,
    decode_envelope_rests,
    envelope_head,
    gpu_fields,
    gpus_from_fields,
    gpus_start,
    node_content_tail,
    node_field_at,
    node_key,
    node_offset_in_tail,
    parse,
    pod_fields,
    pods_from_fields,
    pods_start,
    to_update,
    with_gpus,
    with_pods,
    with_spec,
)
from fleetd.sources.inventory import InventoryAssembler
from fleetd.sources.memory import StateSink
from fleetd.sources.metrics import SourceMetrics
from fleetd.sources.repeats import SPLIT_LATER as _SPLIT_LATER
from fleetd.sources.repeats import UNKNOWN_LAYOUT as _UNKNOWN_LAYOUT
from fleetd.sources.repeats import Content
from fleetd.sources.repeats import Layout as _Layout
from fleetd.sources.security import KafkaSecurity, KafkaSecurityError, diagnose
from fleetd.sources.security import from_config as security_from_config
from fleetd.sources.updates import (
    ClusterSynced,
    HeartbeatSlots,
    NodeHeartbeats,
    NodeInventory,
    NodeInventoryChunk,
    NodeRemoved,
    NodeStale,
    NodeUpdate,
    SequenceColumn,
    SequenceGate,
    Update,
)
from fleetd.v1 import telemetry_pb2 as pb

if TYPE_CHECKING:
    from fleetd.sources.kafka_workers import KafkaWorkers

log = logging.getLogger(__name__)

SOURCE = "kafka"
#: Records parsed between two yields to the event loop.
YIELD_EVERY_RECORDS = 2000
#: Turns of the event loop aiokafka's fetcher (0.14, `fetch.SUPPORTED_AIOKAFKA`) takes to
#: send a fetch request once a poll drained its partitions (`_poll_and_apply`).
FETCH_REQUEST_TURNS = 3
#: The node memory and the scan for repeats, compiled when `make install` built them from
#: this checkout's source (`fleetd.native`), else interpreted; each runs the scan it is
#: fast with (`repeats.skip_repeats`, `skip_repeats_rests`).
_repeats = native.load(repeats)
_NATIVE_SCAN = native.is_native(_repeats)
#: Numbers each source's heartbeat slot space (`HeartbeatSlots.source`): a sink fed by two
#: sources, or by a replaced one, never mixes their slots.
_SLOT_SPACES = itertools.count(1)
DLQ_REASON_HEADER = "fleetd-dlq-reason"
DLQ_DETAIL_HEADER = "fleetd-dlq-detail"
DLQ_ORIGIN_HEADER = "fleetd-dlq-origin"


@dataclass(frozen=True)
class KafkaSourceSettings:
    """Everything the Kafka source needs; `from_config` fills it from fleetd's config."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "fleet.telemetry.v1"
    dead_letter_topic: str = "fleet.telemetry.v1.dlq"
    group_id: str = "fleetd"
    client_id: str = "fleetd"
    #: Clusters whose first report the initial sync (readiness) waits for.
    required_clusters: frozenset[str] = frozenset()
    #: Records per poll at most. When the consumer is behind, large polls let it apply only
    #: the newest snapshot of each changed node (see `process`), so it catches up faster.
    max_batch_records: int = 20_000
    #: Bytes fetched per partition per request (aiokafka's default, 1 MiB: ~2,000 reports).
    #: Larger fetches fill a poll from one partition, many reports of each of its nodes,
    #: which helps nothing now that unchanged reports cost little (measured: 8 MiB made a
    #: catching-up poll decode five times as many records in full).
    max_partition_fetch_bytes: int = 1024 * 1024
    poll_timeout_ms: int = 200
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 10.0
    #: Broker liveness: a metadata round trip (end offsets) at most this often while
    #: consuming, failing after `probe_timeout_s` (reported through `on_connection`).
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 5.0
    #: TLS and SASL of both clients (`fleetd.sources.security`).
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    #: When set, called before every connection attempt instead of using `security`: a
    #: rotated password file is picked up on reconnect, and a missing one is an error the
    #: source logs and retries (readiness stays false) rather than a crash.
    security_loader: Callable[[], KafkaSecurity] | None = None
    #: How long a removed node's (pool's, pending pod's) sequence is kept to drop its
    #: redelivered older records; then one floor per cluster does (`SequenceGate`).
    sequence_tombstone_ttl_s: float = 600.0
    #: A node whose newest record (by its Kafka timestamp) is older than this when the
    #: source reads what the topic held at its start is applied stale: silent that long,
    #: it is gone or its agent is (None: as fresh; the daemon sets its
    #: `staleness.node_stale_after_s`). See `_silent_nodes`.
    replay_max_age_s: float | None = None
    #: Extra keyword arguments for both aiokafka clients.
    client_options: Mapping[str, Any] = field(default_factory=dict)
    #: One of several consumers of one fleetd (`fleetd.sources.kafka_workers`): partitions
    #: held by the group's other members are expected, not a conflict (the parent judges
    #: the whole group's assignment), and an empty assignment is a synced one.
    shared_group: bool = False

    def resolve_security(self) -> tuple[KafkaSecurity, dict[str, Any]]:
        """The security settings and every aiokafka keyword argument they and
        `client_options` make. Raises KafkaSecurityError."""
        security = self.security_loader() if self.security_loader else self.security
        return security, {**security.client_options(), **self.client_options}


#: In a poll's newest records by key (`_process`), a key whose change waits for its envelope:
#: older than anything.
_TAKEN: tuple[int, int, Any, Any] = (-1, 0, None, None)

#: `_Change.kind`: what differs from the remembered content.
_PODS, _GPUS, _SPEC = 0, 1, 2


class _Change:
    """A node report recognised by its bytes as the node's remembered content with other
    pods, other GPUs, or other fields before its GPUs (`_change_of`): what `_convert`
    needs instead of a parsed record. Positions are in the record's value."""

    __slots__ = ("at", "end", "fields", "kind", "memo", "node", "node_at",
                 "observed_unix_ms", "sequence", "spec_end", "tag")  # fmt: skip

    def __init__(
        self,
        kind: int,
        memo: Content,
        sequence: int,
        observed_unix_ms: int,
        tag: int,
        node_at: int,
        spec_end: int,
        at: int,
        end: int,
    ) -> None:
        self.kind = kind
        self.memo = memo
        self.sequence = sequence
        self.observed_unix_ms = observed_unix_ms
        #: Where the record's `node` field (its content token) begins, where its NodeReport
        #: bytes begin, and where their pods begin.
        self.tag = tag
        self.node_at = node_at
        self.spec_end = spec_end
        #: The new part: value[at:end] (pods' fields, GPUs' fields, or fields before them).
        self.at = at
        self.end = end
        #: _PODS, _GPUS: the pods' or GPUs' bytes (`codec.pod_fields`, `gpu_fields`).
        self.fields: list[bytes] = []
        #: _SPEC: the new fields, parsed.
        self.node: pb.NodeReport | None = None


@dataclass(frozen=True, slots=True)
class _DeadRecord:
    """A record to dead-letter, with the partition it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @classmethod
    def of(cls, tp: TopicPartition, rec: Any) -> _DeadRecord:
        return cls(tp.topic, tp.partition, rec.offset, rec.key, rec.value)


def _change_of(
    value: bytes, memo: Content, sequence: int, ms: int, tag: int, node_at: int
) -> _Change | None:
    """When `value` (a record under `memo`'s key: its envelope head, a valid envelope with
    `sequence` and `ms`, then its node field from `tag`, its NodeReport bytes from
    `node_at`: `codec.node_field_at`) is a canonical node report whose node bytes are the
    remembered ones but for its pods, its GPUs, or its fields before the GPUs, what it
    says; None otherwise (it is decoded in full). By protobuf's merge semantics such a
    record *is* the remembered node with that part replaced: the rest was validated when
    remembered, so only the envelope (the caller) and the new part (`_convert`) need
    checking."""
    spec = memo.spec
    if spec is None:
        return None
    if value.startswith(spec, node_at):
        # Only the pods differ (most changes).
        spec_end = node_at + len(spec)
        fields = pod_fields(value, spec_end)
        if fields is None:
            return None
        change = _Change(_PODS, memo, sequence, ms, tag, node_at, spec_end, spec_end, len(value))
        change.fields = fields
        return change
    gpus_at = memo.gpus_at
    if gpus_at < 0:
        return None
    # The pods as remembered; the GPUs, or the fields before them, not.
    tail = memo.tail
    pods_at = node_offset_in_tail(tail) + len(spec)
    spec_end = len(value) - (len(tail) - pods_at)
    if spec_end < node_at or not value.endswith(tail[pods_at:]):
        return None
    if value.startswith(spec[:gpus_at], node_at):
        at = node_at + gpus_at
        fields = gpu_fields(value, at, spec_end)
        if fields is None:
            return None
        change = _Change(_GPUS, memo, sequence, ms, tag, node_at, spec_end, at, spec_end)
        change.fields = fields
        return change
    gpus = spec_end - (len(spec) - gpus_at)
    if gpus < node_at or not value.startswith(spec[gpus_at:], gpus):
        return None
    try:
        node = pb.NodeReport.FromString(value[node_at:gpus])
    except DecodeError:
        return None
    if node.gpus or node.pods:
        return None
    change = _Change(_SPEC, memo, sequence, ms, tag, node_at, spec_end, node_at, gpus)
    change.node = node
    return change


def _content_token(rec: Any, parsed: Any) -> bytes:
    """The content token of a node report: its `node` field bytes (b"" for other records
    and for records laid out otherwise than fleetd's publisher writes them)."""
    if parsed.WhichOneof("payload") != "node" or not rec.value:
        return b""
    return node_content_tail(rec.value, parsed) or b""


class KafkaSource:
    """A supervised long-lived task: `await source.run()` until cancelled.

    `ready` is set once the consumer has caught up with the end offsets its partitions
    had when they were assigned, and every required cluster has reported; from then on
    each newly seen cluster is reported synced with its first batch.
    """

    def __init__(
        self,
        settings: KafkaSourceSettings,
        sink: UpdateSink,
        *,
        metrics: SourceMetrics | None = None,
        slot_space: str | None = None,
    ) -> None:
        """`slot_space` names this source's heartbeat slots in the sink (`HeartbeatSlots`):
        unique per sink (default: numbered within this process)."""
        self.settings = settings
        self.sink = sink
        #: What the sink offers to wait for the batches given to it (`settled`), if anything.
        self._settled: Callable[[], Awaitable[None]] | None = getattr(sink, "settled", None)
        self.metrics = metrics if metrics is not None else SourceMetrics()
        self.ready = asyncio.Event()
        self._gate = SequenceGate(tombstone_ttl_s=settings.sequence_tombstone_ttl_s)
        self._initial_end: dict[TopicPartition, int] | None = None
        self._next_offset: dict[TopicPartition, int] = {}
        self._seen_clusters: set[str] = set()
        self._synced_clusters: set[str] = set()
        #: Records handled (any outcome): tests and benchmarks await progress on it.
        self.records_handled = 0
        #: perf_counter() when the first non-empty poll returned (benchmarks time from it).
        self.first_batch_at: float | None = None
        self.progress = asyncio.Condition()
        #: Why the last connection attempt failed ('' once connected): status and tests.
        self.last_connect_error = ""
        self.connect_failures = 0
        #: Kafka key -> the node content last applied under it (the unchanged-report path).
        self._contents: dict[bytes, Content] = {}
        #: The gate cells of the nodes in `_contents`, for repeats to move in bulk; their
        #: slots are also what `NodeHeartbeats` entries name (`HeartbeatSlots`).
        self._column = SequenceColumn()
        self._slot_space = slot_space or f"{SOURCE}/{next(_SLOT_SPACES)}"
        #: Told (ok, reason) on every change of the broker connection: False when the broker
        #: cannot be reached, True once it is back and the consumer caught up with the end
        #: offsets it saw on return (the daemon's readiness; see `_probe`).
        self.on_connection: Callable[[bool, str], None] | None = None
        #: Told how far the initial sync is ("1,234,567 records to read"; '' when read up
        #: to the end offsets at assignment), after every poll until it is done.
        self.on_progress: Callable[[str], None] | None = None
        #: The records the initial sync has left to read, as `on_progress` last said.
        self.behind_records = 0
        #: Told (partitions held, partitions of the topic) on every assignment.
        self.on_assigned: Callable[[set[int], set[int]], None] | None = None
        #: Told the number of records of every poll, and the offsets committed for it, once
        #: they are committed.
        self.on_handled: Callable[[int, Mapping[TopicPartition, int]], None] | None = None
        self._assigned_once = False
        #: The partitions of the topic the last assignment gave this consumer.
        self.held_partitions: set[int] = set()
        self._connected: bool | None = None
        #: Why the group's assignment leaves partitions of the topic to another consumer
        #: ('' when this source reads them all; see `_assigned`).
        self.group_conflict = ""
        self._next_probe_s = 0.0
        self._resync_end: dict[TopicPartition, int] | None = None
        #: Each partition's end offset when this source first read it (`_silent_nodes`).
        self._replay_end: dict[TopicPartition, int] = {}
        #: Per partition, the group's committed offset when a dead record was first met
        #: there: dead records below it were dead-lettered by an earlier run.
        self._dlq_floor: dict[TopicPartition, int] = {}
        #: Whether the warning that this aiokafka release is polled the slow way was logged.
        self._said_slow_polls = False
        self._said_interpreted = False
        #: Nodes found silent for too long while reading what the topic held at the start.
        self._replayed_stale = 0
        #: The last poll's commit while the next poll is decoded and applied (`_consume`).
        self._committing: asyncio.Future[None] | None = None
        #: Node inventories (telemetry's relist): chunks converted in this poll, their
        #: assembly, and the inventories applied in this poll (see `_assemble_inventories`).
        self._inventory_chunks = 0
        self._inventories = InventoryAssembler(
            on_abandon=lambda cluster: self.metrics.inventories_abandoned.labels(cluster).inc()
        )
        self._applied_inventories: list[NodeInventory] = []

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Consume until cancelled. Connection failures are retried with backoff."""
        s = self.settings
        backoff = Backoff(s.backoff_initial_s, s.backoff_max_s)
        while True:
            try:
                security, options = s.resolve_security()
            except KafkaSecurityError as exc:
                await self._connect_failed(str(exc))
                delay = backoff.next_delay_s()
                self._connection(False, f"kafka security settings: {exc}")
                log.error("kafka: security settings: %s; retry in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            consumer = AIOKafkaConsumer(
                bootstrap_servers=s.bootstrap_servers,
                group_id=s.group_id,
                client_id=s.client_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=s.max_partition_fetch_bytes,
                **options,
            )
            producer = AIOKafkaProducer(
                bootstrap_servers=s.bootstrap_servers,
                client_id=f"{s.client_id}-dlq",
                acks="all",
                enable_idempotence=True,
                **options,
            )
            consumer.subscribe([s.topic], listener=_Positions(self, consumer))
            try:
                await consumer.start()
                await producer.start()
            except KafkaError as exc:
                await _stop_quietly(consumer, producer)
                # aiokafka says only "Unable to bootstrap": one direct connection tells
                # refused, TLS verification or SASL authentication apart.
                cause = await diagnose(s.bootstrap_servers, options) or str(exc)
                await self._connect_failed(cause)
                delay = backoff.next_delay_s()
                self._connection(False, f"cannot connect to {s.bootstrap_servers}: {cause}")
                log.warning("kafka: cannot connect to %s (%s): %s; retry in %.1fs",
                            s.bootstrap_servers, security.describe(), cause, delay)  # fmt: skip
                await asyncio.sleep(delay)
                continue
            self.last_connect_error = ""
            log.info("kafka: consuming %s as group %s (%s)",
                     s.topic, s.group_id, security.describe())  # fmt: skip
            backoff.reset()
            try:
                await self._consume(consumer, producer)
            except KafkaError as exc:
                # Non-retriable client errors: start over with fresh clients; what was not
                # committed is redelivered and the sequence gate drops what was applied.
                delay = backoff.next_delay_s()
                self._connection(False, f"consumer failed: {exc!r}")
                log.warning("kafka: consumer failed (%s); restarting in %.1fs", exc, delay)
                await asyncio.sleep(delay)
            finally:
                await self._abandon_commit()
                await _stop_quietly(consumer, producer)

    # ------------------------------------------------------------------ consuming

    async def _consume(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
        s = self.settings
        # aiokafka's records without a ConsumerRecord each, where its release allows.
        fast = fetch.supports(consumer)
        if not fast and not self._said_slow_polls:
            self._said_slow_polls = True
            log.warning(
                "kafka: aiokafka %s is not one fleetd reads the fetched batches of (%s): "
                "polling with getmany, ~1 µs more CPU a record",
                aiokafka.__version__, ", ".join(sorted(fetch.SUPPORTED_AIOKAFKA)),
            )  # fmt: skip
        why = native.why_interpreted(repeats.__name__)
        if why is not None and not self._said_interpreted:
            self._said_interpreted = True
            log.warning("kafka: the per-record scan (%s) runs interpreted, ~0.4 µs more CPU a "
                        "record: its compiled module is %s", repeats.__name__, why)  # fmt: skip
        while True:
            if fast:
                await fetch.wait(consumer, s.poll_timeout_ms)
            polled = await self._poll_and_apply(consumer, producer, fast)
            if polled is not None:
                # The commit of a poll (a broker round trip, ~5 ms) overlaps the decoding and
                # applying of the next one: its offsets are still committed only after its
                # records were applied, and at most one commit is in flight, so they reach
                # the broker in order. The poll counts as handled once committed.
                await self._settle_commit()
                self._committing = asyncio.ensure_future(self._commit_and_count(consumer, *polled))
            if not self.ready.is_set():
                await self._check_initial_sync(consumer)
            elif self.on_connection is not None:
                await self._probe(consumer)

    async def _poll_and_apply(
        self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, fast: bool
    ) -> tuple[dict[TopicPartition, int], int] | None:
        """Take the records fetched so far (`getmany` waits for some) and apply them; their
        offsets and count, or None when there were none."""
        if not fast:
            batches = await consumer.getmany(
                timeout_ms=self.settings.poll_timeout_ms,
                max_records=self.settings.max_batch_records,
            )
            if not batches:
                return None
            if self.first_batch_at is None:
                self.first_batch_at = time.perf_counter()
            return await self._apply_poll(batches, consumer, producer)
        # A poll's records are made, applied and freed with the cyclic collector paused
        # (`collector`): they hold no cycles, and ~2 tracked objects each (aiokafka's record
        # and its headers) would otherwise set off a young collection every few hundred
        # records and carry the poll's records through the older generations (measured:
        # ~0.5 µs a record of collections that found nothing to free). It collects again at
        # the first allocation after the poll.
        with collector.paused():
            batches = fetch.take(consumer, self.settings.max_batch_records)
            if not batches:
                return None
            if self.first_batch_at is None:
                self.first_batch_at = time.perf_counter()
            # The fetcher may fetch the drained partitions again: let it send that request
            # now (three turns of the loop: its routine wakes, starts the request's task, the
            # task writes it), so the broker reads the next poll while this one is applied.
            # (Else it went out at the apply's first yield, ~10 ms in, and its response
            # was often still on its way when the apply ended: measured ~0.3 µs a record idle.)
            for _ in range(FETCH_REQUEST_TURNS):
                await asyncio.sleep(0)
            applied = await self._apply_poll(batches, consumer, producer)
            # Released now, before the collector resumes and the next poll is fetched: alive
            # while aiokafka builds the next one's records, every collection would walk it.
            del batches
            return applied

    # ------------------------------------------------------------------ connection

    def _connection(self, ok: bool, reason: str = "") -> None:
        """Report a change of the broker connection to `on_connection` (not current while
        another consumer of the group holds some of the partitions)."""
        if ok and self.group_conflict:
            ok, reason = False, self.group_conflict
        if ok != self._connected:
            self._connected = ok
            if not ok:
                self._resync_end = None
            if self.on_connection is not None:
                self.on_connection(ok, reason)

    async def _probe(self, consumer: AIOKafkaConsumer) -> None:
        """aiokafka retries a lost broker silently (polls just return nothing), so ask it
        for the end offsets now and then. Down: reported at once (the daemon applies its
        time bound). Back: reported once the consumer reached the end offsets it saw on
        return, i.e. it has resynced."""
        now_s = time.monotonic()
        if now_s < self._next_probe_s:
            return
        self._next_probe_s = now_s + self.settings.probe_interval_s
        assignment = list(consumer.assignment())
        if not assignment:
            return
        try:
            end = await asyncio.wait_for(
                consumer.end_offsets(assignment), self.settings.probe_timeout_s
            )
            if self._connected is True:
                return
            if self._resync_end is None:
                self._resync_end = end
            for tp, offset in self._resync_end.items():
                if await consumer.position(tp) < offset:
                    return
        except (KafkaError, IllegalStateError, TimeoutError) as exc:
            self._connection(False, f"broker {self.settings.bootstrap_servers} unreachable: "
                             f"{exc!r}")  # fmt: skip
            return
        self._connection(True)

    async def process(
        self,
        batches: Mapping[TopicPartition, list[Any]],
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
    ) -> None:
        """Decode, dead-letter, apply and commit one poll's worth of records (each
        partition's a list of aiokafka's records, as `getmany` and `fetch.poll` give them)."""
        offsets, n_records = await self._apply_poll(batches, consumer, producer)
        await self._commit_and_count(consumer, offsets, n_records)

    async def _apply_poll(
        self,
        batches: Mapping[TopicPartition, list[Any]],
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
    ) -> tuple[dict[TopicPartition, int], int]:
        """Decode, dead-letter and apply one poll's worth of records; returns the offsets to
        commit and the number of records."""
        silent: list[Update] = []
        if not self.ready.is_set() and self.settings.replay_max_age_s is not None:
            silent = await self._silent_nodes(batches, consumer)
        # A poll allocates some thirty acyclic objects per record decoded and replaces the
        # state's values for every changed node; left on, the cyclic collector runs many
        # times per poll and each full run walks the whole fleet state (measured: up to
        # twice the poll's time). Reference counting frees what the poll drops; collection
        # resumes when the poll is done (`collector`: network waits inside run with it).
        with collector.paused():
            applied = await self._process(batches, consumer, producer)
        if silent:
            self._replayed_stale += len(silent)
            await self.sink.apply(silent)
        return applied

    async def _silent_nodes(
        self, batches: Mapping[TopicPartition, list[Any]], consumer: AIOKafkaConsumer
    ) -> list[Update]:
        """`NodeStale` for the nodes whose newest record in a poll is one the topic already
        held when this source started (below its partitions' end offsets then) and is older
        than `replay_max_age_s` by its Kafka timestamp.

        A fresh source reads every partition from its beginning (`_assigned`). A node whose
        last report there is older than the staleness bound has been silent that long (it
        is gone, or its agent is); applied as it is, its report would count as fresh for
        another such bound. It is stale instead, as it would be had fleetd kept running,
        until it reports again. Only records older than the start are judged: an agent whose
        clock (the record's CreateTime) runs late is trusted once it reports after fleetd
        started, so a skewed clock delays its nodes by one resync at most.
        """
        missing = [tp for tp in batches if tp not in self._replay_end]
        if missing:
            # (Fetched after the poll, so a little later than the start: the records in
            # between are new, and new records are never old enough to judge.)
            with collector.running():  # (a broker round trip, inside a poll)
                self._replay_end.update(await consumer.end_offsets(missing))
        max_age_s = self.settings.replay_max_age_s
        assert max_age_s is not None
        cutoff_ms = (time.time() - max_age_s) * 1000.0
        newest_aged: dict[bytes, bool] = {}
        for tp, records in batches.items():
            end = self._replay_end[tp]
            # Records this source applied already (redelivered after a rebalance sought
            # back) were judged then: their node may have reported since.
            applied = self._next_offset.get(tp, 0)
            for rec in records:
                if rec.key is not None and rec.offset >= applied:
                    newest_aged[rec.key] = rec.offset < end and rec.timestamp < cutoff_ms
        silent: list[Update] = []
        for key, aged in newest_aged.items():
            parts = key.split(b"/")
            if aged and len(parts) == 2:  # (a node's key; pools, pending pods... have more)
                cluster, name = (part.decode(errors="replace") for part in parts)
                silent.append(NodeStale(cluster, name, True))
        return silent

    async def _process(
        self,
        batches: Mapping[TopicPartition, list[Any]],
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
    ) -> tuple[dict[TopicPartition, int], int]:
        dead: list[tuple[int, Any, InvalidTelemetry]] = []
        offsets: dict[TopicPartition, int] = {}
        chosen: list[tuple[int, Update, bytes | None, _Layout, int]] = []
        updates: list[Update] = []
        duplicates = superseded = unchanged = unchanged_duplicates = 0
        if True:  # (one block: the decode pass)
            # Records are snapshots of their key (node or pool): of several records of one
            # key in a poll only the one with the highest valid sequence is applied (what a
            # compacted topic would keep). Every record is parsed, so undecodable ones are
            # dead-lettered; the newest of each key is validated in full.
            best: dict[object, tuple[int, int, Any, Any]] = {}
            contents = self._contents
            #: The repeats: their records and the slots of the contents they repeat.
            candidates: list[Any] = []
            repeat_slots = array.array("q")  # (int64s as appended: no list of ints to convert)
            #: Positions of the records parsed in full (the others were repeats).
            full_positions: set[int] = set()
            rests: list[bytes] = []

            def take_in_full(position: int, rec: Any) -> int:
                """Parse a record; dead-letter it or make it its key's newest candidate.
                Returns 1 when it parsed."""
                try:
                    parsed = parse(rec.value)
                except InvalidTelemetry as exc:
                    dead.append((position, rec, exc))
                    return 0
                full_positions.add(position)
                # Records without a key cannot be superseded: each is its own group.
                group = rec.key if rec.key is not None else -position
                seq = parsed.sequence
                current = best.get(group)
                # The newest: the highest sequence, then the latest in the poll (records
                # are taken out of order: changes once their envelopes are decoded).
                if current is None or (seq, position) > (current[0], current[1]):
                    best[group] = (seq, position, rec, parsed)
                return 1

            def take_change(position: int, rec: Any, change: _Change) -> None:
                """`take_in_full` for a change recognised by its bytes."""
                full_positions.add(position)
                current = best.get(rec.key)
                if current is None or (change.sequence, position) > (current[0], current[1]):
                    best[rec.key] = (change.sequence, position, rec, change)

            parsed_ok = 0
            position = 0  # (records before the run)
            next_yield = YIELD_EVERY_RECORDS
            #: The repeats (`repeats.skip_repeats`): the slots of the contents they
            #: repeat, and (compiled scan) their envelopes' sequences and times, or
            #: (interpreted) their records and envelope bytes, decoded below. (int64s as
            #: appended: no list of ints to convert.)
            repeat_sequences = array.array("q")
            repeat_times_ms = array.array("q")
            #: Repeats whose envelope is not the usual one (compiled scan): by index in
            #: their partition's records, and those partitions' positions before them.
            odd: list[int] = []
            odd_runs: list[tuple[int, int, list[Any]]] = []
            skip = _repeats.skip_repeats
            skip_rests = _repeats.skip_repeats_rests
            native_scan = _NATIVE_SCAN
            #: Changes recognised by their shape: (position, record, memory, where its
            #: node field and NodeReport begin), and their envelopes after the head.
            changes: list[tuple[int, Any, Content, int, int]] = []
            #: The poll's partitions and the position of each one's last record: records
            #: (aiokafka's own, `fetch.poll`) do not say which partition they are from.
            partition_ends: list[int] = []
            partition_of_run: list[TopicPartition] = []

            def partition_at(position: int) -> TopicPartition:
                """The partition of the poll's record at `position` (1-based)."""
                return partition_of_run[bisect.bisect_left(partition_ends, position)]

            change_rests: list[bytes] = []
            for tp, records in batches.items():
                before = position  # (records of the poll before this partition's)
                for start in range(0, len(records), YIELD_EVERY_RECORDS):
                    if position >= next_yield:
                        # A large poll is ~0.1 s of CPU: let RPCs in between.
                        next_yield = position + YIELD_EVERY_RECORDS
                        await asyncio.sleep(0)
                    end = min(len(records), start + YIELD_EVERY_RECORDS)
                    i = start
                    while True:
                        # The node's last applied content, repeated (a periodic report):
                        # only the envelope is new. The scan goes on while records are
                        # that, and stops at the first that is not (handled here).
                        if native_scan:
                            odd_before = len(odd)
                            i = skip(records, i, end, contents, best, repeat_slots,
                                     repeat_sequences, repeat_times_ms, odd)  # fmt: skip
                            if len(odd) > odd_before:
                                odd_runs.append((len(odd), before, records))
                        else:
                            i = skip_rests(
                                records, i, end, contents, best, repeat_slots, rests, candidates
                            )
                        if i >= end:
                            break
                        rec = records[i]
                        at = before + i + 1
                        i += 1
                        memo = contents.get(rec.key)  # (None for a key None)
                        if (
                            memo is not None
                            and memo.spec is not None
                            and (value := rec.value) is not None
                            and value.startswith(memo.head)
                        ):
                            # The content with other pods (most changes), GPUs or fields?
                            # (`_change_of`, once its envelope is decoded with the others',
                            # below.) Until then its key is taken: a repeat of it after it
                            # is none.
                            tag, node_at = node_field_at(value, memo.head_len)
                            if tag >= 0:
                                changes.append((at, rec, memo, tag, node_at))
                                change_rests.append(value[memo.head_len : tag])
                                if rec.key not in best:
                                    best[rec.key] = _TAKEN
                                continue
                        parsed_ok += take_in_full(at, rec)
                    position += end - start
                if records:
                    offsets[tp] = records[-1].offset + 1
                    partition_ends.append(position)
                    partition_of_run.append(tp)
            if changes:
                sequences, times, decoded = decode_envelope_rests(change_rests)
                for (pos, rec, memo, tag, node_at), seq, ms, ok in zip(
                    changes, sequences.tolist(), times.tolist(), decoded.tolist(), strict=True
                ):
                    change = _change_of(rec.value, memo, seq, ms, tag, node_at) if ok else None
                    if change is not None:
                        take_change(pos, rec, change)
                        parsed_ok += 1
                    else:
                        parsed_ok += take_in_full(pos, rec)
                for _, rec, _, _, _ in changes:
                    if best.get(rec.key) is _TAKEN:  # (none of its records parsed)
                        del best[rec.key]
            slots = np.frombuffer(repeat_slots, np.int64)
            if native_scan:
                # Not the usual envelope (or a bad one): the full path decides.
                done = 0
                for upto, before, records in odd_runs:
                    for i in odd[done:upto]:
                        parsed_ok += take_in_full(before + i + 1, records[i])
                    done = upto
                sequences = np.frombuffer(repeat_sequences, np.int64)
                times = np.frombuffer(repeat_times_ms, np.int64)
            elif rests:
                sequences, times, decoded = decode_envelope_rests(rests)
                if not decoded.all():
                    # Not the usual envelope (or a bad one): the full path decides.
                    position_of = {
                        id(rec): at for at, rec in enumerate(itertools.chain(*batches.values()), 1)
                    }
                    for i in np.flatnonzero(~decoded).tolist():
                        rec = candidates[i]
                        parsed_ok += take_in_full(position_of[id(rec)], rec)
                    slots, sequences, times = slots[decoded], sequences[decoded], times[decoded]
            if len(slots):
                # The sequence gate of every repeat at once (`SequenceColumn`).
                admitted = self._column.admit(slots, sequences)
                unchanged = int(np.count_nonzero(admitted))
                unchanged_duplicates = len(slots) - unchanged
                if unchanged:
                    updates.append(
                        NodeHeartbeats(
                            self._slot_space,
                            slots[admitted],
                            sequences[admitted],
                            times[admitted] / 1000.0,
                        )
                    )
            fallback: dict[object, list[tuple[int, int, Any, Any]]] | None = None
            rejected = 0
            column = self._column
            for group, newest in best.items():
                candidate: tuple[int, int, Any, Any] | None = newest
                while candidate is not None:
                    seq, pos, rec, parsed = candidate
                    try:
                        update, layout = self._convert(rec, parsed)
                    except InvalidTelemetry as exc:
                        # The newest is invalid: dead-letter it and try the next newest
                        # (rare: the poll is indexed by key only when it happens).
                        dead.append((pos, rec, exc))
                        rejected += pos in full_positions
                        if fallback is None:
                            fallback = _index_by_key(batches)
                        candidate = _next_newest(fallback.get(group, []), (seq, pos))
                        continue
                    if type(parsed) is _Change:
                        # A remembered node: its gate cell is the one its memory's slot
                        # holds (see `_remember_contents`), gated there without a lookup.
                        ok = column.admit_at(parsed.memo.slot, seq)
                    else:
                        memo = contents.get(rec.key) if rec.key is not None else None
                        if memo is not None:
                            # The gate looks at the node's cell: repeats moved its column.
                            column.flush(memo.slot)
                        ok = self._gate.admit(update)
                    if ok:
                        chosen.append((pos, update, rec.key, layout, partition_at(pos).partition))
                        assert not isinstance(update, NodeHeartbeats)  # (records are no batch)
                        self._seen_clusters.add(update.cluster)
                    elif pos in full_positions:
                        # (A fallback to a repeat applied above is no new outcome.)
                        duplicates += 1
                    break
            superseded = max(0, parsed_ok - len(chosen) - duplicates - rejected)
            duplicates += unchanged_duplicates
        chosen.sort(key=lambda item: item[0])
        # Unchanged reports first: a key with a full record in this poll took no unchanged
        # report after it (see above), so every unchanged report is older than its key's
        # full records here and applying them first keeps each node's order.
        updates += [u for _, u, _, _, _ in chosen]
        if self._inventory_chunks:  # (an agent's resync: rare, off the common path)
            updates = self._assemble_inventories(updates)
        # The applied contents' slots, for their repeats from the next poll on.
        updates += self._remember_contents(chosen)
        dead.sort(key=lambda item: item[0])
        if self.ready.is_set():
            # After the initial sync, a cluster's first records make it synced at once.
            updates += self._synced_markers()
        if dead:
            located = [(_DeadRecord.of(partition_at(pos), rec), e) for pos, rec, e in dead]
            # Round trips to the broker, with retries while it is out: the collector runs.
            with collector.running():
                fresh = await self._not_yet_dead_lettered(consumer, located)
                if fresh:
                    await self._dead_letter(producer, fresh)
        if updates:
            await self.sink.apply(updates)
        if self._applied_inventories:
            self._forget_unlisted()
        self._next_offset.update(offsets)
        self._record_metrics(
            consumer,
            applied=len(chosen),
            unchanged=unchanged,
            duplicates=duplicates,
            superseded=superseded,
            dead=len(dead),
        )
        return offsets, sum(len(r) for r in batches.values())

    async def _commit_and_count(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int], n_records: int
    ) -> None:
        """Commit an applied poll's offsets, then count its records as handled."""
        if self._settled is not None:
            await self._settled()  # (a sink that applies later: `kafka_workers`)
        await self._commit(consumer, offsets)
        async with self.progress:
            self.records_handled += n_records
            self.progress.notify_all()
        if self.on_handled is not None:
            self.on_handled(n_records, offsets)

    async def _settle_commit(self) -> None:
        """Wait for the previous poll's commit (its errors are raised here)."""
        committing, self._committing = self._committing, None
        if committing is not None:
            await committing

    async def _abandon_commit(self) -> None:
        """Stopping: cancel a commit still in flight (as a cancelled poll's would be; its
        records are redelivered and dropped by sequence)."""
        committing, self._committing = self._committing, None
        if committing is None:
            return
        committing.cancel()
        await asyncio.wait({committing})
        if not committing.cancelled() and committing.exception() is not None:
            log.warning("kafka: last commit failed while stopping: %r", committing.exception())

    def _convert(self, rec: Any, parsed: Any) -> tuple[Update, _Layout]:
        """A parsed record (or a `_Change`) as an update (InvalidTelemetry if invalid), and
        for a node report what is known of its bytes' layout. A change recognised by its
        bytes is the node's last applied update with the new part converted and validated
        (`codec.with_pods`, `with_gpus`, `with_spec`): of new pods, only those not in that
        update are parsed, the others are its values again."""
        if type(parsed) is _Change:
            memo = parsed.memo
            sequence = parsed.sequence
            observed_s = parsed.observed_unix_ms / 1000.0
            value = rec.value
            token = value[parsed.tag :]
            if parsed.kind == _PODS:
                pods = pods_from_fields(
                    parsed.fields, memo.known_pods(), memo.cluster, memo.name, sequence
                )
                change = with_pods(memo.update, pods, sequence, observed_s, token)
                return change, (memo.spec, memo.gpus_at, parsed.fields, memo.gpu_fields)
            # (The pods are the remembered ones, and so are their bytes.)
            spec = value[parsed.node_at : parsed.spec_end]
            if parsed.kind == _GPUS:
                gpus, in_order = gpus_from_fields(parsed.fields, memo.known_gpus(), memo.name)
                change = with_gpus(memo.update, gpus, sequence, observed_s, token)
                fields = parsed.fields if in_order else None
                return change, (spec, memo.gpus_at, memo.pod_fields, fields)
            assert parsed.node is not None
            change = with_spec(
                rec.key, memo.update, parsed.node, sequence, parsed.observed_unix_ms, token
            )
            layout = (spec, parsed.end - parsed.node_at, memo.pod_fields, memo.gpu_fields)
            return change, layout
        token = _content_token(rec, parsed)
        if not token:
            update = to_update(rec.key, parsed)
            if isinstance(update, NodeInventoryChunk):
                self._inventory_chunks += 1
            return update, _UNKNOWN_LAYOUT
        update = to_update(rec.key, parsed, content_token=token)
        at = node_offset_in_tail(token)
        start = pods_start(token[at:], parsed)
        if start < 0:
            return update, _UNKNOWN_LAYOUT
        spec = token[at : at + start]
        gpus_at = gpus_start(spec, parsed)
        aligned = None
        if gpus_at >= 0 and isinstance(update, NodeUpdate):
            indices = [d.index for d in update.gpus]
            if indices == [g.index for g in parsed.node.gpus]:  # (not sorted: aligned)
                aligned = _SPLIT_LATER
        return update, (spec, gpus_at, None, aligned)

    def _remember_contents(
        self, chosen: list[tuple[int, Update, bytes | None, _Layout, int]]
    ) -> list[HeartbeatSlots]:
        """Each node's content about to be applied, so that repeats of it take the unchanged
        path (`codec.decode_envelope_rests`) and changes of its pods, GPUs or fields the
        short one (`_change_of`); a removed node's is forgotten. Returns the slot bindings
        that tell the sink which node each new content's `NodeHeartbeats` entries refresh
        (a node keeps its slot across changes: it is bound again, to the new content)."""
        contents = self._contents
        column = self._column
        cell_of = self._gate.cell
        heads: dict[str, bytes] = {}
        bindings: dict[str, tuple[list[int], list[str], list[bytes]]] = {}
        for _, update, key, layout, partition in chosen:
            if key is None:
                continue
            if type(update) is NodeUpdate:
                old = contents.get(key)
                tail = update.content_token
            elif isinstance(update, NodeUpdate | NodeRemoved):
                old = contents.get(key)
                tail = update.content_token if isinstance(update, NodeUpdate) else b""
            else:
                continue
            if old is not None and tail:
                # The same key: the same cluster and node, whose gate cell the column
                # holds at the slot (the gate keeps a subject's cell while it is not
                # removed, and a removed node is forgotten here at once).
                assert isinstance(update, NodeUpdate)
                slot = old.slot
                column.refresh(slot)
                old.replace(tail, update, layout)
                old.partition = partition
                cluster = update.cluster
            else:
                cell = None
                if tail:
                    cell = cell_of((update.cluster, "node", update.name))
                if cell is None:  # (removed, or sequence 0: unordered, never a repeat)
                    if old is not None:
                        del contents[key]
                        column.release(old.slot)
                    continue
                assert isinstance(update, NodeUpdate)
                cluster = update.cluster
                head = heads.get(cluster)
                if head is None:
                    head = heads[cluster] = envelope_head(cluster)
                slot = column.add(cell)
                contents[key] = _repeats.Content(
                    cluster, update.name, slot, head, tail, update, layout, partition
                )
            bound = bindings.get(cluster)
            if bound is None:
                bound = bindings[cluster] = ([], [], [])
            slots, names, tokens = bound
            slots.append(slot)
            names.append(update.name)
            tokens.append(tail)
        return [
            HeartbeatSlots(self._slot_space, cluster, tuple(slots), tuple(names), tuple(tokens))
            for cluster, (slots, names, tokens) in bindings.items()
        ]

    def _assemble_inventories(self, updates: list[Update]) -> list[Update]:
        """Replace a poll's node-inventory chunks by the inventories they complete (at the
        place of the completing chunk); incomplete ones wait for their other chunks."""
        self._inventory_chunks = 0
        out: list[Update] = []
        for update in updates:
            if not isinstance(update, NodeInventoryChunk):
                out.append(update)
                continue
            inventory = self._inventories.add(update)
            if inventory is not None:
                out.append(inventory)
                self._applied_inventories.append(inventory)
        return out

    def _forget_unlisted(self) -> None:
        """After apply: the nodes an inventory removed (not listed, last sequence below it)
        leave the gate (a tombstone at the inventory's sequence, so their older records
        are dropped) and the memory of their content, as a NodeDeleted would. Decided on
        this source's gate, which has seen the whole poll: a node that reported after the
        inventory anywhere in it stays."""
        inventories, self._applied_inventories = self._applied_inventories, []
        # The gate reads the cells next: write back what repeats moved in their column.
        self._column.flush_all()
        for inventory in inventories:
            gone = self._gate.retire_unlisted(
                inventory.cluster, "node", inventory.names, inventory.sequence
            )
            for name in gone:
                memo = self._contents.pop(node_key(inventory.cluster, name), None)
                if memo is not None:
                    self._column.release(memo.slot)
            if gone:
                log.info("kafka: node inventory of %s at sequence %d: %d node(s) not listed "
                         "removed: %s", inventory.cluster, inventory.sequence, len(gone),
                         ", ".join(gone[:20]) + (" ..." if len(gone) > 20 else ""))  # fmt: skip
            if inventory.pools is not None:
                pools = self._gate.retire_unlisted(
                    inventory.cluster, "pool", inventory.pools, inventory.sequence
                )
                if pools:
                    log.info("kafka: node inventory of %s at sequence %d: node pool(s) not "
                             "listed removed: %s", inventory.cluster, inventory.sequence,
                             ", ".join(pools))  # fmt: skip

    async def _not_yet_dead_lettered(
        self, consumer: AIOKafkaConsumer, dead: list[tuple[Any, InvalidTelemetry]]
    ) -> list[tuple[Any, InvalidTelemetry]]:
        """The dead records no earlier run of fleetd dead-lettered: those at or above the
        group's committed offset of their partition when this source first met a dead one
        there. A starting fleetd reads every partition from its beginning (`_assigned`), and
        an offset is committed only after what is below it was applied and dead-lettered,
        so without this every restart sent the topic's old bad records to the dead-letter
        topic again, and counted them again (a `FleetdDeadLetters` ticket at every deploy)."""
        unknown = {TopicPartition(r.topic, r.partition) for r, _ in dead} - self._dlq_floor.keys()
        for tp in unknown:
            try:
                committed = await consumer.committed(tp)
            except KafkaError as err:  # (unknown: dead-letter, as before)
                log.warning("kafka: committed offset of %s unknown (%r)", tp, err)
                committed = None
            self._dlq_floor[tp] = committed or 0
        fresh = []
        for rec, why in dead:
            if rec.offset < self._dlq_floor[TopicPartition(rec.topic, rec.partition)]:
                log.debug("kafka: %s/%d/%d dead-lettered by an earlier run (%s)",
                          rec.topic, rec.partition, rec.offset, why.reason)  # fmt: skip
                continue
            fresh.append((rec, why))
        return fresh

    async def _dead_letter(
        self, producer: AIOKafkaProducer, dead: list[tuple[Any, InvalidTelemetry]]
    ) -> None:
        """Publish every dead record and wait for the broker's acknowledgement: the offsets
        behind them are committed only afterwards, so none is lost on a crash."""
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        while True:
            try:
                futures = []
                for rec, exc in dead:
                    headers = [
                        (DLQ_REASON_HEADER, exc.reason.encode()),
                        (DLQ_DETAIL_HEADER, exc.detail.encode()[:1024]),
                        (DLQ_ORIGIN_HEADER, f"{rec.topic}/{rec.partition}/{rec.offset}".encode()),
                    ]
                    futures.append(
                        await producer.send(
                            self.settings.dead_letter_topic,
                            value=rec.value,
                            key=rec.key,
                            headers=headers,
                        )
                    )
                await asyncio.gather(*futures)
                break
            except KafkaError as err:
                delay = backoff.next_delay_s()
                log.warning("kafka: dead-letter publish failed (%s); retry in %.1fs", err, delay)
                await asyncio.sleep(delay)
        for rec, exc in dead:
            log.warning(
                "kafka: dead-lettered %s/%d/%d: %s",
                rec.topic, rec.partition, rec.offset, exc,
            )  # fmt: skip
            self.metrics.dead_letters.labels(reason=exc.reason).inc()

    async def _commit(
        self, consumer: AIOKafkaConsumer, offsets: Mapping[TopicPartition, int]
    ) -> None:
        if not offsets:
            return
        try:
            # aiokafka retries retriable errors (coordinator moving, broker restarting)
            # inside commit; what reaches us is final for this batch.
            await consumer.commit(dict(offsets))
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced: another member (or we, after rejoining) gets these
            # records again and the sequence gate drops what was applied already.
            log.warning("kafka: commit after rebalance not accepted: %s", exc)
        except KafkaError as exc:
            log.warning("kafka: commit failed (%s); the next commit covers it", exc)

    def _record_metrics(
        self,
        consumer: AIOKafkaConsumer,
        *,
        applied: int,
        unchanged: int,
        duplicates: int,
        superseded: int,
        dead: int,
    ) -> None:
        m = self.metrics
        for outcome, n in (
            ("applied", applied),
            ("unchanged", unchanged),
            ("duplicate", duplicates),
            ("superseded", superseded),
            ("dead_lettered", dead),
        ):
            if n > 0:
                m.telemetry_records.labels(outcome=outcome).inc(n)
        assigned = consumer.assignment()
        for tp, next_offset in self._next_offset.items():
            if tp not in assigned:
                # Revoked by a rebalance (aiokafka asserts on highwater of such a partition).
                continue
            highwater = consumer.highwater(tp)
            if highwater is not None:
                m.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    max(0, highwater - next_offset)
                )

    def _assigned(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        """Partitions were (re)assigned: read each from this process's own position in it,
        not from the group's committed offset.

        The fleet state lives in this process, so a fresh process (a restarted daemon) holds
        nothing: it reads every partition from its beginning (offset 0, i.e. the earliest
        kept, `auto_offset_reset`), as a Kafka Streams table restores from its changelog.
        Starting at the committed offsets instead, a restarted fleetd knew only the nodes
        that reported since its last commit and called itself synced. A consumer restarted
        in the same process (after a client error) goes on from the offsets this process
        applied, the state being the same. Committed offsets still follow every applied poll
        (the group's lag in Kafka's tools).

        fleetd needs every partition: an assignment of fewer (another consumer in the
        group, e.g. a second fleetd with the same `group_id`) would leave it a part of the
        fleet, so the source reports itself not current until it holds them all again.
        """
        for tp in assigned:
            consumer.seek(tp, self._next_offset.get(tp, 0))
        self._resync_end = None  # (`_probe`: caught up with the new assignment's ends)
        topic = self.settings.topic
        partitions = consumer.partitions_for_topic(topic) or set()
        held = {tp.partition for tp in assigned if tp.topic == topic}
        if self.settings.shared_group:
            # (The eager protocol revokes every partition before each assignment: what
            # went to another consumer is what was held before and is not now.)
            self.forget_partitions(self.held_partitions - held)
        self.held_partitions = held
        self._assigned_once = True
        if self.on_assigned is not None:
            self.on_assigned(held, set(partitions))
        missing = sorted(set(partitions) - held)
        if missing and not self.settings.shared_group:
            self.group_conflict = (
                f"consumer group {self.settings.group_id!r} is shared: partitions "
                f"{', '.join(map(str, missing))} of {topic} ({len(missing)} of "
                f"{len(partitions)}) went to another consumer; every fleetd needs a "
                f"group_id of its own"
            )
            log.error("kafka: %s", self.group_conflict)
            self._connection(False, self.group_conflict)
        elif self.group_conflict:
            log.info("kafka: every partition of %s is assigned again", topic)
            self.group_conflict = ""

    def forget_partitions(self, partitions: set[int]) -> None:
        """Forget the remembered content of the nodes whose records come from `partitions`
        (revoked from this consumer of a shared group, `kafka_workers`): another consumer
        applies their changes from now on, so what this one remembers goes stale, and a
        record repeating it would be taken for a repeat of what the sink no longer has
        (refused there: the node would not be refreshed). Should the partitions come back,
        each node's next record is decoded in full."""
        if not partitions:
            return
        stale = [key for key, memo in self._contents.items() if memo.partition in partitions]
        for key in stale:
            self._column.release(self._contents.pop(key).slot)

    def applied_elsewhere(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Records below `offsets` reached the sink through another consumer of it (a worker
        of the same daemon, `kafka_workers`): a later assignment of their partitions starts
        there, not at the beginning."""
        for tp, offset in offsets.items():
            if offset > self._next_offset.get(tp, 0):
                self._next_offset[tp] = offset

    async def _check_initial_sync(self, consumer: AIOKafkaConsumer) -> None:
        assignment = consumer.assignment()
        if not assignment and self.settings.shared_group and self._assigned_once:
            # (More consumers than partitions: this one has nothing to read.)
            if self.on_progress is not None:
                self.on_progress("")
            self.ready.set()
            return
        if not assignment or self.group_conflict:
            return
        if self._initial_end is None or set(self._initial_end) != assignment:
            self._initial_end = await consumer.end_offsets(list(assignment))
        behind = 0
        for tp, end in self._initial_end.items():
            behind += max(0, end - await consumer.position(tp))
        self.behind_records = behind
        if self.on_progress is not None:
            self.on_progress(f"{behind:,} records to read" if behind else "")
        if behind:
            return
        missing = self.settings.required_clusters - self._seen_clusters
        if missing:
            return
        log.info("kafka: initial sync done (%d partitions, clusters %s; %d nodes silent for "
                 "longer than %ss applied stale)", len(assignment),
                 ", ".join(sorted(self._seen_clusters)), self._replayed_stale,
                 self.settings.replay_max_age_s)  # fmt: skip
        markers = self._synced_markers()
        if markers:
            await self.sink.apply(markers)
        self.ready.set()

    def _synced_markers(self) -> list[Update]:
        fresh = sorted(self._seen_clusters - self._synced_clusters)
        self._synced_clusters.update(fresh)
        return [ClusterSynced(cluster=c, source=SOURCE) for c in fresh]

    async def _connect_failed(self, cause: str) -> None:
        self.last_connect_error = cause
        self.connect_failures += 1
        async with self.progress:
            self.progress.notify_all()

    async def wait_connect_failures(self, count: int) -> None:
        """Wait until at least `count` connection attempts failed (tests)."""
        async with self.progress:
            await self.progress.wait_for(lambda: self.connect_failures >= count)

    async def wait_handled(self, count: int) -> None:
        """Wait until at least `count` records were handled (tests, benchmarks)."""
        async with self.progress:
            await self.progress.wait_for(lambda: self.records_handled >= count)


class _Positions(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands a consumer's assigned partitions to `KafkaSource._assigned`."""

    def __init__(self, source: KafkaSource, consumer: AIOKafkaConsumer) -> None:
        self._source = source
        self._consumer = consumer

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Nothing to save: offsets are committed after each applied poll."""

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """See `KafkaSource._assigned`."""
        self._source._assigned(self._consumer, assigned)


def _index_by_key(
    batches: Mapping[TopicPartition, list[Any]],
) -> dict[object, list[tuple[int, int, Any, Any]]]:
    """Every parseable record of a poll by key, with its sequence and position."""
    index: dict[object, list[tuple[int, int, Any, Any]]] = {}
    position = 0
    for records in batches.values():
        for rec in records:
            position += 1
            try:
                parsed = parse(rec.value)
            except InvalidTelemetry:
                continue
            group = rec.key if rec.key is not None else -position
            index.setdefault(group, []).append((parsed.sequence, position, rec, parsed))
    return index


def _next_newest(
    candidates: list[tuple[int, int, Any, Any]], below: tuple[int, int]
) -> tuple[int, int, Any, Any] | None:
    """The newest candidate older than `below` (sequence, position), by sequence, then
    position; None if there is none. (`below` need not be among the candidates: a pods-only
    change taken by its bytes may not parse as a whole.)"""
    older = [c for c in candidates if (c[0], c[1]) < below]
    return max(older, key=lambda c: (c[0], c[1])) if older else None


async def _stop_quietly(*clients: AIOKafkaConsumer | AIOKafkaProducer) -> None:
    for client in clients:
        with contextlib.suppress(Exception):
            await client.stop()


def settings_from_config(config: Any) -> KafkaSourceSettings:
    """KafkaSourceSettings from fleetd's `sources.kafka` config section."""
    return KafkaSourceSettings(
        bootstrap_servers=config.bootstrap_servers,
        topic=config.topic,
        dead_letter_topic=config.dead_letter_topic,
        group_id=config.group_id,
        required_clusters=frozenset(config.clusters),
        # (A partial, not a lambda: the settings pickle, for `kafka_workers`' processes.)
        security_loader=functools.partial(security_from_config, config.security),
        sequence_tombstone_ttl_s=config.sequence_tombstone_ttl_s,
    )


def build(config: Any, state: Any, daemon_metrics: Any) -> Callable[[], Awaitable[None]]:
    """The daemon's hook: a Kafka source feeding `state`; returns its `run` coroutine function.

    Readiness waits for `ClusterSynced(cluster, "kafka")` of every configured cluster, or,
    with no cluster listed, for the consumer's initial catch-up (`source.ready`).
    """
    settings = replace(
        settings_from_config(config),
        # (Read at start: a reload of the staleness bound applies from the next restart.)
        replay_max_age_s=state.config.staleness.node_stale_after_s,
    )
    for cluster in sorted(settings.required_clusters):
        state.expect_source(SOURCE, cluster)
    metrics = SourceMetrics.for_daemon(daemon_metrics)
    sink = StateSink(state, lambda kind: metrics.telemetry_records.labels("rejected").inc())
    source: KafkaSource | KafkaWorkers
    if config.workers:
        from fleetd.sources.kafka_workers import KafkaWorkers

        source = KafkaWorkers(
            settings,
            sink,
            workers=config.workers,
            metrics=metrics,
            logging_config=state.config.logging,
            on_restart=lambda: daemon_metrics.task_failures.labels("kafka-worker").inc(),
        )
    else:
        source = KafkaSource(settings, sink, metrics=metrics)
    source.on_connection = lambda ok, reason: state.source_connection(SOURCE, "", ok, reason)
    source.on_progress = lambda progress: state.source_progress(SOURCE, progress)
    if settings.required_clusters:
        return source.run
    state.expect_source_wide(SOURCE)

    async def run() -> None:
        async def synced() -> None:
            await source.ready.wait()
            state.source_synced(SOURCE)

        marker = asyncio.ensure_future(synced())
        try:
            await source.run()
        finally:
            marker.cancel()

    return run
