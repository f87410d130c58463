"""Telemetry's relist through the real broker: a node (and its pool) deleted while its
cluster's agent was down leaves fleetd once the agent is back and publishes its node
inventory. (The rules and
their ordering cases: tests/unit/test_node_inventory.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fleetd.agent import AgentSettings, run_agent
from fleetd.v1 import fleet_pb2, nodepools_pb2, placement_pb2, types_pb2
from tests.integration.sources_support import (
    AWAIT_S,
    GIB,
    KWOK_TOLERATION,
    Client,
    Start,
    create_topic,
    daemon_starter,
    kafka_section,
    running,
    unique,
)

pytestmark = pytest.mark.testbed

NODE_LABEL = "fleetd.test/inventory-node"


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    async with daemon_starter(tmp_path) as go:
        yield go


async def _nodes(client: Client, cluster: str) -> set[str]:
    snap = await client.fleet.GetSnapshot(
        fleet_pb2.GetSnapshotRequest(cluster=cluster, include_nodes=True)
    )
    return {n.name for n in snap.nodes}


async def _pools(client: Client, cluster: str) -> set[str]:
    listed = await client.pools.ListNodePools(nodepools_pb2.ListNodePoolsRequest(cluster=cluster))
    return {p.name for p in listed.pools}


async def _run_agent_until_published(settings: AgentSettings) -> None:
    """Run the agent until its initial publication (node reports, then its node inventory)
    was acknowledged by the broker, then stop it."""
    ready = asyncio.Event()
    async with running(lambda: run_agent(settings, ready)):
        await asyncio.wait_for(ready.wait(), AWAIT_S)


async def test_a_node_deleted_while_the_agent_was_down_leaves_fleetd(
    start: Start, kube: Any, kafka_bootstrap: str
) -> None:
    topic = unique("inventory")
    await create_topic(kafka_bootstrap, topic)
    context = kube.contexts[0]
    cluster, keep, gone = unique("edge-inv"), unique("keep"), unique("gone")
    pools = {keep: unique("pool-keep"), gone: unique("pool-gone")}  # a pool each
    for name in (keep, gone):
        await asyncio.to_thread(
            kube.create_gpu_node, context, name, gpus=2, pool=pools[name],
            labels={NODE_LABEL: name},
        )  # fmt: skip
    settings = AgentSettings(
        context=context,
        cluster=cluster,
        bootstrap_servers=kafka_bootstrap,
        kubeconfig=str(kube.kubeconfig_path),
        topic=topic,
        resync_interval_s=3600,  # no periodic resync: only the one after each start
    )
    try:
        await _run_agent_until_published(settings)
        # Ready = the consumer caught up with what the agent published: both nodes known.
        _, client = await start(
            sources={"kafka": kafka_section(kafka_bootstrap, topic, [cluster])},
            reservations={"default_ttl_s": 3600},
        )
        assert {keep, gone} <= await _nodes(client, cluster)
        assert set(pools.values()) <= await _pools(client, cluster)
        # A reservation on the node that is about to go.
        pod = types_pb2.PodSpec(
            cpu_millicores=1000, memory_bytes=GIB, gpu_count=1,
            node_selector={NODE_LABEL: gone}, tolerations=[KWOK_TOLERATION],
        )  # fmt: skip
        workload = types_pb2.Workload(workload_id=unique("w"), team="ml", pod=pod, cluster=cluster)
        placed = await client.placement.Place(placement_pb2.PlaceRequest(workload=workload))
        assert placed.result == types_pb2.DECISION_RESULT_PLACED
        assert [p.node for p in placed.placements] == [gone]
        stream = client.placement.WatchDecisions(
            placement_pb2.WatchDecisionsRequest(after_seq=placed.decision_seq)
        )

        # The agent is down (stopped above); the node is deleted meanwhile: no NodeDeleted
        # is ever published for it.
        await asyncio.to_thread(kube.delete_node, context, gone)
        await _run_agent_until_published(settings)

        # Its reservation ends as the node is removed (the event awaited), and the node
        # is gone from fleet state while the other stays.
        async with asyncio.timeout(AWAIT_S):
            async for decision in stream:
                if decision.workload_id == workload.workload_id:
                    break
        stream.cancel()
        assert decision.kind == types_pb2.Decision.KIND_EXPIRE
        assert decision.explanation.summary == f"node {cluster}/{gone} removed"
        nodes = await _nodes(client, cluster)
        assert keep in nodes
        assert gone not in nodes
        # Its pool went with it (the restarted agent never published the pool's deletion:
        # it had not published the pool), listed by the same inventory.
        known_pools = await _pools(client, cluster)
        assert pools[keep] in known_pools
        assert pools[gone] not in known_pools
    finally:
        for name in (keep, gone):
            await asyncio.to_thread(kube.delete_node, context, name)  # (no error if gone)
