"""Kafka telemetry decoded in worker processes (`KafkaWorkers`, `sources.kafka.workers`)
against the real broker of the test bed: the same view as one in-process source, offsets
committed after apply, dead letters and metrics forwarded, readiness only once every worker
caught up, a killed worker replaced with nothing lost, a shared group reported."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaConsumer

from fleetd.loadgen import malformed_records, produce
from fleetd.sources.kafka_workers import KafkaWorkers
from fleetd.sources.metrics import SourceMetrics
from fleetd.sources.updates import ClusterSynced, NodeUpdate, SequenceGate, Update
from tests.integration.sources_support import (
    AWAIT_S,
    RecordingView,
    committed_offsets,
    create_topic,
    fleet_records,
    h100_report,
    kafka_settings,
    newest_sequences,
    read_topic,
    running,
    unique,
)
from tests.testbed.procs import async_wait_until

pytestmark = pytest.mark.testbed


class GatedView(RecordingView):
    """A RecordingView behind a sequence gate, as the daemon's state is: a record a worker
    sends again (it re-read a partition another worker had applied) is dropped there."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = SequenceGate()

    async def apply(self, updates: Sequence[Update]) -> None:
        await super().apply(
            [u for u in updates if not isinstance(u, NodeUpdate) or self.gate.admit(u)]
        )


def _count(metric: object, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())  # type: ignore[attr-defined]


async def test_workers_feed_one_view_commit_and_forward_metrics(kafka_bootstrap: str) -> None:
    topic = unique("workers")
    await create_topic(kafka_bootstrap, topic, partitions=4)
    records = fleet_records(n_nodes=40, n_records=200)
    bad = malformed_records()
    await produce(kafka_bootstrap, topic, records[:100])
    view = RecordingView()
    metrics = SourceMetrics()
    settings = kafka_settings(kafka_bootstrap, topic, required_clusters=frozenset({"cluster-1"}))
    workers = KafkaWorkers(settings, view, workers=2, metrics=metrics)
    progress: list[str] = []
    workers.on_progress = progress.append
    total = len(records) + len(bad)
    async with running(workers.run):
        await asyncio.wait_for(workers.ready.wait(), AWAIT_S)
        # (The rest once both workers hold their partitions: a worker that joins late takes
        # partitions over and may read some again, which would count records twice.)
        await produce(kafka_bootstrap, topic, [(k, v) for k, v, _ in bad] + records[100:])
        await workers.wait_handled(total)
    # Every node at its newest report, as one in-process source leaves it.
    newest = newest_sequences(records)
    assert {key: view.sequence(*key) for key in newest} == newest
    # Each partition committed to its end (after apply), by whichever worker held it.
    committed = await committed_offsets(kafka_bootstrap, topic, settings.group_id)
    assert sum(committed.values()) == total
    # The workers' counters are the daemon's: every record has one outcome.
    outcomes = ("applied", "unchanged", "duplicate", "superseded", "dead_lettered")
    assert sum(_count(metrics.telemetry_records, o) for o in outcomes) == total
    assert _count(metrics.telemetry_records, "dead_lettered") == len(bad)
    assert sum(_count(metrics.dead_letters, reason) for _, _, reason in bad) == len(bad)
    dead = await read_topic(kafka_bootstrap, f"{topic}.dlq", len(bad))
    assert len(dead) == len(bad)
    # One ClusterSynced per cluster however many workers saw it, once all of them synced.
    synced = [u for u in view.log if isinstance(u, ClusterSynced)]
    assert sorted(u.cluster for u in synced) == ["cluster-0", "cluster-1"]
    first_synced = view.log.index(synced[0])
    assert all(isinstance(u, ClusterSynced) for u in view.log[first_synced : first_synced + 2])
    assert progress[-1] == ""
    assert workers.restarts == 0


async def test_readiness_waits_for_a_required_cluster_and_every_worker(
    kafka_bootstrap: str,
) -> None:
    topic = unique("workers-ready")
    await create_topic(kafka_bootstrap, topic, partitions=3)
    records = fleet_records(n_nodes=6, n_records=12)
    await produce(kafka_bootstrap, topic, records)
    view = RecordingView()
    settings = kafka_settings(kafka_bootstrap, topic, required_clusters=frozenset({"late"}))
    # Three workers, three partitions; a fourth worker gets none and is synced at once.
    workers = KafkaWorkers(settings, view, workers=4)
    async with running(workers.run):
        await workers.wait_handled(len(records))
        assert not workers.ready.is_set()  # every worker caught up, but no "late" yet
        assert not [u for u in view.log if isinstance(u, ClusterSynced)]
        await produce(kafka_bootstrap, topic, [h100_report("late", "n0", 1)])
        await asyncio.wait_for(workers.ready.wait(), AWAIT_S)
    synced = sorted(u.cluster for u in view.log if isinstance(u, ClusterSynced))
    assert synced == ["cluster-0", "cluster-1", "late"]


async def test_a_killed_worker_is_replaced_and_nothing_is_lost(kafka_bootstrap: str) -> None:
    topic = unique("workers-kill")
    await create_topic(kafka_bootstrap, topic, partitions=2)
    first = fleet_records(n_nodes=20, n_records=60)
    await produce(kafka_bootstrap, topic, first)
    view = GatedView()
    restarts: list[int] = []
    workers = KafkaWorkers(
        kafka_settings(kafka_bootstrap, topic),
        view,
        workers=2,
        on_restart=lambda: restarts.append(1),
    )
    async with running(workers.run):
        await asyncio.wait_for(workers.ready.wait(), AWAIT_S)
        await workers.wait_handled(len(first))
        victim = workers._workers[0].process
        os.kill(victim.pid, signal.SIGKILL)

        async def restarted() -> bool:
            return workers.restarts == 1

        await async_wait_until("a worker restarted", restarted, timeout_s=AWAIT_S)
        second = fleet_records(n_nodes=20, n_records=40, seed=2, first_sequence=1000)
        await produce(kafka_bootstrap, topic, second)
        expected = newest_sequences(first + second)

        def caught_up() -> bool:
            return {key: view.sequence(*key) for key in expected} == expected

        await view.wait_for(caught_up, AWAIT_S)
    assert restarts == [1]
    # What the new worker read again (the records applied but not yet committed when its
    # predecessor died) the gate dropped, as the daemon's state does.
    applied = view.node_sequences()
    last: dict[tuple[str, str], int] = {}
    for cluster, name, seq in applied:
        assert seq > last.get((cluster, name), 0)
        last[(cluster, name)] = seq


async def test_a_group_shared_with_another_consumer_is_reported(kafka_bootstrap: str) -> None:
    topic = unique("workers-shared")
    await create_topic(kafka_bootstrap, topic, partitions=4)
    await produce(kafka_bootstrap, topic, fleet_records(n_nodes=8, n_records=8))
    view = RecordingView()
    settings = kafka_settings(kafka_bootstrap, topic)
    workers = KafkaWorkers(settings, view, workers=2)
    connection: list[tuple[bool, str]] = []
    workers.on_connection = lambda ok, reason: connection.append((ok, reason))
    async with running(workers.run):
        await asyncio.wait_for(workers.ready.wait(), AWAIT_S)

        async def conflict() -> bool:
            return bool(workers.group_conflict)

        async def resolved() -> bool:
            return not workers.group_conflict

        # The workers sharing the group with each other is no conflict.
        assert workers.group_conflict == ""
        intruder = AIOKafkaConsumer(
            topic, bootstrap_servers=kafka_bootstrap, group_id=settings.group_id
        )
        await intruder.start()
        try:
            await async_wait_until("the shared group reported", conflict, timeout_s=AWAIT_S)
            assert "is shared" in workers.group_conflict
            assert "none of this fleetd's 2 workers" in workers.group_conflict
            assert connection[-1] == (False, workers.group_conflict)
        finally:
            await intruder.stop()
        await async_wait_until("every partition the workers' again", resolved, timeout_s=AWAIT_S)
    assert connection[-1] == (True, "")


def test_settings_pickle_for_the_workers() -> None:
    """The daemon's settings (a security loader included) go to spawned processes."""
    import pickle

    from fleetd import config
    from fleetd.sources.kafka import settings_from_config

    settings = settings_from_config(config.KafkaSourceConfig())
    again = pickle.loads(pickle.dumps(settings))
    assert again.resolve_security() == settings.resolve_security()
