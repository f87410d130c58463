"""How long workloads waited in the queue (`fleetd_queue_wait_seconds`) and the oldest wait
(`fleetd_queue_oldest_seconds`), through the state's hooks and a real SQLite journal."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fleetd.config import Config
from fleetd.journal import Journal
from fleetd.metrics import Metrics
from fleetd.sources import updates as up
from fleetd.state import FleetState

from .test_state import FakeClock, node, request


def _wait(metrics: Metrics, team: str, outcome: str, suffix: str, **extra: str) -> float | None:
    labels = {"team": team, "outcome": outcome, **extra}
    return metrics.registry.get_sample_value(f"fleetd_queue_wait_seconds_{suffix}", labels)


def _oldest(metrics: Metrics, cause: str) -> float | None:
    return metrics.registry.get_sample_value("fleetd_queue_oldest_seconds", {"cause": cause})


def test_queue_wait_by_team_and_outcome(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    metrics = Metrics()
    cfg = Config(teams={"priorities": {"ml": 10}})  # type: ignore[arg-type]
    state = FleetState(cfg, Journal(tmp_path / "j.db"), clock, metrics=metrics.state_hooks())
    state.expect_source("test", "c1")
    state.apply_now(node("n0", seq=1, gpus=8))
    state.apply_now(up.ClusterSynced("c1", "test"))
    assert state.place(request("big", gpus=8)).result == "placed"
    clock.now_s = 1_010.0
    assert state.place(request("ml-1", gpus=8)).result == "queued"  # team ml: named
    clock.now_s = 1_020.0
    stranger = dataclasses.replace(request("x-1", gpus=8), team="stranger", fingerprint="x")
    assert state.place(stranger).result == "queued"
    metrics.refresh(state)
    assert _oldest(metrics, "capacity") == 10.0
    assert _oldest(metrics, "quota") == 0.0
    clock.now_s = 1_070.0
    state.release("big")  # ml-1 placed from the queue after 60 s
    assert set(state.held) == {"ml-1"}
    clock.now_s = 1_080.0
    state.release("x-1")  # taken out of the queue by its client after 60 s: "other"
    assert _wait(metrics, "ml", "placed", "count") == 1.0
    assert _wait(metrics, "ml", "placed", "sum") == 60.0
    assert _wait(metrics, "ml", "placed", "bucket", le="15.0") == 0.0
    assert _wait(metrics, "ml", "placed", "bucket", le="60.0") == 1.0
    assert _wait(metrics, "other", "released", "sum") == 60.0
    assert _wait(metrics, "stranger", "released", "count") is None  # (no label per client team)
    metrics.refresh(state)
    assert _oldest(metrics, "capacity") == 0.0


def test_the_oldest_wait_by_what_holds_it(tmp_path: Path) -> None:
    """A workload its team's quota holds back waits by design: its wait is the "quota"
    cause's (the FleetdWorkloadsQueued alert watches "capacity" only)."""
    clock = FakeClock(1_000.0)
    metrics = Metrics()
    cfg = Config(teams={"quotas": {"capped": {"gpus": 8}}})  # type: ignore[arg-type]
    state = FleetState(cfg, Journal(tmp_path / "j.db"), clock, metrics=metrics.state_hooks())
    state.expect_source("test", "c1")
    for i in range(3):
        state.apply_now(node(f"n{i}", seq=1, gpus=8))
    state.apply_now(up.ClusterSynced("c1", "test"))
    capped = [dataclasses.replace(request(f"c-{i}", gpus=8), team="capped") for i in range(2)]
    assert state.place(capped[0]).result == "placed"
    assert state.place(capped[1]).result == "queued"  # (room in the fleet, not in its quota)
    clock.now_s = 1_030.0
    assert state.place(request("big-1", gpus=8)).result == "placed"
    assert state.place(request("big-2", gpus=8)).result == "placed"
    assert state.place(request("big-3", gpus=8)).result == "queued"  # (no room left)
    clock.now_s = 1_100.0
    metrics.refresh(state)
    assert _oldest(metrics, "quota") == 100.0
    assert _oldest(metrics, "capacity") == 70.0
    state.release("c-0")  # room in its team's quota and on c-0's node: c-1 placed
    assert "c-1" in state.held
    metrics.refresh(state)
    assert _oldest(metrics, "quota") == 0.0
    assert _oldest(metrics, "capacity") == 70.0


def test_a_wait_counts_for_its_cause_from_when_it_became_so(tmp_path: Path) -> None:
    """Held back by its team's per-model quota (the H100 it may not take more of) while an
    H100 node has room: a "quota" wait, as its explanation says. Once the quota has room and
    the fleet has none, its "capacity" wait starts then, not when it was queued. The refresh
    reads each workload's last try: it asks the quota nothing."""
    clock = FakeClock(1_000.0)
    metrics = Metrics()
    quotas = {"capped": {"gpus_by_model": {"H100": 8}}}
    cfg = Config(teams={"quotas": quotas})  # type: ignore[arg-type]
    state = FleetState(cfg, Journal(tmp_path / "j.db"), clock, metrics=metrics.state_hooks())
    state.expect_source("test", "c1")
    state.apply_now(node("h0", seq=1, gpus=8, model="H100"))
    state.apply_now(node("h1", seq=1, gpus=8, model="H100"))
    state.apply_now(node("a0", seq=1, gpus=8, model="A100"))
    state.apply_now(up.ClusterSynced("c1", "test"))
    h100 = dataclasses.replace(request("c-h", gpus=8), team="capped")
    h100 = dataclasses.replace(
        h100, pods=tuple(dataclasses.replace(p, gpu_models=("H100",)) for p in h100.pods)
    )
    assert state.place(h100).result == "placed"  # (its quota's 8 H100s)
    assert state.place(request("fill-a", gpus=8)).result == "placed"  # (the A100 node)
    wait = dataclasses.replace(request("c-any", gpus=8), team="capped")
    assert state.place(wait).result == "queued"  # (h1 has room, not its quota)
    clock.now_s = 1_100.0
    state._quota_verdict = None  # type: ignore[assignment,method-assign]  # (not asked)
    metrics.refresh(state)
    assert (_oldest(metrics, "quota"), _oldest(metrics, "capacity")) == (100.0, 0.0)
    del state._quota_verdict
    # The fleet fills up; then its quota is raised (a reload, which retries the queue): now
    # the fleet holds it back, from then on.
    assert state.place(request("fill-h", gpus=8)).result == "placed"  # (h1)
    clock.now_s = 1_200.0
    raised = {"capped": {"gpus_by_model": {"H100": 16}}}
    state.set_config(Config(teams={"quotas": raised}))  # type: ignore[arg-type]
    assert "c-any" in state.queue
    clock.now_s = 1_230.0
    metrics.refresh(state)
    assert (_oldest(metrics, "quota"), _oldest(metrics, "capacity")) == (0.0, 30.0)
