"""Metric names follow Prometheus conventions: promtool (when installed) and our own checks."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from fleetd.config import Config
from fleetd.engine import PodRequest
from fleetd.journal import Journal
from fleetd.metrics import Metrics
from fleetd.sources import updates as up
from fleetd.state import FleetState, WorkloadRequest


def exposition(tmp_path: Path) -> str:
    metrics = Metrics()
    cfg = Config(teams={"quotas": {"ml": {"gpus": 3, "gpus_by_model": {"T4": 2.5}}}})  # type: ignore[arg-type]
    state = FleetState(cfg, Journal(tmp_path / "j.db"), metrics=metrics.state_hooks())
    res = up.Resources(cpu_millicores=8000, memory_bytes=2**35, gpus=4)
    state.apply_now(
        up.NodeUpdate("c1", "n1", 1, res, res, gpu_model="T4", node_pool="p", observed_at_s=1.0)
    )
    pod = PodRequest("p0", 1000, 2**30, gpu_milli=500)
    assert state.place(WorkloadRequest("w", "ml", 0, (pod,))).result == "placed"
    metrics.refresh(state)
    metrics.rpc_duration.labels("Place", "OK").observe(0.001)
    metrics.decisions.labels("place", "placed").inc()
    metrics.dead_letters.labels("undecodable").inc()
    metrics.kafka_consumer_lag.labels("fleet.telemetry.v1", "0").set(3)
    metrics.config_reloads.labels("ok").inc()
    return generate_latest(metrics.registry).decode()


def test_names_follow_conventions(tmp_path: Path) -> None:
    text = exposition(tmp_path)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert types, "no metrics exported"
    for name, kind in types.items():
        assert name.startswith("fleetd_"), name
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
    assert 'fleetd_gpus{cluster="c1",gpu_model="T4"} 4.0' in text
    assert 'fleetd_nodes{cluster="c1",condition="schedulable"} 1.0' in text
    assert 'fleetd_team_gpus_held{team="ml"} 0.5' in text
    assert 'fleetd_team_gpu_quota{team="ml"} 3.0' in text
    assert 'fleetd_team_model_gpus_held{gpu_model="T4",team="ml"} 0.5' in text
    assert 'fleetd_team_model_gpu_quota{gpu_model="T4",team="ml"} 2.5' in text


def test_promtool_check_metrics(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    out = subprocess.run(
        [promtool, "check", "metrics"], input=exposition(tmp_path), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "", out.stdout
