"""Batch placement: ordering, ties, fractional GPUs, commit/release, reasons, gangs."""

from __future__ import annotations

import pytest

from scheduling import (
    AllocationError,
    Batch,
    GangSpec,
    Order,
    PlacementResult,
    Reason,
    TopologyLevel,
    commit,
    place,
    release,
)
from scheduling.fleet import Fleet
from scheduling.reference import place_reference
from scheduling.workload import QueueItem

from .builders import cpu_node, fleet_of, gpu_node, pod

CLUSTER, ZONE, RACK, NODE = (
    TopologyLevel.CLUSTER,
    TopologyLevel.ZONE,
    TopologyLevel.RACK,
    TopologyLevel.NODE,
)


def placed(
    f: Fleet, items: list[QueueItem], policy: str = "best-fit", **kw: object
) -> PlacementResult:
    """Place with the engine, check the reference loop decides the same, return the result."""
    r = place(f, items, policy, **kw)  # type: ignore[arg-type]
    ref = place_reference(f, items, policy, **kw)  # type: ignore[arg-type]
    assert r.decisions() == ref.decisions()
    return r


def test_ties_go_to_the_lowest_slot() -> None:
    f = fleet_of(gpu_node("a"), gpu_node("b"), gpu_node("c"))
    r = placed(f, [pod("p", num_gpu=1)], "least-allocated")
    assert r.decisions() == [("p", "c0", "a", (0,), 0)]


def test_spread_and_pack_differ() -> None:
    f = fleet_of(gpu_node("a"), gpu_node("b"))
    pods: list[QueueItem] = [pod(f"p{i}", num_gpu=1) for i in range(4)]
    spread = placed(f, pods, "least-allocated")
    pack = placed(f, pods, "most-allocated")
    assert [spread.node(i) for i in range(4)] == ["a", "b", "a", "b"]
    assert [pack.node(i) for i in range(4)] == ["a", "a", "a", "a"]
    assert [pack.gpu_indices(i) for i in range(4)] == [(0,), (1,), (2,), (3,)]


def test_fractional_pods_share_gpus_best_fit() -> None:
    f = fleet_of(gpu_node("a", gpus=2))
    pods: list[QueueItem] = [
        pod(f"p{i}", gpu_milli=m) for i, m in enumerate([600, 300, 500, 100, 400])
    ]
    r = placed(f, pods, "gpu-packing", order=Order.FIFO)
    # 600 -> GPU0 (400 left); 300 -> GPU0 (best fit: 400 < 1000) leaves 100;
    # 500 -> GPU1 (500 left); 100 -> GPU0 (exactly 100 left); 400 -> GPU1 (500 left)
    assert [r.gpu_indices(i) for i in range(5)] == [(0,), (0,), (1,), (0,), (1,)]
    assert r.gpu_milli_per_gpu.tolist() == [600, 300, 500, 100, 400]


def test_priority_first_then_input_order() -> None:
    f = fleet_of(gpu_node("a", gpus=1))
    items: list[QueueItem] = [pod("low", num_gpu=1), pod("high", num_gpu=1, priority=10)]
    r = placed(f, items)
    assert r.node(1) == "a"
    assert r.node(0) is None
    assert r.reason.tolist() == [Reason.INSUFFICIENT_GPU, Reason.OK]
    assert r.order.tolist() == [1, 0]


def test_grouped_order_places_identical_shapes_together() -> None:
    a, b = pod("a1", num_gpu=1), pod("b1", gpu_milli=500)
    items: list[QueueItem] = [a, b, pod("a2", num_gpu=1), pod("b2", gpu_milli=500)]
    batch = Batch.of(items)
    assert batch.order(Order.GROUPED).tolist() == [0, 2, 1, 3]
    assert batch.order(Order.FIFO).tolist() == [0, 1, 2, 3]
    assert batch.shape_of.tolist() == [0, 1, 0, 1]


def test_place_does_not_mutate_commit_release_are_inverses() -> None:
    f = fleet_of(gpu_node("a"), cpu_node("b"))
    before = f.copy()
    r = placed(f, [pod(f"p{i}", gpu_milli=300) for i in range(5)] + [pod("c", cpu_millicores=8000)])
    assert f.state_equal(before)
    commit(f, r)
    assert int(f.gpu_free_milli[0].sum()) == 8000 - 1500
    with pytest.raises(AllocationError):  # no room for the same pods twice
        commit(f, place(fleet_of(gpu_node("a"), cpu_node("b")), [pod("x", num_gpu=8)]))
    release(f, r)
    assert f.state_equal(before)


def test_commit_refuses_a_changed_node() -> None:
    f = fleet_of(gpu_node("a"))
    r = place(f, [pod("p", num_gpu=1)])
    f.remove_node("a")
    f.add_node(gpu_node("other"))
    with pytest.raises(AllocationError, match="changed since placement"):
        commit(f, r)


def test_reasons_for_unplaced_pods() -> None:
    f = fleet_of(
        gpu_node("a", model="A100"), gpu_node("a2", model="A100"), cpu_node("b", cordoned=True)
    )
    r = placed(
        f,
        [
            pod("model", num_gpu=1, gpu_models=("H100",)),
            pod("huge", cpu_millicores=10**6),
            pod("nodes", clusters=("elsewhere",)),
        ],
    )
    # no node meets every constraint: each pod's reason is the one charged to most nodes
    assert r.reason.tolist() == [
        Reason.GPU_MODEL,
        Reason.INSUFFICIENT_CPU,
        Reason.CLUSTER_NOT_ALLOWED,
    ]
    # a shortage on nodes that meet every constraint wins over the constraints: 3 nodes of
    # the wrong model, 1 cordoned, 1 H100 node with too few GPUs -> Insufficient GPU
    f2 = fleet_of(
        *(gpu_node(f"m{i}", model="A100") for i in range(3)),
        gpu_node("h", gpus=2),
        cpu_node("b", cordoned=True),
    )
    r2 = placed(f2, [pod("big", num_gpu=4, gpu_models=("H100",))])
    assert r2.reason.tolist() == [Reason.INSUFFICIENT_GPU]
    empty = place(Fleet(), [pod("p")])
    assert empty.reason.tolist() == [Reason.NO_NODES]


def test_cluster_choice_respects_allowed_clusters() -> None:
    f = fleet_of(gpu_node("a", cluster="east"), gpu_node("b", cluster="west"))
    r = placed(f, [pod("p", num_gpu=1, clusters=("west",)), pod("q", num_gpu=1)], "most-allocated")
    assert (r.cluster(0), r.cluster(1)) == ("west", "west")  # q packs next to p


# ---- gangs ----------------------------------------------------------------------------


def two_racks() -> Fleet:
    # cluster c0: zone z0 with racks r0 (2 nodes) and r1 (2 nodes); cluster c1: one node
    return fleet_of(
        gpu_node("r0a", rack="r0"),
        gpu_node("r0b", rack="r0"),
        gpu_node("r1a", rack="r1"),
        gpu_node("r1b", rack="r1"),
        gpu_node("c1a", cluster="c1", rack="r0"),
    )


def gang(n: int, gpus: int = 8, **kw: object) -> GangSpec:
    return GangSpec("g", tuple(pod(f"w{i}", num_gpu=gpus) for i in range(n)), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("g", "expected"),
    [
        # 2 x 8 GPUs fit in one rack: the first rack in tightness order (equal free -> lowest id r0)
        pytest.param(
            gang(2, required_level=CLUSTER, preferred_level=RACK), ["r0a", "r0b"], id="prefers-rack"
        ),
        # 3 x 8 GPUs: no rack holds 3 whole nodes, the zone does
        pytest.param(
            gang(3, required_level=ZONE, preferred_level=RACK),
            ["r0a", "r0b", "r1a"],
            id="falls-back-to-zone",
        ),
        # 3 x 8 GPUs within a rack is required: impossible, nothing is placed
        pytest.param(gang(3, required_level=RACK), [None, None, None], id="rack-required-fails"),
        # 5 x 8 GPUs: 5 nodes exist but c1 is another cluster; never spans clusters
        pytest.param(gang(5), [None] * 5, id="never-spans-clusters"),
        # 4 x 2 GPUs all on one node when preferred
        pytest.param(gang(4, gpus=2, preferred_level=NODE), ["r0a"] * 4, id="prefers-one-node"),
    ],
)
def test_gang_topology(g: GangSpec, expected: list[str | None]) -> None:
    r = placed(two_racks(), [g])
    assert [r.node(i) for i in range(len(g.pods))] == expected
    if expected[0] is None:
        assert set(r.reason.tolist()) == {Reason.GANG_TOPOLOGY}


def test_gang_prefers_the_tightest_domain() -> None:
    f = two_racks()
    f.remove_node("c1a")
    r0 = place(f, [pod("x", num_gpu=4)], "least-allocated")  # x lands on r0a
    commit(f, r0)
    # 2 x 2 GPUs within a rack: r0 has 12 free GPUs, r1 has 16 -> r0 (least free wins)
    r = placed(f, [gang(2, gpus=2, required_level=RACK)])
    assert {r.node(0), r.node(1)} <= {"r0a", "r0b"}


def test_gang_is_all_or_nothing_and_frees_trial_allocations() -> None:
    f = fleet_of(gpu_node("a", gpus=4), gpu_node("b", gpus=2, rack="r1"))
    # 3 pods x 2 GPUs: rack r0 (node a) fits two, rack r1 one: neither rack holds all three
    g = GangSpec("g", tuple(pod(f"w{i}", num_gpu=2) for i in range(3)), required_level=RACK)
    r = placed(f, [g, pod("after", num_gpu=4)])
    assert r.node(0) is None
    assert r.node(3) == "a"


def test_gang_member_that_fits_nowhere() -> None:
    f = fleet_of(gpu_node("a"))
    g = GangSpec("g", (pod("ok", num_gpu=1), pod("bad", num_gpu=9)))
    r = placed(f, [g])
    assert r.reason.tolist() == [Reason.GANG_MEMBER, Reason.INSUFFICIENT_GPU]


def test_gang_priority_orders_it_before_pods() -> None:
    f = fleet_of(gpu_node("a", gpus=2))
    r = placed(f, [pod("solo", num_gpu=1), GangSpec("g", (pod("w", num_gpu=2),), priority=5)])
    assert (r.node(0), r.node(1)) == (None, "a")


def test_mixed_shape_gang() -> None:
    f = two_racks()
    g = GangSpec(
        "g",
        (
            pod("ps", cpu_millicores=4000),
            pod("w0", num_gpu=8),
            pod("w1", num_gpu=4),
            pod("s", gpu_milli=500),
        ),
        required_level=RACK,
    )
    r = placed(f, [g])
    assert r.n_placed == 4
    racks = {f.racks.names[f.rack_id[f.slot(r.node(i) or "")]] for i in range(4)}
    assert len(racks) == 1


def test_bad_gang_specs() -> None:
    with pytest.raises(ValueError, match="no pods"):
        GangSpec("g", ())
    with pytest.raises(ValueError, match="looser"):
        GangSpec("g", (pod(),), required_level=RACK, preferred_level=ZONE)
