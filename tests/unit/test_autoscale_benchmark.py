"""The autoscale benchmark's simulator and lower bound on a tiny hand-made trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.autoscale import (
    FleetdAutoscaler,
    LeastWasteBaseline,
    benchmark_pools,
    fleetd_autoscaler,
    load_timed_pods,
    lower_bound_cost,
    simulate,
)
from benchmarks.traces import TraceError
from scheduling.autoscale import AutoscalePolicy

HEADER = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n"


def write_trace(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "pods.csv"
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    rows = []
    for i in range(12):
        gpu = "1,1000" if i % 3 else "1,500"
        qos = "BE" if i % 4 == 0 else "LS"
        start = i * 600
        rows.append(f"p{i},8000,16384,{gpu},,{qos},Running,{start},{start + 7200},{start}")
    rows.append("cpu0,4000,8192,0,0,,LS,Running,100,4000,100")
    rows.append("zero,1000,1024,0,0,,LS,Running,50,50,50")  # no running time: skipped
    return write_trace(tmp_path, rows)


def test_replay_runs_every_pod_and_costs_at_least_the_bound(trace_path: Path) -> None:
    trace = load_timed_pods(trace_path)
    assert len(trace.pods) == 13
    assert trace.spot_ok.sum() == 3  # BE pods tolerate spot
    pools = benchmark_pools()
    ours = simulate(
        trace,
        pools,
        FleetdAutoscaler(AutoscalePolicy(scale_up_replace_nodes=0), pending_batch_s=1.0),
        seed=1,
    )
    base = simulate(trace, pools, LeastWasteBaseline(1), seed=1)
    bound = lower_bound_cost(trace, pools)
    for r in (ours, base):
        assert r.never_started == 0
        assert r.infeasible == 0
        assert r.pending_s.size == 13
        # Nothing waits longer than a boot plus a tick or two.
        assert r.pending_pct(100) <= 240 + 60
        assert r.cost >= bound.cost > 0
    # Per window the larger of two valid bounds: at least either total.
    assert bound.cost >= max(bound.pooled_cost, bound.class_cost) - 1e-6


def test_bad_trace_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("name,cpu_milli\np0,1\n")
    with pytest.raises(TraceError, match="needs columns"):
        load_timed_pods(path)
    bad = write_trace(tmp_path, ["p0,abc,1,0,0,,LS,Running,0,10,0"])
    with pytest.raises(TraceError, match="bad number"):
        load_timed_pods(bad)


def test_whole_node_bound_is_tighter_than_the_lp_and_exact_on_a_tiny_case(
    tmp_path: Path,
) -> None:
    # Two 1-GPU pods (8 cores, 16 GiB) for 2 hours, on-demand only. Whole nodes: one t4-4
    # ($3.912/h) beats two t4-1 ($2.176/h each): $7.824. The LP mixes 2/3 of a t4-1 with
    # 1/3 of a t4-4 (one node, two GPUs): $2.755/h, $5.51.
    rows = [f"p{i},8000,16384,1,1000,,LS,Running,0,7200,0" for i in range(2)]
    trace = load_timed_pods(write_trace(tmp_path, rows))
    bound = lower_bound_cost(trace, benchmark_pools())
    assert bound.pooled_cost == pytest.approx(2 * 3.912)
    assert bound.cost == pytest.approx(2 * 3.912)
    assert bound.pooled_lp_cost == pytest.approx(2 * (2 / 3 * 2.176 + 1 / 3 * 3.912))
    lp_only = lower_bound_cost(trace, benchmark_pools(), integer=False)
    assert lp_only.cost == pytest.approx(bound.plain_lp_cost)
    assert lp_only.cost < bound.cost


def test_fleetd_settings_replay_the_tiny_trace(trace_path: Path) -> None:
    trace = load_timed_pods(trace_path)
    ours = simulate(trace, benchmark_pools(), fleetd_autoscaler(), seed=1)
    assert ours.never_started == 0
    assert ours.cost >= lower_bound_cost(trace, benchmark_pools()).cost > 0
