"""The autoscaling loop: pools from telemetry, deduplicated decisions, in-flight targets."""

from __future__ import annotations

from pathlib import Path

from fleetd.autoscaler import Autoscaler, node_pool
from fleetd.config import Config
from fleetd.engine import PodRequest
from fleetd.journal import Journal
from fleetd.sources import updates as up
from fleetd.state import FleetState, WorkloadRequest

GIB = 1024**3
RES = up.Resources(cpu_millicores=64_000, memory_bytes=512 * GIB, gpus=8)


def pool_update(current: int, seq: int = 1) -> up.NodePoolUpdate:
    return up.NodePoolUpdate(
        "c1", "a100", seq, "p4d", RES, gpu_model="A100", price_per_hour=30.0,
        min_size=0, max_size=4, current_size=current,
    )  # fmt: skip


def state_with_one_full_node(tmp_path: Path) -> FleetState:
    state = FleetState(Config(), Journal(tmp_path / "j.db"), lambda: 1000.0)
    state.expect_source("t", "c1")
    state.apply_now(pool_update(1))
    state.apply_now(up.NodeUpdate("c1", "n0", 1, RES, RES, gpu_model="A100", node_pool="a100"))
    state.apply_now(up.ClusterSynced("c1", "t"))
    return state


def gpus(wid: str, n: int) -> WorkloadRequest:
    pod = PodRequest(f"{wid}-0", 1000, GIB, gpu_count=n)
    return WorkloadRequest(wid, "ml", 0, (pod,), fingerprint=f"{wid}:{n}")


def test_node_pool_from_telemetry() -> None:
    pool = node_pool(pool_update(2))
    assert pool is not None
    assert (pool.key, pool.gpu_count, pool.max_size, pool.price_per_hour) == (
        ("c1", "a100"), 8, 4, 30.0,
    )  # fmt: skip
    broken = up.NodePoolUpdate("c1", "x", 1, "t", up.Resources(gpus=8), gpu_model="")
    assert node_pool(broken) is None  # GPUs without a model cannot make nodes


def test_scale_up_once_then_in_flight(tmp_path: Path) -> None:
    state = state_with_one_full_node(tmp_path)
    assert state.place(gpus("fill", 8)).result == "placed"
    assert state.place(gpus("wait", 8)).result == "queued"
    scaler = Autoscaler(state, lambda: state.config, lambda: 1000.0)
    [decision] = scaler.step()
    assert (decision.pool, decision.delta, decision.unblocks) == ("a100", 1, ("wait",))
    assert [e.decision.id for e in state.scale.history] == [decision.id]
    assert scaler.step() == []  # nothing changed: nothing new
    # Another queued workload: the node already asked for counts as in flight.
    assert state.place(gpus("wait2", 8)).result == "queued"
    [second] = scaler.step()
    assert second.delta == 1
    assert [e.to_size for e in state.scale.history] == [2, 3]


def test_scale_down_removes_idle_nodes_but_never_a_gang(tmp_path: Path) -> None:
    clock = [1000.0]
    state = FleetState(Config(), Journal(tmp_path / "j.db"), lambda: clock[0])
    state.expect_source("t", "c1")
    state.apply_now(pool_update(4))
    for i in range(4):
        state.apply_now(
            up.NodeUpdate("c1", f"n{i}", 1, RES, RES, gpu_model="A100", node_pool="a100")
        )
    state.apply_now(up.ClusterSynced("c1", "t"))
    gang = WorkloadRequest(
        "g", "ml", 0, tuple(PodRequest(f"g-{j}", 1000, GIB, gpu_count=8) for j in range(2)),
        gang=True, fingerprint="g",
    )  # fmt: skip
    assert state.place(gang).result == "placed"
    gang_nodes = {a.node for a in state.held["g"].slots if a is not None}
    scaler = Autoscaler(state, lambda: state.config, lambda: clock[0])
    assert scaler.step_down() == []  # inside the stabilization window: nothing
    clock[0] += state.config.autoscaling.scale_down_after_s + 1
    decisions = scaler.step_down()
    removed = {n for d in decisions for n in d.remove_nodes}
    # Idle nodes only (as many as the pool's disruption budget allows at once).
    assert removed
    assert removed <= {f"c1/n{i}" for i in range(4)} - gang_nodes
    assert all(d.kind.value == "scale-down" for d in decisions)
    assert scaler.step_down() == []  # the same advice is not streamed twice
