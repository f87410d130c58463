"""Fixtures: a real fleetd daemon (gRPC on 127.0.0.1, ephemeral ports, SQLite in tmp_path)."""

from __future__ import annotations

import asyncio
import os
import shutil
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from fleetd import config
from fleetd.daemon import Daemon
from fleetd.loadgen import produce
from fleetd.v1 import fleet_pb2_grpc, nodepools_pb2_grpc, placement_pb2_grpc
from tests.integration.sources_support import create_topic, h100_report, kafka_section, unique
from tests.testbed.build import artefacts


def daemon_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A config dict: ephemeral ports, journal in tmp_path, then `sections` merged on top."""
    data: dict[str, Any] = {
        "server": {
            "grpc_listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "shutdown_grace_s": 5,
        },
        "journal": {"path": str(tmp_path / "journal.sqlite3")},
        "logging": {"level": "WARNING"},
    }
    for name, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(name, {}).update(value)
        else:
            data[name] = value
    return data


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write a config dict as YAML."""
    path.write_text(yaml.safe_dump(data))
    return path


class Client:
    """Stubs of every fleetd service over one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.placement = placement_pb2_grpc.PlacementStub(channel)
        self.pools = nodepools_pb2_grpc.NodePoolsStub(channel)
        self.fleet = fleet_pb2_grpc.FleetStub(channel)


async def place_concurrently(daemon: Daemon, workloads: list[Any]) -> list[Any]:
    """Place each of `workloads` (`types_pb2.Workload`) from a client of its own, on a
    connection of its own, all at once; their PlaceResponses in order."""
    from fleetd.v1 import placement_pb2

    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{daemon.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in workloads
    ]

    async def one(channel: grpc.aio.Channel, workload: Any) -> Any:
        stub = placement_pb2_grpc.PlacementStub(channel)
        return await stub.Place(placement_pb2.PlaceRequest(workload=workload))

    try:
        return list(await asyncio.gather(*map(one, channels, workloads)))
    finally:
        await asyncio.gather(*(c.close() for c in channels))


async def wait_ready(daemon: Daemon) -> None:
    """Await the daemon's readiness (the health status flips on the same condition)."""
    assert daemon.state is not None
    await daemon.state.ready_event.wait()


StartDaemon = Callable[..., Awaitable[tuple[Daemon, Client]]]


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """Start daemons with `sections` overrides (file-backed config); stops them all after."""
    started: list[tuple[Daemon, grpc.aio.Channel]] = []

    async def start(config_name: str = "fleetd.yaml", **sections: Any) -> tuple[Daemon, Client]:
        path = write_config(tmp_path / config_name, daemon_config(tmp_path, **sections))
        daemon = Daemon(config.load(path), path)
        await daemon.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{daemon.grpc_port}")
        started.append((daemon, channel))
        await wait_ready(daemon)
        return daemon, Client(channel)

    yield start
    for daemon, channel in started:
        await channel.close()
        await daemon.stop()
    await asyncio.sleep(0)


async def start_on_kafka(
    start_daemon: StartDaemon,
    bootstrap: str,
    records: Callable[[str], list[tuple[bytes, bytes]]] | None = None,
    *,
    cluster_list: bool = True,
    **kafka_options: Any,
) -> tuple[Daemon, Client, str, str]:
    """A daemon fed by a topic of its own only: `records(cluster)` (default: one 8 x H100
    node n0) of a fresh cluster produced first, readiness waiting for that cluster (without
    `cluster_list`: for the consumer's catch-up). Returns (daemon, client, topic, cluster)."""
    topic, cluster = unique("daemon"), unique("edge")
    await create_topic(bootstrap, topic)
    made = records(cluster) if records is not None else [h100_report(cluster, "n0", 1)]
    await produce(bootstrap, topic, made)
    clusters = [cluster] if cluster_list else None
    daemon, client = await start_daemon(
        sources={
            "simulated": {"enabled": False},
            "kafka": kafka_section(bootstrap, topic, clusters, **kafka_options),
        }
    )
    return daemon, client, topic, cluster


@pytest.fixture
async def fleetd(start_daemon: StartDaemon) -> tuple[Daemon, Client]:
    """One daemon on the embedded simulated fleet; pods never start (reservations stay pending)."""
    return await start_daemon(sources={"simulated": {"confirm_after_s": 3600}})


def promtool() -> str:
    """promtool as `make testbed` unpacks it from Debian's prometheus package into the cache.

    Under FLEETD_TESTBED=required (make test) a missing one fails the test; otherwise one on
    PATH will do, and without any the test is skipped.
    """
    path = artefacts().promtool
    if path.exists():
        return str(path)
    reason = f"promtool is not installed: run `make testbed` (expected at {path})"
    if os.environ.get("FLEETD_TESTBED") == "required":
        pytest.fail(reason)
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(reason)
    return found


def scrape(daemon: Daemon) -> str:
    """The daemon's /metrics exposition (blocking: call through asyncio.to_thread)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics") as resp:
        return str(resp.read().decode())
