"""Fleet: columnar node state, interning, slots, allocate/free."""

from __future__ import annotations

import numpy as np
import pytest

from scheduling import Allocation, AllocationError, Fleet, Taint
from scheduling.fleet import FLAG_CORDONED, FLAG_EMPTY_SLOT, FLAG_STALE, FLAG_UNHEALTHY

from .builders import GIB, cpu_node, fleet_of, gpu_node


def test_add_interns_attributes_into_columns() -> None:
    f = fleet_of(
        gpu_node("a", model="H100", cluster="c1", zone="z", rack="r", labels={"team": "ml"}),
        cpu_node("b", cluster="c2", labels={"team": "web", "ssd": "yes"}),
    )
    assert len(f) == 2
    assert f.slot("a") == 0
    assert f.slot("b") == 1
    assert f.gpu_models.names[f.gpu_model_id[0]] == "H100"
    assert f.gpu_model_id[1] == -1
    assert [f.clusters.names[i] for i in f.cluster_id[:2]] == ["c1", "c2"]
    assert f.zones.names[f.zone_id[0]] == "c1/z"  # zone names are whole domains
    assert f.racks.names[f.rack_id[0]] == "c1/z/r"
    team = f.label_values[f.label_keys.get("team")]
    assert [f.label_values_interner.names[v] for v in team[:2]] == ["ml", "web"]
    assert f.label_values[f.label_keys.get("ssd")][0] == -1  # absent label
    assert f.gpu_free_milli[0].tolist() == [1000] * 8
    assert f.gpu_free_milli[1].tolist() == [0] * 8


def test_remove_reuses_lowest_slot_and_clears_row() -> None:
    f = fleet_of(*(gpu_node(f"n{i}") for i in range(4)))
    f.remove_node("n2")
    f.remove_node("n1")
    assert "n1" not in f
    assert len(f) == 2
    assert f.flags[1] == FLAG_EMPTY_SLOT
    assert f.gpu_free_milli[1].sum() == 0
    assert not f.live_mask()[1]
    assert f.add_node(gpu_node("x")) == 1  # lowest free slot first
    assert f.add_node(gpu_node("y")) == 2
    assert f.add_node(gpu_node("z")) == 4


def test_grows_capacity_by_doubling() -> None:
    f = Fleet(initial_capacity=2)
    for i in range(9):
        f.add_node(cpu_node(f"n{i}"))
    assert f.capacity == 16
    assert f.n_slots == 9
    assert f.cpu_allocatable_millicores[:9].tolist() == [64_000] * 9


def test_duplicate_and_unknown_names_are_clear_errors() -> None:
    f = fleet_of(gpu_node("a"))
    with pytest.raises(ValueError, match="already exists"):
        f.add_node(gpu_node("a"))
    with pytest.raises(KeyError, match="unknown node"):
        f.remove_node("zz")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"gpus": 8, "model": ""}, "needs a gpu_model", id="gpu-without-model"),
        pytest.param({"gpus": 64}, "outside", id="too-many-gpus"),
        pytest.param({"cpu_millicores": -1}, ">= 0", id="negative-cpu"),
        pytest.param({"cluster": ""}, "cluster", id="no-cluster"),
    ],
)
def test_bad_node_specs_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gpu_node("bad", **kwargs)  # type: ignore[arg-type]


def test_update_keeps_allocations_and_grows_gpus() -> None:
    f = fleet_of(gpu_node("a", gpus=2))
    f.allocate(Allocation("a", 1000, GIB, (1,), 500))
    f.update_node(gpu_node("a", gpus=4, labels={"new": "1"}))
    assert f.gpu_free_milli[0, :4].tolist() == [1000, 500, 1000, 1000]
    assert f.cpu_allocated_millicores[0] == 1000
    assert f.label_values[f.label_keys.get("new")][0] >= 0
    with pytest.raises(ValueError, match="while pods hold them"):
        f.update_node(gpu_node("a", gpus=1))
    f.update_node(gpu_node("a", gpus=2))
    assert f.gpu_count[0] == 2
    assert f.gpu_free_milli[0, 2:].sum() == 0


def test_wider_node_widens_gpu_columns() -> None:
    f = fleet_of(gpu_node("a", gpus=8))
    f.add_node(gpu_node("b", gpus=16))
    assert f.max_gpus == 16
    assert f.gpu_free_milli.shape[1] == 16
    assert f.gpu_free_milli[0, 8:].sum() == 0
    assert f.gpu_free_milli[1].sum() == 16_000


def test_flags_and_gpu_health() -> None:
    f = fleet_of(gpu_node("a", cordoned=True))
    assert f.flags[0] == FLAG_CORDONED
    f.set_flags("a", cordoned=False, unhealthy=True, stale=True)
    assert f.flags[0] == FLAG_UNHEALTHY | FLAG_STALE
    f.set_gpu_health("a", 3, healthy=False)
    assert f.usable_gpu_free_milli()[0].tolist() == [1000] * 3 + [0] + [1000] * 4
    assert not f.fits(Allocation("a", 0, 0, (3,), 1000))
    f.set_gpu_health("a", 3, healthy=True)
    assert f.fits(Allocation("a", 0, 0, (3,), 1000))
    with pytest.raises(ValueError, match="no GPU 9"):
        f.set_gpu_health("a", 9, healthy=False)


def test_taints_keep_only_blocking_effects_as_bits() -> None:
    f = fleet_of(
        gpu_node("a", taints=[Taint("gpu", "true"), Taint("soft", "x", "PreferNoSchedule")]),
        gpu_node("b", taints=[Taint("spot", "", "NoExecute")]),
    )
    assert [t.text for t in f.taints] == ["gpu=true:NoSchedule", "spot=:NoExecute"]
    assert f.taint_bits[:2, 0].tolist() == [1, 2]


def test_many_taints_widen_the_bitset() -> None:
    f = fleet_of(*(gpu_node(f"n{i}", taints=[Taint(f"k{i}")]) for i in range(70)))
    assert f.taint_bits.shape[1] == 2
    assert int(f.taint_bits[69, 1]) == 1 << 5


@pytest.mark.parametrize(
    ("alloc", "message"),
    [
        pytest.param(Allocation("a", 65_000, 0), "insufficient cpu", id="cpu"),
        pytest.param(Allocation("a", 0, 513 * GIB), "insufficient memory", id="memory"),
        pytest.param(Allocation("a", 0, 0, (8,), 1000), "no GPU 8", id="gpu-index"),
        pytest.param(Allocation("a", 0, 0, (0, 0), 500), "duplicate", id="duplicate-gpu"),
        pytest.param(Allocation("a", 0, 0, (0,), 1001), "outside", id="over-1000-milli"),
        pytest.param(Allocation("zz", 0, 0), "unknown node", id="unknown-node"),
    ],
)
def test_allocate_rejects_misfits_without_change(alloc: Allocation, message: str) -> None:
    f = fleet_of(gpu_node("a"))
    before = f.copy()
    assert not f.fits(alloc)
    with pytest.raises(AllocationError, match=message):
        f.allocate(alloc)
    assert f.state_equal(before)


def test_allocate_then_free_restores_state_exactly() -> None:
    f = fleet_of(gpu_node("a"), cpu_node("b"))
    before = f.copy()
    allocs = [
        Allocation("a", 1500, 3 * GIB, (2,), 250),
        Allocation("a", 500, GIB, (2,), 750),
        Allocation("a", 100, 0, (0, 1, 5), 1000),
        Allocation("b", 64_000, 512 * GIB),
    ]
    for a in allocs:
        f.allocate(a)
    assert f.gpu_free_milli[0].tolist() == [0, 0, 0, 1000, 1000, 0, 1000, 1000]
    assert not f.fits(Allocation("a", 0, 0, (2,), 1))
    for a in reversed(allocs):
        f.free(a)
    assert f.state_equal(before)
    with pytest.raises(AllocationError, match="does not hold"):
        f.free(allocs[0])


def test_allocate_many_is_all_or_nothing() -> None:
    f = fleet_of(gpu_node("a", gpus=2), gpu_node("b", gpus=2))
    before = f.copy()
    slots = np.array([0, 0, 1])
    args = (np.array([100, 100, 100]), np.array([0, 0, 0]), np.array([1, 1, 3]))
    # Two pods each take 600 of GPU 0 on node a: 1200 > 1000, so nothing is applied.
    with pytest.raises(AllocationError, match="does not fit"):
        f.allocate_many(slots, *args, np.array([600, 600, 1000]))
    assert f.state_equal(before)
    f.allocate_many(slots, *args, np.array([500, 500, 1000]))
    assert f.gpu_free_milli[:2, :2].tolist() == [[0, 1000], [0, 0]]
    f.allocate_many(slots, *args, np.array([500, 500, 1000]), sign=-1)
    assert f.state_equal(before)


def test_bytes_per_node_is_small() -> None:
    f = Fleet(initial_capacity=8192)
    for i in range(5000):
        f.add_node(gpu_node(f"node-{i:06d}", rack=f"r{i % 50}", labels={"pool": "a", "tier": "x"}))
    # Columns ~110 B + name table ~150 B per node; the target is <= 2 KB at 100k x 8 GPUs.
    assert f.nbytes() / len(f) < 1024


def test_change_stamps_name_the_slots_each_mutation_touched() -> None:
    # slot_version: any change of the slot; attr_version: what static filters read.
    f = fleet_of(gpu_node("n0", gpus=2), gpu_node("n1", gpus=2))
    v = f.version
    f.allocate(Allocation("n1", 1000, GIB, (0,), 500))
    assert f.slot_version[1] == f.version > v
    assert f.attr_version[1] <= v  # usage only
    assert f.slot_version[0] <= v
    v = f.version
    f.set_flags("n0", cordoned=True)
    assert f.attr_version[0] == f.slot_version[0] == f.version > v
    v = f.version
    f.set_flags("n0", cordoned=True)  # no change: no stamp
    f.set_gpu_health("n1", 1, healthy=True)
    assert f.version == v
    f.set_gpu_health("n1", 1, healthy=False)
    assert f.attr_version[1] == f.version > v
    v = f.version
    f.allocate_many(
        np.array([0, 0]), np.array([1, 1]), np.array([0, 0]), np.array([0, 0]), np.array([0, 0])
    )
    assert f.slot_version[0] == f.version > v
    assert f.slot_version[1] < f.version
    f.gpu_free_milli[1, 0] = 1000  # written directly: only `touch` stamps it
    v = f.version
    f.touch(np.array([1]))
    assert f.slot_version[1] == f.attr_version[1] == f.version > v
    g = f.copy()
    assert g.state_equal(f)
    assert (g.slot_version == f.slot_version).all()
    # Stamps are bookkeeping, not state: fleets built differently can still be equal.
    assert fleet_of(gpu_node("n0")).state_equal(fleet_of(gpu_node("n0")))
    h = fleet_of(gpu_node("n0"))
    h.allocate(Allocation("n0", 1000, GIB))
    h.free(Allocation("n0", 1000, GIB))
    assert h.state_equal(fleet_of(gpu_node("n0")))
