"""Filters: one table row per constraint, with the reason code the node is charged to.

Every row is checked twice: by the vectorized filters (`first_failure`) and by the plain
reference check (`reference.first_failure_one`), which must agree.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduling import (
    Allocation,
    Fleet,
    LabelOp,
    LabelRequirement,
    NodeSpec,
    PodSpec,
    Reason,
    Taint,
    Toleration,
    explain,
)
from scheduling.filters import (
    Free,
    allowed_mask,
    compile_pod,
    first_failure,
    pod_capacity,
    static_first_failure,
    static_profiles,
)
from scheduling.reference import _nodes, first_failure_one

from .builders import GIB, cpu_node, fleet_of, gpu_node, pod
from .test_properties import fleets, pods

IN, NOT_IN, EXISTS, ABSENT = LabelOp.IN, LabelOp.NOT_IN, LabelOp.EXISTS, LabelOp.DOES_NOT_EXIST
NOSCHED = Taint("dedicated", "ml")

CASES = [
    # node, pod, expected first failing reason
    (gpu_node(), pod(num_gpu=8), Reason.OK, "whole-node-fits"),
    (gpu_node(cordoned=True), pod(), Reason.NODE_UNSCHEDULABLE, "cordoned"),
    (gpu_node(unhealthy=True), pod(), Reason.NODE_NOT_READY, "unhealthy"),
    (gpu_node(stale=True), pod(), Reason.NODE_NOT_READY, "stale"),
    (gpu_node(cordoned=True, stale=True), pod(), Reason.NODE_UNSCHEDULABLE, "first-reason-wins"),
    (gpu_node(cluster="c1"), pod(clusters=("c2", "c3")), Reason.CLUSTER_NOT_ALLOWED, "cluster"),
    (gpu_node(cluster="c2"), pod(clusters=("c2", "c3")), Reason.OK, "cluster-allowed"),
    (gpu_node(labels={"a": "1"}), pod(node_selector={"a": "1"}), Reason.OK, "selector"),
    (
        gpu_node(labels={"a": "2"}),
        pod(node_selector={"a": "1"}),
        Reason.NODE_AFFINITY,
        "selector-value",
    ),
    (gpu_node(), pod(node_selector={"a": "1"}), Reason.NODE_AFFINITY, "selector-absent"),
    (
        gpu_node(labels={"a": "2"}),
        pod(affinity=(LabelRequirement("a", IN, ("1", "2")),)),
        Reason.OK,
        "in",
    ),
    (
        gpu_node(labels={"a": "2"}),
        pod(affinity=(LabelRequirement("a", NOT_IN, ("2",)),)),
        Reason.NODE_AFFINITY,
        "notin",
    ),
    (
        gpu_node(),
        pod(affinity=(LabelRequirement("a", NOT_IN, ("2",)),)),
        Reason.OK,
        "notin-absent-label-matches",
    ),
    (
        gpu_node(labels={"a": "x"}),
        pod(affinity=(LabelRequirement("a", EXISTS),)),
        Reason.OK,
        "exists",
    ),
    (
        gpu_node(),
        pod(affinity=(LabelRequirement("a", EXISTS),)),
        Reason.NODE_AFFINITY,
        "exists-absent",
    ),
    (
        gpu_node(labels={"a": "x"}),
        pod(affinity=(LabelRequirement("a", ABSENT),)),
        Reason.NODE_AFFINITY,
        "doesnotexist",
    ),
    (gpu_node(taints=[NOSCHED]), pod(), Reason.UNTOLERATED_TAINT, "taint"),
    (
        gpu_node(taints=[NOSCHED]),
        pod(tolerations=(Toleration("dedicated", "Equal", "ml"),)),
        Reason.OK,
        "tolerated-equal",
    ),
    (
        gpu_node(taints=[NOSCHED]),
        pod(tolerations=(Toleration("dedicated", "Equal", "web"),)),
        Reason.UNTOLERATED_TAINT,
        "wrong-value",
    ),
    (
        gpu_node(taints=[NOSCHED]),
        pod(tolerations=(Toleration("dedicated", "Exists"),)),
        Reason.OK,
        "tolerated-exists",
    ),
    (
        gpu_node(taints=[NOSCHED]),
        pod(tolerations=(Toleration(operator="Exists"),)),
        Reason.OK,
        "tolerate-everything",
    ),
    (
        gpu_node(taints=[NOSCHED]),
        pod(tolerations=(Toleration("dedicated", "Exists", effect="NoExecute"),)),
        Reason.UNTOLERATED_TAINT,
        "wrong-effect",
    ),
    (
        gpu_node(taints=[Taint("soft", "", "PreferNoSchedule")]),
        pod(),
        Reason.OK,
        "prefer-no-schedule-does-not-block",
    ),
    (gpu_node(model="A100"), pod(num_gpu=1, gpu_models=("H100",)), Reason.GPU_MODEL, "gpu-model"),
    (
        gpu_node(model="H100"),
        pod(gpu_milli=500, gpu_models=("A100", "H100")),
        Reason.OK,
        "gpu-model-ok",
    ),
    (
        cpu_node(),
        pod(num_gpu=1, gpu_models=("H100",)),
        Reason.INSUFFICIENT_GPU,
        "model-on-cpu-node-is-gpu-shortage",
    ),
    (gpu_node(model="A100"), pod(gpu_models=("H100",)), Reason.OK, "cpu-pod-ignores-gpu-model"),
    (
        gpu_node(gpu_memory_mib=40_960),
        pod(num_gpu=1, gpu_memory_min_mib=80_000),
        Reason.GPU_MEMORY,
        "gpu-memory",
    ),
    (gpu_node(cpu_millicores=500), pod(cpu_millicores=1000), Reason.INSUFFICIENT_CPU, "cpu"),
    (gpu_node(memory_bytes=GIB // 2), pod(memory_bytes=GIB), Reason.INSUFFICIENT_MEMORY, "memory"),
    (gpu_node(gpus=4), pod(num_gpu=8), Reason.INSUFFICIENT_GPU, "too-few-gpus"),
    (cpu_node(), pod(gpu_milli=100), Reason.INSUFFICIENT_GPU, "share-on-cpu-node"),
]


def _check(node: NodeSpec, p: PodSpec, expected: Reason, allocs: list[Allocation]) -> None:
    f = fleet_of(node)
    for a in allocs:
        f.allocate(a)
    got = first_failure(f, compile_pod(f, p), Free.of(f), np.array([0]))
    assert Reason(int(got[0])) is expected
    assert first_failure_one(_nodes(f)[0], p) is expected


@pytest.mark.parametrize(("node", "p", "expected", "case"), CASES, ids=[c[3] for c in CASES])
def test_filter_table(node: NodeSpec, p: PodSpec, expected: Reason, case: str) -> None:
    _check(node, p, expected, [])


@pytest.mark.parametrize(("node", "p", "expected", "case"), CASES, ids=[c[3] for c in CASES])
def test_allowed_mask_is_the_static_filters_on_a_schedulable_healthy_node(
    node: NodeSpec, p: PodSpec, expected: Reason, case: str
) -> None:
    """Where a pod may ever go: cordon, health and freshness do not count (they change)."""
    well = dataclasses.replace(node, cordoned=False, unhealthy=False, stale=False)
    f, f_well = fleet_of(node), fleet_of(well)
    static = static_first_failure(f_well, compile_pod(f_well, p), np.array([0]))
    assert allowed_mask(f, compile_pod(f, p)).tolist() == [Reason(int(static[0])) is Reason.OK]


USED = [
    # allocations on node "n0" (8 GPUs), pod, reason
    (
        [Allocation("n0", 0, 0, (0, 1, 2, 3, 4), 1000)],
        pod(num_gpu=4),
        Reason.INSUFFICIENT_GPU,
        "3-free-4-needed",
    ),
    ([Allocation("n0", 0, 0, (0, 1, 2, 3, 4), 1000)], pod(num_gpu=3), Reason.OK, "3-free-3-needed"),
    # every GPU has 400 left: a 500 share fits nowhere although 3200 milli are free
    (
        [Allocation("n0", 0, 0, tuple(range(8)), 600)],
        pod(gpu_milli=500),
        Reason.INSUFFICIENT_GPU_SHARE,
        "share-fragmented",
    ),
    (
        [Allocation("n0", 0, 0, tuple(range(8)), 600)],
        pod(gpu_milli=400),
        Reason.OK,
        "share-fits-exactly",
    ),
    (
        [Allocation("n0", 0, 0, (0,), 100)],
        pod(num_gpu=8),
        Reason.INSUFFICIENT_GPU,
        "whole-gpus-need-untouched-gpus",
    ),
]


@pytest.mark.parametrize(("allocs", "p", "expected", "case"), USED, ids=[c[3] for c in USED])
def test_gpu_filters_on_used_node(
    allocs: list[Allocation], p: PodSpec, expected: Reason, case: str
) -> None:
    _check(gpu_node("n0"), p, expected, allocs)


def test_unhealthy_gpu_is_never_used() -> None:
    f = fleet_of(gpu_node("n0", gpus=2))
    f.set_gpu_health("n0", 0, healthy=False)
    c = compile_pod(f, pod(num_gpu=2))
    assert first_failure(f, c, Free.of(f), np.array([0])).tolist() == [Reason.INSUFFICIENT_GPU]


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        # 64 cores / 8 = 8 by CPU, 512 GiB / 1 = 512 by memory, no GPU: min = 8
        pytest.param(pod(cpu_millicores=8000), 8, id="cpu-bound"),
        # GPU0 is partly used: 7 untouched GPUs // 2 per pod = 3
        pytest.param(pod(num_gpu=2), 3, id="whole-gpus"),
        # GPU0 has 1000-700=300 left -> 300//250 = 1; 7 untouched GPUs -> 7 * (1000//250) = 28
        pytest.param(pod(cpu_millicores=0, memory_bytes=0, gpu_milli=250), 29, id="shares"),
    ],
)
def test_pod_capacity_counts_identical_pods(p: PodSpec, expected: int) -> None:
    f = fleet_of(gpu_node("n0"))
    f.allocate(Allocation("n0", 0, 0, (0,), 700))
    c = compile_pod(f, p)
    assert pod_capacity(Free.of(f), c, np.array([0]), 1000).tolist() == [expected]


def test_explain_counts_like_kube_scheduler() -> None:
    f = fleet_of(
        gpu_node("a", gpus=2),
        gpu_node("b", model="A100"),
        gpu_node("c", taints=[NOSCHED]),
        cpu_node("d"),
        gpu_node("e", gpus=1),
    )
    e = explain(f, pod(num_gpu=4, gpu_models=("H100",)))
    assert e.n_nodes == 5
    assert e.n_feasible == 0
    assert e.dominant is Reason.INSUFFICIENT_GPU
    assert e.text() == (
        "0/5 nodes are available: 3 Insufficient nvidia.com/gpu, "
        "1 node(s) had untolerated taint, 1 node(s) didn't match GPU model."
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(), st.lists(pods("p"), min_size=1, max_size=4))
def test_static_filters_per_profile_equal_per_node(f: Fleet, shapes: list[PodSpec]) -> None:
    # Nodes with the same static profile pass or fail each static filter together, so the
    # engine may evaluate them once per profile (batches with many shapes).
    f.add_node(cpu_node("extra", labels={"pool": "b", "zone-x": "1"}, taints=(Taint("t", "1"),)))
    rows = np.flatnonzero(f.live_mask()).astype(np.int64)
    reps, profile_of = static_profiles(f, rows)
    assert reps.size == int(profile_of.max()) + 1
    assert (rows[np.unique(profile_of, return_index=True)[1]] == reps).all()
    for p in shapes:
        c = compile_pod(f, p)
        direct = static_first_failure(f, c, rows)
        assert (static_first_failure(f, c, reps)[profile_of] == direct).all()
