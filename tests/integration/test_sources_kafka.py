"""Kafka telemetry end to end against the real broker of the test bed."""

from __future__ import annotations

import asyncio

import pytest

from fleetd.loadgen import malformed_records, produce
from fleetd.sources.codec import decode
from fleetd.sources.kafka import DLQ_REASON_HEADER, KafkaSource
from fleetd.sources.metrics import SourceMetrics
from fleetd.sources.updates import ClusterSynced, NodeUpdate
from tests.integration.sources_support import (
    AWAIT_S,
    RecordingView,
    committed_offsets,
    create_topic,
    fleet_records,
    kafka_settings,
    newest_sequences,
    read_topic,
    running,
    unique,
)

pytestmark = pytest.mark.testbed


async def test_reports_reach_state_and_offsets_are_committed(kafka_bootstrap: str) -> None:
    topic = unique("telemetry")
    await create_topic(kafka_bootstrap, topic)
    records = fleet_records(n_nodes=20, n_records=60)
    await produce(kafka_bootstrap, topic, records)
    expected = {}
    for key, value in records:
        u = decode(key, value)
        assert isinstance(u, NodeUpdate)
        expected[(u.cluster, u.name)] = u
    view = RecordingView()
    settings = kafka_settings(kafka_bootstrap, topic, required_clusters=frozenset({"cluster-0"}))
    source = KafkaSource(settings, view)
    async with running(source.run):
        await view.wait_for(lambda: view.nodes == expected, AWAIT_S)
        await view.wait_for(lambda: ("kafka", "cluster-1") in view.synced, AWAIT_S)
        assert source.ready.is_set()
        await source.wait_handled(len(records))
    # Offsets are committed once the records are applied: up to the end of every partition
    # of the fresh topic, which together hold exactly the records produced.
    committed = await committed_offsets(kafka_bootstrap, topic, settings.group_id)
    assert sum(committed.values()) == len(records)
    # Pods travel with their node.
    some = next(u for u in expected.values() if u.pods)
    assert view.pods_on(some.cluster, some.name) == tuple(
        sorted(some.pods or (), key=lambda p: (p.namespace, p.name, p.uid))
    )
    synced = [u for u in view.log if isinstance(u, ClusterSynced)]
    assert sorted(u.cluster for u in synced) == ["cluster-0", "cluster-1"]


def _assert_applied_once_in_order(view: RecordingView) -> None:
    """No record applied twice, and every node's applied sequences only grow."""
    applied = view.node_sequences()
    assert len(applied) == len(set(applied))
    last: dict[tuple[str, str], int] = {}
    for cluster, name, seq in applied:
        assert seq > last.get((cluster, name), 0)
        last[(cluster, name)] = seq


async def test_redelivered_records_change_nothing(kafka_bootstrap: str) -> None:
    topic = unique("telemetry-dup")
    await create_topic(kafka_bootstrap, topic)
    records = fleet_records(n_nodes=10, n_records=30)
    # Everything twice, then the first third once more: redelivery and reordering.
    await produce(kafka_bootstrap, topic, records + records + records[:10])
    view = RecordingView()
    metrics = SourceMetrics()
    source = KafkaSource(kafka_settings(kafka_bootstrap, topic), view, metrics=metrics)
    async with running(source.run):
        await source.wait_handled(70)
    _assert_applied_once_in_order(view)
    assert {(u.cluster, u.name): u.sequence for u in view.nodes.values()} == newest_sequences(
        records
    )
    outcomes = metrics.telemetry_records
    assert (
        sum(outcomes.labels(o)._value.get() for o in ("applied", "duplicate", "superseded")) == 70
    )


async def test_malformed_records_go_to_the_dead_letter_topic(kafka_bootstrap: str) -> None:
    topic = unique("telemetry-bad")
    await create_topic(kafka_bootstrap, topic, partitions=1)
    good = fleet_records(n_nodes=4, n_records=8)
    bad = malformed_records()
    # Bad records in the middle of good ones: the consumer must go on past them.
    stream = good[:4] + [(k, v) for k, v, _ in bad] + good[4:]
    await produce(kafka_bootstrap, topic, stream)
    view = RecordingView()
    metrics = SourceMetrics()
    settings = kafka_settings(kafka_bootstrap, topic)
    source = KafkaSource(settings, view, metrics=metrics)
    async with running(source.run):
        await source.wait_handled(len(stream))
    assert {(u.cluster, u.name): u.sequence for u in view.nodes.values()} == newest_sequences(good)
    dead = await read_topic(kafka_bootstrap, settings.dead_letter_topic, len(bad))
    reasons = [dict(r.headers)[DLQ_REASON_HEADER].decode() for r in dead]
    assert reasons == [reason for _, _, reason in bad]
    assert [(r.key, r.value) for r in dead] == [(k, v) for k, v, _ in bad]
    for _, _, reason in bad:
        assert metrics.dead_letters.labels(reason)._value.get() == 1
    assert await committed_offsets(kafka_bootstrap, topic, settings.group_id) == {0: len(stream)}


async def test_broker_restart_mid_stream_loses_nothing(
    kafka_bootstrap: str, testbed_run: object
) -> None:
    topic = unique("telemetry-restart")
    await create_topic(kafka_bootstrap, topic)
    first = fleet_records(n_nodes=40, n_records=400, seed=3)
    second = fleet_records(n_nodes=40, n_records=400, seed=4, first_sequence=401)
    await produce(kafka_bootstrap, topic, first)
    view = RecordingView()
    # The state owner stalls mid-stream: a batch is applied but its offsets not committed.
    view.hold_after = 1
    source = KafkaSource(kafka_settings(kafka_bootstrap, topic), view)
    async with running(source.run):
        await asyncio.wait_for(view.holding.wait(), AWAIT_S)
        await asyncio.to_thread(testbed_run.restart_kafka)  # type: ignore[attr-defined]
        view.release.set()
        await produce(kafka_bootstrap, topic, second)
        newest = newest_sequences(first + second)
        await view.wait_for(
            lambda: {(u.cluster, u.name): u.sequence for u in view.nodes.values()} == newest,
            AWAIT_S,
        )
        await source.wait_handled(len(first) + len(second))
    # Nothing lost (every node ends at its newest record), nothing applied twice or backwards.
    _assert_applied_once_in_order(view)
