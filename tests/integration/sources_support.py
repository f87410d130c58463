"""Helpers of the source integration tests: a recording sink, running a source as a task,
reading the dead-letter topic, and restarting the session's Kafka broker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from fleetd.sources.memory import FleetView
from fleetd.sources.updates import NodeUpdate, Update

AWAIT_S = 60.0


def unique(prefix: str) -> str:
    """A name no other test of the session uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class RecordingView(FleetView):
    """A FleetView that also keeps every applied update, and can hold the source up:
    while `hold` is set, `apply` blocks after `hold_after` updates (a slow state owner,
    so a broker can be restarted while a batch is applied but not committed)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[Update] = []
        self.hold_after: int | None = None
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def apply(self, updates: Sequence[Update]) -> None:
        self.log.extend(updates)
        await super().apply(updates)
        if self.hold_after is not None and len(self.log) >= self.hold_after:
            self.hold_after = None
            self.holding.set()
            await self.release.wait()

    def node_sequences(self) -> list[tuple[str, str, int]]:
        """(cluster, node, sequence) of every applied NodeUpdate, in order."""
        return [(u.cluster, u.name, u.sequence) for u in self.log if isinstance(u, NodeUpdate)]


@contextlib.asynccontextmanager
async def running(run: Callable[[], Awaitable[None]]) -> AsyncIterator[asyncio.Task[None]]:
    """Run a source's `run()` as a task for the block; cancel and await it afterwards.

    A source that dies inside the block fails the test with its exception.
    """
    task = asyncio.ensure_future(run())
    try:
        yield task
        if task.done():
            task.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def create_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    """Create a topic with `partitions` partitions (one replica)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()


async def read_topic(bootstrap: str, topic: str, count: int) -> list[Any]:
    """The first `count` records of `topic` (all partitions), waiting for them to arrive."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=unique("reader"),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(AWAIT_S):
            while len(records) < count:
                batch = await consumer.getmany(timeout_ms=500)
                for recs in batch.values():
                    records.extend(recs)
    finally:
        await consumer.stop()
    return records


async def committed_offsets(bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """partition -> committed offset of `group` on `topic` (-1 when none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic}
