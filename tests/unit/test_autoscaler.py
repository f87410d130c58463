"""The autoscaling loop: pools from telemetry, deduplicated decisions, in-flight targets."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from fleetd.autoscaler import DO_NOT_DISRUPT_LABEL, Autoscaler, autoscale_policy, node_pool
from fleetd.config import Config
from fleetd.engine import PodRequest
from fleetd.journal import Journal
from fleetd.metrics import Metrics
from fleetd.sources import updates as up
from fleetd.state import FleetState, WorkloadRequest
from scheduling.autoscale import (
    AutoscalePolicy,
    DecisionKind,
    DecisionReason,
    RecheckFailure,
    plan_scale_down,
)

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


def test_no_scale_up_for_work_its_team_quota_holds_back(tmp_path: Path) -> None:
    state = state_with_one_full_node(tmp_path)
    state.set_config(Config(teams={"quotas": {"ml": {"gpus": 8}}}))  # type: ignore[arg-type]
    assert state.place(gpus("fill", 8)).result == "placed"
    assert state.place(gpus("over", 8)).result == "queued"  # by ml's quota: a node won't help
    scaler = Autoscaler(state, lambda: state.config, lambda: 1000.0)
    assert scaler.step() == []
    # Once the quota is raised it waits for capacity: then a node is planned for it.
    state.set_config(Config(teams={"quotas": {"ml": {"gpus": 16}}}))  # type: ignore[arg-type]
    [decision] = scaler.step()
    assert (decision.pool, decision.delta, decision.unblocks) == ("a100", 1, ("over",))


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


def idle_pool_state(tmp_path: Path, clock: list[float], nodes: int = 4) -> FleetState:
    state = FleetState(Config(), Journal(tmp_path / "j.db"), lambda: clock[0])
    state.expect_source("t", "c1")
    state.apply_now(pool_update(nodes))
    for i in range(nodes):
        state.apply_now(
            up.NodeUpdate("c1", f"n{i}", 1, RES, RES, gpu_model="A100", node_pool="a100")
        )
    state.apply_now(up.ClusterSynced("c1", "t"))
    return state


def test_dry_run_streams_marked_decisions_and_keeps_targets(tmp_path: Path) -> None:
    state = state_with_one_full_node(tmp_path)
    config = Config.model_validate({"autoscaling": {"dry_run": True}})
    metrics = Metrics()
    scaler = Autoscaler(state, lambda: config, lambda: 1000.0, metrics)
    assert state.place(gpus("fill", 8)).result == "placed"
    assert state.place(gpus("wait", 8)).result == "queued"
    [decision] = scaler.step()
    assert (decision.pool, decision.delta) == ("a100", 1)
    [event] = state.scale.history
    assert event.dry_run
    assert (event.from_size, event.to_size) == (1, 2)
    assert scaler.targets == {}  # not in flight: nobody acts on a dry-run decision
    # A second queued workload: nothing was counted in flight, so the plan asks for 2 now.
    assert state.place(gpus("wait2", 8)).result == "queued"
    [second] = scaler.step()
    assert second.delta == 2
    assert [(e.from_size, e.to_size, e.dry_run) for e in state.scale.history] == [
        (1, 2, True), (1, 3, True),
    ]  # fmt: skip
    text = generate_latest(metrics.registry).decode()
    assert 'fleetd_scale_decisions_total{dry_run="true",kind="scale-up"} 2.0' in text
    # The last round's expected cost: two 30 $/h nodes.
    assert 'fleetd_scale_planned_cost_per_hour{dry_run="true"} 60.0' in text


def test_scale_up_metrics(tmp_path: Path) -> None:
    state = state_with_one_full_node(tmp_path)
    metrics = Metrics()
    scaler = Autoscaler(state, lambda: state.config, lambda: 1000.0, metrics)
    assert state.place(gpus("fill", 8)).result == "placed"
    assert state.place(gpus("wait", 8)).result == "queued"
    [decision] = scaler.step()
    assert decision.unblocks == ("wait",)
    assert not state.scale.history[-1].dry_run
    text = generate_latest(metrics.registry).decode()
    assert 'fleetd_scale_decisions_total{dry_run="false",kind="scale-up"} 1.0' in text
    assert 'fleetd_scale_planned_cost_per_hour{dry_run="false"} 30.0' in text


def test_scale_down_is_rechecked_on_a_fresh_snapshot(tmp_path: Path) -> None:
    clock = [1000.0]
    state = idle_pool_state(tmp_path, clock)
    metrics = Metrics()
    scaler = Autoscaler(state, lambda: state.config, lambda: clock[0], metrics)
    clock[0] += state.config.autoscaling.scale_down_after_s + 1
    plan = plan_scale_down(scaler.down_request())
    [decision] = plan.decisions  # the pool's budget (10% of 4, rounded up): one node
    [node] = decision.remove_nodes
    # Between planning and emitting, a pod that must not be disrupted lands on that node.
    dnd = up.PodObserved(
        "c1", "ns", "keep", "uid-keep", node.split("/", 1)[1], up.Resources(1000, GIB),
        labels=((DO_NOT_DISRUPT_LABEL, "true"),),
    )  # fmt: skip
    assert state.apply_now(dnd)
    assert scaler.emit_down(plan.decisions) == []
    assert scaler.recheck_failures == {RecheckFailure.DO_NOT_DISRUPT: 1}
    assert list(state.scale.history) == []
    text = generate_latest(metrics.registry).decode()
    assert 'fleetd_scale_recheck_failures_total{reason="do-not-disrupt"} 1.0' in text
    # Planned again on the new state, another idle node is advised instead.
    [again] = scaler.step_down()
    assert again.remove_nodes != decision.remove_nodes


def test_emitted_scale_down_holds_budget_until_its_node_is_gone(tmp_path: Path) -> None:
    clock = [1000.0]
    state = idle_pool_state(tmp_path, clock)
    scaler = Autoscaler(state, lambda: state.config, lambda: clock[0])
    clock[0] += state.config.autoscaling.scale_down_after_s + 1
    [first] = scaler.step_down()
    [node] = first.remove_nodes
    assert set(scaler.disrupting) == {node}
    # Nobody removed it yet: it still uses the pool's budget of one node at a time.
    assert scaler.step_down() == []
    state.apply_now(up.NodeRemoved("c1", node.split("/", 1)[1], 2))
    state.apply_now(pool_update(3, seq=2))
    [second] = scaler.step_down()
    assert second.remove_nodes != first.remove_nodes
    assert set(scaler.disrupting) == set(second.remove_nodes)


def test_dry_run_scale_down_holds_nothing(tmp_path: Path) -> None:
    clock = [1000.0]
    state = idle_pool_state(tmp_path, clock)
    config = Config.model_validate({"autoscaling": {"dry_run": True, "scale_down": True}})
    scaler = Autoscaler(state, lambda: config, lambda: clock[0])
    clock[0] += config.autoscaling.scale_down_after_s + 1
    [first] = scaler.step_down()
    assert first.kind.value == "scale-down"
    assert scaler.disrupting == {}
    assert state.scale.history[-1].dry_run
    assert scaler.step_down() == []  # the same advice is not streamed twice


def test_no_plans_for_a_cluster_whose_sync_is_lost(tmp_path: Path) -> None:
    # Two clusters, each one full 8-GPU node and a pool; c1's source loses its broker. Its
    # pool sizes and nodes are no longer known to be current: nothing is asked for or
    # removed there, and pending work goes to c2 until c1 is back.
    clock = [1000.0]
    state = FleetState(Config(), Journal(tmp_path / "j.db"), lambda: clock[0])
    for cluster, source in (("c1", "kafka"), ("c2", "kubernetes")):
        state.expect_source(source, cluster)
        pool = up.NodePoolUpdate(
            cluster, "a100", 1, "p4d", RES, gpu_model="A100", price_per_hour=30.0,
            min_size=0, max_size=4, current_size=2,
        )  # fmt: skip
        state.apply_now(pool)
        for name in ("n0", "idle"):
            state.apply_now(
                up.NodeUpdate(cluster, name, 1, RES, RES, gpu_model="A100", node_pool="a100")
            )
        state.apply_now(up.ClusterSynced(cluster, source))
        assert state.place(gpus(f"fill-{cluster}", 8)).result == "placed"
        assert state.place(gpus(f"fill2-{cluster}", 8)).result == "placed"
    state.source_connection("kafka", "", False, "broker down")
    clock[0] += 3600  # past sync_lost_after_s and any stabilization window
    state.check_sources()
    assert state.lost_clusters == {"c1"}
    assert state.place(gpus("wait", 8)).result == "queued"
    scaler = Autoscaler(state, lambda: state.config, lambda: clock[0])
    [up_decision] = scaler.step()
    assert (up_decision.cluster, up_decision.unblocks) == ("c2", ("wait",))
    for wid in ("wait", "fill-c1", "fill2-c1", "fill2-c2"):
        state.release(wid)  # c1's nodes look empty, but c1 is lost: only c2's may go
    clock[0] += 3600  # the releases' changes are older than the stabilization window
    assert state.lost_clusters == {"c1"}
    assert {d.cluster for d in scaler.step_down()} == {"c2"}
    # c1 back: its pools are planned again (the same queue gives a new plan).
    state.source_connection("kafka", "", True)
    assert state.lost_clusters == frozenset()
    assert any(d.cluster == "c1" for d in scaler.step_down())


# ---- consolidation on scale-up: the benchmark's decision logic in the daemon ----------------

ONE = up.Resources(cpu_millicores=16_000, memory_bytes=64 * GIB, gpus=1)
FOUR = up.Resources(cpu_millicores=64_000, memory_bytes=256 * GIB, gpus=4)


def small_big_state(tmp_path: Path, clock: list[float]) -> FleetState:
    """Pool `small` (1 GPU, $4/h) with two nodes each running a 1-GPU workload; pool `big`
    (4 GPUs, $4/h) empty. Another 1-GPU workload waits: one `big` node holds it and the
    pod of a `small` node it takes along for the price of one `small` node."""
    state = FleetState(Config(), Journal(tmp_path / "j.db"), lambda: clock[0])
    state.expect_source("t", "c1")
    for name, res, size in (("small", ONE, 2), ("big", FOUR, 0)):
        state.apply_now(
            up.NodePoolUpdate(
                "c1", name, 1, name, res, gpu_model="T4", price_per_hour=4.0,
                min_size=0, max_size=10, current_size=size,
            )
        )  # fmt: skip
    for i in range(2):
        state.apply_now(
            up.NodeUpdate("c1", f"s{i}", 1, ONE, ONE, gpu_model="T4", node_pool="small")
        )
    state.apply_now(up.ClusterSynced("c1", "t"))
    for i in range(2):
        assert state.place(gpus(f"run{i}", 1)).result == "placed"
    clock[0] += 3600  # the running nodes are stable
    assert state.place(gpus("wait", 1)).result == "queued"
    return state


def scale_down_config(**extra: object) -> Config:
    return Config.model_validate({"autoscaling": {"scale_down": True, **extra}})


def big_node_up(state: FleetState) -> None:
    state.apply_now(up.NodeUpdate("c1", "b0", 1, FOUR, FOUR, gpu_model="T4", node_pool="big"))
    state.apply_now(
        up.NodePoolUpdate(
            "c1", "big", 2, "big", FOUR, gpu_model="T4", price_per_hour=4.0,
            min_size=0, max_size=10, current_size=1,
        )
    )  # fmt: skip


def test_config_defaults_are_the_benchmarks_policy() -> None:
    from benchmarks.autoscale import fleetd_autoscaler

    cfg = scale_down_config().autoscaling
    assert autoscale_policy(cfg) == AutoscalePolicy() == fleetd_autoscaler().policy
    # Without scale_down nothing is ever retired: no consolidation on scale-up either.
    assert autoscale_policy(Config().autoscaling).scale_up_replace_nodes == 0


def test_scale_up_takes_a_node_along_and_retires_it_once_the_new_node_is_up(
    tmp_path: Path,
) -> None:
    clock = [1000.0]
    state = small_big_state(tmp_path, clock)
    config = scale_down_config()
    scaler = Autoscaler(state, lambda: config, lambda: clock[0])
    [grow] = scaler.step()
    # Not a third `small` node: one `big` node for the waiting workload and a moved one.
    assert (grow.kind, grow.pool, grow.delta, grow.unblocks) == (
        DecisionKind.SCALE_UP, "big", 1, ("wait",),
    )  # fmt: skip
    [retiring] = scaler.retiring
    [old] = retiring.decision.remove_nodes
    assert old in {"c1/s0", "c1/s1"}
    assert scaler.retiring_nodes() == {old}
    # Nothing is removed before the new node is up; consolidation leaves that node alone.
    assert scaler.step_retire() == []
    assert all(old not in d.remove_nodes for d in scaler.step_down())
    big_node_up(state)
    [retire] = scaler.step_retire()
    assert (retire.kind, retire.reason, retire.pool, retire.remove_nodes) == (
        DecisionKind.SCALE_DOWN, DecisionReason.CHEAPER_REPLACEMENT, "small", (old,),
    )  # fmt: skip
    assert retire.cost_per_hour_delta == -4.0
    assert scaler.retiring == []
    assert scaler.disrupting == {old: ("c1", "small")}
    assert [e.decision.kind for e in state.scale.history] == [
        DecisionKind.SCALE_UP, DecisionKind.SCALE_DOWN,
    ]  # fmt: skip


def test_retirement_is_rechecked_on_a_fresh_snapshot(tmp_path: Path) -> None:
    clock = [1000.0]
    state = small_big_state(tmp_path, clock)
    metrics = Metrics()
    config = scale_down_config()
    scaler = Autoscaler(state, lambda: config, lambda: clock[0], metrics)
    scaler.step()
    [old] = scaler.retiring[0].decision.remove_nodes
    # While the new node boots, a pod that must not be disrupted lands on the old node.
    dnd = up.PodObserved(
        "c1", "ns", "keep", "uid-keep", old.split("/", 1)[1], up.Resources(1000, GIB),
        labels=((DO_NOT_DISRUPT_LABEL, "true"),),
    )  # fmt: skip
    assert state.apply_now(dnd)
    big_node_up(state)
    assert scaler.step_retire() == []
    assert scaler.recheck_failures == {RecheckFailure.DO_NOT_DISRUPT: 1}
    assert scaler.retiring == []
    assert scaler.disrupting == {}
    text = generate_latest(metrics.registry).decode()
    assert 'fleetd_scale_recheck_failures_total{reason="do-not-disrupt"} 1.0' in text


def test_retirement_waits_for_the_new_nodes_then_gives_up(tmp_path: Path) -> None:
    clock = [1000.0]
    state = small_big_state(tmp_path, clock)
    config = scale_down_config(scale_up_replace_timeout_s=600.0)
    scaler = Autoscaler(state, lambda: config, lambda: clock[0])
    scaler.step()
    clock[0] += 300
    assert scaler.step_retire() == []
    assert len(scaler.retiring) == 1
    clock[0] += 301  # the pool never reported its new node
    assert scaler.step_retire() == []
    assert scaler.retiring == []
    assert scaler.recheck_failures == {RecheckFailure.REPLACEMENT_NOT_UP: 1}


def test_dry_run_streams_the_retirement_at_once_and_holds_nothing(tmp_path: Path) -> None:
    clock = [1000.0]
    state = small_big_state(tmp_path, clock)
    config = scale_down_config(dry_run=True)
    scaler = Autoscaler(state, lambda: config, lambda: clock[0])
    grow, retire = scaler.step()
    assert (grow.kind, grow.pool, grow.delta) == (DecisionKind.SCALE_UP, "big", 1)
    assert (retire.kind, retire.reason, retire.pool) == (
        DecisionKind.SCALE_DOWN, DecisionReason.CHEAPER_REPLACEMENT, "small",
    )  # fmt: skip
    assert all(e.dry_run for e in state.scale.history)
    assert scaler.targets == {}
    assert scaler.retiring == []
    assert scaler.disrupting == {}


def test_no_consolidation_on_scale_up_without_scale_down(tmp_path: Path) -> None:
    clock = [1000.0]
    state = small_big_state(tmp_path, clock)
    scaler = Autoscaler(state, lambda: state.config, lambda: clock[0])
    [grow] = scaler.step()
    assert (grow.pool, grow.delta) == ("small", 1)  # the cheapest node for the one workload
    assert scaler.retiring == []


def test_tick_plans_scale_ups_at_once_and_scale_down_every_interval(tmp_path: Path) -> None:
    clock = [1000.0]
    state = small_big_state(tmp_path, clock)
    config = scale_down_config()
    scaler = Autoscaler(state, lambda: config, lambda: clock[0])
    [grow] = scaler.tick()  # pending work: planned on the first wake-up (then consolidation)
    assert grow.kind is DecisionKind.SCALE_UP
    assert scaler.last_down_s == clock[0]
    clock[0] += config.autoscaling.scale_up_after_s
    for i in range(4):  # with "wait": more than the node in flight holds
        assert state.place(gpus(f"more{i}", 1)).result == "queued"
    again = scaler.tick()  # the next second: the new pending work, no consolidation yet
    assert again
    assert {d.kind for d in again} == {DecisionKind.SCALE_UP}
    assert scaler.last_down_s == clock[0] - config.autoscaling.scale_up_after_s
    clock[0] += config.autoscaling.interval_s
    scaler.tick()
    assert scaler.last_down_s == clock[0]
