"""`fleetd serve` as a real process: SIGTERM drain, kill -9 durability, SIGHUP reload."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from fleetd.demo import wait_serving
from fleetd.v1 import fleet_pb2, placement_pb2, types_pb2

from .conftest import Client, daemon_config, write_config

PLACED = types_pb2.DECISION_RESULT_PLACED
QUEUED = types_pb2.DECISION_RESULT_QUEUED


class DaemonProcess:
    """A `fleetd serve --config` subprocess; its JSON log lines are read as events."""

    def __init__(self, config_path: Path | None, env: dict[str, str] | None = None) -> None:
        """`fleetd serve --config config_path` (None: no arguments), `env` added."""
        self.config_path = config_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        #: stderr lines that were not JSON objects (structured logs: there should be none).
        self.not_json: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        args = ["--config", str(self.config_path)] if self.config_path is not None else []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetd.cli", "serve", *args,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self.env} if self.env is not None else None,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        serving = await self.wait_log("fleetd serving")
        self.port = int(serving["grpc_port"])

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                line = None
            if not isinstance(line, dict) or not {"ts", "level", "logger", "msg"} <= set(line):
                self.not_json.append(raw.decode(errors="replace"))
                line = {"msg": raw.decode(errors="replace")}
            await self.lines.put(line)

    async def wait_log(self, msg: str, timeout_s: float = 60) -> dict[str, Any]:
        async def find() -> dict[str, Any]:
            while True:
                line = await self.lines.get()
                if line.get("msg") == msg:
                    return line

        return await asyncio.wait_for(find(), timeout_s)

    async def client(self) -> tuple[grpc.aio.Channel, Client]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        await wait_serving(channel)
        return channel, Client(channel)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await self._reader


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    data = daemon_config(
        tmp_path,
        logging={"level": "INFO"},
        sources={"simulated": {"confirm_after_s": 3600}},
        reload_poll_s=600,
    )
    return write_config(tmp_path / "fleetd.yaml", data)


def workload(wid: str, gpus: int = 1) -> placement_pb2.PlaceRequest:
    pod = types_pb2.PodSpec(cpu_millicores=1000, memory_bytes=1 << 30, gpu_count=gpus)
    return placement_pb2.PlaceRequest(
        workload=types_pb2.Workload(workload_id=wid, team="t", pod=pod)
    )


async def allocated_gpu_milli(client: Client) -> int:
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    return sum(c.gpu_milli_allocated for c in snap.capacity)


async def test_kill9_then_restart_restores_every_reservation(config_path: Path) -> None:
    daemon = DaemonProcess(config_path)
    await daemon.start()
    try:
        channel, client = await daemon.client()
        placed = {}
        for i in range(20):
            resp = await client.placement.Place(workload(f"w{i}", gpus=1 + i % 3))
            placed[f"w{i}"] = list(resp.placements)
        await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="w0"))
        held = await allocated_gpu_milli(client)
        await channel.close()
    finally:
        await daemon.kill()  # SIGKILL: no shutdown path runs
    restarted = DaemonProcess(config_path)
    await restarted.start()
    try:
        channel, client = await restarted.client()
        assert await allocated_gpu_milli(client) == held
        # Decisions made before the kill are still resumable.
        stream = client.placement.WatchDecisions(placement_pb2.WatchDecisionsRequest(after_seq=2))
        got = []
        async for d in stream:
            got.append((d.seq, d.workload_id))
            if len(got) == 3:
                break
        stream.cancel()
        assert got == [(3, "w2"), (4, "w3"), (5, "w4")]
        for wid in sorted(placed):
            if wid == "w0":
                continue
            resp = await client.placement.Place(workload(wid, gpus=1 + int(wid[1:]) % 3))
            assert resp.replayed, wid
            assert list(resp.placements) == placed[wid], wid
        # New work never lands on a restored device.
        used = {(p.cluster, p.node, g) for ps in placed.values() for p in ps for g in p.gpu_indices}
        used -= {(p.cluster, p.node, g) for p in placed["w0"] for g in p.gpu_indices}
        for i in range(30):
            resp = await client.placement.Place(workload(f"new{i}"))
            if resp.result == PLACED:
                for p in resp.placements:
                    assert not {(p.cluster, p.node, g) for g in p.gpu_indices} & used
        await channel.close()
    finally:
        restarted.signal(signal.SIGTERM)
        assert await restarted.wait() == 0


def h100_workload(wid: str, priority: int = 0) -> placement_pb2.PlaceRequest:
    pod = types_pb2.PodSpec(cpu_millicores=1000, memory_bytes=1 << 30, gpu_count=8)
    wl = types_pb2.Workload(
        workload_id=wid, team="t", pod=pod, cluster="sim-west", pool="h100", priority=priority
    )
    return placement_pb2.PlaceRequest(workload=wl)


async def test_kill9_then_restart_keeps_the_queue(config_path: Path) -> None:
    daemon = DaemonProcess(config_path)
    await daemon.start()
    try:
        channel, client = await daemon.client()
        # sim-west/h100: 4 nodes x 8 GPUs. Fill them; three more wait in the queue.
        for i in range(4):
            assert (await client.placement.Place(h100_workload(f"fill{i}"))).result == PLACED
        for wid in ("q1", "q2", "q3"):
            resp = await client.placement.Place(h100_workload(wid, priority=int(wid == "q3")))
            assert resp.result == QUEUED
        await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="q2"))
        await channel.close()
    finally:
        await daemon.kill()  # SIGKILL: no shutdown path runs
    restarted = DaemonProcess(config_path)
    await restarted.start()
    try:
        channel, client = await restarted.client()
        snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
        assert snap.workloads_queued == 2
        assert snap.reservations_pending == 4
        replay = await client.placement.Place(h100_workload("q1"))
        assert (replay.result, replay.replayed) == (QUEUED, True)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="q2"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Capacity frees: the queue is retried in its order (priority, then arrival).
        rel = await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="fill0"))
        await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="fill1"))
        stream = client.placement.WatchDecisions(
            placement_pb2.WatchDecisionsRequest(after_seq=rel.decision_seq)
        )
        placed = []
        async for d in stream:
            if d.kind == types_pb2.Decision.KIND_PLACE and d.result == PLACED:
                placed.append(d.workload_id)
                if len(placed) == 2:
                    break
        stream.cancel()
        assert placed == ["q3", "q1"]
        snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
        assert (snap.workloads_queued, snap.reservations_pending) == (0, 4)
        await channel.close()
    finally:
        await restarted.kill()
    # The grants left the durable queue: nothing is queued (or placed twice) after another kill.
    again = DaemonProcess(config_path)
    await again.start()
    try:
        channel, client = await again.client()
        snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
        assert (snap.workloads_queued, snap.reservations_pending) == (0, 4)
        assert await allocated_gpu_milli(client) == 4 * 8 * 1000
        await channel.close()
    finally:
        again.signal(signal.SIGTERM)
        assert await again.wait() == 0


async def test_sigterm_drains_in_flight_rpcs_and_exits_0(config_path: Path) -> None:
    daemon = DaemonProcess(config_path)
    await daemon.start()
    channel, client = await daemon.client()
    first = asyncio.Event()

    async def one(i: int) -> tuple[str, list[placement_pb2.PodPlacement]]:
        try:
            resp = await client.placement.Place(workload(f"d{i}"))
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, []
        finally:
            first.set()
        return types_pb2.DecisionResult.Name(resp.result), list(resp.placements)

    calls = [asyncio.create_task(one(i)) for i in range(200)]
    await first.wait()
    daemon.signal(signal.SIGTERM)
    results = await asyncio.gather(*calls)
    code = await daemon.wait(timeout_s=30)
    await channel.close()
    assert code == 0
    assert daemon.not_json == []  # every log line, drain included, is structured
    kinds = {r for r, _ in results}
    # Calls that reach the server after the drain began are refused (UNAVAILABLE from fleetd,
    # or CANCELLED from grpc core once the server stopped); none fails any other way.
    assert kinds <= {"DECISION_RESULT_PLACED", "DECISION_RESULT_QUEUED", "UNAVAILABLE", "CANCELLED"}
    acked = {f"d{i}": p for i, (r, p) in enumerate(results) if r == "DECISION_RESULT_PLACED"}
    assert acked
    # Every acknowledged reservation survived the shutdown.
    restarted = DaemonProcess(daemon.config_path)
    await restarted.start()
    try:
        channel, client = await restarted.client()
        for wid, placements in acked.items():
            resp = await client.placement.Place(workload(wid))
            assert resp.replayed
            assert list(resp.placements) == placements
        await channel.close()
    finally:
        restarted.signal(signal.SIGTERM)
        assert await restarted.wait() == 0


async def test_sighup_reloads_the_config(config_path: Path) -> None:
    daemon = DaemonProcess(config_path)
    await daemon.start()
    try:
        channel, client = await daemon.client()
        before = (await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())).config_version
        data = yaml.safe_load(await asyncio.to_thread(config_path.read_text))
        data["teams"] = {"priorities": {"ml": 10}}
        await asyncio.to_thread(config_path.write_text, yaml.safe_dump(data))
        daemon.signal(signal.SIGHUP)
        await daemon.wait_log("config reloaded")
        after = (await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())).config_version
        assert after != before
        await asyncio.to_thread(config_path.write_text, "teams: [oops\n")
        daemon.signal(signal.SIGHUP)
        line = await daemon.wait_log("config reload rejected; keeping the running config")
        assert str(config_path) in line["error"]
        status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
        assert status.config_version == after
        await channel.close()
    finally:
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0


async def test_serve_without_arguments_runs_on_embedded_defaults(tmp_path: Path) -> None:
    """`fleetd serve` with no arguments: the shipped fleet, simulated, no Kafka or Kubernetes
    (only the ports and the journal are moved, through FLEETD_* environment overrides)."""
    daemon = DaemonProcess(
        None,
        env={
            "FLEETD_SERVER__GRPC_LISTEN": "127.0.0.1:0",
            "FLEETD_SERVER__METRICS_LISTEN": "127.0.0.1:0",
            "FLEETD_JOURNAL__PATH": str(tmp_path / "journal.sqlite3"),
        },
    )
    await daemon.start()
    try:
        channel, client = await daemon.client()
        status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
        assert status.ready
        assert {(s.source, s.cluster) for s in status.sources} == {
            ("simulated", "sim-east"),
            ("simulated", "sim-west"),
        }
        snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
        assert (sum(c.nodes for c in snap.clusters), sum(c.gpus for c in snap.clusters)) == (
            24,
            128,
        )
        assert (await client.placement.Place(workload("w", gpus=2))).result == PLACED
        await channel.close()
    finally:
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    assert (tmp_path / "journal.sqlite3").exists()


async def test_demo_drives_the_daemon_and_writes_a_chart(tmp_path: Path) -> None:
    """`fleetd demo` (what `make demo` runs), on a small synthetic workload."""
    chart = tmp_path / "demo.png"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetd.cli", "demo", "--scale", "1", "--pods", "60",
        "--chart", str(chart), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    for line in ("GPU allocation", "decisions", "Place latency", "p50", "p99", "results"):
        assert line in text, (line, text)
    assert "60/60 pods (100%)" in text
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
