"""Why a queued workload waits, as `ListWorkloads` tells it: the reasons of its last try
(queued, each retry that considered it, its client's repeated Place) and when they were
found, not the ones it was queued with hours ago."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fleetd.api import workloads
from fleetd.config import Config
from fleetd.journal import Journal
from fleetd.sources import updates as up
from fleetd.state import FleetState

from .test_state import FakeClock, node, request


def _queued(state: FleetState, config: Config) -> dict[str, workloads.WorkloadStatus]:
    page, _ = workloads.list_workloads(
        state, config, teams=None, states={workloads.QUEUED}, size=100, after=""
    )
    return {w.workload_id: w for w in page}


def _codes(w: workloads.WorkloadStatus) -> set[str]:
    assert w.explanation is not None
    return {code for code, _, _ in w.explanation.reasons}


def test_a_queued_workload_says_why_it_waits_as_of_its_last_try(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    config = Config(teams={"quotas": {"capped": {"gpus": 4}}})  # type: ignore[arg-type]
    state = FleetState(config, Journal(tmp_path / "j.db"), clock)
    state.expect_source("test", "c1")
    state.apply_now(node("n0", seq=1, gpus=8))
    state.apply_now(node("n1", seq=1, gpus=8))
    state.apply_now(up.ClusterSynced("c1", "test"))
    assert state.place(request("big", gpus=8)).result == "placed"
    assert state.place(request("half-a", gpus=4)).result == "placed"
    assert state.place(request("half-b", gpus=4)).result == "placed"
    clock.now_s = 1_010.0
    assert state.place(request("w", gpus=8)).result == "queued"  # (no node with 8 free)
    listed = _queued(state, config)
    assert _codes(listed["w"]) == {"INSUFFICIENT_GPU"}
    assert listed["w"].explained_at_s == 1_010.0
    # 4 GPUs freed: the retry tries w again, which still does not fit, as of now.
    clock.now_s = 1_050.0
    state.release("half-a")
    listed = _queued(state, config)
    assert _codes(listed["w"]) == {"INSUFFICIENT_GPU"}
    assert listed["w"].explained_at_s == 1_050.0
    # Team "capped" may hold 4 GPUs: its second workload waits for its quota.
    clock.now_s = 1_060.0
    capped = [dataclasses.replace(request(f"c-{i}", gpus=4), team="capped") for i in range(2)]
    assert state.place(capped[0]).result == "placed"
    assert state.place(capped[1]).result == "queued"
    assert _codes(_queued(state, config)["c-1"]) == {"TEAM_QUOTA"}
    # 8 GPUs freed: w placed; c-1 considered again, still held by the quota, as of now.
    clock.now_s = 1_100.0
    state.release("big")
    assert "w" in state.held
    listed = _queued(state, config)
    assert list(listed) == ["c-1"]
    assert _codes(listed["c-1"]) == {"TEAM_QUOTA"}
    assert listed["c-1"].explained_at_s == 1_100.0
    # Its client asks again: why it waits, as of that Place.
    clock.now_s = 1_120.0
    assert state.place(capped[1]).result == "queued"
    assert _queued(state, config)["c-1"].explained_at_s == 1_120.0


def test_workloads_of_one_shape_keep_their_own_teams_reasons(tmp_path: Path) -> None:
    """A retry tries a shape once a round and reuses its failure for the same shape later in
    the round; each workload still gets its own team's quota reasons, never another's
    (capped's per-model quota narrows its pod to the A100 that ml's pod asks for)."""
    clock = FakeClock(1_000.0)
    quotas = {"capped": {"gpus_by_model": {"H100": 8}}}
    config = Config(teams={"quotas": quotas})  # type: ignore[arg-type]
    state = FleetState(config, Journal(tmp_path / "j.db"), clock)
    state.expect_source("test", "c1")
    state.apply_now(node("h0", seq=1, gpus=8, model="H100"))
    state.apply_now(node("a0", seq=1, gpus=8, model="A100"))
    state.apply_now(node("a1", seq=1, gpus=8, model="A100"))
    state.apply_now(up.ClusterSynced("c1", "test"))

    def workload(wid: str, team: str, models: tuple[str, ...] = ()) -> Any:
        req = dataclasses.replace(request(wid, gpus=8), team=team)
        pods = tuple(dataclasses.replace(p, name="main", gpu_models=models) for p in req.pods)
        return dataclasses.replace(req, pods=pods)

    assert state.place(workload("c-h", "capped", ("H100",))).result == "placed"
    assert state.place(request("fill-a0", gpus=8)).result == "placed"
    assert state.place(request("half-1", gpus=4)).result == "placed"
    assert state.place(request("half-2", gpus=4)).result == "placed"
    assert state.place(workload("cq", "capped")).result == "queued"  # (A100 only, no room)
    assert state.place(workload("mq", "ml", ("A100",))).result == "queued"
    clock.now_s = 1_050.0
    state.release("half-1")  # (a retry: 4 GPUs free, not 8: both fail, one shape)
    listed = _queued(state, config)
    assert listed["cq"].explained_at_s == listed["mq"].explained_at_s == 1_050.0
    assert {"INSUFFICIENT_GPU", "TEAM_QUOTA"} <= _codes(listed["cq"])
    assert _codes(listed["mq"]) == _codes(listed["cq"]) - {"TEAM_QUOTA"}
    assert listed["mq"].explanation is not None
    assert "capped" not in listed["mq"].explanation.summary
