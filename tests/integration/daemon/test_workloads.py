"""ListWorkloads and the on-call's `fleetd workloads` / `fleetd release`, against a real daemon
over gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from fleetd.daemon import Daemon
from fleetd.v1 import placement_pb2
from tests.testbed.procs import async_wait_until

from .conftest import Client, StartDaemon
from .test_api import PLACED, QUEUED, place, pod_workload

PENDING = placement_pb2.WORKLOAD_STATE_PENDING
CONFIRMED = placement_pb2.WORKLOAD_STATE_CONFIRMED
QUEUED_STATE = placement_pb2.WORKLOAD_STATE_QUEUED


async def list_all(
    client: Client, page_size: int, **filters: object
) -> list[placement_pb2.WorkloadStatus]:
    """Every listed workload, page after page; checks each page's size."""
    out: list[placement_pb2.WorkloadStatus] = []
    token = ""
    while True:
        reply = await client.placement.ListWorkloads(
            placement_pb2.ListWorkloadsRequest(page_size=page_size, page_token=token, **filters)  # type: ignore[arg-type]
        )
        assert len(reply.workloads) <= page_size
        out.extend(reply.workloads)
        token = reply.next_page_token
        if not token:
            return out
        assert len(reply.workloads) == page_size  # (only the last page is short)


async def _fill_and_queue(client: Client) -> dict[str, placement_pb2.PlaceResponse]:
    """sim-west/h100 (4 nodes x 8 GPUs) full with four teams' pods, then two queued: the
    later one with the higher priority."""
    placed = {}
    for i, team in enumerate(("ml", "ml", "vision", "speech")):
        wl = pod_workload(f"fill-{i}", gpus=8, cluster="sim-west", pool="h100")
        wl.team = team
        placed[wl.workload_id] = await place(client, wl)
        assert placed[wl.workload_id].result == PLACED
    for wid, priority in (("wait-low", 0), ("wait-high", 10)):
        wl = pod_workload(wid, gpus=8, cluster="sim-west", pool="h100", priority=priority)
        placed[wid] = await place(client, wl)
        assert placed[wid].result == QUEUED
    return placed


async def test_list_workloads_states_pages_and_filters(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    before = time.time()
    placed = await _fill_and_queue(client)
    small = await place(client, pod_workload("small", gpus=0, milli=250, cluster="sim-east"))
    assert small.result == PLACED

    listed = await list_all(client, page_size=2)
    ids = [w.workload_id for w in listed]
    assert ids == sorted([*placed, "small"])  # each once, by id, across 4 pages
    by_id = {w.workload_id: w for w in listed}
    fill = by_id["fill-2"]
    assert (fill.team, fill.state, fill.pods, fill.gpu_milli) == ("vision", PENDING, 1, 8000)
    assert list(fill.placements) == list(placed["fill-2"].placements)
    assert fill.expires_at == placed["fill-2"].expires_at
    assert fill.decision_seq == placed["fill-2"].decision_seq
    assert before - 1 <= fill.since.ToNanoseconds() / 1e9 <= time.time()
    assert by_id["small"].gpu_milli == 250
    # The queue in its retry order: the higher priority first, each with why it waits.
    queued = await list_all(client, page_size=10, state=QUEUED_STATE)
    assert [(w.workload_id, w.queue_position) for w in queued] == [
        ("wait-high", 1),
        ("wait-low", 2),
    ]
    for w in queued:
        assert w.state == QUEUED_STATE
        assert not w.placements
        assert not w.HasField("expires_at")
        assert (w.pods, w.gpu_milli, w.decision_seq) == (
            1,
            8000,
            placed[w.workload_id].decision_seq,
        )
        assert "INSUFFICIENT_GPU" in {r.code for r in w.explanation.reasons}
        # (As of its last try: here when it was queued.)
        assert w.explained_at.ToNanoseconds() >= w.since.ToNanoseconds() > 0
    assert (by_id["wait-high"].priority, by_id["wait-high"].effective_priority) == (10, 10)
    # Filters.
    vision = await list_all(client, page_size=10, team="vision")
    assert [w.workload_id for w in vision] == ["fill-2"]
    assert await list_all(client, page_size=10, team="nobody") == []
    assert len(await list_all(client, page_size=10, state=PENDING)) == 5
    # Paging stays consistent while workloads come and go: released between two pages, a
    # workload is simply gone; the queued one placed in its stead shows as placed.
    first = await client.placement.ListWorkloads(placement_pb2.ListWorkloadsRequest(page_size=3))
    assert [w.workload_id for w in first.workloads] == ["fill-0", "fill-1", "fill-2"]
    await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="fill-3"))

    async def high_placed() -> bool:
        reply = await client.placement.ListWorkloads(
            placement_pb2.ListWorkloadsRequest(state=QUEUED_STATE)
        )
        return [w.workload_id for w in reply.workloads] == ["wait-low"]

    await async_wait_until("wait-high placed", high_placed, timeout_s=10)
    rest = await client.placement.ListWorkloads(
        placement_pb2.ListWorkloadsRequest(page_size=10, page_token=first.next_page_token)
    )
    assert [(w.workload_id, w.state) for w in rest.workloads] == [
        ("small", PENDING),
        ("wait-high", PENDING),
        ("wait-low", QUEUED_STATE),
    ]
    assert rest.workloads[2].queue_position == 1
    assert not rest.next_page_token


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"page_token": "not a token!"}, "page_token"),
        ({"page_size": 1001}, "page_size"),
        ({"team": "no spaces"}, "team"),
        ({"state": 7}, "state"),
    ],
)
async def test_list_workloads_rejects_bad_requests(
    fleetd: tuple[Daemon, Client], request_fields: dict[str, object], field: str
) -> None:
    _, client = fleetd
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.placement.ListWorkloads(placement_pb2.ListWorkloadsRequest(**request_fields))  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field)


async def test_confirmed_once_the_cluster_reports_the_pods(start_daemon: StartDaemon) -> None:
    _, client = await start_daemon(sources={"simulated": {"confirm_after_s": 0.2}})
    assert (await place(client, pod_workload("runs", gpus=1))).result == PLACED

    async def confirmed() -> bool:
        [w] = await list_all(client, page_size=10)
        return w.state == CONFIRMED

    await async_wait_until("the reservation confirmed", confirmed, timeout_s=10)
    [w] = await list_all(client, page_size=10, state=CONFIRMED)
    assert not w.HasField("expires_at")  # (a confirmed reservation does not expire)
    assert await list_all(client, page_size=10, state=PENDING) == []


async def test_cli_workloads_and_release(
    fleetd: tuple[Daemon, Client], capsys: pytest.CaptureFixture[str]
) -> None:
    from fleetd import cli

    daemon, client = fleetd
    await _fill_and_queue(client)
    addr = ["--addr", f"127.0.0.1:{daemon.grpc_port}"]
    assert await asyncio.to_thread(cli.main, ["workloads", *addr, "--state", "queued"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["WORKLOAD", "TEAM", "STATE", "PRIO"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["wait-high", "ml", "queued", "10"],
        ["wait-low", "ml", "queued", "0"],
    ]
    assert "#1 in queue: 0/" in lines[1]
    # --limit stops early; several pages are joined (1,000 a page: one here).
    assert await asyncio.to_thread(cli.main, ["workloads", *addr, "--limit", "2"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [
        "fill-0",
        "fill-1",
    ]
    assert await asyncio.to_thread(cli.main, ["release", *addr, "wait-low"]) == 0
    assert "taken out of the queue" in capsys.readouterr().out
    assert await asyncio.to_thread(cli.main, ["release", *addr, "fill-1"]) == 0
    assert "released 1 pod(s), was pending" in capsys.readouterr().out
    assert await asyncio.to_thread(cli.main, ["release", *addr, "fill-1"]) == 1
    assert capsys.readouterr().err.startswith("fleetd release: NOT_FOUND")
    assert await asyncio.to_thread(cli.main, ["workloads", *addr, "--team", "vision"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [(r.split()[0], r.split()[2]) for r in rows] == [("fill-2", "pending")]
    assert "sim-west/" in rows[0]
