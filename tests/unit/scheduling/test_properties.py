"""Hypothesis properties of the placement engine on small random fleets and queues."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduling import (
    Allocation,
    Fleet,
    GangSpec,
    LabelOp,
    LabelRequirement,
    Order,
    PodSpec,
    Taint,
    Toleration,
    TopologyLevel,
    commit,
    place,
    placement,
    release,
)
from scheduling.placement import _topology_column
from scheduling.reference import place_reference
from scheduling.workload import QueueItem

from .builders import GIB, gpu_node

POLICIES = [
    "best-fit",
    "least-allocated",
    "most-allocated",
    "dot-product",
    "gpu-packing",
    "gpu-clustering",
    "random",
    "gpu-packing:2,best-fit:1",
    "least-allocated:1,dot-product:0.5",
]

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    f = Fleet(max_gpus=8, initial_capacity=2)
    n = draw(st.integers(1, 7))
    for i in range(n):
        gpus = draw(st.sampled_from([0, 1, 2, 4, 8]))
        f.add_node(
            gpu_node(
                f"n{i}",
                gpus=gpus,
                model=draw(st.sampled_from(["A100", "H100"])),
                cluster=draw(st.sampled_from(["c0", "c1"])),
                zone=draw(st.sampled_from(["z0", "z1"])),
                rack=draw(st.sampled_from(["r0", "r1"])),
                cpu_millicores=draw(st.sampled_from([4000, 16_000, 64_000])),
                memory_bytes=draw(st.sampled_from([8, 64, 512])) * GIB,
                labels=draw(st.sampled_from([{}, {"pool": "a"}, {"pool": "b", "ssd": "1"}])),
                taints=draw(st.sampled_from([(), (Taint("dedicated", "ml"),)])),
                cordoned=draw(st.booleans()) and draw(st.booleans()),
            )
        )
        if gpus and draw(st.booleans()):
            f.set_gpu_health(f"n{i}", draw(st.integers(0, gpus - 1)), healthy=False)
        if gpus and draw(st.booleans()):  # something already running there
            g = draw(st.integers(0, gpus - 1))
            if not (int(f.gpu_unhealthy_mask[i]) >> g) & 1:
                f.allocate(
                    Allocation(f"n{i}", 1000, GIB, (g,), draw(st.sampled_from([250, 500, 1000])))
                )
    return f


@st.composite
def pods(draw: st.DrawFn, name: str) -> PodSpec:
    kind = draw(st.sampled_from(["cpu", "share", "whole"]))
    return PodSpec(
        name,
        cpu_millicores=draw(st.sampled_from([0, 500, 2000, 8000])),
        memory_bytes=draw(st.sampled_from([0, 1, 16])) * GIB,
        num_gpu=draw(st.sampled_from([1, 2, 4])) if kind == "whole" else 0,
        gpu_milli=draw(st.sampled_from([100, 250, 500, 700])) if kind == "share" else 0,
        gpu_models=draw(st.sampled_from([(), ("H100",)])),
        affinity=draw(st.sampled_from([(), (LabelRequirement("pool", LabelOp.NOT_IN, ("b",)),)])),
        node_selector=draw(st.sampled_from([{}, {"pool": "a"}])),
        tolerations=draw(st.sampled_from([(), (Toleration("dedicated", "Exists"),)])),
        priority=draw(st.sampled_from([0, 0, 1])),
        clusters=draw(st.sampled_from([(), ("c1",)])),
    )


@st.composite
def queues(draw: st.DrawFn) -> list[QueueItem]:
    # A few shapes repeated, so runs of identical pods are exercised.
    shapes = [draw(pods(f"s{i}")) for i in range(draw(st.integers(1, 4)))]
    items: list[QueueItem] = []
    for i in range(draw(st.integers(0, 14))):
        if draw(st.integers(0, 5)) == 0:
            members = tuple(
                PodSpec(f"g{i}-{j}", **_fields(draw(st.sampled_from(shapes))))
                for j in range(draw(st.integers(1, 4)))
            )
            req = draw(st.sampled_from(list(TopologyLevel)))
            pref = draw(st.sampled_from([None, *[t for t in TopologyLevel if t >= req]]))
            items.append(GangSpec(f"g{i}", members, req, pref, draw(st.integers(0, 1))))
        else:
            items.append(PodSpec(f"p{i}", **_fields(draw(st.sampled_from(shapes)))))
    return items


def _fields(p: PodSpec) -> dict[str, object]:
    return {
        "cpu_millicores": p.cpu_millicores,
        "memory_bytes": p.memory_bytes,
        "num_gpu": p.num_gpu,
        "gpu_milli": p.gpu_milli,
        "gpu_models": p.gpu_models,
        "affinity": p.affinity,
        "node_selector": p.node_selector,
        "tolerations": p.tolerations,
        "priority": p.priority,
        "clusters": p.clusters,
    }


@SETTINGS
@given(fleets(), queues(), st.sampled_from(POLICIES), st.sampled_from(list(Order)), st.booleans())
def test_engine_and_reference_loop_agree(
    f: Fleet, items: list[QueueItem], policy: str, order: Order, by_state: bool
) -> None:
    # Both engine modes (scoring per distinct node state, or per changed row) must agree
    # with the plain loop.
    # (The first mode also evaluates static filters once per node profile.)
    saved = placement._BY_STATE_RUN, placement._BY_STATE_MIN_PODS, placement._BY_PROFILE_SHAPES
    placement._BY_STATE_RUN = placement._BY_STATE_MIN_PODS = 0 if by_state else 1 << 30
    placement._BY_PROFILE_SHAPES = 1 if by_state else 1 << 30
    try:
        engine = place(f, items, policy, order=order)
    finally:
        (
            placement._BY_STATE_RUN,
            placement._BY_STATE_MIN_PODS,
            placement._BY_PROFILE_SHAPES,
        ) = saved
    reference = place_reference(f, items, policy, order=order)
    assert engine.decisions() == reference.decisions()


@SETTINGS
@given(fleets(), queues(), st.sampled_from(POLICIES))
def test_nothing_is_over_allocated_and_commit_release_restore(
    f: Fleet, items: list[QueueItem], policy: str
) -> None:
    before = f.copy()
    r = place(f, items, policy)
    assert f.state_equal(before)  # place never mutates
    commit(f, r)
    n = f.n_slots
    assert (f.cpu_allocated_millicores[:n] <= f.cpu_allocatable_millicores[:n]).all()
    assert (f.memory_allocated_bytes[:n] <= f.memory_allocatable_bytes[:n]).all()
    assert (f.gpu_free_milli[:n] >= 0).all()
    # unhealthy GPUs and cordoned nodes received nothing new
    for i in np.flatnonzero(r.placed).tolist():
        s = int(r.node_slot[i])
        assert int(r.gpu_mask[i]) & int(f.gpu_unhealthy_mask[s]) == 0
        assert f.flags[s] == 0
    release(f, r)
    assert f.state_equal(before)


@SETTINGS
@given(fleets(), queues(), st.sampled_from(POLICIES))
def test_deterministic(f: Fleet, items: list[QueueItem], policy: str) -> None:
    assert place(f, items, policy).decisions() == place(f.copy(), items, policy).decisions()


@SETTINGS
@given(fleets(), queues(), st.sampled_from(POLICIES))
def test_gangs_all_or_nothing_within_their_domain(
    f: Fleet, items: list[QueueItem], policy: str
) -> None:
    r = place(f, items, policy)
    i = 0
    for item in items:
        k = len(item.pods) if isinstance(item, GangSpec) else 1
        if isinstance(item, GangSpec):
            slots = r.node_slot[i : i + k]
            assert (slots >= 0).all() or (slots < 0).all()
            if (slots >= 0).all():
                for level in (TopologyLevel.CLUSTER, item.required_level):
                    assert len(set(_topology_column(f, level)[slots].tolist())) == 1
        i += k
