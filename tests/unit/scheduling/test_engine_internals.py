"""Engine internals that the speed relies on: closed-form deeper states, queue orders,
the synthetic generators, and the benchmark entry point on a tiny instance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import placement as placement_benchmark
from scheduling import Allocation, Batch, Fleet, GangSpec, NodeSpec, Order, PodSpec, place
from scheduling.filters import Free, compile_pod
from scheduling.placement import states_after
from scheduling.reference import place_reference
from scheduling.scoring import NodeView, default_gpu_pick
from scheduling.synthetic import synthetic_fleet, synthetic_workload
from scheduling.workload import QueueItem

from .builders import GIB, fleet_of, gpu_node, pod

BUILTIN_POLICIES = [
    "least-allocated",
    "most-allocated",
    "best-fit",
    "dot-product",
    "gpu-packing",
    "gpu-clustering",
    "random",
]


@settings(max_examples=80, deadline=None)
@given(
    used=st.lists(st.sampled_from([0, 100, 250, 400, 500, 750, 1000]), min_size=8, max_size=8),
    share=st.sampled_from([0, 100, 250, 300, 500, 700]),
    whole=st.sampled_from([1, 2, 4]),
    fractional=st.booleans(),
)
def test_closed_form_states_equal_step_by_step_simulation(
    used: list[int], share: int, whole: int, fractional: bool
) -> None:
    # Placing identical pods one at a time with the default GPU choice must walk through
    # exactly the states `states_after` computes in closed form.
    f = fleet_of(gpu_node("n0"))
    for g, milli in enumerate(used):
        if milli:
            f.allocate(Allocation("n0", 0, 0, (g,), milli))
    p = pod(cpu_millicores=1000, gpu_milli=share) if fractional and share else pod(num_gpu=whole)
    c = compile_pod(f, p)
    base = NodeView.of(f, Free.of(f), np.array([0], np.int64))
    closed = states_after(base, c, np.arange(1, 9, dtype=np.int64))
    view = base
    for j in range(8):
        pick = default_gpu_pick(view, c)
        if pick[0] == 0:  # the node is full: beyond capacity states are not used
            break
        view = view.after(c, pick)
        assert closed.gpu_free_milli[j].tolist() == view.gpu_free_milli[0].tolist()
        assert closed.cpu_free_millicores[j] == view.cpu_free_millicores[0]


def test_largest_first_order() -> None:
    small, big = pod("small", gpu_milli=100), pod("big", num_gpu=4)
    gang = GangSpec("g", (pod("g0", num_gpu=1), pod("g1", num_gpu=1)))
    urgent = pod("urgent", gpu_milli=100, priority=1)
    batch = Batch.of([small, big, gang, pod("small2", gpu_milli=100), urgent])
    names = [batch.pods[i].name for i in batch.order(Order.LARGEST_FIRST)]
    # priority first; then the 4-GPU pod, the 2 x 1 GPU gang (2000 milli in all), the shares
    assert names == ["urgent", "big", "g0", "g1", "small", "small2"]
    assert [batch.pods[i].name for i in batch.order(Order.GROUPED)] == [
        "urgent",
        "small",
        "small2",
        "big",
        "g0",
        "g1",
    ]


def _order_by_sorting(batch: Batch, order: Order) -> list[int]:
    # The orders' definition as plain sorts (stable: ties keep input order).
    n = len(batch.pods)
    prio = batch.priority.tolist()
    if order is Order.FIFO:
        return sorted(range(n), key=lambda i: -prio[i])
    group: dict[tuple[int, int], int] = {}  # group key -> first pod
    key_of = []
    for i in range(n):
        gang = int(batch.gang_of[i])
        key = (-1 - gang if gang >= 0 else int(batch.shape_of[i]), prio[i])
        group.setdefault(key, i)
        key_of.append(key)

    def size(first: int) -> tuple[int, int, int]:
        gang = int(batch.gang_of[first])
        pods = batch.gangs[gang].pods if gang >= 0 else (batch.shapes[batch.shape_of[first]],)
        return (
            sum(p.gpu_milli_total for p in pods),
            sum(p.cpu_millicores for p in pods),
            sum(p.memory_bytes for p in pods),
        )

    def rank(key: tuple[int, int]) -> tuple[int, ...]:
        first = group[key]
        if order is Order.GROUPED:
            return (-prio[first], first)
        gpu, cpu, mem = size(first)
        return (-prio[first], -gpu, -cpu, -mem, first)

    return sorted(range(n), key=lambda i: rank(key_of[i]))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    seed=st.integers(0, 2**16),
    spread=st.sampled_from([0, 3, 40_000, 10**12]),
)
def test_queue_orders_equal_plain_sorts(n: int, seed: int, spread: int) -> None:
    # Batch.order counts and radix-sorts small key ranges; large ones take np.unique and a
    # merge sort: both must be the plain sorts above.
    rng = np.random.default_rng(seed)
    batch = Batch.of(synthetic_workload(n, np.random.default_rng(seed)))
    batch.priority[:] = rng.integers(-spread, spread + 1, batch.priority.size)
    for order in Order:
        assert batch.order(order).tolist() == _order_by_sorting(batch, order), order


def test_synthetic_generators_are_seeded() -> None:
    a = synthetic_fleet(300, np.random.default_rng(5))
    b = synthetic_fleet(300, np.random.default_rng(5))
    assert a.state_equal(b)
    assert len(a.clusters) == 8
    assert len(a.gpu_models) == 4
    wa = synthetic_workload(500, np.random.default_rng(6))
    wb = synthetic_workload(500, np.random.default_rng(6))
    assert Batch.of(wa).names == Batch.of(wb).names
    assert any(isinstance(i, GangSpec) for i in synthetic_workload(3000, np.random.default_rng(1)))
    assert place(a, wa).decisions() == place(b, wb).decisions()


def test_many_identical_pods_fill_nodes_in_score_order() -> None:
    # 3 nodes with 2 GPUs; 7 one-GPU pods, packing: node a fills (2), then b (2), then c (2),
    # the 7th fits nowhere.
    f = fleet_of(gpu_node("a", gpus=2), gpu_node("b", gpus=2), gpu_node("c", gpus=2))
    r = place(f, [pod(f"p{i}", num_gpu=1) for i in range(7)], "most-allocated")
    assert [r.node(i) for i in range(7)] == ["a", "a", "b", "b", "c", "c", None]


def test_memory_free_pod_on_shrunk_node_fits_nowhere() -> None:
    f = fleet_of(gpu_node("a", memory_bytes=8 * GIB))
    f.allocate(Allocation("a", 0, 6 * GIB))
    f.update_node(gpu_node("a", memory_bytes=4 * GIB))  # shrank below what is allocated
    r = place(f, [PodSpec("p", num_gpu=1)])
    assert r.node(0) is None


def test_benchmark_runs_on_a_tiny_instance(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--nodes", "60", "--pods", "300", "--repeats", "1", "--loop-pods", "5"]
    argv += ["--check-nodes", "30", "--check-pods", "200", "--memory-nodes", "100", "--json"]
    assert placement_benchmark.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["identical_decisions"] is True
    assert {"pods_per_s", "loop_pods_per_s", "speedup", "bytes_per_node"} <= out.keys()


@pytest.mark.parametrize("policy", BUILTIN_POLICIES)
def test_cpu_only_fleet_without_gpu_columns(policy: str) -> None:
    f = Fleet(max_gpus=0)
    f.add_node(NodeSpec("a", "c", cpu_millicores=4000, memory_bytes=GIB))
    items: list[QueueItem] = [pod("g", gpu_milli=100), pod("w", num_gpu=1)]
    items += [pod(f"q{i}", cpu_millicores=1000, memory_bytes=0) for i in range(5)]
    r = place(f, items, policy)
    assert r.decisions() == place_reference(f, items, policy).decisions()
    # 4 cores fit 4 one-core pods; GPU pods have nowhere to go
    assert [r.node(i) for i in range(7)] == [None, None, "a", "a", "a", "a", None]
