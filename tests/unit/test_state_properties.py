"""Property: whatever sequence of requests and telemetry arrives, fleet usage is exactly the sum
of what reservations and observed pods hold, no GPU is ever over 1000 milli, and a restart
from the journal reproduces the same usage."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.config import Config
from fleetd.engine import PodRequest, gpu_allocated_milli
from fleetd.journal import Journal
from fleetd.sources import updates as up
from fleetd.state import POD_NAME_LABEL, WORKLOAD_LABEL, FleetState, StateError, WorkloadRequest

GIB = 1024**3

op = st.one_of(
    st.tuples(st.just("place"), st.integers(0, 15), st.sampled_from([0, 1, 2, 4, 8]),
              st.sampled_from([0, 250, 500]), st.integers(1, 3)),
    st.tuples(st.just("release"), st.integers(0, 15)),
    st.tuples(st.just("start"), st.integers(0, 15)),
    st.tuples(st.just("finish"), st.integers(0, 15)),
    st.tuples(st.just("expire"), st.integers(1, 400)),
    st.tuples(st.just("foreign"), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.just("remove-node"), st.integers(0, 3)),
)  # fmt: skip


def node(i: int, seq: int) -> up.NodeUpdate:
    res = up.Resources(cpu_millicores=32_000, memory_bytes=256 * GIB, gpus=4)
    return up.NodeUpdate("c", f"n{i}", seq, res, res, gpu_model="A100", node_pool="p")


class Clock:
    now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def usage(state: FleetState) -> dict[str, list[int]]:
    return {k: gpu_allocated_milli(state.fleet, state.fleet.slot(k)) for k in sorted(state.nodes)}


def expected_usage(state: FleetState) -> dict[str, list[int]]:
    out = {k: [0] * int(state.fleet.gpu_count[state.fleet.slot(k)]) for k in state.nodes}
    allocs = [a for h in state.held.values() for a in h.slots if a is not None]
    allocs += [p.slot for p in state.pods.values() if p.slot is not None]
    for a in allocs:
        for g in a.gpu_indices:
            out[a.node][g] += a.gpu_milli_per_gpu
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(op, min_size=1, max_size=40))
def test_usage_is_exactly_what_is_held(ops: list[tuple[int | str, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "j.db"
        clock = Clock()
        state = FleetState(Config(), Journal(path), clock)
        state.expect_source("t", "c")
        seq = 1
        for i in range(4):
            state.apply_now(node(i, seq))
        state.apply_now(up.ClusterSynced("c", "t"))
        for o in ops:
            seq += 1
            kind = o[0]
            try:
                if kind == "place":
                    _, w, gpus, milli, n = o
                    pods = tuple(
                        PodRequest(f"w{w}-{j}", 1000, GIB, gpus, 0 if gpus else milli)
                        for j in range(int(n))
                    )
                    fp = f"{gpus}:{milli}:{n}"
                    state.place(WorkloadRequest(f"w{w}", "t", 0, pods, gang=n > 1, fingerprint=fp))
                elif kind == "release":
                    state.release(f"w{o[1]}")
                elif kind in ("start", "finish"):
                    held = state.held.get(f"w{o[1]}")
                    if held is None:
                        continue
                    for p in held.record.pods:
                        uid = f"w{o[1]}/{p.pod_name}"
                        if kind == "start":
                            res = up.Resources(
                                cpu_millicores=p.cpu_millicores, memory_bytes=p.memory_bytes
                            )
                            labels = up.labels_of(
                                {WORKLOAD_LABEL: f"w{o[1]}", POD_NAME_LABEL: p.pod_name}
                            )
                            state.apply_now(
                                up.PodObserved(
                                    "c",
                                    "ns",
                                    p.pod_name,
                                    uid,
                                    p.node,
                                    res,
                                    labels=labels,
                                    sequence=seq,
                                )
                            )
                        else:
                            state.apply_now(
                                up.PodRemoved("c", "ns", p.pod_name, uid, p.node, sequence=seq)
                            )
                elif kind == "expire":
                    clock.now_s += float(o[1])
                    state.expire_due()
                elif kind == "foreign":
                    res = up.Resources(cpu_millicores=500, memory_bytes=GIB, gpus=int(o[2]))
                    state.apply_now(
                        up.PodObserved(
                            "c", "ns", f"f{seq}", f"f{seq}", f"n{o[1]}", res, sequence=seq
                        )
                    )
                elif kind == "remove-node":
                    state.apply_now(up.NodeRemoved("c", f"n{o[1]}", sequence=seq))
            except StateError:
                pass
            got = usage(state)
            assert got == expected_usage(state)
            assert all(0 <= a <= 1000 for gpus in got.values() for a in gpus)
        # Restart from the journal: reservations come back exactly (observed pods are re-reported
        # by the cluster, so compare what reservations hold).
        held_only = {k: [0] * len(v) for k, v in usage(state).items()}
        for h in state.held.values():
            for a in h.slots:
                if a is not None:
                    for g in a.gpu_indices:
                        held_only[a.node][g] += a.gpu_milli_per_gpu
        restarted = FleetState(Config(), Journal(path), clock)
        # As in the daemon, the source is declared before its first update: the restored
        # queue is retried only after the sync, so usage is what reservations hold.
        restarted.expect_source("t", "c")
        for key in sorted(state.nodes):
            restarted.apply_now(node(int(key.split("/n")[1]), 1))
        assert usage(restarted) == held_only
