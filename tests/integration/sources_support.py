"""Helpers of the source integration tests: a recording sink, running a source as a task,
reading the dead-letter topic, and restarting the session's Kafka broker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from fleetd import config
from fleetd.daemon import Daemon
from fleetd.loadgen import node_records, synthetic_fleet
from fleetd.sources.codec import decode, encode_node, node_key
from fleetd.sources.kafka import KafkaSourceSettings
from fleetd.sources.memory import FleetView
from fleetd.sources.updates import GpuDevice, NodeUpdate, PodObserved, Resources, Update
from fleetd.v1 import fleet_pb2_grpc, nodepools_pb2_grpc, placement_pb2_grpc, types_pb2

AWAIT_S = 60.0


def unique(prefix: str) -> str:
    """A name no other test of the session uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def kafka_section(
    bootstrap: str, topic: str, clusters: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    """The daemon config's `sources.kafka` for `topic` (its dead letters on `<topic>.dlq`,
    a group of its own), waiting for `clusters` (none: any) to be synced; `extra` keys on
    top."""
    section: dict[str, Any] = {
        "enabled": True,
        "bootstrap_servers": bootstrap,
        "topic": topic,
        "dead_letter_topic": f"{topic}.dlq",
        "group_id": unique("fleetd"),
    }
    if clusters is not None:
        section["clusters"] = clusters
    return {**section, **extra}


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


def fleet_records(
    n_nodes: int, n_records: int, seed: int = 1, first_sequence: int = 1
) -> list[tuple[bytes, bytes]]:
    """`n_records` node reports of a synthetic fleet of `n_nodes` nodes in 2 clusters."""
    rng = np.random.default_rng(seed)
    fleet = synthetic_fleet(rng, clusters=2, nodes_per_cluster=n_nodes // 2)
    return list(node_records(fleet, n_records, rng, first_sequence=first_sequence))


def kafka_settings(bootstrap: str, topic: str, **kw: Any) -> KafkaSourceSettings:
    """A Kafka source's settings for `topic` (dead letters on `<topic>.dlq`, a group of its
    own); `kw` on top."""
    return KafkaSourceSettings(
        bootstrap_servers=bootstrap,
        topic=topic,
        dead_letter_topic=f"{topic}.dlq",
        group_id=unique("fleetd"),
        **kw,
    )


def newest_sequences(records: list[tuple[bytes, bytes]]) -> dict[tuple[str, str], int]:
    """(cluster, node) -> the highest sequence among node-report `records`."""
    newest: dict[tuple[str, str], int] = {}
    for key, value in records:
        u = decode(key, value)
        assert isinstance(u, NodeUpdate)
        newest[(u.cluster, u.name)] = max(u.sequence, newest.get((u.cluster, u.name), 0))
    return newest


async def produce_at(
    bootstrap: str, topic: str, records: list[tuple[bytes, bytes]], timestamp_ms: int
) -> None:
    """Publish records with the given Kafka timestamp (CreateTime: an agent's clock)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        sent = [
            await producer.send(topic, value=value, key=key, timestamp_ms=timestamp_ms)
            for key, value in records
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


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


class Client:
    """The stubs the daemon tests of this folder use, over one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.fleet = fleet_pb2_grpc.FleetStub(channel)
        self.placement = placement_pb2_grpc.PlacementStub(channel)
        self.pools = nodepools_pb2_grpc.NodePoolsStub(channel)


Start = Callable[..., Awaitable[tuple[Daemon, Client]]]


@contextlib.asynccontextmanager
async def daemon_starter(tmp_path: Path) -> AsyncIterator[Start]:
    """`start(**sections)`: a daemon on `sections` (no simulated fleet) with a client, once
    ready; every daemon started is stopped (and its channel closed) on exit."""
    started: list[tuple[Daemon, grpc.aio.Channel]] = []

    async def go(**sections: Any) -> tuple[Daemon, Client]:
        sections.setdefault("sources", {}).setdefault("simulated", {"enabled": False})
        data = {
            "server": {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
            "journal": {"path": str(tmp_path / "journal.sqlite3")},
            "logging": {"level": "WARNING"},
            **sections,
        }
        path = tmp_path / "fleetd.yaml"
        path.write_text(yaml.safe_dump(data))
        daemon = Daemon(config.load(path), path)
        await daemon.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{daemon.grpc_port}")
        started.append((daemon, channel))
        assert daemon.state is not None
        await asyncio.wait_for(daemon.state.ready_event.wait(), AWAIT_S)
        return daemon, Client(channel)

    try:
        yield go
    finally:
        for daemon, channel in started:
            await channel.close()
            await daemon.stop()


GIB = 1024**3
#: What a pod needs to run on the test bed's kwok nodes (they carry this taint).
KWOK_TOLERATION = types_pb2.Toleration(
    key="kwok.x-k8s.io/node", operator="Equal", value="fake", effect="NoSchedule"
)


def h100_report(
    cluster: str,
    name: str,
    seq: int,
    pods: tuple[PodObserved, ...] = (),
    *,
    observed_unix_ms: int = 1,
) -> tuple[bytes, bytes]:
    """(key, value) of a telemetry record: an 8 x H100 node of pool h100 in zone z1."""
    res = Resources(cpu_millicores=96_000, memory_bytes=768 * GIB, gpus=8, pods=110)
    node = NodeUpdate(
        cluster=cluster, name=name, sequence=seq, capacity=res, allocatable=res,
        node_pool="h100", zone="z1", gpu_model="H100",
        gpus=tuple(GpuDevice(i, "H100", 80 * GIB, True) for i in range(8)), pods=pods,
    )  # fmt: skip
    record = encode_node(node, sequence=seq, observed_unix_ms=observed_unix_ms)
    return node_key(cluster, name), record.SerializeToString()
