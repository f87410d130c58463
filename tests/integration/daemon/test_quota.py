"""Team GPU quotas (teams.quotas) through the real gRPC API: QUEUED over quota, placed when
the team's usage drops or a reload raises the quota, concurrent Places, kill -9."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml

from fleetd.v1 import fleet_pb2, placement_pb2, types_pb2

from .conftest import (
    Client,
    StartDaemon,
    daemon_config,
    place_concurrently,
    promtool,
    scrape,
    write_config,
)
from .test_process import DaemonProcess

PLACED = types_pb2.DECISION_RESULT_PLACED
QUEUED = types_pb2.DECISION_RESULT_QUEUED
UNSCHEDULABLE = types_pb2.DECISION_RESULT_UNSCHEDULABLE
GIB = 1024**3
#: Pods never start in these tests: reservations stay pending (and held).
SIMULATED = {"simulated": {"confirm_after_s": 3600}}


def workload(wid: str, team: str = "research", gpus: int = 1, milli: int = 0, **kw: Any) -> Any:
    pod = types_pb2.PodSpec(cpu_millicores=1000, memory_bytes=GIB, gpu_count=gpus, gpu_milli=milli)
    return types_pb2.Workload(workload_id=wid, team=team, pod=pod, **kw)


async def place(client: Client, wl: types_pb2.Workload) -> placement_pb2.PlaceResponse:
    resp: placement_pb2.PlaceResponse = await client.placement.Place(
        placement_pb2.PlaceRequest(workload=wl)
    )
    return resp


async def teams(client: Client) -> dict[tuple[str, str], tuple[int, int | None]]:
    """(team, model) -> (GPU milli held, quota milli or None) from GetSnapshot."""
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    return {
        (t.team, t.gpu_model): (t.gpu_milli_held, t.gpu_milli_quota if t.has_quota else None)
        for t in snap.teams
    }


async def placed_next(client: Client, after_seq: int, wids: set[str]) -> list[str]:
    """The workloads of `wids` placed in the decision stream after `after_seq`, in order
    (the stream's deadline fails the test if they never are)."""
    stream = client.placement.WatchDecisions(
        placement_pb2.WatchDecisionsRequest(after_seq=after_seq), timeout=30
    )
    placed: list[str] = []
    async for d in stream:
        if d.kind == types_pb2.Decision.KIND_PLACE and d.result == PLACED and d.workload_id in wids:
            placed.append(d.workload_id)
            if len(placed) == len(wids):
                break
    stream.cancel()
    return placed


async def test_over_quota_queues_until_the_team_releases(start_daemon: StartDaemon) -> None:
    quotas = {"research": {"gpus": 4, "gpus_by_model": {"H100-80GB": 2}}}
    daemon, client = await start_daemon(sources=SIMULATED, teams={"quotas": quotas})
    assert (await place(client, workload("a", gpus=3))).result == PLACED
    resp = await place(client, workload("b", gpus=2))
    assert resp.result == QUEUED
    [reason] = resp.explanation.reasons
    assert (reason.code, reason.nodes) == ("TEAM_QUOTA", 0)
    assert reason.message == "team research: quota 4 GPUs, holds 3, needs 2"
    # Explain says the same, and that the fleet itself has room.
    explained = await client.placement.Explain(
        placement_pb2.ExplainRequest(workload=workload("b", gpus=2))
    )
    assert (explained.fits, explained.result) == (False, QUEUED)
    assert explained.explanation.summary == (
        "team research: quota 4 GPUs, holds 3, needs 2. The fleet has room for it now."
    )
    # More than the quota itself: never.
    huge = await place(client, workload("huge", gpus=5))
    assert huge.result == UNSCHEDULABLE
    assert huge.explanation.summary == "team research: quota 4 GPUs, needs 5."
    # H100 capped at 2 for the team: an H100-only pod of 3 GPUs can never be placed.
    h100_only = workload("h100", gpus=3)
    h100_only.pod.gpu_models.append("H100-80GB")
    h100 = await place(client, h100_only)
    assert h100.result == UNSCHEDULABLE
    assert h100.explanation.summary == "team research: quota 2 H100-80GB GPUs, needs 3."
    # Another team is not capped.
    assert (await place(client, workload("other", team="batch", gpus=8))).result == PLACED
    usage = await teams(client)
    assert usage[("research", "")] == (3000, 4000)
    assert usage[("research", "H100-80GB")] == (0, 2000)
    assert usage[("batch", "")] == (8000, None)
    assert daemon.state is not None
    daemon.metrics.refresh(daemon.state)  # (as the daemon's periodic refresh does)
    text = await asyncio.to_thread(scrape, daemon)
    assert 'fleetd_team_gpus_held{team="research"} 3.0' in text
    assert 'fleetd_team_gpus_held{team="other"} 8.0' in text  # batch: not named in the config
    assert 'fleetd_team_gpu_quota{team="research"} 4.0' in text
    assert 'fleetd_team_model_gpu_quota{gpu_model="H100-80GB",team="research"} 2.0' in text
    lint = await asyncio.to_thread(
        subprocess.run, [promtool(), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert (lint.returncode, lint.stdout) == (0, ""), lint.stdout + lint.stderr
    # The team's usage drops: the queued workload is placed.
    rel = await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="a"))
    assert await placed_next(client, rel.decision_seq, {"b"}) == ["b"]
    again = await place(client, workload("b", gpus=2))
    assert (again.result, again.replayed) == (PLACED, True)
    assert (await teams(client))[("research", "")] == (2000, 4000)


async def test_an_over_quota_head_does_not_block_other_teams(start_daemon: StartDaemon) -> None:
    _, client = await start_daemon(sources=SIMULATED, teams={"quotas": {"research": {"gpus": 8}}})
    # sim-west/h100: 4 nodes x 8 GPUs. research holds one node (its quota); 40 more of its
    # workloads queue ahead of everyone (more than a retry round's budget of 32 tries).
    h100: dict[str, Any] = {"cluster": "sim-west", "pool": "h100"}
    assert (await place(client, workload("r0", gpus=8, **h100))).result == PLACED
    for i in range(1, 41):
        assert (await place(client, workload(f"r{i}", gpus=8, **h100))).result == QUEUED
    for i in range(3):
        wl = workload(f"fill{i}", team="batch", gpus=8, **h100)
        assert (await place(client, wl)).result == PLACED
    waiting = await place(client, workload("b", team="batch", gpus=8, **h100))
    assert waiting.result == QUEUED
    assert [r.code for r in waiting.explanation.reasons] != ["TEAM_QUOTA"]  # capacity
    rel = await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="fill0"))
    assert await placed_next(client, rel.decision_seq, {"b"}) == ["b"]
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert (snap.workloads_queued, snap.reservations_pending) == (40, 4)


async def test_concurrent_places_never_exceed_the_quota(start_daemon: StartDaemon) -> None:
    # 128 GPUs in the simulated fleet, 20.5 of them for the team: 200 clients, each on its
    # own connection, ask for a whole GPU or a 300-milli share.
    quotas = {"research": {"gpus": 20.5}}
    daemon, client = await start_daemon(sources=SIMULATED, teams={"quotas": quotas})
    replies = await place_concurrently(
        daemon,
        [
            workload(f"c{i}", gpus=0 if i % 3 == 0 else 1, milli=300 if i % 3 == 0 else 0)
            for i in range(200)
        ],
    )
    held = sum(p.gpu_milli * len(p.gpu_indices) for r in replies for p in r.placements)
    assert held <= 20_500
    assert {r.result for r in replies} == {PLACED, QUEUED}
    for i, r in enumerate(replies):
        if r.result == QUEUED:
            # Queued only by the quota, and rightly: usage only grew since it was decided.
            assert [x.code for x in r.explanation.reasons] == ["TEAM_QUOTA"]
            assert held + (300 if i % 3 == 0 else 1000) > 20_500
    assert (await teams(client))[("research", "")] == (held, 20_500)
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert sum(c.gpu_milli_allocated for c in snap.capacity) == held


async def test_reload_raising_the_quota_places_the_queue(start_daemon: StartDaemon) -> None:
    daemon, client = await start_daemon(
        sources=SIMULATED, teams={"quotas": {"research": {"gpus": 2}}}
    )
    path = daemon.config_path
    assert path is not None
    data = yaml.safe_load(path.read_text())
    assert (await place(client, workload("a", gpus=2))).result == PLACED
    first = await place(client, workload("b", gpus=1))
    assert first.result == QUEUED
    assert (await place(client, workload("c", gpus=1))).result == QUEUED
    # An invalid quota is rejected; the old one stays.
    data["teams"] = {"quotas": {"research": {"gpus": -4}}}
    await asyncio.to_thread(path.write_text, yaml.safe_dump(data))
    await asyncio.wait_for(daemon.reloads_reached(error=1), 30)
    assert daemon.config.teams.quotas["research"].gpus == 2
    assert (await place(client, workload("d", gpus=1))).result == QUEUED
    # Raised to 4: the queue is placed in its order (b and c; d waits: 2 + 1 + 1 = 4).
    data["teams"] = {"quotas": {"research": {"gpus": 4}}}
    await asyncio.to_thread(path.write_text, yaml.safe_dump(data))
    await asyncio.wait_for(daemon.reloads_reached(ok=1), 30)
    assert await placed_next(client, first.decision_seq, {"b", "c"}) == ["b", "c"]
    usage = await teams(client)
    assert usage[("research", "")] == (4000, 4000)
    assert (await place(client, workload("d", gpus=1))).result == QUEUED
    # Lowered to 1: nothing is evicted; new work waits.
    data["teams"] = {"quotas": {"research": {"gpus": 1}}}
    await asyncio.to_thread(path.write_text, yaml.safe_dump(data))
    await asyncio.wait_for(daemon.reloads_reached(ok=2), 30)
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert snap.reservations_pending == 3
    assert (await teams(client))[("research", "")] == (4000, 1000)
    assert (await place(client, workload("e", gpus=0, milli=100))).result == QUEUED


async def test_kill9_then_restart_keeps_the_usage(tmp_path: Path) -> None:
    data = daemon_config(
        tmp_path,
        logging={"level": "INFO"},
        sources=SIMULATED,
        teams={"quotas": {"research": {"gpus": 3, "gpus_by_model": {"A100-80GB": 1.5}}}},
        reload_poll_s=600,
    )
    path = write_config(tmp_path / "fleetd.yaml", data)
    daemon = DaemonProcess(path)
    await daemon.start()
    try:
        channel, client = await daemon.client()
        a100: dict[str, Any] = {"cluster": "sim-east", "pool": "a100"}
        assert (await place(client, workload("a", gpus=0, milli=500, **a100))).result == PLACED
        assert (await place(client, workload("b", gpus=1, **a100))).result == PLACED
        assert (await place(client, workload("c", gpus=1))).result == PLACED
        before = await teams(client)
        assert before[("research", "")] == (2500, 3000)
        assert before[("research", "A100-80GB")] == (1500, 1500)
        await channel.close()
    finally:
        await daemon.kill()  # SIGKILL: no shutdown path runs
    restarted = DaemonProcess(path)
    await restarted.start()
    try:
        channel, client = await restarted.client()
        assert await teams(client) == before
        # The restored usage counts: a whole GPU would take the team over its quota.
        resp = await place(client, workload("d", gpus=1))
        assert resp.result == QUEUED
        assert resp.explanation.reasons[0].message == (
            "team research: quota 3 GPUs, holds 2.5, needs 1"
        )
        await channel.close()
    finally:
        restarted.signal(signal.SIGTERM)
        assert await restarted.wait() == 0
