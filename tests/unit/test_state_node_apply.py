"""The state's short paths for a changed node report leave exactly what the full write does.

`FleetState` applies a report that changes only a node's cordon, readiness or GPU health
without rebuilding its node-table row (`_node_flags_update`), and reconciles a report's pods
without a call per unchanged pod. Each property feeds one update stream to a state as it is
and to one with the short paths off (every change written in full, every pod passed to
`_pod_observed`), and compares everything the state holds about nodes and pods.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from aiokafka import TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetd import state as state_module
from fleetd.config import Config
from fleetd.journal import Journal
from fleetd.loadgen import periodic_reports, synthetic_fleet
from fleetd.sources import updates as up
from fleetd.sources.kafka import KafkaSource, KafkaSourceSettings
from fleetd.sources.memory import StateSink
from fleetd.state import GPU_MILLI_LABEL, FleetState
from tests.unit.test_sources_kafka import Consumer, Producer, Rec

GIB = 1024**3


class _Clock:
    now_s = 1_000.0

    def __call__(self) -> float:
        return self.now_s


def _node(name: str, gpus: int) -> up.NodeUpdate:
    res = up.Resources(cpu_millicores=32_000, memory_bytes=256 * GIB, gpus=gpus)
    return up.NodeUpdate(
        cluster="c", name=name, sequence=0, capacity=res, allocatable=res,
        gpu_model="A100" if gpus else "", node_pool="p",
        gpus=tuple(up.GpuDevice(i, "A100", 80 * GIB, True) for i in range(gpus)),
        pods=(),
    )  # fmt: skip


def _pod(node: str, uid: str, gpus: int, milli: str = "", phase: str = "Running") -> up.PodObserved:
    labels = ((GPU_MILLI_LABEL, milli),) if milli else ()
    res = up.Resources(cpu_millicores=1000, memory_bytes=GIB, gpus=gpus)
    return up.PodObserved("c", "ml", uid, uid, node, res, phase=phase, labels=labels)


#: One step: (node index, what changes). "cordon", "ready", "gpu" (index, healthy),
#: "gpu-dup" (an index listed twice), "add" (pod gpus, milli label), "drop" (pod slot),
#: "replace" (pod slot, new pod's gpus, milli label, cpu), "swap" (pod slot: one like it),
#: "finish" (pod slot), "same" (the same content again), "stale" (the node goes stale),
#: "lost" (its cluster's sync lost / back): no report; "k8s": a report without pods.
step = st.one_of(
    st.tuples(st.integers(0, 2), st.just("cordon")),
    st.tuples(st.integers(0, 2), st.just("ready")),
    st.tuples(st.integers(0, 2), st.just("gpu"), st.integers(0, 3), st.booleans()),
    st.tuples(st.integers(0, 2), st.just("gpu-dup"), st.integers(0, 3), st.booleans()),
    st.tuples(st.integers(0, 2), st.just("add"), st.sampled_from([0, 1, 2]),
              st.sampled_from(["", "500", "x"])),
    st.tuples(st.integers(0, 2), st.just("drop"), st.integers(0, 3)),
    st.tuples(st.integers(0, 2), st.just("swap"), st.integers(0, 3)),
    st.tuples(st.integers(0, 2), st.just("replace"), st.integers(0, 3), st.sampled_from([0, 1, 2]),
              st.sampled_from(["", "500"]), st.sampled_from([1000, 2000])),
    st.tuples(st.integers(0, 2), st.just("finish"), st.integers(0, 3)),
    st.tuples(st.integers(0, 2), st.just("same")),
    st.tuples(st.integers(0, 2), st.just("stale")),
    st.tuples(st.integers(0, 2), st.just("lost")),
    st.tuples(st.integers(0, 2), st.just("k8s")),
)  # fmt: skip


def _run(steps: list[tuple[object, ...]], tmp: Path) -> FleetState:
    clock = _Clock()
    state = FleetState(Config(), Journal(tmp / "journal.sqlite3"), clock)
    current = [_node(f"n{i}", gpus) for i, gpus in enumerate((4, 2, 0))]
    sequence = 0
    uid = 0
    for i, n in enumerate(current):
        sequence += 1
        state.apply_now(dataclasses.replace(n, sequence=sequence, content_token=b"%d" % i))
    for number, (index, kind, *args) in enumerate(steps):
        assert isinstance(index, int)
        clock.now_s += 1.0
        n = current[index]
        pods = n.pods or ()
        if kind == "cordon":
            n = dataclasses.replace(n, unschedulable=not n.unschedulable)
        elif kind == "ready":
            n = dataclasses.replace(n, ready=not n.ready)
        elif kind in ("gpu", "gpu-dup") and n.gpus:
            g, healthy = int(args[0]) % len(n.gpus), bool(args[1])
            dev = dataclasses.replace(n.gpus[g], healthy=healthy)
            gpus = (*n.gpus[:g], dev, *n.gpus[g + 1 :])
            if kind == "gpu-dup":
                gpus = (*gpus, dataclasses.replace(dev, healthy=not healthy))
            n = dataclasses.replace(n, gpus=gpus)
        elif kind == "add":
            uid += 1
            gpus_wanted, milli = int(args[0]), str(args[1])  # type: ignore[call-overload]
            n = dataclasses.replace(n, pods=(*pods, _pod(n.name, f"p{uid}", gpus_wanted, milli)))
        elif kind == "replace" and pods:
            # One pod replaced by another (the same requests or not): `_pod_replaced`.
            uid += 1
            k = int(args[0]) % len(pods)  # type: ignore[call-overload]
            gpus_wanted, milli, cpu = int(args[1]), str(args[2]), int(args[3])  # type: ignore[call-overload]
            new = _pod(n.name, f"p{uid}", gpus_wanted, milli)
            new = dataclasses.replace(
                new, requests=dataclasses.replace(new.requests, cpu_millicores=cpu)
            )
            n = dataclasses.replace(n, pods=(*pods[:k], new, *pods[k + 1 :]))
        elif kind == "swap" and pods:
            # A pod replaced by one like it (a new uid): mostly `_pod_replaced`.
            uid += 1
            k = int(args[0]) % len(pods)  # type: ignore[call-overload]
            new = dataclasses.replace(pods[k], uid=f"p{uid}", name=f"p{uid}", phase="Running")
            n = dataclasses.replace(n, pods=(*pods[:k], new, *pods[k + 1 :]))
        elif kind == "drop" and pods:
            k = int(args[0]) % len(pods)  # type: ignore[call-overload]
            n = dataclasses.replace(n, pods=pods[:k] + pods[k + 1 :])
        elif kind == "finish" and pods:
            k = int(args[0]) % len(pods)  # type: ignore[call-overload]
            done = dataclasses.replace(pods[k], phase="Succeeded")
            n = dataclasses.replace(n, pods=(*pods[:k], done, *pods[k + 1 :]))
        elif kind == "stale":
            state.apply_now(up.NodeStale("c", n.name, True))
            continue
        elif kind == "lost":
            state.lost_clusters = frozenset() if state.lost_clusters else frozenset({"c"})
            continue
        current[index] = n
        sequence += 1
        update = dataclasses.replace(n, sequence=sequence, content_token=b"t%d" % number)
        if kind == "k8s":
            update = dataclasses.replace(update, pods=None)
        state.apply_now(update)
    return state


def _reconcile_every_pod(self: FleetState, u: up.NodeUpdate, now: float, key: str = "") -> None:
    """The reference reconciliation: every reported pod through `_pod_observed`."""
    if u.pods is None:
        return
    current = {p.uid or f"{p.namespace}/{p.name}" for p in u.pods}
    for uid in list(self._pods_on.get((u.cluster, u.name), ())):
        if uid not in current:
            self._pod_removed(u.cluster, uid, now)
    for p in u.pods:
        self._pod_observed(p, now)


def _everything(state: FleetState) -> dict[str, object]:
    def last_update(info: object) -> object:
        applied = getattr(info, "applied_update", None)
        last = getattr(info, "last_update", None)
        if last is None and applied is not None:
            return dataclasses.replace(applied, sequence=0, observed_at_s=0.0, pods=None)
        return last

    nodes = {
        key: (
            info.pool, info.zone, info.gpu_model, info.labels, info.taints, info.ready,
            info.cordoned, info.stale, info.last_seen_s, info.spec_signature,
            info.content_token, last_update(info),
        )
        for key, info in state.nodes.items()
    }  # fmt: skip
    pods = {
        key: (p.cluster, p.node, p.slot, p.labels, p.request, p.reservation)
        for key, p in state.pods.items()
    }
    on = {key: sorted(uids) for key, uids in state._pods_on.items()}
    return {
        "nodes": nodes,
        "pods": pods,
        "pods_on": on,
        "node_since": dict(state.node_since),
        "gate": state.gate.snapshot(),
        "counters": (state._structure_version, state.ignored_updates, state.invalid_updates),
    }


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(step, min_size=1, max_size=30))
def test_short_paths_leave_what_the_full_write_leaves(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, steps: list
) -> None:
    short = _run(steps, tmp_path_factory.mktemp("short"))
    with monkeypatch.context() as m:
        # The reference: every node change written in full.
        m.setattr(state_module, "_flags_only_changed", lambda old, new: False)
        m.setattr(FleetState, "_reconcile_pods", _reconcile_every_pod)
        full = _run(steps, tmp_path_factory.mktemp("full"))
    assert short.fleet.state_equal(full.fleet)
    assert _everything(short) == _everything(full)


def test_a_gpu_health_flip_takes_the_short_path_and_marks_the_gpu(tmp_path: Path) -> None:
    state = _run([(0, "gpu", 2, False)], tmp_path)
    slot = state.fleet.slot("c/n0")
    assert int(state.fleet.gpu_unhealthy_mask[slot]) == 0b100
    assert state.nodes["c/n0"].applied_update is not None
    assert state.nodes["c/n0"].last_update is None  # (made when a report without pods needs it)


def _bind(state: FleetState, slot: int, name: str, token: bytes) -> None:
    state.apply_now(up.HeartbeatSlots("kafka", "c", (slot,), (name,), (token,)))


def _beat(state: FleetState, slot: int, sequence: int) -> bool:
    return state.apply_now(up.NodeHeartbeats.of("kafka", [slot], [sequence], [2_000.0]))


def test_a_changed_nodes_slot_refreshes_only_once_bound_to_the_new_content(
    tmp_path: Path,
) -> None:
    clock = _Clock()
    state = FleetState(Config(), Journal(tmp_path / "journal.sqlite3"), clock)
    a = dataclasses.replace(_node("a", 2), sequence=1, content_token=b"A")
    state.apply_now(a)
    _bind(state, 0, "a", b"A")
    clock.now_s = 1_005.0
    assert _beat(state, 0, 2)
    # A pods-only change: the node's `_NodeInfo` stays, its slot is suspended.
    clock.now_s = 1_010.0
    state.apply_now(
        dataclasses.replace(a, sequence=3, content_token=b"B", pods=(_pod("a", "p1", 1),))
    )
    assert state.nodes["c/a"].last_seen_s == 1_010.0
    assert not _beat(state, 0, 4)  # (the old content's slot refreshes nothing)
    assert state.gate.last("c", "node", "a") == 3
    _bind(state, 0, "a", b"A")  # a binding to content replaced since binds nothing
    assert not _beat(state, 0, 5)
    _bind(state, 0, "a", b"B")
    clock.now_s = 1_020.0
    assert _beat(state, 0, 6)
    assert state.gate.last("c", "node", "a") == 6
    assert state.nodes["c/a"].last_seen_s == 1_020.0
    assert not _beat(state, 0, 6)  # (redelivered)
    # Suspended, then the node's spec changes in full (a new `_NodeInfo`): the slot is
    # dropped, and binding it again to the new content refreshes the new info.
    state.apply_now(
        dataclasses.replace(a, sequence=7, content_token=b"C", labels=(("zone", "z2"),))
    )
    assert "c/a" not in state._beats["kafka"].slot_of
    _bind(state, 0, "a", b"C")
    clock.now_s = 1_030.0
    assert _beat(state, 0, 8)
    assert state.gate.last("c", "node", "a") == 8  # (`gate` writes heartbeats back)
    assert state.nodes["c/a"].last_seen_s == 1_030.0
    state.apply_now(up.NodeRemoved("c", "a", 9))
    assert not state._beats["kafka"].slot_of
    assert not _beat(state, 0, 10)


def test_a_suspended_slot_bound_to_another_node_leaves_the_first(tmp_path: Path) -> None:
    state = FleetState(Config(), Journal(tmp_path / "journal.sqlite3"), _Clock())
    a = dataclasses.replace(_node("a", 0), sequence=1, content_token=b"A")
    b = dataclasses.replace(_node("b", 0), sequence=2, content_token=b"B")
    state.apply_now(a)
    state.apply_now(b)
    _bind(state, 0, "a", b"A")
    state.apply_now(dataclasses.replace(a, sequence=3, content_token=b"A2", pods=()))
    _bind(state, 0, "b", b"B")
    assert _beat(state, 0, 4)
    assert state.gate.last("c", "node", "b") == 4
    assert state.gate.last("c", "node", "a") == 3
    _bind(state, 0, "a", b"A2")  # (slot 0 moves back to a: b's binding goes)
    assert _beat(state, 0, 5)
    assert state.gate.last("c", "node", "a") == 5
    assert state.gate.last("c", "node", "b") == 4


@pytest.mark.parametrize(("seed", "poll"), [(1, 9), (2, 120)])
def test_every_heartbeat_slot_holds_its_nodes_gate_cell(
    tmp_path: Path, seed: int, poll: int
) -> None:
    """What `_HeartbeatTable.rebind` and the apply path's gate check rest on: a bound or
    suspended slot's cell is the gate's cell of its node, whatever the stream did (changes,
    repeats, coalescing, redelivery)."""
    rng = np.random.default_rng(seed)
    fleet = synthetic_fleet(rng, clusters=2, nodes_per_cluster=12)
    records = list(periodic_reports(fleet, 10, rng, changed_fraction=0.4))
    records += records[len(records) // 2 :]  # (redelivered: dropped by sequence)
    state = FleetState(Config(), Journal(tmp_path / "journal.sqlite3"), _Clock())

    async def run() -> None:
        source = KafkaSource(KafkaSourceSettings(), StateSink(state))
        recs = [Rec(key, value, i) for i, (key, value) in enumerate(records)]
        for i in range(0, len(recs), poll):
            await source.process(
                {TopicPartition("t", 0): recs[i : i + poll]}, Consumer(), Producer()
            )
            for table in state._beats.values():
                for slot, info in enumerate(table.infos):
                    if info is not None:
                        key = table.keys[slot]
                        assert table.slot_of[key] == slot
                        assert state.nodes[key] is info
                        cluster, _, name = key.partition("/")
                        assert table.cells[slot] is state._gate.cell((cluster, "node", name))
                        assert (info.beat_table, info.beat_slot) == (table, slot)
            bound = {id(info) for t in state._beats.values() for info in t.infos if info}
            for info in state.nodes.values():
                if id(info) not in bound:
                    assert (info.beat_table, info.beat_slot) == (None, -1)

    asyncio.run(run())
    assert any(table.slot_of for table in state._beats.values())


def test_a_pod_replaced_by_one_of_its_shape_takes_its_allocation(tmp_path: Path) -> None:
    """`_pod_replaced`: the new pod holds the old one's GPU and the node table is not
    written (its version stays), as freeing and allocating again would leave it."""
    state = _run([(0, "add", 1, ""), (0, "add", 1, "")], tmp_path)
    slot = state.fleet.slot("c/n0")
    held = state.fleet.gpu_free_milli[slot, :4].tolist()
    version = state.fleet.version
    before = state.pods[("c", "p1")].slot
    n0 = state.nodes["c/n0"].spec_update
    assert n0 is not None
    assert n0.pods is not None
    new = _pod("n0", "p9", 1)
    state.apply_now(
        dataclasses.replace(n0, sequence=99, pods=(new, n0.pods[1]), content_token=b"r")
    )
    assert ("c", "p1") not in state.pods
    assert state.pods[("c", "p9")].slot is before
    assert state._pods_on[("c", "n0")] == {"p2", "p9"}
    assert state.fleet.version == version
    assert state.fleet.gpu_free_milli[slot, :4].tolist() == held
