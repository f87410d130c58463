"""One poll through KafkaSource.process with in-process stand-ins for the two clients: which
records are applied, superseded, dropped as duplicates or dead-lettered, and what is committed.
(The real broker: tests/integration/test_sources_kafka.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from pathlib import Path
from typing import Any

import aiokafka
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from fleetd.sources import fetch
from fleetd.sources.codec import encode_node, node_key
from fleetd.sources.kafka import (
    DLQ_ORIGIN_HEADER,
    DLQ_REASON_HEADER,
    KafkaSource,
    KafkaSourceSettings,
)
from fleetd.sources.memory import FleetView
from fleetd.sources.metrics import SourceMetrics
from fleetd.sources.updates import NodeStale, NodeUpdate
from tests.unit.scans import both_scans  # noqa: F401  (every test under both scans)
from tests.unit.test_sources_codec import gpu_node

TP = TopicPartition("t", 0)


@dataclasses.dataclass
class Rec:
    key: bytes | None
    value: bytes
    offset: int
    topic: str = "t"
    partition: int = 0


class Consumer:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)

    def highwater(self, tp: TopicPartition) -> int:
        return 100

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def committed(self, tp: TopicPartition) -> int | None:
        return None  # (a fresh group: nothing dead-lettered before)


class Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, list[tuple[str, bytes]]]] = []

    async def send(self, topic: str, *, value: bytes, key: bytes | None, headers: Any) -> Any:
        self.sent.append((topic, key, headers))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def _report(name: str, seq: int, **changes: Any) -> tuple[bytes, bytes]:
    node = dataclasses.replace(gpu_node(name), sequence=seq, **changes)
    record = encode_node(node, sequence=seq, observed_unix_ms=1)
    return node_key("c1", name), record.SerializeToString()


def _broken(name: str, seq: int) -> tuple[bytes, bytes]:
    key, _ = _report(name, seq)
    record = encode_node(gpu_node(name), sequence=seq, observed_unix_ms=1)
    record.node.gpus[0].utilization_ratio = 3.0
    return key, record.SerializeToString()


async def _poll(
    source: KafkaSource, pairs: list[tuple[bytes | None, bytes]]
) -> tuple[Consumer, Producer]:
    consumer, producer = Consumer(), Producer()
    recs = [Rec(k, v, offset=i) for i, (k, v) in enumerate(pairs)]
    await source.process({TP: recs}, consumer, producer)
    return consumer, producer


async def test_newest_valid_snapshot_per_node_is_applied() -> None:
    view = FleetView()
    metrics = SourceMetrics()
    source = KafkaSource(KafkaSourceSettings(dead_letter_topic="dlq"), view, metrics=metrics)
    consumer, producer = await _poll(
        source,
        [
            _report("a", 1),
            _report("b", 2),
            _report("a", 3, unschedulable=True),
            _broken("a", 4),  # newest of "a" but invalid: dead-lettered, seq 3 applied
            (b"c1/b", b"\xff\xfe"),  # older than b's newest? no: newest of b, undecodable
        ],
    )
    a, b = view.node("c1", "a"), view.node("c1", "b")
    assert isinstance(a, NodeUpdate)
    assert a.sequence == 3
    assert a.unschedulable
    assert isinstance(b, NodeUpdate)
    assert b.sequence == 2
    assert [dict(h)[DLQ_REASON_HEADER] for _, _, h in producer.sent] == [
        b"bad-gpus",
        b"undecodable",
    ]
    assert consumer.commits == [{TP: 5}]
    outcome = metrics.telemetry_records.labels
    assert outcome("applied")._value.get() == 2
    assert outcome("superseded")._value.get() == 1  # a seq 1
    assert outcome("dead_lettered")._value.get() == 2


async def test_the_collector_runs_while_a_dead_letter_waits_for_the_broker() -> None:
    """A poll pauses the cyclic collector; its dead letters' round trips to the broker (the
    group's committed offsets, the publishing and its retries: a broker outage can make them
    last) run with it on, and it is on again after the poll."""
    collecting: list[tuple[str, bool]] = []

    class Recording(Consumer):
        async def committed(self, tp: TopicPartition) -> int | None:
            collecting.append(("committed", gc.isenabled()))
            return None

    class FailingOnce(Producer):
        async def send(self, topic: str, *, value: bytes, key: bytes | None, headers: Any) -> Any:
            collecting.append(("send", gc.isenabled()))
            if len(collecting) == 2:
                raise KafkaConnectionError("broker down")  # (retried after a backoff)
            return await super().send(topic, value=value, key=key, headers=headers)

    settings = KafkaSourceSettings(dead_letter_topic="dlq", backoff_initial_s=0.01)
    source = KafkaSource(settings, FleetView())
    producer = FailingOnce()
    recs = [Rec(*_report("a", 1), offset=0), Rec(*_broken("b", 1), offset=1)]
    await source.process({TP: recs}, Recording(), producer)
    assert collecting == [("committed", True), ("send", True), ("send", True)]
    assert len(producer.sent) == 1
    assert gc.isenabled()


@dataclasses.dataclass
class _BareRecord:
    """What aiokafka's C records carry (`fetch.poll`): no topic, no partition."""

    key: bytes | None
    value: bytes
    offset: int
    timestamp: int = 0


async def test_records_are_filed_under_the_partition_they_came_from() -> None:
    """Records do not say their partition: the source finds it from their place in the poll,
    for the dead-letter origin header and for the node's remembered content, across
    partitions of every size (several runs of 2,000 records, one record, none)."""
    source = KafkaSource(KafkaSourceSettings(dead_letter_topic="dlq"), FleetView())
    sizes = {0: 2001, 1: 1, 2: 0, 3: 2500}
    batches: dict[TopicPartition, list[Any]] = {}
    dead = set()
    for p, n in sizes.items():
        recs = []
        for i in range(n):
            bad = i in (0, n - 1, 1999, 2000)
            key, value = (_broken if bad else _report)(f"p{p}-{i}", 1)
            recs.append(_BareRecord(key, value, offset=100 * p + i))
            if bad:
                dead.add(f"t/{p}/{100 * p + i}")
        batches[TopicPartition("t", p)] = recs
    producer = Producer()
    await source.process(batches, Consumer(), producer)
    assert sorted(dict(h)[DLQ_ORIGIN_HEADER].decode() for _, _, h in producer.sent) == sorted(dead)
    remembered = {key.decode(): memo.partition for key, memo in source._contents.items()}
    assert len(remembered) == sum(sizes.values()) - len(dead)
    assert all(name.startswith(f"c1/p{p}-") for name, p in remembered.items())


async def test_superseded_records_are_still_checked_to_be_telemetry() -> None:
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(dead_letter_topic="dlq"), view)
    _, producer = await _poll(source, [(b"c1/a", b"garbage"), _report("a", 2)])
    assert [dict(h)[DLQ_REASON_HEADER] for _, _, h in producer.sent] == [b"undecodable"]
    assert view.node("c1", "a") is not None


async def test_redelivery_is_dropped_by_sequence() -> None:
    view = FleetView()
    metrics = SourceMetrics()
    source = KafkaSource(KafkaSourceSettings(), view, metrics=metrics)
    await _poll(source, [_report("a", 5)])
    await _poll(source, [_report("a", 5), _report("a", 4)])  # redelivered, then older
    assert view.applied == 1
    # Both repeat the applied content: each is gated on its own sequence.
    assert metrics.telemetry_records.labels("duplicate")._value.get() == 2


async def test_highest_sequence_wins_within_a_poll_whatever_the_offset_order() -> None:
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(), view)
    # A redelivered older record after a newer one, in the same poll.
    await _poll(source, [_report("a", 7, unschedulable=True), _report("a", 3)])
    a = view.node("c1", "a")
    assert isinstance(a, NodeUpdate)
    assert a.sequence == 7
    assert view.applied == 1


async def test_falls_back_past_several_invalid_newest_records() -> None:
    view = FleetView()
    metrics = SourceMetrics()
    source = KafkaSource(KafkaSourceSettings(), view, metrics=metrics)
    mismatched = _report("other", 4)[1]  # a valid record of node "other" under a's key
    _, producer = await _poll(
        source, [_report("a", 1), _broken("a", 2), _broken("a", 3), (b"c1/a", mismatched)]
    )
    a = view.node("c1", "a")
    assert isinstance(a, NodeUpdate)
    assert a.sequence == 1
    reasons = [dict(h)[DLQ_REASON_HEADER] for _, _, h in producer.sent]
    assert reasons == [b"bad-gpus", b"bad-gpus", b"key-mismatch"]  # in offset order
    assert metrics.telemetry_records.labels("superseded")._value.get() == 0


class SlowCommitConsumer(Consumer):
    """Hands out the given polls, then none; each commit waits for `release`."""

    def __init__(self, polls: list[dict[TopicPartition, list[Rec]]]) -> None:
        super().__init__()
        self.polls = polls
        self.release = asyncio.Event()

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Rec]]:
        if self.polls:
            return self.polls.pop(0)
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        await self.release.wait()
        self.commits.append(offsets)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return 0


async def test_a_polls_commit_overlaps_the_next_poll_and_counts_once_committed() -> None:
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(dead_letter_topic="dlq"), view)
    first = [Rec(k, v, offset=i) for i, (k, v) in enumerate([_report("a", 1), _report("b", 2)])]
    second = [Rec(*_report("a", 3), offset=2)]
    consumer = SlowCommitConsumer([{TP: first}, {TP: second}])
    task = asyncio.ensure_future(source._consume(consumer, Producer()))
    try:
        # The second poll is applied while the first one's commit is still in flight...
        await view.wait_for(lambda: view.sequence("c1", "a") == 3, 5)
        assert consumer.commits == []
        # ...and records count as handled only once their offsets are committed, in order.
        assert source.records_handled == 0
        consumer.release.set()
        await asyncio.wait_for(source.wait_handled(3), 5)
        assert consumer.commits == [{TP: 2}, {TP: 3}]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source._abandon_commit()


@dataclasses.dataclass
class _TimedRec(Rec):
    timestamp: float = 0.0


class _StartingConsumer(Consumer):
    """The topic held 1,000 records of each partition when the source started."""

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 1000 for tp in partitions}


class _StaleCounting(FleetView):
    def __init__(self) -> None:
        super().__init__()
        self.stale_reports = 0

    def apply_now(self, update: Any) -> None:
        self.stale_reports += isinstance(update, NodeStale)
        super().apply_now(update)


async def test_a_replay_marks_nodes_silent_too_long_stale_and_judges_each_record_once() -> None:
    view = _StaleCounting()
    source = KafkaSource(KafkaSourceSettings(replay_max_age_s=120.0), view)
    now_ms = time.time() * 1000
    hour_ago, fresh = now_ms - 3_600_000, now_ms - 1_000
    (ka, a1), (_, a2), (kb, b1) = _report("a", 1), _report("a", 2), _report("b", 3)
    old_a = _TimedRec(ka, a1, offset=0, timestamp=hour_ago)
    consumer, producer = _StartingConsumer(), Producer()
    # a's newest record is recent, b's an hour old: b is stale, a not.
    recs = [
        old_a,
        _TimedRec(ka, a2, offset=1, timestamp=fresh),
        _TimedRec(kb, b1, offset=2, timestamp=hour_ago),
    ]
    await source.process({TP: recs}, consumer, producer)
    assert (view.stale, view.stale_reports) == ({("c1", "b")}, 1)
    # A rebalance sought back (the seek is this process's position before the poll): a's
    # hour-old record comes again, alone. It was judged with the poll it came in: a stays.
    await source.process({TP: [old_a]}, consumer, producer)
    assert (view.stale, view.stale_reports) == ({("c1", "b")}, 1)
    # After the start, nothing is judged by age (a clock running late is trusted).
    source.ready.set()
    _, b4 = _report("b", 4)
    await source.process({TP: [_TimedRec(kb, b4, 1000, timestamp=hour_ago)]}, consumer, producer)
    assert view.stale_reports == 1
    assert view.sequence("c1", "b") == 4


class _SyncingConsumer(Consumer):
    """Assigned one partition whose end was offset 100 at assignment, read up to `position`."""

    def __init__(self) -> None:
        super().__init__()
        self.at = 0

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 100 for tp in partitions}

    async def position(self, tp: TopicPartition) -> int:
        return self.at


async def test_the_initial_sync_reports_how_many_records_are_left() -> None:
    source = KafkaSource(KafkaSourceSettings(), FleetView())
    told: list[str] = []
    source.on_progress = told.append
    consumer = _SyncingConsumer()
    consumer.at = 40
    await source._check_initial_sync(consumer)  # type: ignore[arg-type]
    assert (told, source.ready.is_set()) == (["60 records to read"], False)
    consumer.at = 100
    await source._check_initial_sync(consumer)  # type: ignore[arg-type]
    assert (told[-1], source.ready.is_set()) == ("", True)


def test_the_locked_aiokafka_is_a_release_fleetd_reads_the_batches_of() -> None:
    """`fetch.poll` reads aiokafka's internals: a lock that moves aiokafka to another release
    fails here (else the source would silently poll the slow way) until its fetcher is read
    again and the release added to `SUPPORTED_AIOKAFKA`."""
    lock = (Path(__file__).parents[2] / "requirements.lock").read_text().splitlines()
    (locked,) = [line.split("==")[1] for line in lock if line.startswith("aiokafka==")]
    assert locked in fetch.SUPPORTED_AIOKAFKA
    assert aiokafka.__version__ == locked
