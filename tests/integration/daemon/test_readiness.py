"""Readiness follows the sources, against the real test bed: the Kafka broker stopped and
restarted, a kube-apiserver cut off (through a TCP proxy in front of it) and reachable again.

Once a source has been unable to reach its cluster for `sync_lost_after_s` that cluster has
lost its sync: GetStatus names the source, the cluster and the cause, grpc.health.v1
service "cluster/<name>" goes NOT_SERVING, and the cluster takes no new placements (a Place
limited to it answers UNAVAILABLE) while the other clusters keep placing. When every source
lost its sync the daemon as a whole is NOT_SERVING and every Place answers UNAVAILABLE.
All of it comes back when the source has resynced. Every wait is on an event (the health
Watch stream), not on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetd.loadgen import produce
from fleetd.v1 import fleet_pb2, placement_pb2, types_pb2
from tests.integration.sources_support import (
    AWAIT_S,
    h100_report,
    unique,
)
from tests.testbed.kube import KubeTestbed
from tests.testbed.procs import async_wait_until
from tests.testbed.runner import TestbedRun

from .conftest import Client, StartDaemon, scrape, start_on_kafka
from .test_edge import _grpc_tool

pytestmark = pytest.mark.testbed

GIB = 1024**3
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthWatch:
    """grpc.health.v1 Watch on the daemon: each status change is an event to await."""

    def __init__(self, client: Client, service: str = "") -> None:
        stub = health_pb2_grpc.HealthStub(client.channel)
        self.call = stub.Watch(health_pb2.HealthCheckRequest(service=service))

    async def next_status(self, wanted: int) -> None:
        """Read the stream until it reports `wanted` (at most AWAIT_S)."""
        async with asyncio.timeout(AWAIT_S):
            async for resp in self.call:
                if resp.status == wanted:
                    return
        raise AssertionError("health stream ended")

    def close(self) -> None:
        self.call.cancel()


def _place(wid: str, cluster: str) -> placement_pb2.PlaceRequest:
    pod = types_pb2.PodSpec(cpu_millicores=1000, memory_bytes=GIB, gpu_count=1)
    wl = types_pb2.Workload(workload_id=wid, team="t", pod=pod, cluster=cluster)
    return placement_pb2.PlaceRequest(workload=wl)


async def test_kafka_broker_outage_drops_readiness_until_resynced(
    start_daemon: StartDaemon, kafka_bootstrap: str, testbed_run: TestbedRun
) -> None:
    daemon, client, topic, cluster = await start_on_kafka(
        start_daemon, kafka_bootstrap, sync_lost_after_s=1
    )
    health = HealthWatch(client)
    try:
        await health.next_status(SERVING)
        await asyncio.to_thread(testbed_run.stop_kafka)
        try:
            await health.next_status(NOT_SERVING)
            status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
            assert not status.ready
            [src] = [s for s in status.sources if s.cluster == cluster]
            assert (src.source, src.synced) == ("kafka", False)
            assert src.reason.startswith("sync lost")
            assert kafka_bootstrap in src.reason
            assert f"kafka/{cluster}: sync lost" in status.not_ready_reason
            # Every source lost (not ready): Place is refused with the reason; Explain (a dry
            # run) still answers, and says why the cluster's node takes nothing now.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.placement.Place(_place("while-down", cluster))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"kafka/{cluster}" in (err.value.details() or "")
            assert daemon.state is not None
            daemon.metrics.refresh(daemon.state)
            text = await asyncio.to_thread(scrape, daemon)
            assert f'fleetd_source_synced{{cluster="{cluster}",source="kafka"}} 0.0' in text
            assert "fleetd_ready 0.0" in text
            explain = await client.placement.Explain(
                placement_pb2.ExplainRequest(workload=_place("x", cluster).workload)
            )
            assert not explain.fits
            assert [r.code for r in explain.explanation.reasons] == ["CLUSTER_SYNC_LOST"]
        finally:
            await asyncio.to_thread(testbed_run.restart_kafka)
        # A report published while fleetd was cut off arrives once it is back.
        await produce(kafka_bootstrap, topic, [h100_report(cluster, "n1", 2)])
        await health.next_status(SERVING)
        status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
        assert status.ready
        assert all(s.synced and not s.reason for s in status.sources)
        resp = await client.placement.Place(_place("after", cluster))
        assert resp.result == types_pb2.DECISION_RESULT_PLACED
    finally:
        health.close()
    assert daemon.exit_code == 0


async def test_kafka_without_a_cluster_list_is_ready_only_after_catching_up(
    start_daemon: StartDaemon, kafka_bootstrap: str
) -> None:
    # start_on_kafka returns once the daemon is ready.
    _, client, _, cluster = await start_on_kafka(
        start_daemon,
        kafka_bootstrap,
        lambda cluster: [h100_report(cluster, f"n{i}", 1) for i in range(20)],
        cluster_list=False,
    )
    status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
    assert status.ready
    assert {(s.source, s.cluster, s.synced) for s in status.sources} == {
        ("kafka", "*", True),
        ("kafka", cluster, True),
    }
    # Ready means caught up: every node published before the start is in fleet state.
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest(cluster=cluster))
    assert snap.clusters[0].nodes == 20


class TcpProxy:
    """A TCP forwarder on 127.0.0.1 in front of a real server. `cut()` refuses and resets
    every connection, `heal()` listens again on the same port; `freeze()` silently stops
    forwarding (a partition that drops packets: nothing errors), `thaw()` resumes."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        self._server = None

    async def heal(self) -> None:
        await self.start()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            await self.cut()


@contextlib.asynccontextmanager
async def proxied_kubeconfig(
    kube: KubeTestbed, context: str, path: Path
) -> AsyncIterator[TcpProxy]:
    """A kubeconfig whose `context` reaches its kube-apiserver through a TcpProxy."""
    server = urlsplit(kube.servers[context])
    assert server.hostname is not None
    assert server.port is not None
    proxy = TcpProxy(server.hostname, server.port)
    await proxy.start()
    data: dict[str, Any] = yaml.safe_load(await asyncio.to_thread(kube.kubeconfig_path.read_text))
    for entry in data["clusters"]:
        if entry["name"] == context:
            entry["cluster"]["server"] = f"https://127.0.0.1:{proxy.listen_port}"
    await asyncio.to_thread(path.write_text, yaml.safe_dump(data))
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_kube_apiserver_unreachable_drops_readiness_until_relisted(
    start_daemon: StartDaemon, kube: KubeTestbed, tmp_path: Path
) -> None:
    context = kube.contexts[0]
    async with proxied_kubeconfig(kube, context, tmp_path / "kubeconfig") as proxy:
        daemon, client = await start_daemon(
            sources={
                "simulated": {"enabled": False},
                "kubernetes": {
                    "enabled": True,
                    "kubeconfig": str(tmp_path / "kubeconfig"),
                    "contexts": [context],
                    "sync_lost_after_s": 1,
                },
            }
        )
        health = HealthWatch(client)
        try:
            await health.next_status(SERVING)
            await proxy.cut()
            await health.next_status(NOT_SERVING)
            status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
            assert not status.ready
            [src] = list(status.sources)
            assert (src.source, src.cluster, src.synced) == ("kubernetes", context, False)
            assert src.reason.startswith("sync lost")
            assert f"kubernetes/{context}: sync lost" in status.not_ready_reason
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.placement.Place(_place("while-cut", ""))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # A node added while fleetd cannot see the cluster is there once it can.
            name = unique("cut")
            await asyncio.to_thread(kube.create_gpu_node, context, name, gpus=2, wait_ready=False)
            await proxy.heal()
            await health.next_status(SERVING)
            status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
            assert status.ready
            assert all(s.synced and not s.reason for s in status.sources)

            async def node_seen() -> bool:
                snap = await client.fleet.GetSnapshot(
                    fleet_pb2.GetSnapshotRequest(cluster=context, include_nodes=True)
                )
                return any(n.name == name for n in snap.nodes)

            await async_wait_until(f"{name} in fleet state", node_seen, timeout_s=AWAIT_S)
            await asyncio.to_thread(kube.delete_node, context, name)
        finally:
            health.close()
        assert daemon.exit_code == 0


async def test_kube_apiserver_silently_partitioned_drops_readiness(
    start_daemon: StartDaemon, kube: KubeTestbed, tmp_path: Path
) -> None:
    """Packets dropped, nothing reset: the watch would only notice at its read timeout
    (minutes); the source's version probe notices within seconds."""
    context = kube.contexts[1]
    async with proxied_kubeconfig(kube, context, tmp_path / "kubeconfig") as proxy:
        _, client = await start_daemon(
            sources={
                "simulated": {"enabled": False},
                "kubernetes": {
                    "enabled": True,
                    "kubeconfig": str(tmp_path / "kubeconfig"),
                    "contexts": [context],
                    "sync_lost_after_s": 1,
                },
            }
        )
        health = HealthWatch(client)
        try:
            await health.next_status(SERVING)
            proxy.freeze()
            try:
                await health.next_status(NOT_SERVING)
                status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
                [src] = list(status.sources)
                assert (src.cluster, src.synced) == (context, False)
                assert "probe" in src.reason
            finally:
                proxy.thaw()
            await health.next_status(SERVING)
        finally:
            health.close()


def _gpu_pod(wid: str, pool: str, cluster: str = "", gpus: int = 1) -> types_pb2.Workload:
    pod = types_pb2.PodSpec(
        cpu_millicores=1000,
        memory_bytes=GIB,
        gpu_count=gpus,
        tolerations=[
            types_pb2.Toleration(
                key="kwok.x-k8s.io/node", operator="Equal", value="fake", effect="NoSchedule"
            )
        ],
    )
    return types_pb2.Workload(workload_id=wid, team="t", pod=pod, cluster=cluster, pool=pool)


async def test_one_lost_cluster_leaves_placement_the_other_keeps_placing(
    start_daemon: StartDaemon, kube: KubeTestbed, tmp_path: Path
) -> None:
    """cluster-a behind a TCP proxy that is cut; cluster-b stays reachable. Nodes of a pool
    unique to this test in each, 2 GPUs each."""
    lost, other = kube.contexts
    pool = unique("lost")
    node_a, node_b = unique("a"), unique("b")
    await asyncio.to_thread(kube.create_gpu_node, lost, node_a, gpus=2, pool=pool)
    await asyncio.to_thread(kube.create_gpu_node, other, node_b, gpus=2, pool=pool)
    probe = _grpc_tool("grpc-health-probe")
    try:
        async with proxied_kubeconfig(kube, lost, tmp_path / "kubeconfig") as proxy:
            daemon, client = await start_daemon(
                sources={
                    "simulated": {"enabled": False},
                    "kubernetes": {
                        "enabled": True,
                        "kubeconfig": str(tmp_path / "kubeconfig"),
                        "contexts": [lost, other],
                        "sync_lost_after_s": 1,
                    },
                }
            )
            addr = f"127.0.0.1:{daemon.grpc_port}"

            async def probe_rc(*args: str) -> int:
                out = await asyncio.to_thread(
                    subprocess.run, [probe, "-addr", addr, *args], capture_output=True
                )
                return out.returncode

            health = HealthWatch(client, f"cluster/{lost}")
            try:
                await health.next_status(SERVING)
                # A reservation on cluster-a's node (both GPUs), made before the outage.
                held = await client.placement.Place(
                    placement_pb2.PlaceRequest(workload=_gpu_pod("held-a", pool, lost, gpus=2))
                )
                assert held.result == types_pb2.DECISION_RESULT_PLACED
                assert held.placements[0].node == node_a
                await proxy.cut()
                await health.next_status(NOT_SERVING)
                # The daemon as a whole still serves: cluster-b is synced.
                check = await health_pb2_grpc.HealthStub(client.channel).Check(
                    health_pb2.HealthCheckRequest(service="")
                )
                assert check.status == SERVING
                assert await probe_rc() == 0
                assert await probe_rc("-service", f"cluster/{lost}") != 0
                assert await probe_rc("-service", f"cluster/{other}") == 0
                status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
                assert status.ready
                assert status.not_ready_reason == ""
                by_cluster = {s.cluster: s for s in status.sources}
                assert not by_cluster[lost].synced
                assert by_cluster[lost].reason.startswith("sync lost")
                assert by_cluster[other].synced
                # Not limited to a cluster: lands on the synced one.
                anywhere = await client.placement.Place(
                    placement_pb2.PlaceRequest(workload=_gpu_pod("anywhere", pool))
                )
                assert anywhere.result == types_pb2.DECISION_RESULT_PLACED
                assert (anywhere.placements[0].cluster, anywhere.placements[0].node) == (
                    other,
                    node_b,
                )
                # Limited to the lost cluster: UNAVAILABLE naming it; nothing is queued.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.placement.Place(
                        placement_pb2.PlaceRequest(workload=_gpu_pod("only-a", pool, lost))
                    )
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                details = err.value.details() or ""
                assert f"'{lost}' lost their sync" in details
                assert f"kubernetes/{lost}: sync lost" in details
                # Explain says why, per node.
                explain = await client.placement.Explain(
                    placement_pb2.ExplainRequest(workload=_gpu_pod("only-a", pool, lost))
                )
                assert not explain.fits
                reasons = {r.code: r for r in explain.explanation.reasons}
                assert reasons["CLUSTER_SYNC_LOST"].message == (
                    "node(s) in a cluster whose telemetry is lost"
                )
                assert "in a cluster whose telemetry is lost" in explain.explanation.summary
                await proxy.heal()
                await health.next_status(SERVING)
                # The reservation made before the outage is still there: cluster-a's node is
                # full, so a new 1-GPU pod for it queues (nothing allocated twice) ...
                after = _gpu_pod("after-a", pool, lost)
                resp = await client.placement.Place(placement_pb2.PlaceRequest(workload=after))
                assert resp.result == types_pb2.DECISION_RESULT_QUEUED
                # ... and lands there once the reservation is released.
                await client.placement.Release(placement_pb2.ReleaseRequest(workload_id="held-a"))
                resp = await client.placement.Place(placement_pb2.PlaceRequest(workload=after))
                assert resp.result == types_pb2.DECISION_RESULT_PLACED
                assert (resp.placements[0].cluster, resp.placements[0].node) == (lost, node_a)
            finally:
                health.close()
            assert daemon.exit_code == 0
    finally:
        await asyncio.to_thread(kube.delete_node, lost, node_a)
        await asyncio.to_thread(kube.delete_node, other, node_b)
