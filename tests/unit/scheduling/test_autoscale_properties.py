"""Hypothesis properties of the autoscaler: what a plan claims holds when it is applied."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduling import Fleet, GangSpec, PodSpec, TopologyLevel, place
from scheduling.autoscale import (
    ConsolidationOptions,
    RunningPod,
    ScaleDownRequest,
    ScaleUpRequest,
    apply_scale_down,
    apply_scale_up,
    plan_scale_down,
    plan_scale_up,
    replace_candidates,
)
from scheduling.pools import SPOT_TOLERATION, CapacityType, DisruptionBudget, NodePool, PoolStatus
from scheduling.workload import QueueItem

from .builders import GIB

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@st.composite
def pools_st(draw: st.DrawFn) -> tuple[NodePool, ...]:
    """2-5 pools over two models and two zones, some spot, small max sizes."""
    n = draw(st.integers(2, 5))
    out = []
    for i in range(n):
        gpus = draw(st.sampled_from([0, 1, 2, 4, 8]))
        out.append(
            NodePool(
                name=f"p{i}",
                cluster="c0",
                cpu_millicores=draw(st.sampled_from([8_000, 32_000, 64_000])),
                memory_bytes=draw(st.sampled_from([32, 128, 256])) * GIB,
                gpu_count=gpus,
                gpu_model=draw(st.sampled_from(["T4", "A100"])) if gpus else "",
                price_per_hour=float(draw(st.integers(1, 40))) / 4,
                zone=draw(st.sampled_from(["a", "b"])),
                capacity_type=draw(st.sampled_from(list(CapacityType))),
                max_size=draw(st.integers(1, 6)),
                disruption_budget=DisruptionBudget(max_percent=100),
            )
        )
    return tuple(out)


@st.composite
def pod_st(draw: st.DrawFn, name: str) -> PodSpec:
    kind = draw(st.sampled_from(["cpu", "share", "whole"]))
    return PodSpec(
        name,
        cpu_millicores=draw(st.sampled_from([500, 2_000, 8_000])),
        memory_bytes=draw(st.sampled_from([1, 4, 16])) * GIB,
        num_gpu=draw(st.sampled_from([1, 2, 4])) if kind == "whole" else 0,
        gpu_milli=draw(st.sampled_from([250, 500, 700])) if kind == "share" else 0,
        gpu_models=draw(st.sampled_from([(), ("T4",), ("A100",)])) if kind != "cpu" else (),
        tolerations=(SPOT_TOLERATION,) if draw(st.booleans()) else (),
    )


@st.composite
def pending_st(draw: st.DrawFn) -> tuple[QueueItem, ...]:
    n = draw(st.integers(1, 14))
    items: list[QueueItem] = [draw(pod_st(f"w{i}")) for i in range(n)]
    if draw(st.booleans()):
        member = draw(pod_st("g-m"))
        k = draw(st.integers(2, 3))
        pods = tuple(
            PodSpec(f"g-m{j}", **{f: getattr(member, f) for f in _FIELDS}) for j in range(k)
        )
        items.append(GangSpec("gang", pods, required_level=TopologyLevel.ZONE))
    return tuple(items)


_FIELDS = ("cpu_millicores", "memory_bytes", "num_gpu", "gpu_milli", "gpu_models", "tolerations")


@SETTINGS
@given(pools=pools_st(), pending=pending_st())
def test_scale_up_unblocks_what_it_claims(
    pools: tuple[NodePool, ...], pending: tuple[QueueItem, ...]
) -> None:
    plan = plan_scale_up(ScaleUpRequest(Fleet(), pending, pools))
    # Max sizes hold.
    for d in plan.decisions:
        pool = next(p for p in pools if p.name == d.pool)
        assert 0 < d.delta <= pool.max_size
    # Every workload is accounted for exactly once.
    names = [it.name for it in pending]
    reported = set(plan.fits_now) | set(plan.unblocked) | {u.workload for u in plan.unschedulable}
    assert reported == set(names)
    assert not set(plan.unblocked) & {u.workload for u in plan.unschedulable}
    # The plan's allocations are one valid simultaneous assignment on the applied fleet,
    # and they cover every pod of every workload it claims to unblock or fit now.
    fleet = apply_scale_up(Fleet(), plan)
    allocs = dict(plan.allocations)
    for _, alloc in plan.allocations:
        fleet.allocate(alloc)  # AllocationError if anything overlaps or overflows
    for item in plan.queue:
        if item.name in plan.unblocked or item.name in plan.fits_now:
            pods = item.pods if isinstance(item, GangSpec) else (item,)
            assert all(p.name in allocs for p in pods), item.name
            if isinstance(item, GangSpec):
                zones = {int(fleet.zone_id[fleet.slot(allocs[p.name].node)]) for p in pods}
                assert len(zones) == 1
    # No node is added that nothing uses.
    assert {n.name for n in plan.new_nodes} <= {a.node for a in allocs.values()}


@st.composite
def running_st(draw: st.DrawFn) -> tuple[NodePool, tuple[int, ...], tuple[int, ...]]:
    pool = NodePool(
        name="g4",
        cluster="c0",
        cpu_millicores=64_000,
        memory_bytes=256 * GIB,
        gpu_count=4,
        gpu_model="T4",
        price_per_hour=4.0,
        min_size=draw(st.integers(0, 2)),
        disruption_budget=DisruptionBudget(max_nodes=draw(st.integers(1, 5))),
    )
    loads = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=7)))
    dnd = tuple(i for i in range(len(loads)) if loads[i] and draw(st.integers(0, 5)) == 0)
    return pool, loads, dnd


@SETTINGS
@given(case=running_st(), replace_on=st.booleans())
def test_scale_down_displaced_pods_still_fit(
    case: tuple[NodePool, tuple[int, ...], tuple[int, ...]], replace_on: bool
) -> None:
    pool, loads, dnd = case
    small = NodePool(
        "g1",
        "c0",
        cpu_millicores=16_000,
        memory_bytes=64 * GIB,
        gpu_count=1,
        gpu_model="T4",
        price_per_hour=1.0,
    )
    fleet = Fleet()
    running = []
    for i, load in enumerate(loads):
        name = f"g4-{i}"
        fleet.add_node(pool.node_spec(name))
        for j in range(load):
            p = PodSpec(f"{name}-p{j}", cpu_millicores=4000, memory_bytes=8 * GIB, num_gpu=1)
            rp = RunningPod(p, name, (j,), do_not_disrupt=i in dnd)
            fleet.allocate(rp.allocation)
            running.append(rp)
    n = len(loads)
    req = ScaleDownRequest(
        fleet,
        tuple(running),
        (pool, small),
        {pool.key: PoolStatus(n, n)},
        {name: 0.0 for name in fleet.node_names()},
        now_s=1_000.0,
        options=ConsolidationOptions(replace=replace_on, stabilization_window_s=60.0),
    )
    plan = plan_scale_down(req)
    removed = set(plan.removed)
    # Safety: do-not-disrupt nodes stay, min size and budget hold.
    assert not removed & {f"g4-{i}" for i in dnd}
    assert not removed or n - len(removed) >= pool.min_size
    assert len(removed) <= (pool.disruption_budget.max_nodes or n)
    # Every displaced pod fits on what is left (plus any replacement nodes).
    after, pods = apply_scale_down(fleet, running, plan, req.pools)
    assert {p.name for p in pods} == {p for p, _ in plan.moves}
    res = place(after, pods)
    assert res.placed.all()
    # Consolidation saves money.
    assert plan.cost_per_hour_delta <= 0


@SETTINGS
@given(case=running_st(), pending=st.integers(1, 6), saving=st.sampled_from([0.0, 0.25, 2.0]))
def test_consolidation_on_scale_up_holds_together(
    case: tuple[NodePool, tuple[int, ...], tuple[int, ...]], pending: int, saving: float
) -> None:
    pool, loads, dnd = case
    # Retiring 4-GPU nodes pays off against 1-GPU nodes dearer per GPU.
    small = NodePool(
        "g1", "c0", cpu_millicores=16_000, memory_bytes=64 * GIB, gpu_count=1,
        gpu_model="T4", price_per_hour=1.5,
    )  # fmt: skip
    fleet = Fleet()
    running = []
    for i, load in enumerate(loads):
        name = f"g4-{i}"
        fleet.add_node(pool.node_spec(name))
        for j in range(load):
            p = PodSpec(f"{name}-p{j}", cpu_millicores=4000, memory_bytes=8 * GIB, num_gpu=1)
            rp = RunningPod(p, name, (j,), do_not_disrupt=i in dnd)
            fleet.allocate(rp.allocation)
            running.append(rp)
    n = len(loads)
    status = {pool.key: PoolStatus(n, n)}
    down = ScaleDownRequest(
        fleet, tuple(running), (pool, small), status, {m: 0.0 for m in fleet.node_names()},
        now_s=1_000.0, options=ConsolidationOptions(stabilization_window_s=60.0),
    )  # fmt: skip
    cands = replace_candidates(down, limit=4)
    waiting = tuple(
        PodSpec(f"w{i}", cpu_millicores=4000, memory_bytes=8 * GIB, num_gpu=2)
        for i in range(pending)
    )
    req = ScaleUpRequest(
        fleet, waiting, (pool, small), status, replaceable=cands,
        replace_min_saving_per_hour=saving,
    )  # fmt: skip
    plain = plan_scale_up(replace(req, replaceable=()))
    plan = plan_scale_up(req)
    # Candidates never include do-not-disrupt nodes, and respect the pool's budget.
    assert not {c.node for c in cands} & {f"g4-{i}" for i in dnd}
    assert len(cands) <= (pool.disruption_budget.max_nodes or n)
    if plan.replace is None:
        assert plan.cost_per_hour_delta == plain.cost_per_hour_delta
        return
    r = plan.replace
    # It saves what it says against the plain plan, above the minimum.
    retired = sum(c.price_per_hour for c in cands if c.node in r.remove_nodes)
    expected = retired + plain.cost_per_hour_delta - plan.cost_per_hour_delta
    assert -r.cost_per_hour_delta == pytest.approx(expected)
    assert expected > saving
    # The same pending work is unblocked, and every pod (pending or moved) holds together
    # on the fleet after it: retired nodes gone with their pods, new nodes added.
    assert set(plan.unblocked) | set(plan.fits_now) >= set(plain.unblocked)
    after = fleet.copy()
    for rp in running:
        if rp.node in r.remove_nodes:
            after.free(rp.allocation)
    for node in r.remove_nodes:
        after.remove_node(node)
    for spec in (*plan.in_flight_nodes, *plan.new_nodes):
        after.add_node(spec)
    placed = dict(plan.allocations)
    for rp in running:
        if rp.node in r.remove_nodes:
            after.allocate(placed[rp.pod.name])
    for name, alloc in plan.allocations:
        if name.startswith("w"):
            after.allocate(alloc)
