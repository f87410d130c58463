"""Place / Release / Explain / Watch against a real daemon over gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetd.daemon import Daemon
from fleetd.v1 import fleet_pb2, nodepools_pb2, placement_pb2, types_pb2
from tests.testbed.procs import async_wait_until

from .conftest import Client, StartDaemon, place_concurrently

PLACED = types_pb2.DECISION_RESULT_PLACED
QUEUED = types_pb2.DECISION_RESULT_QUEUED
UNSCHEDULABLE = types_pb2.DECISION_RESULT_UNSCHEDULABLE
GIB = 1024**3


def pod_workload(wid: str, gpus: int = 1, milli: int = 0, **kw: object) -> types_pb2.Workload:
    pod = types_pb2.PodSpec(
        cpu_millicores=4000, memory_bytes=16 * GIB, gpu_count=gpus, gpu_milli=milli
    )
    return types_pb2.Workload(workload_id=wid, team="ml", pod=pod, **kw)  # type: ignore[arg-type]


async def place(
    client: Client, wl: types_pb2.Workload, ttl_s: int = 0
) -> placement_pb2.PlaceResponse:
    resp: placement_pb2.PlaceResponse = await client.placement.Place(
        placement_pb2.PlaceRequest(workload=wl, ttl_s=ttl_s)
    )
    return resp


async def test_health_serving_after_sync(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "fleetd.v1.Placement"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_place_single_pod_then_release(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    resp = await place(client, pod_workload("w1", gpus=2))
    assert resp.result == PLACED
    assert resp.reservation_state == types_pb2.RESERVATION_STATE_PENDING
    [p] = resp.placements
    assert p.cluster
    assert p.node
    assert len(p.gpu_indices) == 2
    assert p.gpu_milli == 1000
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest(include_nodes=True))
    node = next(n for n in snap.nodes if n.name == p.node)
    assert [node.gpu_milli_allocated[i] for i in p.gpu_indices] == [1000, 1000]
    assert snap.reservations_pending == 1
    rel = await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="w1"))
    assert rel.previous_state == types_pb2.RESERVATION_STATE_PENDING
    assert rel.pods_released == 1
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest(include_nodes=True))
    assert sum(sum(n.gpu_milli_allocated) for n in snap.nodes) == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="w1"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_place_is_idempotent(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    first = await place(client, pod_workload("same", gpus=1))
    again = await place(client, pod_workload("same", gpus=1))
    assert again.replayed
    assert not first.replayed
    assert list(again.placements) == list(first.placements)
    assert again.decision_seq == first.decision_seq
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await place(client, pod_workload("same", gpus=2))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert sum(c.gpu_milli_allocated for c in snap.capacity) == 1000


async def test_gang_is_all_or_nothing(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    pods = [types_pb2.PodSpec(cpu_millicores=1000, gpu_count=8) for _ in range(4)]
    wl = types_pb2.Workload(workload_id="g", team="ml", gang=types_pb2.GangSpec(pods=pods))
    resp = await place(client, wl)
    assert resp.result == PLACED
    nodes = {(p.cluster, p.node) for p in resp.placements}
    assert len(nodes) == 4  # 8 GPUs each: one whole node per pod
    too_big = types_pb2.Workload(
        workload_id="g2", team="ml", gang=types_pb2.GangSpec(pods=pods * 8), cluster="sim-west"
    )
    resp = await place(client, too_big)
    assert resp.result == UNSCHEDULABLE
    assert "INSUFFICIENT_GPU" in {r.code for r in resp.explanation.reasons}
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert sum(c.gpu_milli_allocated for c in snap.capacity) == 4 * 8 * 1000


async def test_unschedulable_explains_per_reason(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    resp = await place(client, pod_workload("huge", gpus=16))
    assert resp.result == UNSCHEDULABLE
    codes = {r.code: r.nodes for r in resp.explanation.reasons}
    assert codes["INSUFFICIENT_GPU"] > 0
    assert resp.explanation.summary.startswith(
        f"0/{resp.explanation.nodes_total} nodes are available"
    )
    wl = pod_workload("model", gpus=1)
    wl.pod.gpu_models.append("B200")
    resp = await place(client, wl)
    assert resp.result == UNSCHEDULABLE
    assert {r.code for r in resp.explanation.reasons} >= {"GPU_MODEL"}


async def test_explain_is_a_dry_run(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    wl = pod_workload("dry", gpus=4)
    resp = await client.placement.Explain(placement_pb2.ExplainRequest(workload=wl))
    assert resp.fits
    assert resp.result == PLACED
    assert len(resp.placements) == 1
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert sum(c.gpu_milli_allocated for c in snap.capacity) == 0
    assert snap.reservations_pending == 0
    placed = await place(client, wl)
    assert list(placed.placements) == list(resp.placements)


async def test_queued_then_placed_when_capacity_frees(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    # sim-west/h100: 4 nodes x 8 GPUs. Fill them, then one more pod queues.
    for i in range(4):
        wl = pod_workload(f"fill{i}", gpus=8, cluster="sim-west", pool="h100")
        assert (await place(client, wl)).result == PLACED
    extra = pod_workload("waiting", gpus=8, cluster="sim-west", pool="h100")
    resp = await place(client, extra)
    assert resp.result == QUEUED
    assert "INSUFFICIENT_GPU" in {r.code for r in resp.explanation.reasons}
    stream = client.placement.WatchDecisions(
        placement_pb2.WatchDecisionsRequest(after_seq=resp.decision_seq)
    )
    await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="fill2"))
    seen = []
    async for d in stream:
        seen.append((d.kind, d.workload_id, d.result))
        if d.workload_id == "waiting":
            break
    stream.cancel()
    assert seen == [
        (types_pb2.Decision.KIND_RELEASE, "fill2", types_pb2.DECISION_RESULT_UNSPECIFIED),
        (types_pb2.Decision.KIND_PLACE, "waiting", PLACED),
    ]
    again = await place(client, extra)
    assert again.result == PLACED
    assert again.replayed


async def test_watch_resumes_from_seq(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    seqs = [(await place(client, pod_workload(f"r{i}", gpus=1))).decision_seq for i in range(5)]
    stream = client.placement.WatchDecisions(placement_pb2.WatchDecisionsRequest(after_seq=seqs[1]))
    got = []
    async for d in stream:
        got.append((d.seq, d.workload_id))
        if len(got) == 3:
            break
    stream.cancel()
    assert got == [(seqs[2], "r2"), (seqs[3], "r3"), (seqs[4], "r4")]


async def test_stream_deadline_ends_the_watch(fleetd: tuple[Daemon, Client]) -> None:
    """A Watch call's deadline is honoured: the stream ends DEADLINE_EXCEEDED, and the
    server drops its subscription (no leaked watcher)."""
    daemon, client = fleetd
    assert daemon.state is not None
    await place(client, pod_workload("before-deadline"))
    others = len(daemon.state.subscribers)  # the simulated fleet watches decisions too
    stream = client.placement.WatchDecisions(
        placement_pb2.WatchDecisionsRequest(after_seq=0), timeout=1.0
    )
    seen: list[str] = []

    async def read_all() -> None:
        async for d in stream:
            seen.append(d.workload_id)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_all()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen == ["before-deadline"]
    # The server cancels the handler when the deadline passes; no event marks the end of
    # its cleanup, so poll for it (bounded).
    state = daemon.state

    async def unsubscribed() -> bool:
        return len(state.subscribers) == others

    await async_wait_until("the watcher unsubscribed", unsubscribed, timeout_s=30)


async def test_unknown_cluster_and_pool_are_not_found(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    for kw, named in (
        ({"cluster": "nowhere"}, "cluster 'nowhere'"),
        ({"pool": "nopool"}, "pool 'nopool'"),
        ({"cluster": "sim-east", "pool": "h100"}, "pool 'h100' in cluster 'sim-east'"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await place(client, pod_workload("nf", **kw))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, kw
        assert named in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.placement.Explain(
                placement_pb2.ExplainRequest(workload=pod_workload("nf", **kw))
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, kw
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="never-placed"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert sum(c.gpu_milli_allocated for c in snap.capacity) == 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.pools.ListNodePools(nodepools_pb2.ListNodePoolsRequest(cluster="nowhere"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest(cluster="nowhere"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_pools_and_status(fleetd: tuple[Daemon, Client]) -> None:
    daemon, client = fleetd
    pools = (await client.pools.ListNodePools(nodepools_pb2.ListNodePoolsRequest())).pools
    assert [(p.cluster, p.name) for p in pools] == [
        ("sim-east", "a100"), ("sim-east", "t4"), ("sim-west", "cpu"), ("sim-west", "h100"),
    ]  # fmt: skip
    a100 = pools[0]
    assert (a100.gpu_model, a100.gpus_per_node, a100.nodes_ready) == ("A100-80GB", 8, 8)
    status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
    assert status.ready
    assert status.config_version == daemon.config.version()
    assert {(s.source, s.cluster, s.synced) for s in status.sources} == {
        ("simulated", "sim-east", True), ("simulated", "sim-west", True),
    }  # fmt: skip


async def test_concurrent_places_never_oversubscribe(fleetd: tuple[Daemon, Client]) -> None:
    daemon, client = fleetd
    # 128 GPUs in the simulated fleet; 200 clients, each on its own connection, ask for 1
    # whole GPU or a 300-milli share.
    replies = await place_concurrently(
        daemon,
        [
            pod_workload(f"c{i}", gpus=0 if i % 3 == 0 else 1, milli=300 if i % 3 == 0 else 0)
            for i in range(200)
        ],
    )
    used: dict[tuple[str, str, int], int] = {}
    for r in replies:
        for p in r.placements:
            for g in p.gpu_indices:
                used[(p.cluster, p.node, g)] = used.get((p.cluster, p.node, g), 0) + p.gpu_milli
    assert max(used.values()) <= 1000
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest(include_nodes=True))
    for n in snap.nodes:
        assert all(0 <= a <= 1000 for a in n.gpu_milli_allocated), n.name
        assert n.cpu_millicores_allocated <= n.cpu_millicores
        for g, a in enumerate(n.gpu_milli_allocated):
            assert a == used.get((n.cluster, n.name, g), 0)
    placed = sum(r.result == PLACED for r in replies)
    assert placed + sum(r.result == QUEUED for r in replies) == 200
    assert placed >= 128


async def test_watch_scale_decisions_streams_and_resumes(fleetd: tuple[Daemon, Client]) -> None:
    from scheduling.autoscale import DecisionKind, DecisionReason, ScaleDecision

    daemon, client = fleetd
    assert daemon.state is not None
    up = ScaleDecision.make(
        DecisionKind.SCALE_UP, "sim-west", "h100", 2, (), DecisionReason.PENDING_WORKLOADS,
        196.6, target_size=6, unblocks=("big-gang",),
    )  # fmt: skip
    down = ScaleDecision.make(
        DecisionKind.SCALE_DOWN, "sim-east", "t4", -1, ("sim-east/sim-east-t4-0007",),
        DecisionReason.EMPTY, -3.9, target_size=7,
    )  # fmt: skip
    first = daemon.state.publish_scale(up)
    daemon.state.publish_scale(down)
    stream = client.pools.WatchScaleDecisions(nodepools_pb2.WatchScaleDecisionsRequest())
    got = []
    async for d in stream:
        got.append(d)
        if len(got) == 2:
            break
    stream.cancel()
    assert [(d.kind, d.cluster, d.pool, d.from_size, d.to_size) for d in got] == [
        (nodepools_pb2.ScaleDecision.KIND_SCALE_UP, "sim-west", "h100", 4, 6),
        (nodepools_pb2.ScaleDecision.KIND_SCALE_DOWN, "sim-east", "t4", 8, 7),
    ]
    assert list(got[0].workload_ids) == ["big-gang"]
    assert list(got[1].nodes) == ["sim-east-t4-0007"]
    assert got[0].id == up.id
    resumed = client.pools.WatchScaleDecisions(
        nodepools_pb2.WatchScaleDecisionsRequest(after_seq=first.seq)
    )
    async for d in resumed:
        assert d.id == down.id
        break
    resumed.cancel()


async def test_cli_explain(
    fleetd: tuple[Daemon, Client], capsys: pytest.CaptureFixture[str]
) -> None:
    from fleetd import cli

    daemon, _ = fleetd
    addr = f"127.0.0.1:{daemon.grpc_port}"
    code = await asyncio.to_thread(cli.main, ["explain", "--addr", addr, "--gpus", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("placed: fits now")
    code = await asyncio.to_thread(
        cli.main, ["explain", "--addr", addr, "--gpus", "2", "--model", "B200"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("unschedulable: 0/24 nodes are available")
    assert "GPU_MODEL" in out


async def test_cli_status(start_daemon: StartDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    from fleetd import cli

    daemon, _ = await start_daemon(
        sources={"simulated": {"confirm_after_s": 3600}}, staleness={"node_stale_after_s": 3600}
    )
    addr = f"127.0.0.1:{daemon.grpc_port}"
    code = await asyncio.to_thread(cli.main, ["status", "--addr", addr])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0].startswith("ready (fleetd ")
    assert ", 0 nodes stale)" in lines[0]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["simulated", "sim-east", "synced,"],
        ["simulated", "sim-west", "synced,"],
    ]
    await daemon.stop()
    code = await asyncio.to_thread(cli.main, ["status", "--addr", addr, "--timeout-s", "2"])
    assert code == 1
    assert capsys.readouterr().err.startswith("fleetd status: UNAVAILABLE")


async def test_queued_work_scales_up_a_pool_and_then_runs(start_daemon: StartDaemon) -> None:
    _, client = await start_daemon(
        autoscaling={"interval_s": 0.05},
        sources={
            "simulated": {
                "confirm_after_s": 3600,
                "apply_scale_decisions": True,
                "provisioning_delay_s": 0,
            }
        },
    )
    for i in range(4):  # sim-west/h100: 4 nodes x 8 GPUs, max_size 8
        wl = pod_workload(f"fill{i}", gpus=8, cluster="sim-west", pool="h100")
        assert (await place(client, wl)).result == PLACED
    waiting = await place(client, pod_workload("waiting", gpus=8, cluster="sim-west", pool="h100"))
    assert waiting.result == QUEUED
    scale = client.pools.WatchScaleDecisions(nodepools_pb2.WatchScaleDecisionsRequest())
    async for d in scale:
        assert (d.kind, d.cluster, d.pool) == (
            nodepools_pb2.ScaleDecision.KIND_SCALE_UP, "sim-west", "h100",
        )  # fmt: skip
        assert (d.from_size, d.to_size) == (4, 5)
        assert list(d.workload_ids) == ["waiting"]
        break
    scale.cancel()
    decisions = client.placement.WatchDecisions(
        placement_pb2.WatchDecisionsRequest(after_seq=waiting.decision_seq)
    )
    async for d in decisions:
        if d.workload_id == "waiting":
            assert d.result == PLACED
            assert d.placements[0].node == "sim-west-h100-0004"  # the new node
            break
    decisions.cancel()
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert [d.pool for d in snap.scale_decisions] == ["h100"]
    pools = (
        await client.pools.ListNodePools(nodepools_pb2.ListNodePoolsRequest(cluster="sim-west"))
    ).pools
    h100 = next(p for p in pools if p.name == "h100")
    assert (h100.current_size, h100.nodes_ready) == (5, 5)


async def test_simulated_pool_manager_carries_out_a_scale_down(
    start_daemon: StartDaemon,
) -> None:
    """With scale_down, empty simulated nodes are planned away and the simulated pool
    manager deletes them: the decision's nodes leave the snapshot and the pool shrinks."""
    _, client = await start_daemon(
        autoscaling={"interval_s": 0.05, "scale_down": True, "scale_down_empty_after_s": 0},
        sources={"simulated": {"apply_scale_decisions": True, "provisioning_delay_s": 0}},
    )
    scale = client.pools.WatchScaleDecisions(nodepools_pb2.WatchScaleDecisionsRequest())
    async for d in scale:
        if d.kind == nodepools_pb2.ScaleDecision.KIND_SCALE_DOWN:
            down = d
            break
    scale.cancel()
    assert down.nodes
    assert down.to_size < down.from_size

    async def shrunk() -> bool:
        snap = await client.fleet.GetSnapshot(
            fleet_pb2.GetSnapshotRequest(cluster=down.cluster, include_nodes=True)
        )
        names = {n.name for n in snap.nodes}
        pool = next(p for p in snap.pools if p.name == down.pool)
        return not names & set(down.nodes) and pool.current_size <= down.to_size

    await async_wait_until("the scale-down's nodes deleted", shrunk, timeout_s=30, interval_s=0.05)
