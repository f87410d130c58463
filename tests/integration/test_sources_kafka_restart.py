"""Where the Kafka source reads from, against the real broker: a restarted fleetd (a fresh
state, the same consumer group) reads every partition from its beginning, taking nodes
silent for too long as stale; a group shared with another consumer is reported instead of
leaving fleetd a part of the fleet."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from fleetd.loadgen import malformed_records, node_records, produce, synthetic_fleet
from fleetd.sources.kafka import DLQ_ORIGIN_HEADER, KafkaSource
from fleetd.sources.metrics import SourceMetrics
from fleetd.sources.updates import NodeStale
from tests.integration.sources_support import (
    AWAIT_S,
    RecordingView,
    committed_offsets,
    create_topic,
    fleet_records,
    kafka_settings,
    newest_sequences,
    produce_at,
    read_topic,
    running,
    unique,
)

pytestmark = pytest.mark.testbed


def _held(view: RecordingView) -> dict[tuple[str, str], int | None]:
    """(cluster, node) -> the last sequence applied (content or unchanged report)."""
    return {key: view.sequence(*key) for key in view.nodes}


class _Connection:
    """Records a source's `on_connection` reports; tests await the next one."""

    def __init__(self, source: KafkaSource) -> None:
        self.reports: list[tuple[bool, str]] = []
        self._changed = asyncio.Event()
        source.on_connection = self._report

    def _report(self, ok: bool, reason: str) -> None:
        self.reports.append((ok, reason))
        self._changed.set()

    async def wait(self, ok: bool) -> str:
        """Wait for the current report to be `ok`; returns its reason."""
        async with asyncio.timeout(AWAIT_S):
            while not (self.reports and self.reports[-1][0] == ok):
                self._changed.clear()
                await self._changed.wait()
        return self.reports[-1][1]


async def test_a_restarted_fleetd_reads_every_partition_from_the_beginning(
    kafka_bootstrap: str,
) -> None:
    topic = unique("telemetry-restart")
    await create_topic(kafka_bootstrap, topic)
    rng = np.random.default_rng(3)
    fleet = synthetic_fleet(rng, clusters=2, nodes_per_cluster=15)
    records = list(node_records(fleet, 60, rng))
    await produce(kafka_bootstrap, topic, records)
    settings = kafka_settings(kafka_bootstrap, topic)
    first = RecordingView()
    source = KafkaSource(settings, first)
    async with running(source.run):
        await source.wait_handled(len(records))
    assert _held(first) == newest_sequences(records)
    assert sum((await committed_offsets(kafka_bootstrap, topic, settings.group_id)).values()) == 60
    # The daemon restarts: a fresh state, the same group, whose offsets are at the end. One
    # node reports once more meanwhile.
    later = list(node_records(fleet, 1, rng, first_sequence=10**12))
    await produce(kafka_bootstrap, topic, later)
    restarted = RecordingView()
    source = KafkaSource(settings, restarted)
    async with running(source.run):
        await asyncio.wait_for(source.ready.wait(), AWAIT_S)
        # Ready means every node is back, not only the one that reported since.
        assert _held(restarted) == newest_sequences(records + later)
        await source.wait_handled(len(records) + len(later))
    # Nothing was applied twice on the way.
    sequences = restarted.node_sequences()
    assert len(sequences) == len(set(sequences))


async def test_a_restarted_fleetd_does_not_dead_letter_old_records_again(
    kafka_bootstrap: str,
) -> None:
    topic = unique("telemetry-restart-dlq")
    await create_topic(kafka_bootstrap, topic, partitions=1)
    good = fleet_records(n_nodes=4, n_records=8)
    bad = [(k, v) for k, v, _ in malformed_records()]
    await produce(kafka_bootstrap, topic, good[:4] + bad + good[4:])
    settings = kafka_settings(kafka_bootstrap, topic)
    metrics = SourceMetrics()
    source = KafkaSource(settings, RecordingView(), metrics=metrics)
    async with running(source.run):
        await source.wait_handled(len(good) + len(bad))
    assert len(await read_topic(kafka_bootstrap, f"{topic}.dlq", len(bad))) == len(bad)
    # Restarted (a fresh source, the same group): it reads everything again, and dead-letters
    # only what arrived since (one more bad record), counting only that one.
    await produce(kafka_bootstrap, topic, bad[:1])
    metrics = SourceMetrics()
    source = KafkaSource(settings, RecordingView(), metrics=metrics)
    async with running(source.run):
        await source.wait_handled(len(good) + len(bad) + 1)
    dead = await read_topic(kafka_bootstrap, f"{topic}.dlq", len(bad) + 1)
    assert len(dead) == len(bad) + 1
    origins = [dict(r.headers)[DLQ_ORIGIN_HEADER].decode() for r in dead]
    assert len(set(origins)) == len(origins)  # (each bad record once)
    assert sum(c._value.get() for c in metrics.dead_letters._metrics.values()) == 1


async def test_a_group_shared_with_another_consumer_is_reported_until_it_is_not(
    kafka_bootstrap: str,
) -> None:
    topic = unique("telemetry-shared")
    await create_topic(kafka_bootstrap, topic, partitions=3)
    rng = np.random.default_rng(4)
    fleet = synthetic_fleet(rng, clusters=1, nodes_per_cluster=30)
    records = list(node_records(fleet, 30, rng))
    await produce(kafka_bootstrap, topic, records)
    settings = kafka_settings(kafka_bootstrap, topic)
    view = RecordingView()
    source = KafkaSource(settings, view)
    connection = _Connection(source)
    async with running(source.run):
        await asyncio.wait_for(source.ready.wait(), AWAIT_S)
        await source.wait_handled(len(records))
        # A second consumer joins the group (a second fleetd with the same group_id): the
        # partitions are split, so the first says it is not current, and why.
        other_view = RecordingView()
        other = KafkaSource(settings, other_view)
        async with running(other.run):
            reason = await connection.wait(ok=False)
            assert f"consumer group {settings.group_id!r} is shared" in reason
            assert "every fleetd needs a group_id of its own" in reason
            assert source.group_conflict == reason
            # Reports made meanwhile land (partly) on the partitions the other one holds.
            meanwhile = list(node_records(fleet, 30, rng, first_sequence=10**12))
            await produce(kafka_bootstrap, topic, meanwhile)
            await other.wait_handled(1)
            assert not other.ready.is_set()  # (shared from its start: never synced)
        # The other consumer left: every partition is the first's again, read on from where
        # it had applied them, so it is current with the whole fleet.
        assert await connection.wait(ok=True) == ""
        assert source.group_conflict == ""
        await view.wait_for(lambda: _held(view) == newest_sequences(records + meanwhile), AWAIT_S)


async def test_nodes_silent_for_longer_than_the_staleness_bound_are_replayed_stale(
    kafka_bootstrap: str,
) -> None:
    topic = unique("telemetry-aged")
    await create_topic(kafka_bootstrap, topic)
    rng = np.random.default_rng(5)
    fleet = synthetic_fleet(rng, clusters=2, nodes_per_cluster=6)
    gone = [u for u in fleet if u.cluster == "cluster-0"]  # (its agent went an hour ago)
    live = [u for u in fleet if u.cluster == "cluster-1"]
    hour_ago_ms = int((time.time() - 3600) * 1000)
    old = list(node_records(gone, 12, rng))
    await produce_at(kafka_bootstrap, topic, old, hour_ago_ms)
    recent = list(node_records(live, 12, rng, first_sequence=100))
    await produce(kafka_bootstrap, topic, recent)
    view = RecordingView()
    source = KafkaSource(kafka_settings(kafka_bootstrap, topic, replay_max_age_s=120.0), view)
    async with running(source.run):
        await asyncio.wait_for(source.ready.wait(), AWAIT_S)
        # Every node is known; those whose last report is an hour old are stale.
        assert _held(view) == newest_sequences(old + recent)
        assert view.stale == {(u.cluster, u.name) for u in gone}
        # A report published after the start is news whatever its timestamp says (an
        # agent whose clock runs an hour late): not judged.
        late_clock = list(node_records(gone[:1], 1, rng, first_sequence=10**12))
        await produce_at(kafka_bootstrap, topic, late_clock, hour_ago_ms)
        await view.wait_for(
            lambda: _held(view) == newest_sequences(old + recent + late_clock), AWAIT_S
        )
        marked = {(u.cluster, u.name) for u in view.log if isinstance(u, NodeStale)}
        assert marked == {(u.cluster, u.name) for u in gone}
