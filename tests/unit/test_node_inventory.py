"""Node inventories (telemetry's relist): the record and its chunks, their validation,
joining chunks, the state's removals and their ordering with node reports, and the Kafka
source (dead letters, forgetting removed nodes). The real broker and agent:
tests/integration/test_agent.py::test_a_node_deleted_while_the_agent_was_down_leaves_fleetd.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from fleetd.config import Config
from fleetd.journal import Journal
from fleetd.sources import codec
from fleetd.sources import updates as up
from fleetd.sources.codec import (
    InvalidTelemetry,
    decode,
    encode_node,
    encode_node_inventory,
    inventory_key,
    node_key,
    record_key,
)
from fleetd.sources.inventory import InventoryAssembler
from fleetd.sources.kafka import DLQ_REASON_HEADER, KafkaSource, KafkaSourceSettings
from fleetd.sources.memory import FleetView, StateSink
from fleetd.sources.metrics import SourceMetrics
from fleetd.state import FleetState
from fleetd.v1 import telemetry_pb2 as pb
from tests.unit.test_sources_codec import gpu_node
from tests.unit.test_sources_kafka import TP, Consumer, Producer, Rec
from tests.unit.test_state import FakeClock, node, request

# ---------------------------------------------------------------------------- the record


def _chunks(names: list[str], seq: int = 10, **kw: int) -> list[up.NodeInventoryChunk]:
    out = []
    for record in encode_node_inventory("c1", names, sequence=seq, observed_unix_ms=1, **kw):
        chunk = decode(record_key(record), record.SerializeToString())
        assert isinstance(chunk, up.NodeInventoryChunk)
        out.append(chunk)
    return out


def test_an_inventory_roundtrips_as_one_chunk_when_small() -> None:
    [chunk] = _chunks(["n2", "n1", "n3"])
    assert chunk == up.NodeInventoryChunk("c1", 10, 0, 1, ("n1", "n2", "n3"))


def test_an_empty_cluster_is_one_empty_chunk() -> None:
    assert _chunks([]) == [up.NodeInventoryChunk("c1", 10, 0, 1, ())]


def test_chunks_stay_within_their_byte_budget_and_share_the_sequence() -> None:
    names = [f"gke-prod-gpu-pool-{i:05d}-abcd" for i in range(1000)]  # 29 chars: 31 B each
    records = encode_node_inventory("c1", names, sequence=7, observed_unix_ms=1, chunk_bytes=4096)
    assert len(records) == 8  # 132 names (4,092 B) per chunk; 1000 = 7 x 132 + 76
    for i, record in enumerate(records):
        assert len(record.node_inventory.SerializeToString()) <= 4096 + 12  # + index, count
        assert (record.sequence, record.node_inventory.chunk_index) == (7, i)
        assert record.node_inventory.chunk_count == 8
        assert record_key(record) == f"c1/inventory/{i}".encode()
    assert [n for r in records for n in r.node_inventory.node_names] == sorted(names)


def test_ten_thousand_long_names_fit_kafkas_default_message_size() -> None:
    """The size bound: 10,000 names of the longest legal length (253) are ~2.5 MB; each
    chunk record stays under half of Kafka's default 1 MB (1,048,576 B) message size."""
    names = [f"{i:05d}" + "x" * 248 for i in range(10_000)]
    records = encode_node_inventory("c1", names, sequence=1, observed_unix_ms=1)
    sizes = [len(r.SerializeToString()) for r in records]
    assert len(records) == 5  # 2,047 names (518,000 B) per chunk
    assert max(sizes) <= 512 * 1024 + 64
    typical = [f"ip-10-{i // 250}-{i % 250}-7.us-west-2.compute.internal" for i in range(10_000)]
    assert len(encode_node_inventory("c1", typical, sequence=1, observed_unix_ms=1)) == 1


def _inventory_record(**fields: object) -> pb.TelemetryRecord:
    record = pb.TelemetryRecord(cluster="c1", sequence=5, observed_unix_ms=1)
    record.node_inventory.node_names.extend(["n1", "n2"])
    record.node_inventory.chunk_count = 1
    for name, value in fields.items():
        if name == "node_names":
            del record.node_inventory.node_names[:]
            record.node_inventory.node_names.extend(value)  # type: ignore[arg-type]
        else:
            setattr(record.node_inventory, name, value)
    return record


@pytest.mark.parametrize(
    ("fields", "key", "reason"),
    [
        ({"chunk_count": 0}, b"c1/inventory/0", "bad-inventory"),
        ({"chunk_count": 2, "chunk_index": 2}, b"c1/inventory/2", "bad-inventory"),
        ({"chunk_count": codec.MAX_INVENTORY_CHUNKS + 1}, b"c1/inventory/0", "bad-inventory"),
        ({"node_names": ["n1", "n1"]}, b"c1/inventory/0", "bad-inventory"),
        ({"node_names": ["n1", "-bad-"]}, b"c1/inventory/0", "bad-name"),
        ({"node_names": ["a/b"]}, b"c1/inventory/0", "bad-name"),
        ({}, b"c1/inventory/1", "key-mismatch"),
        ({}, b"c1/n1", "key-mismatch"),
    ],
    ids=[
        "no-chunks",
        "index-not-below-count",
        "too-many-chunks",
        "name-twice",
        "bad-name",
        "slash-in-name",
        "other-chunks-key",
        "a-nodes-key",
    ],
)
def test_invalid_inventories_are_rejected_with_a_reason(
    fields: dict[str, object], key: bytes, reason: str
) -> None:
    with pytest.raises(InvalidTelemetry) as err:
        decode(key, _inventory_record(**fields).SerializeToString())
    assert err.value.reason == reason


def test_too_many_names_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_INVENTORY_NODES", 1)
    with pytest.raises(InvalidTelemetry, match="at most 1"):
        decode(inventory_key("c1", 0), _inventory_record().SerializeToString())


# ---------------------------------------------------------------------------- joining chunks


def test_chunks_join_in_any_order_and_an_older_inventory_is_ignored() -> None:
    names = [f"n{i:03d}" for i in range(100)]
    first = _chunks(names, seq=10, chunk_bytes=204)  # 34 names of 6 B each per chunk
    assert len(first) == 3
    joiner = InventoryAssembler()
    assert joiner.add(first[2]) is None
    assert joiner.add(first[0]) is None
    assert joiner.add(first[0]) is None  # the same chunk again
    assert joiner.pending() == {"c1": (10, 2, 3)}
    whole = joiner.add(first[1])
    assert whole == up.NodeInventory("c1", 10, frozenset(names))
    assert joiner.pending() == {}
    # Redelivered chunks of an inventory already handed out, or of an older one: ignored.
    assert joiner.add(first[1]) is None
    assert joiner.add(_chunks(names[:5], seq=9)[0]) is None
    assert joiner.ignored_chunks == 2


def test_a_newer_inventory_replaces_an_incomplete_one() -> None:
    old = _chunks(["a", "b", "c"], seq=10, chunk_bytes=4)
    new = _chunks(["a", "c"], seq=20, chunk_bytes=4)
    joiner = InventoryAssembler()
    assert joiner.add(old[0]) is None
    assert joiner.add(new[1]) is None  # newer: the incomplete seq 10 is dropped
    assert joiner.add(old[1]) is None  # older than the one being joined
    assert joiner.add(new[0]) == up.NodeInventory("c1", 20, frozenset({"a", "c"}))


def test_inconsistent_or_oversized_inventories_are_abandoned() -> None:
    told: list[str] = []
    joiner = InventoryAssembler(max_nodes=3, on_abandon=told.append)
    assert joiner.add(up.NodeInventoryChunk("c1", 5, 0, 2, ("a",))) is None
    assert joiner.add(up.NodeInventoryChunk("c1", 5, 1, 3, ("b",))) is None
    assert joiner.pending() == {}
    assert joiner.add(up.NodeInventoryChunk("c1", 6, 0, 2, ("a", "b"))) is None
    assert joiner.add(up.NodeInventoryChunk("c1", 6, 1, 2, ("c", "d"))) is None
    assert (joiner.abandoned, joiner.pending()) == (2, {})
    assert told == ["c1", "c1"]


# ---------------------------------------------------------------------------- the gate


def test_the_gate_retires_unlisted_entries_below_the_inventory_once() -> None:
    clock = FakeClock(0.0)
    gate = up.SequenceGate(tombstone_ttl_s=60.0, clock=clock)
    for name, seq in (("a", 1), ("b", 2), ("c", 30)):
        assert gate.admit(node(name, seq))
    assert gate.admit(up.NodeRemoved("c1", "d", 0))  # unordered: no entry
    assert gate.admit(node("e", 3))
    assert gate.admit(up.NodeRemoved("c1", "e", 4))  # deleted the usual way: a tombstone
    assert gate.retire_unlisted("c1", "node", frozenset({"a"}), 20) == ["b"]
    assert gate.last("c1", "node", "b") == 20  # its records below the inventory are dropped
    assert not gate.admit(node("b", 15))
    assert gate.last("c1", "node", "c") == 30  # reported after the list was taken
    # Tombstones are not re-tombstoned by later inventories: they still expire on time.
    clock.now_s = 30.0
    assert gate.retire_unlisted("c1", "node", frozenset({"a"}), 25) == []
    clock.now_s = 61.0
    assert gate.expire() == 2
    assert set(gate.snapshot()) == {("c1", "node", "a"), ("c1", "node", "c")}


# ---------------------------------------------------------------------------- the state


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _kafka_state(tmp_path: Path, clock: FakeClock) -> FleetState:
    state = FleetState(Config(), Journal(tmp_path / "j.db"), clock)
    state.expect_source("kafka", "c1")
    for name in ("n0", "n1", "n2"):
        state.apply_now(node(name, seq=10))
    state.apply_now(up.ClusterSynced("c1", "kafka"))
    return state


def _names(state: FleetState) -> list[str]:
    return sorted(info.name for info in state.nodes.values() if info.cluster == "c1")


def test_an_inventory_removes_unlisted_nodes_as_a_removal_does(
    tmp_path: Path, clock: FakeClock
) -> None:
    state = _kafka_state(tmp_path, clock)
    assert state.place(request("w", gpus=8, cluster="c1")).placements[0].node == "n0"
    pod = up.PodObserved("c1", "ml", "other", "u1", "n0", up.Resources(gpus=0))
    state.apply_now(dataclasses.replace(node("n0", 11), pods=(pod,)))
    assert state.apply_now(up.NodeInventory("c1", 20, frozenset({"n1", "n2"})))
    assert _names(state) == ["n1", "n2"]
    assert "w" not in state.held  # its reservation ended, as on NodeRemoved
    ended = state.history[-1]
    assert ended.explanation is not None
    assert (ended.kind, ended.explanation.summary) == ("expire", "node c1/n0 removed")
    assert ("c1", "u1") not in state.pods
    assert state.gate.last("c1", "node", "n0") == 20
    assert not state.apply_now(node("n0", 15))  # a late report from before the inventory


def test_a_node_added_after_the_inventory_was_taken_survives(
    tmp_path: Path, clock: FakeClock
) -> None:
    state = _kafka_state(tmp_path, clock)
    # n3 joined after the list was taken: its first report (seq 21) is newer. It arrives
    # before the inventory (another partition), and n1's newer heartbeat too.
    state.apply_now(node("n3", 21))
    state.apply_now(node("n1", 25, gpus=4))
    state.apply_now(up.NodeInventory("c1", 20, frozenset({"n0", "n2"})))
    assert _names(state) == ["n0", "n1", "n2", "n3"]


def test_an_older_inventory_removes_nothing(tmp_path: Path, clock: FakeClock) -> None:
    state = _kafka_state(tmp_path, clock)
    state.apply_now(up.NodeInventory("c1", 20, frozenset({"n0", "n1", "n2"})))
    state.apply_now(node("n3", 21))  # added after it
    # The same inventory redelivered, and an older one coming late: dropped by sequence.
    assert not state.apply_now(up.NodeInventory("c1", 20, frozenset({"n0", "n1", "n2"})))
    assert not state.apply_now(up.NodeInventory("c1", 15, frozenset({"n0"})))
    assert _names(state) == ["n0", "n1", "n2", "n3"]
    # Even past the gate, an old list spares what reported since it was taken.
    state._node_inventory(up.NodeInventory("c1", 20, frozenset({"n0", "n1", "n2"})), clock())
    assert _names(state) == ["n0", "n1", "n2", "n3"]


def test_a_late_report_of_an_unlisted_node_does_not_bring_it_back(
    tmp_path: Path, clock: FakeClock
) -> None:
    state = _kafka_state(tmp_path, clock)
    state.apply_now(up.NodeInventory("c1", 20, frozenset({"n0", "n1", "n2"})))
    # n9 was deleted before the list was taken; its last report comes late.
    assert not state.apply_now(node("n9", 12))
    assert "c1/n9" not in state.nodes
    assert state.gate.last("c1", "node", "n9") is None  # no entry left behind
    assert state.apply_now(node("n9", 22))  # back (a new node of that name) after the list
    assert "c1/n9" in state.nodes
    assert state.apply_now(node("n5", 12, cluster="c2"))  # other clusters are not concerned


def test_a_restored_reservation_on_a_node_gone_unseen_ends(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "j.db"
    state = FleetState(Config(), Journal(path), clock)
    for name in ("n0", "n1"):
        state.apply_now(node(name, seq=10))
    placed = state.place(request("w", gpus=2)).placements[0].node
    restarted = FleetState(Config(), Journal(path), clock)
    survivor = "n1" if placed == "n0" else "n0"
    restarted.apply_now(node(survivor, seq=30))
    assert "w" in restarted.held  # waits for its node
    restarted.apply_now(up.NodeInventory("c1", 40, frozenset({survivor})))
    assert "w" not in restarted.held
    ended = restarted.history[-1]
    assert ended.explanation is not None
    assert (ended.kind, ended.explanation.summary) == ("expire", "its node is gone (inventory)")


# ---------------------------------------------------------------------------- the Kafka source


def _report(name: str, seq: int) -> tuple[bytes, bytes]:
    record = encode_node(dataclasses.replace(gpu_node(name), sequence=seq), sequence=seq,
                         observed_unix_ms=1)  # fmt: skip
    return node_key("c1", name), record.SerializeToString(deterministic=True)


def _inventory(names: list[str], seq: int, chunk_bytes: int = 4096) -> list[tuple[bytes, bytes]]:
    records = encode_node_inventory(
        "c1", names, sequence=seq, observed_unix_ms=1, chunk_bytes=chunk_bytes
    )
    return [(record_key(r), r.SerializeToString()) for r in records]


async def _poll(source: KafkaSource, pairs: list[tuple[bytes, bytes]]) -> Producer:
    producer = Producer()
    recs = [Rec(k, v, offset=i) for i, (k, v) in enumerate(pairs)]
    await source.process({TP: recs}, Consumer(), producer)
    return producer


async def test_the_source_joins_chunks_across_polls_and_forgets_removed_nodes(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    state = FleetState(Config(), Journal(tmp_path / "j.db"), clock)
    source = KafkaSource(KafkaSourceSettings(), StateSink(state))
    await _poll(source, [_report("a", 1), _report("b", 2), _report("c", 3)])
    assert set(source._contents) == {b"c1/a", b"c1/b", b"c1/c"}
    first, second = _inventory(["a", "c"], seq=10, chunk_bytes=3)
    await _poll(source, [first, _report("d", 11)])  # d: added after the list was taken
    assert _names(state) == ["a", "b", "c", "d"]  # half an inventory removes nothing
    await _poll(source, [second, _report("a", 12)])
    assert _names(state) == ["a", "c", "d"]
    assert set(source._contents) == {b"c1/a", b"c1/c", b"c1/d"}
    assert source._gate.last("c1", "node", "b") == 10  # a tombstone at the inventory
    # A redelivered report of b, and the whole inventory again: nothing changes.
    producer = await _poll(source, [_report("b", 2), first, second])
    assert _names(state) == ["a", "c", "d"]
    assert not producer.sent


async def test_the_source_dead_letters_a_bad_inventory_and_applies_the_rest() -> None:
    view = FleetView()
    metrics = SourceMetrics()
    source = KafkaSource(KafkaSourceSettings(dead_letter_topic="dlq"), view, metrics=metrics)
    await _poll(source, [_report("a", 1), _report("b", 2)])
    bad = _inventory_record(node_names=["a", "a"])
    producer = await _poll(source, [(inventory_key("c1", 0), bad.SerializeToString())])
    assert [dict(h)[DLQ_REASON_HEADER] for _, _, h in producer.sent] == [b"bad-inventory"]
    assert metrics.dead_letters.labels(reason="bad-inventory")._value.get() == 1
    assert set(view.nodes) == {("c1", "a"), ("c1", "b")}
    await _poll(source, _inventory(["a"], seq=10))
    assert set(view.nodes) == {("c1", "a")}


def test_the_agents_records_decode_as_the_source_reads_them() -> None:
    """What `TelemetryPublisher.publish_node_inventory` sends is what the source joins."""
    from fleetd.sources.publisher import TelemetryPublisher

    class _Producer:
        def __init__(self) -> None:
            self.sent: list[tuple[bytes, bytes]] = []

        async def send(self, topic: str, *, value: bytes, key: bytes) -> asyncio.Future[None]:
            self.sent.append((key, value))
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future

    async def run() -> None:
        producer = _Producer()
        publisher = TelemetryPublisher(producer, wall_clock=lambda: 100.0)
        await publisher.publish_node_inventory("c1", ["b", "a"])
        [(key, value)] = producer.sent
        chunk = decode(key, value)
        assert chunk == up.NodeInventoryChunk("c1", 100_000_000, 0, 1, ("a", "b"))

    asyncio.run(run())


async def test_an_unchanged_report_after_the_inventory_keeps_its_node(tmp_path: Path) -> None:
    """A repeat of b's content (the heartbeat path: sequences moved in bulk, written back to
    the gates' cells lazily) newer than the inventory, in the same poll: b stays, in the
    state and in the source's memory."""
    clock = FakeClock()
    state = FleetState(Config(), Journal(tmp_path / "j.db"), clock)
    source = KafkaSource(KafkaSourceSettings(), StateSink(state))
    await _poll(source, [_report("a", 1), _report("b", 2), _report("c", 3)])
    await _poll(source, [_report("b", 11), *_inventory(["a"], seq=10)])
    assert _names(state) == ["a", "b"]
    assert set(source._contents) == {b"c1/a", b"c1/b"}
    assert source._gate.last("c1", "node", "b") == 11
    assert state.gate.last("c1", "node", "b") == 11
    # b's repeats still refresh it (its heartbeat slot survived the inventory).
    await _poll(source, [_report("b", 12)])
    assert state.gate.last("c1", "node", "b") == 12


# ---------------------------------------------------------------------------- node pools


def test_pools_travel_in_chunk_0_when_listed() -> None:
    records = encode_node_inventory(
        "c1", ["a", "b"], sequence=5, observed_unix_ms=1, chunk_bytes=3, pools=["p2", "p1"]
    )
    chunks = [decode(record_key(r), r.SerializeToString()) for r in records]
    # Chunk 0's budget holds the pools (4 B each) first: "a" and "b" go to chunks 1 and 2.
    assert chunks == [
        up.NodeInventoryChunk("c1", 5, 0, 3, (), ("p1", "p2")),
        up.NodeInventoryChunk("c1", 5, 1, 3, ("a",)),
        up.NodeInventoryChunk("c1", 5, 2, 3, ("b",)),
    ]
    joiner = InventoryAssembler()
    assert [joiner.add(c) for c in chunks if isinstance(c, up.NodeInventoryChunk)][-1] == (
        up.NodeInventory("c1", 5, frozenset({"a", "b"}), frozenset({"p1", "p2"}))
    )
    # No pools in the cluster, listed: an empty list, not "not listed".
    [empty] = encode_node_inventory("c1", [], sequence=5, observed_unix_ms=1, pools=[])
    chunk = decode(record_key(empty), empty.SerializeToString())
    assert isinstance(chunk, up.NodeInventoryChunk)
    assert chunk.pools == ()
    [unlisted] = encode_node_inventory("c1", [], sequence=5, observed_unix_ms=1)
    chunk = decode(record_key(unlisted), unlisted.SerializeToString())
    assert isinstance(chunk, up.NodeInventoryChunk)
    assert chunk.pools is None


@pytest.mark.parametrize(
    ("fields", "key", "reason"),
    [
        ({"node_pool_names": ["p1"]}, b"c1/inventory/0", "bad-inventory"),
        (
            {"lists_node_pools": True, "chunk_index": 1, "chunk_count": 2},
            b"c1/inventory/1",
            "bad-inventory",
        ),
        (
            {"lists_node_pools": True, "node_pool_names": ["p1", "p1"]},
            b"c1/inventory/0",
            "bad-inventory",
        ),
        (
            {"lists_node_pools": True, "node_pool_names": ["bad pool"]},
            b"c1/inventory/0",
            "bad-name",
        ),
    ],
    ids=["pools-without-the-flag", "pools-outside-chunk-0", "pool-twice", "bad-pool-name"],
)
def test_invalid_pool_lists_are_rejected(
    fields: dict[str, object], key: bytes, reason: str
) -> None:
    record = _inventory_record()
    for name, value in fields.items():
        if name == "node_pool_names":
            record.node_inventory.node_pool_names.extend(value)  # type: ignore[arg-type]
        else:
            setattr(record.node_inventory, name, value)
    with pytest.raises(InvalidTelemetry) as err:
        decode(key, record.SerializeToString())
    assert err.value.reason == reason


def _pool(name: str, seq: int) -> up.NodePoolUpdate:
    return up.NodePoolUpdate("c1", name, seq, "a3-highgpu-8g", up.Resources(gpus=8))


def test_an_inventory_that_lists_pools_removes_unlisted_older_ones(
    tmp_path: Path, clock: FakeClock
) -> None:
    state = _kafka_state(tmp_path, clock)
    for name, seq in (("p-gone", 5), ("p-kept", 6), ("p-new", 25)):
        state.apply_now(_pool(name, seq))
    everything = frozenset({"n0", "n1", "n2"})
    state.apply_now(up.NodeInventory("c1", 20, everything))  # pools not listed: left alone
    assert sorted(p for _, p in state.pools) == ["p-gone", "p-kept", "p-new"]
    state.apply_now(up.NodeInventory("c1", 30, everything, frozenset({"p-kept"})))
    assert sorted(p for _, p in state.pools) == ["p-kept"]
    state.apply_now(_pool("p-new", 28))  # reported before the list that left it out
    assert sorted(p for _, p in state.pools) == ["p-kept"]


async def test_the_source_forgets_removed_pools_and_the_agent_lists_its_pools(
    tmp_path: Path,
) -> None:
    view = FleetView()
    source = KafkaSource(KafkaSourceSettings(), view)
    pools = [
        codec.encode_pool(_pool(name, seq), sequence=seq, observed_unix_ms=1)
        for name, seq in (("p1", 1), ("p2", 2))
    ]
    await _poll(source, [(record_key(r), r.SerializeToString()) for r in pools])
    inventory = encode_node_inventory("c1", [], sequence=10, observed_unix_ms=1, pools=["p1"])
    await _poll(source, [(record_key(r), r.SerializeToString()) for r in inventory])
    assert set(view.pools) == {("c1", "p1")}
    assert source._gate.last("c1", "pool", "p2") == 10


async def test_the_source_counts_an_abandoned_inventory_and_removes_nothing() -> None:
    view = FleetView()
    metrics = SourceMetrics()
    source = KafkaSource(KafkaSourceSettings(), view, metrics=metrics)
    await _poll(source, [_report("a", 1), _report("b", 2)])
    # Chunk 0 of a two-chunk inventory, then a chunk 1 that says there are three.
    first = _inventory_record(node_names=["a"], chunk_index=0, chunk_count=2)
    second = _inventory_record(node_names=[], chunk_index=1, chunk_count=3)
    pairs = [(inventory_key("c1", i), r.SerializeToString()) for i, r in enumerate((first, second))]
    producer = await _poll(source, pairs)
    assert not producer.sent  # each chunk is valid on its own
    assert metrics.inventories_abandoned.labels(cluster="c1")._value.get() == 1
    assert set(view.nodes) == {("c1", "a"), ("c1", "b")}
