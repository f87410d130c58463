"""The placement benchmark measures the daemon's default policy and the core's generic one
in one run, and ends with one JSON line (a tiny instance: no timing is asserted)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks import placement
from fleetd.config import SchedulingConfig
from scheduling import DEFAULT_POLICY

#: A tiny instance (no timing is asserted).
TINY = [
    "--nodes", "40", "--pods", "200", "--repeats", "1", "--loop-pods", "2",
    "--check-nodes", "20", "--check-pods", "60", "--memory-nodes", "50",
]  # fmt: skip


def _report(capsys: pytest.CaptureFixture[str], args: list[str]) -> dict[str, Any]:
    """Run the benchmark with `args` (it must exit 0); its last line, the JSON report."""
    assert placement.main([*args, "--json"]) == 0
    report: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return report


def test_benchmark_defaults_to_the_daemon_policy_and_compares_the_generic_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        "--nodes", "60", "--pods", "400", "--repeats", "1", "--loop-pods", "2",
        "--check-nodes", "30", "--check-pods", "120", "--memory-nodes", "100",
        "--single-calls", "10",
    ]  # fmt: skip
    report = _report(capsys, args)
    assert SchedulingConfig().policy == "fgd-plus"
    assert report["policy"] == "fgd-plus:1"
    assert report["compare"]["policy"] == DEFAULT_POLICY
    assert report["identical_decisions"] is True
    assert report["pods"] == 400
    assert report["placed"] > 0
    assert report["compare"]["placed"] > 0
    for key in ("pods_per_s", "loop_pods_per_s", "speedup", "bytes_per_node"):
        assert report[key] > 0
    assert report["load_1m"] >= 0
    # Placements per second: the placed pods over the same median wall time.
    assert report["placed_per_s"] == pytest.approx(report["placed"] / report["engine_s"], rel=0.01)
    assert 0 < report["placed_per_s"] <= report["pods_per_s"]


def test_compare_policy_can_be_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    args = [*TINY, "--single-calls", "5", "--policy", "best-fit", "--compare-policy", ""]
    report = _report(capsys, args)
    assert report["policy"] == "best-fit:1"
    assert report["compare"] == {}


def test_single_pod_latency_without_timed_calls_reports_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # One pod placed one at a time: the first of its shape is not timed, so no percentile.
    report = _report(capsys, [*TINY, "--single-calls", "1", "--compare-policy", ""])
    assert report["single_pod"]["calls"] == 1
    assert report["single_pod"]["cached_p50_ms"] is None
