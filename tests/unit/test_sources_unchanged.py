"""Unchanged reports (periodic resyncs) take the envelope-only path: what it accepts, what it
refuses, and that it leaves fleet state exactly as decoding every record in full would."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from aiokafka import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.config import Config
from fleetd.journal import Journal
from fleetd.loadgen import periodic_reports, synthetic_fleet
from fleetd.sources import updates as up
from fleetd.sources.codec import (
    InvalidTelemetry,
    decode,
    decode_envelope_rests,
    encode_node,
    encode_node_deleted,
    envelope_head,
    fields_of,
    node_after_envelope,
    node_content_tail,
    node_field_at,
    node_key,
    parse,
    pod_fields,
    pods_start,
    unchanged_envelope,
)
from fleetd.sources.kafka import (
    DLQ_ORIGIN_HEADER,
    DLQ_REASON_HEADER,
    KafkaSource,
    KafkaSourceSettings,
)
from fleetd.sources.memory import FleetView, StateSink
from fleetd.sources.metrics import SourceMetrics
from fleetd.state import FleetState
from fleetd.v1 import telemetry_pb2 as pb
from tests.unit.scans import both_scans  # noqa: F401  (every test under both scans)
from tests.unit.test_sources_codec import gpu_node
from tests.unit.test_sources_kafka import Consumer, Producer, Rec

TP = TopicPartition("t", 0)


def _value(node: up.NodeUpdate, seq: int, ms: int = 1_000, cluster: str | None = None) -> bytes:
    record = encode_node(node, sequence=seq, observed_unix_ms=ms)
    if cluster is not None:
        record.cluster = cluster
    return record.SerializeToString(deterministic=True)


def _rec(name: str, value: bytes, offset: int) -> Rec:
    return Rec(node_key("c1", name), value, offset)


# ---------------------------------------------------------------------------- codec


def test_tail_is_the_node_field_and_a_new_envelope_is_recognised() -> None:
    node = gpu_node("a")
    first = _value(node, 5, ms=1_000)
    tail = node_content_tail(first, parse(first))
    assert tail is not None
    assert tail[0] == (10 << 3) | 2
    assert pb.TelemetryRecord.FromString(tail).node == parse(first).node
    again = _value(node, 6, ms=31_000)
    envelope = unchanged_envelope(again, tail)
    assert envelope is not None
    assert (envelope.cluster, envelope.sequence, envelope.observed_unix_ms) == ("c1", 6, 31_000)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda n, t: _value(dataclasses.replace(n, unschedulable=True), 6), id="changed"
        ),
        pytest.param(lambda n, t: b"\xff\xff" + t, id="garbage-envelope"),
        pytest.param(
            lambda n, t: (
                pb.TelemetryRecord(cluster="c1", sequence=6).SerializeToString()
                + pb.TelemetryRecord(node_deleted=pb.NodeDeleted(name="a")).SerializeToString()
                + t
            ),
            id="envelope-with-a-payload",
        ),
        pytest.param(lambda n, t: t, id="tail-alone"),
    ],
)
def test_anything_else_is_not_taken_as_unchanged(make: object) -> None:
    node = gpu_node("a")
    first = _value(node, 5)
    tail = node_content_tail(first, parse(first))
    assert tail is not None
    assert unchanged_envelope(make(node, tail), tail) is None  # type: ignore[operator]


def test_records_laid_out_differently_have_no_tail() -> None:
    node = gpu_node("a")
    record = encode_node(node, sequence=5, observed_unix_ms=1)
    # The node first, the envelope after: valid protobuf, but not what the publisher writes.
    swapped = (
        pb.TelemetryRecord(node=record.node).SerializeToString()
        + pb.TelemetryRecord(cluster="c1", sequence=5, observed_unix_ms=1).SerializeToString()
    )
    assert decode(node_key("c1", "a"), swapped).sequence == 5  # type: ignore[union-attr]
    assert node_content_tail(swapped, parse(swapped)) is None


# ---------------------------------------------------------------------------- source


async def _process(source: KafkaSource, recs: list[Rec]) -> Producer:
    producer = Producer()
    await source.process({TP: recs}, Consumer(), producer)
    return producer


async def test_unchanged_reports_move_sequence_and_freshness_only() -> None:
    view, metrics = FleetView(), SourceMetrics()
    source = KafkaSource(KafkaSourceSettings(), view, metrics=metrics)
    a, b = gpu_node("a"), gpu_node("b")
    await _process(source, [_rec("a", _value(a, 1), 0), _rec("b", _value(b, 2), 1)])
    await _process(source, [_rec("a", _value(a, 3, ms=31_000), 2), _rec("b", _value(b, 4), 3)])
    assert view.sequence("c1", "a") == 3
    assert view.heartbeats[("c1", "a")] == (3, 31.0)
    assert view.sequence("c1", "b") == 4
    outcome = metrics.telemetry_records.labels
    assert outcome("applied")._value.get() == 2
    assert outcome("unchanged")._value.get() == 2
    # Redelivered: duplicates, nothing moves.
    await _process(source, [_rec("a", _value(a, 3), 2)])
    assert outcome("duplicate")._value.get() == 1
    assert view.sequence("c1", "a") == 3


async def test_unchanged_content_with_a_bad_envelope_is_still_dead_lettered() -> None:
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(), view)
    a = gpu_node("a")
    await _process(source, [_rec("a", _value(a, 1), 0)])
    no_sequence = _value(a, 0)
    other_cluster = _value(a, 7, cluster="c2")  # under key c1/a
    producer = await _process(source, [_rec("a", no_sequence, 1), _rec("a", other_cluster, 2)])
    reasons = [dict(h)[DLQ_REASON_HEADER] for _, _, h in producer.sent]
    assert reasons == [b"no-sequence", b"key-mismatch"]
    assert view.sequence("c1", "a") == 1


async def test_a_change_and_its_revert_in_one_poll_end_in_the_newest() -> None:
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(), view)
    a = gpu_node("a")
    cordoned = dataclasses.replace(a, unschedulable=True)
    await _process(source, [_rec("a", _value(a, 1), 0)])
    await _process(
        source,
        [
            _rec("a", _value(a, 2), 1),  # unchanged
            _rec("a", _value(cordoned, 3), 2),  # changed
            _rec("a", _value(a, 4), 3),  # back: equal to the content before the poll
        ],
    )
    node = view.node("c1", "a")
    assert node is not None
    assert node.sequence == 4
    assert not node.unschedulable
    # The newest content is remembered: its repeats are unchanged reports again.
    await _process(source, [_rec("a", _value(a, 5), 4)])
    assert view.heartbeats[("c1", "a")][0] == 5


# ---------------------------------------------------------------------------- state


def _state(tmp: Path) -> FleetState:
    cfg = Config(**{"sources": {"simulated": {"enabled": False}}})  # type: ignore[arg-type]
    return FleetState(cfg, Journal(tmp / "journal.sqlite3"), clock=lambda: 1_000_000.0)


def heartbeats(state: FleetState, cluster: str, entries: list[tuple[str, int, bytes]]) -> bool:
    """Apply `entries` (node, sequence, content token) the way the Kafka source sends
    repeats: each distinct (node, token) bound to a slot (`HeartbeatSlots`), then one
    `NodeHeartbeats` batch. True when an entry was applied."""
    pairs = list(dict.fromkeys((name, token) for name, _, token in entries))
    slot_of = {pair: i for i, pair in enumerate(pairs)}
    state.apply_now(
        up.HeartbeatSlots(
            "kafka",
            cluster,
            tuple(range(len(pairs))),
            tuple(name for name, _ in pairs),
            tuple(token for _, token in pairs),
        )
    )
    return state.apply_now(
        up.NodeHeartbeats.of(
            "kafka",
            [slot_of[(name, token)] for name, _, token in entries],
            [sequence for _, sequence, _ in entries],
            [1.0] * len(entries),
        )
    )


def test_heartbeats_of_unapplied_content_are_refused(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.apply_now(dataclasses.replace(gpu_node("a"), sequence=1, content_token=b"A"))
    assert heartbeats(state, "c1", [("a", 2, b"A"), ("a", 3, b"B"), ("zz", 4, b"A")])
    assert state.gate.last("c1", "node", "a") == 2  # the b"B" entry was refused
    assert state.gate.last("c1", "node", "zz") is None
    assert state.invalid_updates == 2


def test_a_heartbeat_brings_a_stale_node_back(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.apply_now(dataclasses.replace(gpu_node("a"), sequence=1, content_token=b"A"))
    state.nodes["c1/a"].last_seen_s = 0.0
    assert state.mark_stale() == 1
    heartbeats(state, "c1", [("a", 2, b"A")])
    assert state.mark_stale() == 0
    assert not state.nodes["c1/a"].stale


class _AlwaysInFull(KafkaSource):
    """The source with the unchanged path off: every record decoded in full."""

    def _remember_contents(self, chosen: object) -> list[up.HeartbeatSlots]:
        return []


def _through(source_type: type[KafkaSource], state: FleetState, records: list, poll: int) -> None:
    async def run() -> None:
        source = source_type(KafkaSourceSettings(), StateSink(state))
        recs = [Rec(k, v, i) for i, (k, v) in enumerate(records)]
        for i in range(0, len(recs), poll):
            await source.process({TP: recs[i : i + poll]}, Consumer(), Producer())

    asyncio.run(run())


def _mix(seed: int, nodes_per_cluster: int = 15) -> list[tuple[bytes, bytes]]:
    rng = np.random.default_rng(seed)
    fleet = synthetic_fleet(rng, clusters=2, nodes_per_cluster=nodes_per_cluster)
    return list(periodic_reports(fleet, 12, rng, changed_fraction=0.3))


def _assert_same(a: FleetState, b: FleetState) -> None:
    assert a.fleet.state_equal(b.fleet)
    assert {k: (p.node, p.slot) for k, p in a.pods.items()} == {
        k: (p.node, p.slot) for k, p in b.pods.items()
    }
    assert a.gate.snapshot() == b.gate.snapshot()
    assert {k: (i.cordoned, i.labels, i.last_seen_s) for k, i in a.nodes.items()} == {
        k: (i.cordoned, i.labels, i.last_seen_s) for k, i in b.nodes.items()
    }


@pytest.mark.parametrize("seed", [1, 2])
def test_record_by_record_the_state_equals_decoding_in_full(tmp_path: Path, seed: int) -> None:
    records = _mix(seed)
    fast, full = _state(tmp_path / "a"), _state(tmp_path / "b")
    for key, value in records:
        full.apply_now(decode(key, value))
    _through(KafkaSource, fast, records, poll=1)
    _assert_same(fast, full)


@pytest.mark.parametrize(
    ("seed", "poll", "nodes_per_cluster"), [(1, 7, 15), (2, 50, 15), (3, 400, 15), (4, 5000, 150)]
)
def test_in_polls_the_state_equals_decoding_in_full(
    tmp_path: Path, seed: int, poll: int, nodes_per_cluster: int
) -> None:
    """With coalescing too (several records of a node in one poll), and polls longer than
    the runs the source scans them in (`YIELD_EVERY_RECORDS`)."""
    records = _mix(seed, nodes_per_cluster)
    fast, full = _state(tmp_path / "a"), _state(tmp_path / "b")
    _through(KafkaSource, fast, records, poll)
    _through(_AlwaysInFull, full, records, poll)
    _assert_same(fast, full)


def test_envelope_rests_decode_like_protobuf() -> None:
    rng = np.random.default_rng(7)
    head = envelope_head("c1")
    rests, expected = [], []
    for _ in range(3000):
        seq = int(rng.choice([1, 127, 128, 2**20, 2**50 + int(rng.integers(10**6)), 2**63 - 1]))
        ms = int(rng.choice([0, 1, 1_700_000_000_000, 2**40]))
        value = pb.TelemetryRecord(cluster="c1", sequence=seq, observed_unix_ms=ms)
        raw = value.SerializeToString()
        assert raw.startswith(head)
        rests.append(raw[len(head) :])
        expected.append((seq, ms))
    sequences, times, ok = decode_envelope_rests(rests)
    assert ok.all()
    assert list(zip(sequences.tolist(), times.tolist(), strict=True)) == expected


@pytest.mark.parametrize(
    "rest",
    [
        b"\x00",  # sequence 0
        b"\x80",  # truncated varint
        b"\x81",  # truncated varint of a non-zero value (the tail's tag would end it)
        b"\x81\x81",
        b"\x01\x19\x01",  # another field after the sequence
        b"\x01\x18",  # time tag without a value
        b"\x01\x18\x01\x00",  # trailing byte
        b"\xff" * 9 + b"\x01",  # a 10-byte sequence (>= 2^63)
        b"\x01\x18" + b"\xff" * 9 + b"\x01",  # a negative time (10-byte varint)
    ],
)
def test_other_envelopes_are_left_to_the_full_decoder(rest: bytes) -> None:
    _, _, ok = decode_envelope_rests([b"\x05\x18\x07", rest])
    assert ok.tolist() == [True, False]


def test_pods_start_only_for_the_canonical_layout() -> None:
    record = encode_node(gpu_node("a", pods=2), sequence=5, observed_unix_ms=1)
    node = record.node.SerializeToString(deterministic=True)
    start = pods_start(node, record)
    assert start > 0
    assert pb.NodeReport.FromString(node[:start]).pods == []
    # Pods first, then the rest: valid protobuf, but the prefix is not "everything but pods".
    pods_first = (
        pb.NodeReport(pods=record.node.pods).SerializeToString()
        + pb.NodeReport(name="a", gpus=record.node.gpus).SerializeToString()
    )
    swapped = pb.TelemetryRecord(cluster="c1", sequence=5)
    swapped.node.ParseFromString(pods_first)
    assert pods_start(pods_first, swapped) == -1


async def test_a_pods_only_change_with_a_bad_pod_is_dead_lettered() -> None:
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(), view)
    a = gpu_node("a", pods=1)
    await _process(source, [_rec("a", _value(a, 1), 0)])
    assert a.pods
    nameless = dataclasses.replace(a.pods[0], name="", uid="u-2")
    bad = dataclasses.replace(a, pods=(*a.pods, nameless))
    moved = dataclasses.replace(a, pods=())
    producer = await _process(source, [_rec("a", _value(bad, 2), 1)])
    assert [dict(h)[DLQ_REASON_HEADER] for _, _, h in producer.sent] == [b"bad-pods"]
    await _process(source, [_rec("a", _value(moved, 3), 2)])  # the short path again
    node = view.node("c1", "a")
    assert node is not None
    assert node.sequence == 3
    assert node.pods == ()


def test_removed_nodes_leave_no_heartbeat_cache_entry(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.apply_now(dataclasses.replace(gpu_node("a"), sequence=1, content_token=b"A"))
    heartbeats(state, "c1", [("a", 2, b"A")])
    assert "c1/a" in state._beats["kafka"].slot_of
    state.apply_now(up.NodeRemoved("c1", "a", sequence=3))
    assert "c1/a" not in state._beats["kafka"].slot_of
    # A heartbeat for the removed node's old content is refused, not applied.
    heartbeats(state, "c1", [("a", 4, b"A")])
    assert "c1/a" not in state.nodes


def test_heartbeats_after_a_change_refresh_the_node_applied_last(tmp_path: Path) -> None:
    """The heartbeat cache holds each node's `_NodeInfo`: a full update replaces it, and the
    next heartbeats must refresh (and compare the content token of) the new one."""
    state = _state(tmp_path)
    state.apply_now(dataclasses.replace(gpu_node("a"), sequence=1, content_token=b"A"))
    heartbeats(state, "c1", [("a", 2, b"A")])
    cordoned = dataclasses.replace(
        gpu_node("a"), sequence=3, content_token=b"B", unschedulable=True
    )
    state.apply_now(cordoned)
    state.nodes["c1/a"].last_seen_s = 0.0
    # The old content's repeat is refused; the new content's is applied to the new info.
    heartbeats(state, "c1", [("a", 4, b"A"), ("a", 5, b"B")])
    assert state.gate.last("c1", "node", "a") == 5
    assert state.nodes["c1/a"].last_seen_s == 1_000_000.0
    assert state.invalid_updates == 1


async def test_an_invalid_change_after_a_repeat_in_one_poll_falls_back_safely() -> None:
    """The newest record of a key is invalid and the next newest is a repeat that was
    already applied as such: dead letter, nothing applied twice, no crash."""
    view, metrics = FleetView(), SourceMetrics()
    source = KafkaSource(KafkaSourceSettings(), view, metrics=metrics)
    a = gpu_node("a")
    await _process(source, [_rec("a", _value(a, 1), 0)])
    broken = encode_node(a, sequence=3, observed_unix_ms=1)
    broken.node.gpus[0].utilization_ratio = 3.0
    producer = await _process(
        source,
        [_rec("a", _value(a, 2), 1), _rec("a", broken.SerializeToString(deterministic=True), 2)],
    )
    assert [dict(h)[DLQ_REASON_HEADER] for _, _, h in producer.sent] == [b"bad-gpus"]
    assert view.sequence("c1", "a") == 2
    outcome = metrics.telemetry_records.labels
    assert outcome("unchanged")._value.get() == 1
    assert outcome("dead_lettered")._value.get() == 1


_CONTENTS = {
    "A": gpu_node("x", pods=1),
    "B": gpu_node("x", pods=2),  # pods changed
    "C": dataclasses.replace(gpu_node("x", pods=1), unschedulable=True),  # node changed
    "D": dataclasses.replace(  # a GPU changed
        gpu_node("x", pods=1),
        gpus=tuple(
            dataclasses.replace(g, healthy=False) if g.index == 3 else g for g in gpu_node("x").gpus
        ),
    ),
}

_op = st.one_of(
    st.tuples(st.just("report"), st.integers(0, 2), st.sampled_from("ABCD")),
    st.tuples(st.just("redeliver"), st.integers(0, 30), st.just("")),
    st.tuples(st.just("bad"), st.integers(0, 2), st.just("")),
    st.tuples(st.just("garbage"), st.integers(0, 2), st.just("")),
    st.tuples(st.just("zero-seq"), st.integers(0, 2), st.sampled_from("ABC")),
    st.tuples(st.just("delete"), st.integers(0, 2), st.just("")),
)


def _memories_hold_gate_cells(source: KafkaSource) -> None:
    """What the change path rests on (`SequenceColumn.admit_at`): the cell at a remembered
    node's slot is its gate's cell."""
    for memo in source._contents.values():
        cell = source._gate.cell((memo.cluster, "node", memo.name))
        assert cell is not None
        assert source._column._cells[memo.slot] is cell


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(_op, min_size=1, max_size=30), polls=st.lists(st.integers(1, 6), min_size=1))
def test_any_stream_ends_where_decoding_every_record_would(
    ops: list[tuple[str, int, str]], polls: list[int]
) -> None:
    """Repeats, changes, reverts, deletions, redeliveries, invalid and undecodable records,
    in polls of any size: each node ends at its valid record of highest sequence, with its
    content (gone if that is its deletion); records that do not even parse are always
    dead-lettered."""
    records: list[tuple[bytes, bytes]] = []
    seq = 0
    for kind, n, variant in ops:
        name = f"n{n}"
        if kind == "redeliver":
            if records:
                records.append(records[n % len(records)])
            continue
        seq += 1
        if kind == "report":
            node = dataclasses.replace(_CONTENTS[variant], name=name)
            node = dataclasses.replace(
                node, pods=tuple(dataclasses.replace(p, node=name) for p in node.pods or ())
            )
            records.append((node_key("c1", name), _value(node, seq)))
        elif kind == "bad":
            record = encode_node(gpu_node(name), sequence=seq, observed_unix_ms=1)
            record.node.gpus[0].utilization_ratio = 3.0
            records.append((node_key("c1", name), record.SerializeToString(deterministic=True)))
        elif kind == "garbage":
            records.append((node_key("c1", name), b"\xff\xfe garbage"))
        elif kind == "delete":
            record = encode_node_deleted("c1", name, sequence=seq, observed_unix_ms=1)
            records.append((node_key("c1", name), record.SerializeToString()))
        else:
            node = dataclasses.replace(_CONTENTS[variant], name=name, pods=())
            records.append((node_key("c1", name), _value(node, 0)))
    # Reference: every record decoded in full, the highest valid sequence per node wins.
    expected: dict[str, up.NodeUpdate | up.NodeRemoved] = {}
    unparseable = 0
    for key, value in records:
        try:
            parse(value)
        except InvalidTelemetry:
            unparseable += 1
        try:
            update = decode(key, value)
        except InvalidTelemetry:
            continue
        assert isinstance(update, up.NodeUpdate | up.NodeRemoved)
        if update.name not in expected or update.sequence > expected[update.name].sequence:
            expected[update.name] = update

    async def through_source() -> tuple[FleetView, list[bytes]]:
        view = FleetView()
        source = KafkaSource(KafkaSourceSettings(), view)
        recs = [Rec(k, v, i) for i, (k, v) in enumerate(records)]
        reasons: list[bytes] = []
        i = 0
        for size in polls * (len(recs) // len(polls) + 1):
            if i >= len(recs):
                break
            producer = await _process(source, recs[i : i + size])
            reasons += [dict(h)[DLQ_REASON_HEADER] for _, _, h in producer.sent]
            _memories_hold_gate_cells(source)
            i += size
        return view, reasons

    view, reasons = asyncio.run(through_source())

    def content(u: up.NodeUpdate) -> object:
        pods = tuple((p.uid, p.name, p.requests) for p in u.pods or ())
        return dataclasses.replace(u, sequence=0, observed_at_s=0.0, pods=None), pods

    present = {name for name, u in expected.items() if isinstance(u, up.NodeUpdate)}
    assert set(view.nodes) == {("c1", name) for name in present}
    for name, update in expected.items():
        if not isinstance(update, up.NodeUpdate):
            continue
        assert view.sequence("c1", name) == update.sequence
        got = view.node("c1", name)
        assert got is not None
        assert content(got) == content(update)
    assert reasons.count(b"undecodable") + reasons.count(b"no-sequence") == unparseable


@settings(max_examples=200, deadline=None)
@given(
    cluster=st.sampled_from(["c1", "cluster-0", "a" * 200]),
    sequence=st.integers(0, 2**64 - 1),
    ms=st.integers(-(2**63), 2**63 - 1),
)
def test_envelope_bytes_are_what_protobuf_writes(cluster: str, sequence: int, ms: int) -> None:
    from fleetd.sources.codec import _envelope_bytes

    record = pb.TelemetryRecord(cluster=cluster, sequence=sequence, observed_unix_ms=ms)
    assert _envelope_bytes(cluster, sequence, ms) == record.SerializeToString()


def test_resources_are_shared_and_still_checked() -> None:
    from fleetd.sources.codec import _resources

    a = pb.Resources(cpu_millicores=1000, memory_bytes=2**32, gpus=1)
    assert _resources(a, "x") is _resources(
        pb.Resources(cpu_millicores=1000, memory_bytes=2**32, gpus=1), "x"
    )
    assert _resources(a, "x") == up.Resources(1000, 2**32, 1)
    # OR-ing in-range values can exceed the bound: still in range.
    edge = pb.Resources(cpu_millicores=2**62, memory_bytes=1)
    assert _resources(edge, "x") == up.Resources(2**62, 1)
    with pytest.raises(InvalidTelemetry, match="memory_bytes"):
        _resources(pb.Resources(cpu_millicores=1, memory_bytes=-1), "x")
    with pytest.raises(InvalidTelemetry, match="gpus"):
        _resources(pb.Resources(gpus=2**62 + 1), "x")


def test_a_stale_flag_from_a_source_keeps_the_nodes_heartbeats(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.apply_now(dataclasses.replace(gpu_node("a"), sequence=1, content_token=b"A"))
    assert heartbeats(state, "c1", [("a", 2, b"A")])
    state.apply_now(up.NodeStale("c1", "a", stale=True))
    # The binding outlives the flag: the next repeat (same slot) brings the node back.
    assert state.apply_now(up.NodeHeartbeats.of("kafka", [0], [3], [1.0]))
    assert not state.nodes["c1/a"].stale
    assert state.gate.last("c1", "node", "a") == 3


def test_a_slot_bound_again_refreshes_only_its_new_node(tmp_path: Path) -> None:
    state = _state(tmp_path)
    for name, token in (("a", b"A"), ("b", b"B")):
        state.apply_now(dataclasses.replace(gpu_node(name), sequence=1, content_token=token))
    state.apply_now(up.HeartbeatSlots("kafka", "c1", (0,), ("a",), (b"A",)))
    state.apply_now(up.HeartbeatSlots("kafka", "c1", (0,), ("b",), (b"B",)))
    assert state.apply_now(up.NodeHeartbeats.of("kafka", [0], [5], [1.0]))
    assert state.gate.last("c1", "node", "a") == 1
    assert state.gate.last("c1", "node", "b") == 5
    # Another source's slot 0 is another slot.
    assert not state.apply_now(up.NodeHeartbeats.of("kafka/2", [0], [6], [1.0]))
    assert state.gate.last("c1", "node", "b") == 5


def test_a_binding_batch_naming_a_slot_or_node_twice_keeps_the_last(tmp_path: Path) -> None:
    state = _state(tmp_path)
    for name, token in (("a", b"A"), ("b", b"B")):
        state.apply_now(dataclasses.replace(gpu_node(name), sequence=1, content_token=token))
    state.apply_now(
        up.HeartbeatSlots(
            "kafka", "c1", (0, 0, 1, 2), ("a", "b", "a", "a"), (b"A", b"B", b"A", b"A")
        )
    )
    # Slot 0 ends with b; a moved to 1, then to 2.
    assert state.apply_now(up.NodeHeartbeats.of("kafka", [0, 1, 2], [5, 6, 7], [1.0] * 3))
    assert state.gate.last("c1", "node", "b") == 5
    assert state.gate.last("c1", "node", "a") == 7
    assert state.invalid_updates == 1  # slot 1's entry
    state.apply_now(up.NodeRemoved("c1", "a", 8))
    state.apply_now(up.NodeRemoved("c1", "b", 9))
    assert not state._beats["kafka"].slot_of


# ---------------------------------------------------------------------------- pods-only changes


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes([*out, n])


def _pod_content(u: up.NodeUpdate) -> object:
    """A node update without sequence, time and the pods' sequences."""
    pods = tuple(dataclasses.replace(p, sequence=0) for p in u.pods or ())
    return dataclasses.replace(u, sequence=0, observed_at_s=0.0, pods=pods)


async def _applied(
    pods: int,
) -> tuple[FleetView, KafkaSource, up.NodeUpdate, up.NodeUpdate]:
    """A source into a view that applied node "a" (with `pods` pods) at sequence 1: the
    view, the source, the node as published and as applied."""
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(), view)
    a = gpu_node("a", pods=pods)
    await _process(source, [_rec("a", _value(a, 1), 0)])
    first = view.node("c1", "a")
    assert first is not None
    return view, source, a, first


async def test_a_pods_only_change_reuses_the_unchanged_pods_and_parses_the_new() -> None:
    view, source, a, first = await _applied(pods=3)
    assert first.pods is not None
    assert a.pods is not None
    new_pod = dataclasses.replace(a.pods[1], name="fresh", uid="u-fresh")
    changed = dataclasses.replace(a, pods=(a.pods[0], new_pod, a.pods[2]))
    value = _value(changed, 2, ms=2_000)
    await _process(source, [_rec("a", value, 1)])
    got = view.node("c1", "a")
    assert got is not None
    assert got.pods is not None
    expected = decode(node_key("c1", "a"), value)
    assert isinstance(expected, up.NodeUpdate)
    assert _pod_content(got) == _pod_content(expected)
    assert (got.sequence, got.observed_at_s) == (2, 2.0)
    assert got.content_token == node_content_tail(value, parse(value))
    # The unchanged pods are the earlier values (their sequence the report that first
    # showed them), the new one is parsed from this report; the node's fields are shared.
    assert got.pods[0] is first.pods[0]
    assert got.pods[2] is first.pods[2]
    assert got.pods[1].name == "fresh"
    assert got.pods[1].sequence == 2
    assert got.gpus is first.gpus
    assert got.labels is first.labels
    # The new content is remembered: its repeats are unchanged reports.
    await _process(source, [_rec("a", _value(changed, 3), 2)])
    assert view.heartbeats[("c1", "a")][0] == 3


async def test_a_pods_only_change_keeps_the_node_heartbeat_slot() -> None:
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(), view)
    a = gpu_node("a", pods=1)
    await _process(source, [_rec("a", _value(a, 1), 0)])
    slots = dict(view.heartbeat_slots)
    moved = dataclasses.replace(a, pods=())
    await _process(source, [_rec("a", _value(moved, 2), 1)])
    assert list(view.heartbeat_slots) == list(slots)  # bound again, same slot
    ((_, _, token),) = view.heartbeat_slots.values()
    node = view.node("c1", "a")
    assert node is not None
    assert token == node.content_token
    await _process(source, [_rec("a", _value(moved, 3), 2), _rec("a", _value(a, 4), 3)])
    node = view.node("c1", "a")
    assert node is not None
    assert node.sequence == 4
    assert node.pods is not None
    assert len(node.pods) == 1


async def test_a_pods_only_change_with_an_undecodable_pod_is_dead_lettered_as_such() -> None:
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(), view)
    a = gpu_node("a", pods=1)
    await _process(source, [_rec("a", _value(a, 1), 0)])
    good = _value(dataclasses.replace(a, pods=()), 2)
    # One more pods field whose payload is no Pod (a truncated varint), and the node
    # field's length grown to match: the record as a whole does not parse either.
    record = pb.TelemetryRecord.FromString(good)
    node = record.node.SerializeToString(deterministic=True) + b"\x5a\x01\x08"
    head = pb.TelemetryRecord(cluster="c1", sequence=3, observed_unix_ms=1_000)
    bad = head.SerializeToString() + b"\x52" + _varint(len(node)) + node
    with pytest.raises(InvalidTelemetry) as full:
        parse(bad)
    producer = await _process(source, [_rec("a", good, 1), _rec("a", bad, 2)])
    reasons = [dict(h)[DLQ_REASON_HEADER] for _, _, h in producer.sent]
    assert reasons == [full.value.reason.encode()] == [b"undecodable"]
    got = view.node("c1", "a")
    assert got is not None
    assert got.sequence == 2
    assert got.pods == ()


@settings(max_examples=300, deadline=None)
@given(rest=st.binary(min_size=0, max_size=22), node=st.binary(min_size=0, max_size=3))
def test_the_envelope_before_a_node_is_read_as_the_vectorized_decoder_reads_it(
    rest: bytes, node: bytes
) -> None:
    value = b"HEAD" + rest + b"\x52" + bytes([len(node)]) + node
    sequence, ms, tag, node_at = node_after_envelope(value, 4)
    sequences, times, ok = decode_envelope_rests([rest])
    if ok[0]:
        assert (sequence, ms, tag, node_at) == (
            sequences[0],
            times[0],
            4 + len(rest),
            len(value) - len(node),
        )
    else:
        assert tag == -1
    # The source's reading: the shape by `node_field_at`, the values by the vectorized
    # decoder (a shape it finds whose values the decoder refuses is no envelope).
    shape_tag, shape_node_at = node_field_at(value, 4)
    found = shape_tag >= 0 and bool(decode_envelope_rests([value[4:shape_tag]])[2][0])
    assert found == (tag >= 0)
    if found:
        assert (shape_tag, shape_node_at) == (tag, node_at)
        again, again_ms, _ = decode_envelope_rests([value[4:shape_tag]])
        assert (again[0], again_ms[0]) == (sequence, ms)


def test_pod_fields_are_pods_and_nothing_else() -> None:
    record = encode_node(gpu_node("a", pods=2), sequence=5, observed_unix_ms=1)
    node = record.node.SerializeToString(deterministic=True)
    start = pods_start(node, record)
    fields = pod_fields(node, start)
    assert fields is not None
    assert [pb.Pod.FromString(f) for f in fields] == list(record.node.pods)
    assert pod_fields(node, 0) is None  # the name field first
    assert pod_fields(node[:-1], start) is None  # a pod cut short
    assert pod_fields(node, len(node)) == []


@settings(max_examples=100, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), max_size=4), cut=st.integers(1, 4))
def test_fields_of_splits_what_protobuf_would(payloads: list[bytes], cut: int) -> None:
    """Lengths of one, two or more varint bytes; a field cut short, or another field after
    them, is no split."""
    node = pb.NodeReport(pods=[pb.Pod(name="p" + p.hex()) for p in payloads])  # (>= 5 bytes)
    data = node.SerializeToString()
    fields = pod_fields(data, 0)
    assert fields is not None
    assert [pb.Pod.FromString(f).name for f in fields] == ["p" + p.hex() for p in payloads]
    if len(data) > cut:
        assert pod_fields(data[:-cut], 0) is None
    assert fields_of(data + b"\x08\x01", 0, len(data) + 2, (11 << 3) | 2) is None


# ---------------------------------------------------------------------------- GPU and field changes


def _node_bytes_change(update: up.NodeUpdate, seq: int) -> tuple[bytes, up.NodeUpdate]:
    value = _value(update, seq, ms=seq * 1_000)
    expected = decode(node_key("c1", update.name), value)
    assert isinstance(expected, up.NodeUpdate)
    return value, expected


async def test_a_gpu_change_converts_only_the_changed_gpu() -> None:
    view, source, a, first = await _applied(pods=2)
    flipped = dataclasses.replace(a.gpus[5], healthy=False, xid_errors=(79,))
    changed = dataclasses.replace(a, gpus=(*a.gpus[:5], flipped, *a.gpus[6:]))
    value, expected = _node_bytes_change(changed, 2)
    await _process(source, [_rec("a", value, 1)])
    got = view.node("c1", "a")
    assert got is not None
    assert _pod_content(got) == _pod_content(expected)
    assert got.content_token == node_content_tail(value, parse(value))
    assert got.gpus[5] == expected.gpus[5]
    assert not got.gpus[5].healthy
    assert all(got.gpus[i] is first.gpus[i] for i in range(8) if i != 5)
    assert got.pods is first.pods
    # And back: a GPU change again, then repeats of it.
    value, expected = _node_bytes_change(a, 3)
    await _process(source, [_rec("a", value, 2)])
    got = view.node("c1", "a")
    assert got is not None
    assert _pod_content(got) == _pod_content(expected)
    await _process(source, [_rec("a", _value(a, 4), 3)])
    assert view.heartbeats[("c1", "a")][0] == 4


async def test_a_change_before_the_gpus_converts_those_fields_only() -> None:
    view, source, a, first = await _applied(pods=2)
    cordoned = dataclasses.replace(a, unschedulable=True, labels=(*a.labels, ("k", "v")))
    value, expected = _node_bytes_change(cordoned, 2)
    await _process(source, [_rec("a", value, 1)])
    got = view.node("c1", "a")
    assert got is not None
    assert _pod_content(got) == _pod_content(expected)
    assert got.unschedulable
    assert got.gpus is first.gpus
    assert got.pods is first.pods
    # Then a pods-only change and a GPU change of the new content.
    moved = dataclasses.replace(cordoned, pods=cordoned.pods[:1] if cordoned.pods else ())
    value, expected = _node_bytes_change(moved, 3)
    await _process(source, [_rec("a", value, 2)])
    got = view.node("c1", "a")
    assert got is not None
    assert _pod_content(got) == _pod_content(expected)
    sick = dataclasses.replace(moved, gpus=(dataclasses.replace(a.gpus[0], healthy=False),))
    value, expected = _node_bytes_change(sick, 4)
    await _process(source, [_rec("a", value, 3)])
    got = view.node("c1", "a")
    assert got is not None
    assert _pod_content(got) == _pod_content(expected)


def _bad_gpu_index(record: pb.TelemetryRecord) -> None:
    record.node.gpus[2].index = 1  # twice


def _bad_utilization(record: pb.TelemetryRecord) -> None:
    record.node.gpus[4].utilization_ratio = 2.0


def _bad_taint(record: pb.TelemetryRecord) -> None:
    record.node.taints[0].effect = "Sometimes"


def _bad_name(record: pb.TelemetryRecord) -> None:
    record.node.name = "b"  # not the key's


def _bad_resources(record: pb.TelemetryRecord) -> None:
    record.node.allocatable.cpu_millicores = -1


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_bad_gpu_index, b"bad-gpus"),
        (_bad_utilization, b"bad-gpus"),
        (_bad_taint, b"bad-taint"),
        (_bad_name, b"key-mismatch"),
        (_bad_resources, b"bad-resources"),
    ],
)
async def test_gpu_and_field_changes_are_dead_lettered_as_decoding_does(
    spoil: object, reason: bytes
) -> None:
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(), view)
    a = gpu_node("a", pods=1)
    await _process(source, [_rec("a", _value(a, 1), 0)])
    record = encode_node(a, sequence=2, observed_unix_ms=1_000)
    spoil(record)  # type: ignore[operator]
    bad = record.SerializeToString(deterministic=True)
    with pytest.raises(InvalidTelemetry) as full:
        decode(node_key("c1", "a"), bad)
    assert full.value.reason.encode() == reason
    producer = await _process(source, [_rec("a", bad, 1)])
    assert [dict(h)[DLQ_REASON_HEADER] for _, _, h in producer.sent] == [reason]
    node = view.node("c1", "a")
    assert node is not None
    assert node.sequence == 1


# ---------------------------------------------------------------------------- changes gated at their slot


async def test_a_change_older_than_a_repeat_applied_before_it_is_a_duplicate() -> None:
    """A change is gated on the cell at its node's slot (`SequenceColumn.admit_at`), which
    repeats have moved ahead of: the column is read first, so a change late behind a repeat
    (at or below its sequence) is dropped, and one above it applied."""
    view, metrics = FleetView(), SourceMetrics()
    source = KafkaSource(KafkaSourceSettings(), view, metrics=metrics)
    a = gpu_node("a", pods=1)
    cordoned = dataclasses.replace(a, unschedulable=True)
    other_pods = gpu_node("a", pods=2)
    await _process(source, [_rec("a", _value(a, 10), 0)])
    await _process(source, [_rec("a", _value(a, 30), 1)])  # a repeat: the column at 30
    assert view.sequence("c1", "a") == 30
    for late in (_value(other_pods, 20), _value(cordoned, 30)):
        await _process(source, [_rec("a", late, 2)])
        assert view.sequence("c1", "a") == 30
        assert view.node("c1", "a") is not None
        assert not view.node("c1", "a").unschedulable  # type: ignore[union-attr]
    assert metrics.telemetry_records.labels("duplicate")._value.get() == 2
    await _process(source, [_rec("a", _value(cordoned, 31), 3)])
    assert view.sequence("c1", "a") == 31
    assert view.node("c1", "a").unschedulable  # type: ignore[union-attr]
    _memories_hold_gate_cells(source)


def test_admit_at_gates_on_the_cell_after_the_column() -> None:
    column = up.SequenceColumn(capacity=2)
    cell = up.SequenceCell(5)
    slot = column.add(cell)
    assert column.admit(np.array([slot]), np.array([9])).tolist() == [True]
    assert cell.last == 5  # the column runs ahead
    assert not column.admit_at(slot, 9)
    assert cell.last == 9  # flushed
    assert column.admit_at(slot, 10)
    assert (cell.last, int(column.seq[slot])) == (10, 9)
    column.refresh(slot)
    assert int(column.seq[slot]) == 10


@pytest.mark.parametrize(
    "value",
    [
        gpu_node("a", pods=2),
        gpu_node("a", pods=2).pods[0],  # type: ignore[index]
        gpu_node("a").gpus[0],
    ],
    ids=["node", "pod", "gpu"],
)
def test_fast_constructors_make_the_same_frozen_values(value: object) -> None:
    make = up.fast_constructor(type(value))
    fields = [getattr(value, f.name) for f in dataclasses.fields(value)]  # type: ignore[arg-type]
    made = make(*fields)
    assert type(made) is type(value)
    assert made == value
    assert hash(made) == hash(value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(made, dataclasses.fields(value)[0].name, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        make(*fields[:-1])


def test_fast_constructors_only_for_slotted_dataclasses() -> None:
    @dataclasses.dataclass(frozen=True)
    class Plain:
        x: int

    with pytest.raises(TypeError):
        up.fast_constructor(Plain)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        x: int

        def __post_init__(self) -> None:
            assert self.x >= 0

    with pytest.raises(TypeError, match="__post_init__"):
        up.fast_constructor(Checked)


async def test_repeats_with_bad_envelopes_in_a_long_poll_are_dead_lettered_in_order() -> None:
    """A poll longer than a scan run (`YIELD_EVERY_RECORDS`): repeats whose envelope the
    vectorized decoder refuses are decoded in full at their place in the poll, so dead
    letters go out in offset order."""
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(), view)
    names = [f"n{i}" for i in range(2_600)]
    nodes = {name: gpu_node(name) for name in names}
    await _process(source, [_rec(n, _value(nodes[n], 1), i) for i, n in enumerate(names)])
    recs = [_rec(n, _value(nodes[n], 2), 10_000 + i) for i, n in enumerate(names)]

    def bad_envelope(i: int) -> Rec:
        """Head and tail of a repeat of node i around an envelope that does not parse (an
        invalid wire type): the vectorized decoder refuses it, the full one dead-letters."""
        value = _value(nodes[names[i]], 1)
        tail = node_content_tail(value, parse(value))
        assert tail is not None
        return _rec(names[i], envelope_head("c1") + b"\x05\x0f" + tail, recs[i].offset)

    recs[2_300] = bad_envelope(2_300)
    recs[1_000] = _rec(names[1_000], _value(nodes[names[1_000]], 0), recs[1_000].offset)
    recs[10] = bad_envelope(10)
    recs[5] = _rec(names[5], _value(nodes[names[5]], 3, cluster="c2"), recs[5].offset)
    producer = await _process(source, recs)
    sent = [(dict(h)[DLQ_REASON_HEADER], dict(h)[DLQ_ORIGIN_HEADER]) for _, _, h in producer.sent]
    assert sent == [
        (b"key-mismatch", b"t/0/10005"),
        (b"undecodable", b"t/0/10010"),
        (b"no-sequence", b"t/0/11000"),
        (b"undecodable", b"t/0/12300"),
    ]
    assert view.sequence("c1", names[0]) == 2
    assert view.sequence("c1", names[10]) == 1
    assert view.sequence("c1", names[2_599]) == 2


@settings(max_examples=100, deadline=None)
@given(
    entries=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 12)), max_size=40),
    start=st.lists(st.integers(1, 8), min_size=6, max_size=6),
)
def test_a_column_gates_a_batch_in_order(entries: list[tuple[int, int]], start: list[int]) -> None:
    """Slots more than once in a batch (a poll spanning two resync rounds) are gated as one
    entry after the other would be."""
    column = up.SequenceColumn(capacity=6)
    for last in start:
        column.add(up.SequenceCell(last))
    expected, lasts = [], list(column.seq.tolist())
    for slot, sequence in entries:
        expected.append(sequence > lasts[slot])
        lasts[slot] = max(lasts[slot], sequence)
    slots = np.array([slot for slot, _ in entries], np.int64)
    sequences = np.array([sequence for _, sequence in entries], np.int64)
    assert column.admit(slots, sequences).tolist() == expected
    assert column.seq.tolist() == lasts


async def test_a_repeat_with_an_odd_envelope_is_dead_lettered_from_its_own_partition() -> None:
    # Positions are 1-based across a poll's partitions: a repeat that the envelope path
    # refuses, first in the poll's second partition, is dead-lettered with its own
    # partition and offset.
    source = KafkaSource(KafkaSourceSettings(dead_letter_topic="dlq"), FleetView())
    a, b = gpu_node("a"), gpu_node("b")
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    await source.process(
        {p0: [_rec("a", _value(a, 1), 0)], p1: [_rec("b", _value(b, 1), 0)]},
        Consumer(),
        Producer(),
    )
    first = _value(b, 1)
    tail = node_content_tail(first, parse(first))
    assert tail is not None
    bad = Rec(node_key("c1", "b"), envelope_head("c1") + b"\x05\x0f" + tail, 7, partition=1)
    producer = Producer()
    await source.process({p0: [_rec("a", _value(a, 2), 1)], p1: [bad]}, Consumer(), producer)
    assert [dict(h)[DLQ_ORIGIN_HEADER] for _, _, h in producer.sent] == [b"t/1/7"]
