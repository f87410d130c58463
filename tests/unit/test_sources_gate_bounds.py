"""The sequence gates stay bounded under node-name churn (autoscaled nodes come and go under
new names) without letting a redelivered old report resurrect a removed node: a removal
leaves a tombstone for a while, then its sequence becomes its cluster's floor."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from fleetd.config import Config, KafkaSourceConfig
from fleetd.journal import Journal
from fleetd.sources import updates as up
from fleetd.sources.codec import encode_node, encode_node_deleted, node_key
from fleetd.sources.kafka import KafkaSource, KafkaSourceSettings, settings_from_config
from fleetd.sources.memory import FleetView, StateSink
from fleetd.state import FleetState
from tests.unit.test_sources_codec import gpu_node
from tests.unit.test_sources_kafka import TP, Consumer, Producer, Rec
from tests.unit.test_sources_unchanged import heartbeats


class Clock:
    def __init__(self, now_s: float = 1_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def _node(name: str, seq: int, cluster: str = "c1") -> up.NodeUpdate:
    return dataclasses.replace(gpu_node(name), cluster=cluster, sequence=seq)


def test_a_removal_is_a_tombstone_then_a_floor() -> None:
    clock = Clock()
    gate = up.SequenceGate(tombstone_ttl_s=60.0, clock=clock)
    assert gate.admit(_node("a", 5))
    assert gate.admit(up.NodeRemoved("c1", "a", 7))
    assert len(gate) == 1  # the tombstone
    assert not gate.admit(_node("a", 6))  # redelivered, older than the removal
    clock.now_s += 61
    assert gate.expire() == 1
    assert len(gate) == 0
    assert gate.last("c1", "node", "a") is None
    # Still never resurrected by what was published before the removal ...
    assert not gate.admit(_node("a", 6))
    assert not gate.admit(_node("a", 7))
    # ... while a newer report (the node is back) and other clusters are admitted.
    assert gate.admit(_node("a", 8))
    assert gate.admit(_node("b", 3, cluster="c2"))


def test_the_floor_is_per_cluster_and_kind() -> None:
    clock = Clock()
    gate = up.SequenceGate(tombstone_ttl_s=1.0, clock=clock)
    assert gate.admit(_node("a", 100))
    assert gate.admit(up.NodeRemoved("c1", "a", 101))
    clock.now_s += 2
    gate.expire()
    pool = up.NodePoolUpdate("c1", "p", 50, "n1", up.Resources())
    assert gate.admit(pool)  # another kind: its own floor
    assert not gate.admit(_node("z", 99))  # a new node older than the expired removal
    assert gate.admit(_node("z", 102))


def test_a_subject_back_before_its_tombstone_expires_keeps_its_entry() -> None:
    clock = Clock()
    gate = up.SequenceGate(tombstone_ttl_s=10.0, clock=clock)
    assert gate.admit(_node("a", 1))
    assert gate.admit(up.NodeRemoved("c1", "a", 2))
    assert gate.admit(_node("a", 3))  # re-created under the same name
    clock.now_s += 11
    assert gate.expire() == 0
    assert gate.last("c1", "node", "a") == 3
    assert not gate.admit(_node("a", 3))


def test_churn_keeps_the_gate_bounded() -> None:
    clock = Clock()
    gate = up.SequenceGate(tombstone_ttl_s=5.0, clock=clock)
    seq = 0
    for generation in range(200):
        names = [f"n{generation}-{i}" for i in range(10)]
        for name in names:
            seq += 1
            assert gate.admit(_node(name, seq))
        for name in names:
            seq += 1
            assert gate.admit(up.NodeRemoved("c1", name, seq))
        clock.now_s += 1
    # Only the last ~5 s of removals are still tombstones (10 names a second).
    assert len(gate) <= 60
    # Pending pods come and go much faster than nodes: the same holds for them.
    for i in range(500):
        seq += 1
        assert gate.admit(up.PendingPod("c1", "ns", f"p{i}", "", up.Resources(), sequence=seq))
        seq += 1
        assert gate.admit(up.PendingPodRemoved("c1", "ns", f"p{i}", sequence=seq))
        clock.now_s += 0.1
    assert len(gate) <= 200


def _state(tmp: Path, clock: Clock) -> FleetState:
    cfg = Config(**{"sources": {"simulated": {"enabled": False}}})  # type: ignore[arg-type]
    return FleetState(cfg, Journal(tmp / "journal.sqlite3"), clock=clock)


def test_state_drops_a_removed_nodes_entry_after_its_tombstone(tmp_path: Path) -> None:
    clock = Clock()
    state = _state(tmp_path, clock)
    state.apply_now(dataclasses.replace(_node("a", 1), content_token=b"A"))
    heartbeats(state, "c1", [("a", 2, b"A")])
    state.apply_now(up.NodeRemoved("c1", "a", 3))
    assert "c1/a" not in state._beats["kafka"].slot_of
    assert not state.apply_now(_node("a", 2))  # redelivered within the tombstone's time
    assert "c1/a" not in state.nodes
    clock.now_s += state.gate.tombstone_ttl_s + 1
    state.gate.expire()
    assert len(state.gate) == 0
    assert state.apply_now(_node("a", 4))  # back for real
    assert "c1/a" in state.nodes


def test_state_keeps_no_floor_for_kubernetes_resource_versions(tmp_path: Path) -> None:
    """A relist hands out objects at the resourceVersion of their last change, which may be
    older than another object's deletion: the state must take them."""
    clock = Clock()
    state = _state(tmp_path, clock)
    state.apply_now(_node("a", 500))
    state.apply_now(up.NodeRemoved("c1", "a", 0))  # watches send removals unordered
    state.apply_now(up.NodeRemoved("c1", "b", 900))
    clock.now_s += state.gate.tombstone_ttl_s + 1
    state.gate.expire()
    assert len(state.gate) == 0  # the unordered removal left a tombstone too
    assert state.apply_now(_node("z", 450))  # created earlier, first seen in a relist now
    assert "c1/z" in state.nodes


def test_state_tombstones_nodes_a_relist_removed(tmp_path: Path) -> None:
    clock = Clock()
    state = _state(tmp_path, clock)
    state.apply_now(_node("a", 1))
    state.apply_now(_node("b", 2))
    state.apply_now(up.ClusterSynced("c1", "kubernetes", frozenset({"b"})))
    assert "c1/a" not in state.nodes
    assert not state.apply_now(_node("a", 1))  # within the tombstone's time
    clock.now_s += state.gate.tombstone_ttl_s + 1
    state.gate.expire()
    assert state.gate.last("c1", "node", "a") is None
    assert state.gate.last("c1", "node", "b") == 2


def test_kafka_source_bounds_its_gate_and_drops_old_reports_of_deleted_nodes() -> None:
    def report(name: str, seq: int) -> bytes:
        return encode_node(gpu_node(name), sequence=seq, observed_unix_ms=1).SerializeToString(
            deterministic=True
        )

    def deleted(name: str, seq: int) -> bytes:
        record = encode_node_deleted("c1", name, sequence=seq, observed_unix_ms=1)
        return record.SerializeToString()

    async def run() -> None:
        view = FleetView()
        source = KafkaSource(KafkaSourceSettings(sequence_tombstone_ttl_s=0.0), view)
        offset = 0
        seq = 0

        def generation_of(generation: int, make: Callable[[str, int], bytes]) -> list[Rec]:
            """One record of five nodes each, by `make`, at the next sequences and offsets."""
            nonlocal offset, seq
            recs = []
            for i in range(5):
                seq += 1
                name = f"n{generation}-{i}"
                recs.append(Rec(node_key("c1", name), make(name, seq), offset))
                offset += 1
            return recs

        for generation in range(30):
            await source.process({TP: generation_of(generation, report)}, Consumer(), Producer())
            await source.process({TP: generation_of(generation, deleted)}, Consumer(), Producer())
        assert not view.nodes
        assert len(source._gate) <= 10
        assert not source._contents
        # A redelivered report of a long deleted node does not bring it back.
        await source.process({TP: [Rec(node_key("c1", "n0-0"), report("n0-0", 1), 0)]},
                             Consumer(), Producer())  # fmt: skip
        assert not view.nodes

    asyncio.run(run())


def test_the_state_behind_the_source_agrees(tmp_path: Path) -> None:
    """Through StateSink: removed nodes leave neither node nor gate entries behind, and the
    source's floor keeps a late redelivery from the state."""
    clock = Clock()
    state = _state(tmp_path, clock)
    a = encode_node(gpu_node("a"), sequence=1, observed_unix_ms=1)
    old = Rec(node_key("c1", "a"), a.SerializeToString(deterministic=True), 0)
    gone = encode_node_deleted("c1", "a", sequence=2, observed_unix_ms=1)

    async def run() -> None:
        source = KafkaSource(KafkaSourceSettings(sequence_tombstone_ttl_s=0.0), StateSink(state))
        for rec in (old, Rec(node_key("c1", "a"), gone.SerializeToString(), 1)):
            await source.process({TP: [rec]}, Consumer(), Producer())
        clock.now_s += state.gate.tombstone_ttl_s + 1
        state.gate.expire()
        assert not state.nodes
        assert len(state.gate) == 0
        await source.process({TP: [old]}, Consumer(), Producer())  # long after

    asyncio.run(run())
    assert not state.nodes


def test_the_tombstone_time_comes_from_the_config() -> None:
    assert settings_from_config(KafkaSourceConfig()).sequence_tombstone_ttl_s == 600.0
    section = KafkaSourceConfig(sequence_tombstone_ttl_s=30.0)
    source = KafkaSource(settings_from_config(section), FleetView())
    assert source._gate.tombstone_ttl_s == 30.0
    with pytest.raises(ValueError, match="sequence_tombstone_ttl_s"):
        KafkaSourceConfig(sequence_tombstone_ttl_s=0)
