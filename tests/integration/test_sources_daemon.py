"""The daemon with real sources: Kafka only, Kubernetes only, and both for different
clusters; what the sources deliver is visible through the gRPC API (snapshot, Explain)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from fleetd.loadgen import produce
from fleetd.sources.codec import encode_pool, pool_key
from fleetd.sources.updates import NodePoolUpdate, Resources
from fleetd.v1 import fleet_pb2, nodepools_pb2, placement_pb2, types_pb2
from tests.integration.sources_support import (
    AWAIT_S,
    GIB,
    KWOK_TOLERATION,
    Client,
    Start,
    create_topic,
    daemon_starter,
    h100_report,
    kafka_section,
    produce_at,
    unique,
)
from tests.testbed.procs import async_wait_until

pytestmark = pytest.mark.testbed


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Start a daemon on `sections` (no simulated fleet); await its readiness."""
    async with daemon_starter(tmp_path) as go:
        yield go


async def _nodes(client: Client, cluster: str) -> dict[str, fleet_pb2.Node]:
    """The nodes fleet state holds for `cluster` (none: the cluster is not known)."""
    try:
        snap = await client.fleet.GetSnapshot(
            fleet_pb2.GetSnapshotRequest(cluster=cluster, include_nodes=True)
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return {}
    return {n.name: n for n in snap.nodes}


async def _until(what: str, probe: Callable[[], Awaitable[bool]]) -> None:
    async def check() -> bool:
        return await probe()

    await async_wait_until(what, check, timeout_s=AWAIT_S, interval_s=0.1)


async def test_kafka_only_nodes_arrive_go_stale_and_come_back(
    start: Start, kafka_bootstrap: str
) -> None:
    topic = unique("daemon-telemetry")
    await create_topic(kafka_bootstrap, topic)
    # Readiness waits for edge-1's first report: publish before starting.
    await produce(kafka_bootstrap, topic, [h100_report("edge-1", f"n{i}", 1 + i) for i in range(3)])
    _, client = await start(
        sources={"kafka": kafka_section(kafka_bootstrap, topic, ["edge-1"])},
        staleness={"node_stale_after_s": 1.0, "check_interval_s": 0.1},
    )
    nodes = await _nodes(client, "edge-1")
    assert sorted(nodes) == ["n0", "n1", "n2"]
    assert nodes["n0"].gpus == 8
    status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
    assert any(s.source == "kafka" and s.cluster == "edge-1" and s.synced for s in status.sources)

    # Silence: every node goes stale (unschedulable) ...
    async def all_stale() -> bool:
        return all(not n.schedulable for n in (await _nodes(client, "edge-1")).values())

    await _until("edge-1 nodes stale", all_stale)
    assert (await _nodes(client, "edge-1"))["n0"].condition == "stale"
    # ... and n0 comes back with its next report.
    await produce(kafka_bootstrap, topic, [h100_report("edge-1", "n0", 100)])

    async def n0_back() -> bool:
        return (await _nodes(client, "edge-1"))["n0"].schedulable

    await _until("n0 schedulable again", n0_back)


async def test_kafka_a_restarted_daemon_knows_every_node_and_which_went_silent(
    start: Start, kafka_bootstrap: str
) -> None:
    topic = unique("daemon-restart")
    await create_topic(kafka_bootstrap, topic)
    # edge-1's agent went an hour ago; edge-2's reports are current.
    hour_ago_ms = int((time.time() - 3600) * 1000)
    await produce_at(
        kafka_bootstrap, topic, [h100_report("edge-1", f"n{i}", 1 + i) for i in range(3)],
        hour_ago_ms,
    )  # fmt: skip
    await produce(kafka_bootstrap, topic, [h100_report("edge-2", f"m{i}", 1 + i) for i in range(3)])
    sections = {"sources": {"kafka": kafka_section(kafka_bootstrap, topic, ["edge-1", "edge-2"])}}

    async def schedulable() -> dict[str, bool]:
        return {
            f"{cluster}/{name}": node.schedulable
            for cluster in ("edge-1", "edge-2")
            for name, node in (await _nodes(client, cluster)).items()
        }

    expected = {
        **{f"edge-1/n{i}": False for i in range(3)},
        **{f"edge-2/m{i}": True for i in range(3)},
    }
    daemon, client = await start(**sections)
    assert await schedulable() == expected
    # A restart, with the same consumer group (its offsets committed at the end): ready
    # means every node is back, those that went silent stale.
    await daemon.stop()
    _, client = await start(**sections)
    assert await schedulable() == expected
    assert (await _nodes(client, "edge-1"))["n0"].condition == "stale"


async def test_kafka_a_retired_cluster_leaves_fleet_state(
    start: Start, kafka_bootstrap: str
) -> None:
    topic = unique("daemon-retire")
    await create_topic(kafka_bootstrap, topic)
    gone, kept = unique("edge-gone"), unique("edge-kept")
    pool = encode_pool(
        NodePoolUpdate(gone, "h100", 1, "p5.48xlarge", Resources(96_000, 768 * GIB, gpus=8)),
        sequence=1,
        observed_unix_ms=1,
    )
    await produce(
        kafka_bootstrap,
        topic,
        [h100_report(gone, f"n{i}", 1 + i) for i in range(3)]
        + [h100_report(kept, "m0", 1), (pool_key(gone, "h100"), pool.SerializeToString())],
    )
    _, client = await start(sources={"kafka": kafka_section(kafka_bootstrap, topic, [gone, kept])})
    assert sorted(await _nodes(client, gone)) == ["n0", "n1", "n2"]
    listed = await client.pools.ListNodePools(nodepools_pb2.ListNodePoolsRequest(cluster=gone))
    assert [p.name for p in listed.pools] == ["h100"]
    # The cluster left the fleet; its agent is gone. An operator says so:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetd.cli", "retire-cluster", "--cluster", gone,
        "--bootstrap-servers", kafka_bootstrap, "--topic", topic,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    assert f"cluster {gone} has no nodes and no pools" in out.decode()

    async def retired() -> bool:
        return not await _nodes(client, gone)

    await _until(f"{gone} without nodes", retired)
    # Without a node or a pool the cluster is no longer known at all.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.pools.ListNodePools(nodepools_pb2.ListNodePoolsRequest(cluster=gone))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert sorted(await _nodes(client, kept)) == ["m0"]


def _explain(pool: str, cluster: str, gpus: int = 8) -> placement_pb2.ExplainRequest:
    pod = types_pb2.PodSpec(
        cpu_millicores=1000, memory_bytes=GIB, gpu_count=gpus, tolerations=[KWOK_TOLERATION]
    )
    return placement_pb2.ExplainRequest(
        workload=types_pb2.Workload(
            workload_id=unique("w"), team="ml", pod=pod, cluster=cluster, pool=pool
        )
    )


async def test_kubernetes_only_node_added_cordoned_removed_shows_in_placement(
    start: Start, kube: Any
) -> None:
    _, client = await start(
        sources={"kubernetes": {"enabled": True, "kubeconfig": str(kube.kubeconfig_path)}}
    )
    a, b = kube.contexts
    status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
    assert {(s.source, s.cluster) for s in status.sources} >= {("kubernetes", a), ("kubernetes", b)}

    pool, name = unique("pool"), unique("gpu")
    await asyncio.to_thread(kube.create_gpu_node, b, name, gpus=8, pool=pool)

    async def fits() -> bool:
        try:
            resp = await client.placement.Explain(_explain(pool, b))
        except grpc.aio.AioRpcError as exc:
            # The pool (and the cluster, if it has no other node) is unknown until it comes.
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return resp.fits

    await _until(f"an 8-GPU pod fits on {b}/{name}", fits)
    await asyncio.to_thread(kube.core_v1(b).patch_node, name, {"spec": {"unschedulable": True}})

    async def cordoned() -> bool:
        node = (await _nodes(client, b)).get(name)
        return node is not None and not node.schedulable

    await _until(f"{name} cordoned in fleet state", cordoned)
    assert not (await client.placement.Explain(_explain(pool, b))).fits
    await asyncio.to_thread(kube.delete_node, b, name)

    async def gone() -> bool:
        return name not in await _nodes(client, b)

    await _until(f"{name} removed from fleet state", gone)


async def test_kafka_and_kubernetes_for_different_clusters(
    start: Start, kube: Any, kafka_bootstrap: str
) -> None:
    topic = unique("daemon-mixed")
    await create_topic(kafka_bootstrap, topic)
    await produce(kafka_bootstrap, topic, [h100_report("edge-2", "k0", 1)])
    a = kube.contexts[0]
    node = unique("mixed")
    await asyncio.to_thread(kube.create_gpu_node, a, node, gpus=2, wait_ready=False)
    _, client = await start(
        sources={
            "kafka": kafka_section(kafka_bootstrap, topic, ["edge-2"]),
            "kubernetes": {
                "enabled": True,
                "kubeconfig": str(kube.kubeconfig_path),
                "contexts": [a],
            },
        }
    )
    assert "k0" in await _nodes(client, "edge-2")
    assert node in await _nodes(client, a)
    status = await client.fleet.GetStatus(fleet_pb2.GetStatusRequest())
    assert {(s.source, s.cluster) for s in status.sources} == {
        ("kafka", "edge-2"),
        ("kubernetes", a),
    }
    await asyncio.to_thread(kube.delete_node, a, node)
