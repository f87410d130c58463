"""The edge: invalid input, oversized messages, reflection, health, metrics, hot reload."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest

from fleetd.daemon import Daemon
from fleetd.v1 import fleet_pb2, placement_pb2, types_pb2
from tests.testbed.build import artefacts
from tests.testbed.procs import async_wait_until

from .conftest import Client, StartDaemon, promtool, scrape

GIB = 1024**3


def pod(**kw: object) -> types_pb2.PodSpec:
    return types_pb2.PodSpec(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        pytest.param(placement_pb2.PlaceRequest(), "workload", id="no-workload"),
        pytest.param(
            placement_pb2.PlaceRequest(
                workload=types_pb2.Workload(workload_id="a", team="t", pod=pod(cpu_millicores=-5))
            ),
            "workload.pod.cpu_millicores",
            id="negative-cpu",
        ),
        pytest.param(
            placement_pb2.PlaceRequest(
                workload=types_pb2.Workload(workload_id="a", team="t", pod=pod(gpu_count=100000))
            ),
            "workload.pod.gpu_count",
            id="absurd-gpus",
        ),
        pytest.param(
            placement_pb2.PlaceRequest(
                workload=types_pb2.Workload(
                    workload_id="a", team="t", pod=pod(gpu_count=1, gpu_models=["A100 80GB"])
                )
            ),
            "workload.pod.gpu_models[0]",
            id="gpu-model-syntax",
        ),
        pytest.param(
            placement_pb2.PlaceRequest(
                workload=types_pb2.Workload(workload_id="a", team="t", gang=types_pb2.GangSpec())
            ),
            "workload.gang.pods",
            id="empty-gang",
        ),
        pytest.param(
            placement_pb2.PlaceRequest(
                workload=types_pb2.Workload(
                    workload_id="a",
                    team="t",
                    gang=types_pb2.GangSpec(
                        pods=[pod(name="x", gpu_count=1), pod(name="x", gpu_count=1)]
                    ),
                )
            ),
            "workload.gang.pods[1].name",
            id="duplicate-ids",
        ),
        pytest.param(
            placement_pb2.PlaceRequest(
                workload=types_pb2.Workload(
                    workload_id="a",
                    team="t",
                    gang=types_pb2.GangSpec(pods=[pod(gpu_milli=100)] * 1025),
                )
            ),
            "workload.gang.pods",
            id="oversized-gang",
        ),
        pytest.param(
            placement_pb2.PlaceRequest(
                workload=types_pb2.Workload(
                    workload_id="a",
                    team="t",
                    pod=pod(gpu_count=1, node_selector={f"k{i}": "v" for i in range(65)}),
                )
            ),
            "workload.pod.node_selector",
            id="oversized-selector",
        ),
        pytest.param(
            placement_pb2.PlaceRequest(
                workload=types_pb2.Workload(workload_id="a" * 300, team="t", pod=pod(gpu_count=1))
            ),
            "workload.workload_id",
            id="oversized-id",
        ),
        pytest.param(
            placement_pb2.PlaceRequest(
                workload=types_pb2.Workload(workload_id="a", team="t", pod=pod(gpu_count=1)),
                ttl_s=10**9,
            ),
            "ttl_s",
            id="absurd-ttl",
        ),
    ],
)
async def test_invalid_place_names_the_field(
    fleetd: tuple[Daemon, Client], request_: placement_pb2.PlaceRequest, field: str
) -> None:
    _, client = fleetd
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.placement.Place(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(field)
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert sum(c.gpu_milli_allocated for c in snap.capacity) == 0


async def test_oversized_and_garbage_requests_do_not_hurt(fleetd: tuple[Daemon, Client]) -> None:
    daemon, client = fleetd
    huge = types_pb2.Workload(
        workload_id="big",
        team="t",
        pod=pod(gpu_count=1, node_selector={f"k{i}": "v" * 60 for i in range(80_000)}),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.placement.Place(placement_pb2.PlaceRequest(workload=huge))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    raw = client.channel.unary_unary("/fleetd.v1.Placement/Place")
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05abc"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(garbage)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "fleetd.v1.PlaceRequest" in (err.value.details() or "")
    # Still serving, state intact.
    wl = types_pb2.Workload(workload_id="ok", team="t", pod=pod(gpu_count=1))
    resp = await client.placement.Place(placement_pb2.PlaceRequest(workload=wl))
    assert resp.result == types_pb2.DECISION_RESULT_PLACED
    assert daemon.exit_code == 0


#: Every RPC the server offers, with how it is called and its request message type.
EVERY_RPC = [
    ("/fleetd.v1.Placement/Place", "unary", "fleetd.v1.PlaceRequest"),
    ("/fleetd.v1.Placement/Release", "unary", "fleetd.v1.ReleaseRequest"),
    ("/fleetd.v1.Placement/Explain", "unary", "fleetd.v1.ExplainRequest"),
    ("/fleetd.v1.Placement/WatchDecisions", "stream", "fleetd.v1.WatchDecisionsRequest"),
    ("/fleetd.v1.NodePools/ListNodePools", "unary", "fleetd.v1.ListNodePoolsRequest"),
    (
        "/fleetd.v1.NodePools/WatchScaleDecisions",
        "stream",
        "fleetd.v1.WatchScaleDecisionsRequest",
    ),
    ("/fleetd.v1.Fleet/GetSnapshot", "unary", "fleetd.v1.GetSnapshotRequest"),
    ("/fleetd.v1.Fleet/GetStatus", "unary", "fleetd.v1.GetStatusRequest"),
    ("/grpc.health.v1.Health/Check", "unary", "grpc.health.v1.HealthCheckRequest"),
    ("/grpc.health.v1.Health/Watch", "stream", "grpc.health.v1.HealthCheckRequest"),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "bidi",
        "grpc.reflection.v1alpha.ServerReflectionRequest",
    ),
]


async def _call_raw(channel: grpc.aio.Channel, method: str, kind: str, body: bytes) -> None:
    """Send `body` unparsed to `method` and read the whole reply."""
    if kind == "unary":
        await channel.unary_unary(method)(body, timeout=10)
    elif kind == "stream":
        async for _ in channel.unary_stream(method)(body, timeout=10):
            pass
    else:
        async for _ in channel.stream_stream(method)(iter([body]), timeout=10):
            pass


async def test_malformed_body_is_invalid_argument_for_every_rpc(
    fleetd: tuple[Daemon, Client],
) -> None:
    """Raw bytes that do not parse as the request message, over a real channel."""
    daemon, client = fleetd
    # A truncated length-delimited field, and a field with an invalid wire type (7).
    for garbage in (b"\x0a\x05abc", b"\x0f"):
        for method, kind, message in EVERY_RPC:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _call_raw(client.channel, method, kind, garbage)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
            assert f"not a valid {message}" in (err.value.details() or ""), method
    text = generate_latest(daemon.metrics.registry).decode()
    assert 'fleetd_rpc_duration_seconds_count{code="INVALID_ARGUMENT",method="Place"} 2.0' in text
    # The server is unharmed: a well-formed call on the same channel works.
    status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
    assert status.ready
    assert daemon.exit_code == 0


async def test_random_bytes_never_crash_or_corrupt(fleetd: tuple[Daemon, Client]) -> None:
    """Seeded random bodies (some parse as messages with odd fields) to every fleetd RPC:
    each gets an answer with a definite status, never UNKNOWN or INTERNAL; usage stays sane."""
    daemon, client = fleetd
    rng = random.Random(4)
    allowed = {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,  # a stream that parsed fine runs until its deadline
    }
    seen: dict[grpc.StatusCode, int] = {}
    fleetd_rpcs = [r for r in EVERY_RPC if r[0].startswith("/fleetd.")]
    valid = placement_pb2.PlaceRequest(
        workload=types_pb2.Workload(
            workload_id="fz",
            team="t",
            cluster="sim-east",
            gang=types_pb2.GangSpec(pods=[pod(gpu_count=1, cpu_millicores=100)] * 2),
        ),
        ttl_s=30,
    ).SerializeToString()
    for i in range(600):
        method, kind, _ = fleetd_rpcs[i % len(fleetd_rpcs)]
        if i % 2:
            body = rng.randbytes(rng.randrange(0, 64))
        else:  # a valid message with a few bytes changed: often still parses
            mutated = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            body = bytes(mutated)
        try:
            if kind == "unary":
                await client.channel.unary_unary(method)(body, timeout=10)
            else:
                async for _ in client.channel.unary_stream(method)(body, timeout=0.05):
                    pass
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        assert code in allowed, (method, body, code)
        seen[code] = seen.get(code, 0) + 1
    assert seen[grpc.StatusCode.INVALID_ARGUMENT] > 0
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest(include_nodes=True))
    for n in snap.nodes:
        assert all(0 <= a <= 1000 for a in n.gpu_milli_allocated), n.name
    assert daemon.exit_code == 0


async def test_expired_deadline_is_refused(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    wl = types_pb2.Workload(workload_id="late", team="t", pod=pod(gpu_count=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.placement.Place(placement_pb2.PlaceRequest(workload=wl), timeout=1e-6)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_reflection_lists_every_service(fleetd: tuple[Daemon, Client]) -> None:
    _, client = fleetd
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = set()
    async for resp in call:
        services = {s.name for s in resp.list_services_response.service}
        break
    assert services >= {
        "fleetd.v1.Placement",
        "fleetd.v1.NodePools",
        "fleetd.v1.Fleet",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def _grpc_tool(name: str) -> str:
    """grpcurl or grpc-health-probe, as `make testbed` builds them into the test-bed cache."""
    path = artefacts().grpc_tool(name)
    if path.exists():
        return str(path)
    reason = f"{name} is not built: run `make testbed` (expected at {path})"
    if os.environ.get("FLEETD_TESTBED") == "required":
        pytest.fail(reason)
    pytest.skip(reason)


async def test_stock_clients(fleetd: tuple[Daemon, Client]) -> None:
    daemon, _ = fleetd
    grpcurl, probe = _grpc_tool("grpcurl"), _grpc_tool("grpc-health-probe")
    addr = f"127.0.0.1:{daemon.grpc_port}"
    out = await asyncio.to_thread(
        subprocess.run, [grpcurl, "-plaintext", addr, "list"], capture_output=True, text=True
    )
    assert "fleetd.v1.Placement" in out.stdout
    body = '{"workload": {"workload_id": "curl-1", "team": "ml", "pod": {"gpu_count": 2}}}'
    out = await asyncio.to_thread(
        subprocess.run,
        [grpcurl, "-plaintext", "-d", body, addr, "fleetd.v1.Placement/Place"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["result"] == "DECISION_RESULT_PLACED"
    pod = reply["placements"][0]
    assert len(pod.get("gpuIndices", pod.get("gpu_indices", []))) == 2
    out = await asyncio.to_thread(
        subprocess.run,
        [grpcurl, "-plaintext", "-d", '{"workload": {"workload_id": "x"}}', addr,
         "fleetd.v1.Placement/Place"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert "InvalidArgument" in out.stderr
    assert "workload.team" in out.stderr
    out = await asyncio.to_thread(
        subprocess.run, [probe, "-addr", addr], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


async def test_metrics_endpoint(fleetd: tuple[Daemon, Client]) -> None:
    daemon, client = fleetd
    wl = types_pb2.Workload(workload_id="m", team="t", pod=pod(gpu_count=2))
    await client.placement.Place(placement_pb2.PlaceRequest(workload=wl))
    assert daemon.state is not None
    daemon.metrics.refresh(daemon.state)
    text = await asyncio.to_thread(scrape, daemon)
    assert 'fleetd_decisions_total{kind="place",result="placed"} 1.0' in text
    assert re.search(r'fleetd_rpc_duration_seconds_count\{code="OK",method="Place"\} 1\.0', text)
    allocated = re.findall(r"^fleetd_gpus_allocated\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert sum(float(v) for v in allocated) == 2.0
    assert 'fleetd_reservations{state="pending"} 1.0' in text
    assert "fleetd_ready 1.0" in text
    out = await asyncio.to_thread(
        subprocess.run,
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


async def test_hot_reload_good_then_bad(start_daemon: StartDaemon, tmp_path: Path) -> None:
    daemon, client = await start_daemon(sources={"simulated": {"confirm_after_s": 3600}})
    assert daemon.config_path is not None
    before = (await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())).config_version
    data = yaml.safe_load(daemon.config_path.read_text())
    data["reservations"] = {"default_ttl_s": 42}
    data["scheduling"] = {"policy": "best-fit"}
    daemon.config_path.write_text(yaml.safe_dump(data))
    await asyncio.wait_for(daemon.reloads_reached(ok=1), 30)
    after = (await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())).config_version
    assert after != before
    wl = types_pb2.Workload(workload_id="r", team="t", pod=pod(gpu_count=1))
    resp = await client.placement.Place(placement_pb2.PlaceRequest(workload=wl))
    assert resp.expires_at.seconds - int(daemon.clock()) in (41, 42)
    # An invalid file is rejected; the running config stays; the error is counted.
    daemon.config_path.write_text("reservations:\n  default_ttl_s: -3\n  bogus: 1\n")
    await asyncio.wait_for(daemon.reloads_reached(error=1), 30)
    status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
    assert status.config_version == after
    assert daemon.config.reservations.default_ttl_s == 42
    text = await asyncio.to_thread(scrape, daemon)
    assert 'fleetd_config_reloads_total{result="error"} 1.0' in text
    assert 'fleetd_config_reloads_total{result="ok"} 1.0' in text


async def test_hot_reload_takes_effect_on_priorities_and_staleness(
    start_daemon: StartDaemon,
) -> None:
    daemon, client = await start_daemon(sources={"simulated": {"confirm_after_s": 3600}})
    path = daemon.config_path
    assert path is not None
    data = yaml.safe_load(path.read_text())

    async def reload(ok: int, **sections: object) -> None:
        data.update(sections)
        await asyncio.to_thread(path.write_text, yaml.safe_dump(data))
        await asyncio.wait_for(daemon.reloads_reached(ok=ok), 30)

    # Team priorities: a later workload of a now-privileged team overtakes the queue.
    await reload(1, teams={"priorities": {"vip": 10}})

    def h100(wid: str, team: str) -> placement_pb2.PlaceRequest:
        wl = types_pb2.Workload(
            workload_id=wid, team=team, pod=pod(gpu_count=8), cluster="sim-west", pool="h100"
        )
        return placement_pb2.PlaceRequest(workload=wl)

    for i in range(4):
        await client.placement.Place(h100(f"fill{i}", "t"))
    for wid, team in (("plain", "t"), ("vip-job", "vip")):
        resp = await client.placement.Place(h100(wid, team))
        assert resp.result == types_pb2.DECISION_RESULT_QUEUED
    rel = await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="fill0"))
    stream = client.placement.WatchDecisions(
        placement_pb2.WatchDecisionsRequest(after_seq=rel.decision_seq)
    )
    async for d in stream:
        if d.kind == types_pb2.Decision.KIND_PLACE:
            assert d.workload_id == "vip-job"
            break
    stream.cancel()
    # Staleness: nodes silent longer than the new limit (they heartbeat every 10 s) go stale.
    await reload(2, staleness={"node_stale_after_s": 0.2, "check_interval_s": 0.1})

    async def stale() -> bool:
        status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
        return status.nodes_stale > 0

    await async_wait_until("nodes stale under the reloaded limit", stale, timeout_s=30)


class NeverSyncs:
    """A source that declares a cluster and never finishes its initial sync."""

    def __init__(self, daemon: Daemon) -> None:
        assert daemon.state is not None
        daemon.state.expect_source("external", "never")

    async def run(self) -> None:
        await asyncio.Event().wait()


async def test_not_ready_until_every_source_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetd import config

    from .conftest import daemon_config, write_config

    monkeypatch.setattr(
        Daemon, "_external_sources", lambda self: [("source-never", NeverSyncs(self).run)]
    )
    path = write_config(tmp_path / "fleetd.yaml", daemon_config(tmp_path))
    daemon = Daemon(config.load(path), path)
    await daemon.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{daemon.grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
            client = Client(channel)
            wl = types_pb2.Workload(workload_id="w", team="t", pod=pod(gpu_count=1))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.placement.Place(placement_pb2.PlaceRequest(workload=wl))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "external/never" in (err.value.details() or "")
            status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
            assert not status.ready
            assert "external/never" in status.not_ready_reason
    finally:
        await daemon.stop()


class Crashes:
    """A source whose task dies after the initial sync: the daemon must not limp on."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def run(self) -> None:
        assert self.daemon.state is not None
        await self.daemon.state.ready_event.wait()
        raise RuntimeError("source lost its connection for good")


async def test_a_dying_task_stops_the_daemon_with_exit_code_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetd import config

    from .conftest import daemon_config, write_config

    monkeypatch.setattr(
        Daemon, "_external_sources", lambda self: [("source-crashes", Crashes(self).run)]
    )
    path = write_config(tmp_path / "fleetd.yaml", daemon_config(tmp_path))
    daemon = Daemon(config.load(path), path)
    await daemon.start()
    assert await asyncio.wait_for(daemon.wait(), 30) == 1
    text = generate_latest(daemon.metrics.registry).decode()
    assert 'fleetd_task_failures_total{task="source-crashes"} 1.0' in text


async def test_shutdown_is_bounded_by_a_task_that_ignores_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetd import config

    from .conftest import daemon_config, write_config

    let_go = asyncio.Event()

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if let_go.is_set():
                    raise

    monkeypatch.setattr(Daemon, "_external_sources", lambda self: [("source-stubborn", stubborn)])
    data = daemon_config(tmp_path, server={"shutdown_grace_s": 0.2})
    path = write_config(tmp_path / "fleetd.yaml", data)
    daemon = Daemon(config.load(path), path)
    await daemon.start()
    await asyncio.wait_for(daemon.stop(), 10)
    assert daemon.stuck_tasks == ["source-stubborn"]
    let_go.set()
    for task in [t for t in asyncio.all_tasks() if t.get_name() == "source-stubborn"]:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
