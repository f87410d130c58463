"""Autoscaling against the test bed: a real daemon (gRPC on 127.0.0.1) fed by the real Kafka
broker. Node pools and nodes (with the pods that fill them) arrive as telemetry published with
the project's publisher; pending work queues through `Place`, or arrives from the clusters:
pods their scheduler marked Unschedulable, as PendingPod telemetry or through the
Kubernetes watches. A client on `NodePools.WatchScaleDecisions`
sees each scale-up decision with the workloads it unblocks, resumes from a sequence number,
and the same decisions show in `Fleet.GetSnapshot` and the metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from fleetd.daemon import Daemon
from fleetd.sources.codec import encode_pending_pod_deleted
from fleetd.sources.kafka import DLQ_REASON_HEADER
from fleetd.sources.publisher import TelemetryPublisher
from fleetd.sources.updates import NodePoolUpdate, NodeUpdate, PendingPod, PodObserved, Resources
from fleetd.v1 import (
    fleet_pb2,
    nodepools_pb2,
    placement_pb2,
    types_pb2,
)
from tests.integration.sources_support import (
    AWAIT_S,
    Start,
    create_topic,
    daemon_starter,
    kafka_section,
    read_topic,
    unique,
)
from tests.testbed.gpu_nodes import KWOK_TOLERATION
from tests.testbed.procs import async_wait_until

pytestmark = pytest.mark.testbed

GIB = 1024**3
NODE = Resources(cpu_millicores=96_000, memory_bytes=768 * GIB, gpus=8, pods=110)
SCALE_UP = nodepools_pb2.ScaleDecision.KIND_SCALE_UP
PLACED = types_pb2.DECISION_RESULT_PLACED
QUEUED = types_pb2.DECISION_RESULT_QUEUED


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Start a daemon on `sections` (no simulated fleet); await its readiness."""
    async with daemon_starter(tmp_path) as go:
        yield go


@pytest.fixture
async def publisher(kafka_bootstrap: str) -> AsyncIterator[TelemetryPublisher]:
    """The project's telemetry publisher on a fresh topic of the session's broker."""
    topic = unique("autoscale-telemetry")
    await create_topic(kafka_bootstrap, topic)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        yield TelemetryPublisher(producer, topic)
    finally:
        await producer.stop()


def pool(cluster: str, current: int, max_size: int = 4) -> NodePoolUpdate:
    """An 8 x A100 pool at 30 $/h per node."""
    return NodePoolUpdate(
        cluster, "a100", 0, "p4d.24xlarge", NODE, gpu_model="A100", gpu_memory_bytes=80 * GIB,
        price_per_hour=30.0, min_size=0, max_size=max_size, current_size=current, zones=("z1",),
    )  # fmt: skip


def node(cluster: str, name: str, busy_gpus: int) -> NodeUpdate:
    """A node of the pool with pods fleetd did not place holding `busy_gpus` GPUs."""
    pods = tuple(
        PodObserved(cluster, "batch", f"{name}-job{i}", f"{name}-uid{i}", name,
                    Resources(cpu_millicores=1000, memory_bytes=GIB, gpus=1))
        for i in range(busy_gpus)
    )  # fmt: skip
    return NodeUpdate(
        cluster, name, 0, NODE, NODE, node_pool="a100", zone="z1", gpu_model="A100",
        gpu_memory_bytes=80 * GIB, pods=pods,
    )  # fmt: skip


def workload(wid: str, cluster: str) -> placement_pb2.PlaceRequest:
    pod = types_pb2.PodSpec(cpu_millicores=8000, memory_bytes=64 * GIB, gpu_count=8)
    return placement_pb2.PlaceRequest(
        workload=types_pb2.Workload(workload_id=wid, team="ml", pod=pod, cluster=cluster)
    )


async def next_decision(
    stream: AsyncIterator[nodepools_pb2.ScaleDecision],
) -> nodepools_pb2.ScaleDecision:
    async with asyncio.timeout(AWAIT_S):
        return await anext(stream)


def metrics_text(daemon: Daemon) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics") as resp:
        return str(resp.read().decode())


async def test_scale_up_decisions_stream_as_telemetry_and_pending_work_arrive(
    start: Start, publisher: TelemetryPublisher, kafka_bootstrap: str
) -> None:
    cluster = unique("edge-as")
    # The cluster's one node is full of pods fleetd did not place (readiness waits for it).
    await publisher.publish_node(node(cluster, "n0", busy_gpus=8))
    await publisher.flush()
    daemon, client = await start(
        sources={"kafka": kafka_section(kafka_bootstrap, publisher.topic, [cluster])},
        autoscaling={"interval_s": 0.05},
    )
    stream = client.pools.WatchScaleDecisions(nodepools_pb2.WatchScaleDecisionsRequest())
    # Pending work: it fits the fleet's capacity, not now.
    first_wl = await client.placement.Place(workload("train-1", cluster))
    assert first_wl.result == QUEUED
    # The pool definition arrives as telemetry: the autoscaler can now ask for a node.
    await publisher.publish_pool(pool(cluster, current=1))
    await publisher.flush()
    first = await next_decision(aiter(stream))
    assert (first.kind, first.cluster, first.pool) == (SCALE_UP, cluster, "a100")
    assert (first.from_size, first.to_size) == (1, 2)
    assert list(first.workload_ids) == ["train-1"]
    assert first.price_per_hour_delta == 30.0
    assert first.reason == "pending-workloads"
    assert not first.dry_run
    # More pending work: the node asked for is in flight, so the next decision adds one more.
    assert (await client.placement.Place(workload("train-2", cluster))).result == (QUEUED)
    second = await next_decision(aiter(stream))
    assert (second.pool, second.from_size, second.to_size) == ("a100", 2, 3)
    assert list(second.workload_ids) == ["train-2"]
    assert second.seq > first.seq
    stream.cancel()
    # Resumable: after first.seq the stream starts with the second decision, same id.
    resumed = client.pools.WatchScaleDecisions(
        nodepools_pb2.WatchScaleDecisionsRequest(after_seq=first.seq)
    )
    again = await next_decision(aiter(resumed))
    assert (again.seq, again.id) == (second.seq, second.id)
    resumed.cancel()
    # Exposed in the snapshot and counted in the metrics.
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert [d.id for d in snap.scale_decisions] == [first.id, second.id]
    text = await asyncio.to_thread(metrics_text, daemon)
    assert 'fleetd_scale_decisions_total{dry_run="false",kind="scale-up"} 2.0' in text
    assert 'fleetd_scale_planned_cost_per_hour{dry_run="false"} 30.0' in text
    # The pool manager brings the node up (telemetry): the first workload runs there.
    watch = client.placement.WatchDecisions(
        placement_pb2.WatchDecisionsRequest(after_seq=first_wl.decision_seq)
    )
    await publisher.publish_node(node(cluster, "n1", busy_gpus=0))
    await publisher.publish_pool(pool(cluster, current=2))
    await publisher.flush()
    async with asyncio.timeout(AWAIT_S):
        async for d in watch:
            if d.workload_id == "train-1":
                assert d.result == PLACED
                assert d.placements[0].node == "n1"
                break
    watch.cancel()


async def test_dry_run_decisions_are_marked_and_not_counted_in_flight(
    start: Start, publisher: TelemetryPublisher, kafka_bootstrap: str
) -> None:
    cluster = unique("edge-dry")
    await publisher.publish_node(node(cluster, "n0", busy_gpus=8))
    await publisher.publish_pool(pool(cluster, current=1))
    await publisher.flush()
    daemon, client = await start(
        sources={"kafka": kafka_section(kafka_bootstrap, publisher.topic, [cluster])},
        autoscaling={"interval_s": 0.05, "dry_run": True},
    )
    stream = aiter(client.pools.WatchScaleDecisions(nodepools_pb2.WatchScaleDecisionsRequest()))
    assert (await client.placement.Place(workload("dry-1", cluster))).result == (QUEUED)
    first = await next_decision(stream)
    assert first.dry_run
    assert (first.from_size, first.to_size, list(first.workload_ids)) == (1, 2, ["dry-1"])
    assert (await client.placement.Place(workload("dry-2", cluster))).result == (QUEUED)
    # Nothing was counted in flight: the plan for both workloads asks for two nodes at once.
    second = await next_decision(stream)
    assert second.dry_run
    assert (second.from_size, second.to_size) == (1, 3)
    assert sorted(second.workload_ids) == ["dry-1", "dry-2"]
    snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    assert [d.dry_run for d in snap.scale_decisions] == [True, True]
    text = await asyncio.to_thread(metrics_text, daemon)
    assert 'fleetd_scale_decisions_total{dry_run="true",kind="scale-up"} 2.0' in text


def labelled_pool(cluster: str, label: tuple[str, str], current: int = 0) -> NodePoolUpdate:
    """The a100 pool whose nodes carry `label` (what the pending pods select)."""
    return replace(pool(cluster, current), labels=(label,))


def unschedulable_pod(name: str, label: tuple[str, str]) -> dict[str, Any]:
    """A pod asking for a whole 8-GPU node that carries `label` (kwok nodes tolerated)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "containers": [{"name": "train", "image": "busybox", "resources": {
                "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "8"},
                "limits": {"nvidia.com/gpu": "8"}}}],
            "nodeSelector": dict([label]),
            "tolerations": [KWOK_TOLERATION],
        },
    }  # fmt: skip


async def test_kube_unschedulable_pod_gets_a_scale_up_and_is_bound_on_the_new_node(
    start: Start, publisher: TelemetryPublisher, kafka_bootstrap: str, kube: Any
) -> None:
    # Nodes and pods come from the cluster's API server (the real kube-scheduler decides
    # what is unschedulable); the node pool definition comes as telemetry from the pool
    # manager (there is no pool configuration for Kubernetes clusters).
    a = kube.contexts[0]
    label = ("fleetd.test/run", unique("pending"))
    await publisher.publish_pool(labelled_pool(a, label))
    await publisher.flush()
    daemon, client = await start(
        sources={
            "kafka": kafka_section(kafka_bootstrap, publisher.topic, [a]),
            "kubernetes": {"enabled": True, "kubeconfig": str(kube.kubeconfig_path),
                           "contexts": [a]},
        },
        autoscaling={"interval_s": 0.05},
    )  # fmt: skip
    stream = client.pools.WatchScaleDecisions(nodepools_pb2.WatchScaleDecisionsRequest())
    name, node_name = unique("train"), unique("pending-node")
    core = kube.core_v1(a)
    await asyncio.to_thread(core.create_namespaced_pod, "default", unschedulable_pod(name, label))
    try:
        # No node carries the label: kube-scheduler marks the pod Unschedulable, the watch
        # reports it, and the autoscaler asks the labelled pool for a node.
        decision = await next_decision(aiter(stream))
        assert (decision.kind, decision.cluster, decision.pool) == (SCALE_UP, a, "a100")
        assert (decision.from_size, decision.to_size) == (0, 1)
        assert list(decision.workload_ids) == [f"default/{name}"]
        pod = await asyncio.to_thread(core.read_namespaced_pod, name, "default")
        [cond] = [c for c in pod.status.conditions if c.type == "PodScheduled"]
        assert (cond.status, cond.reason) == ("False", "Unschedulable")
        assert daemon.state is not None
        assert f"default/{name}" in daemon.state.pending_pods[a]
        # The pool manager brings the node up: kube-scheduler binds the pod there and the
        # pending entry goes away (the pod's watch reports it bound).
        await asyncio.to_thread(
            kube.create_gpu_node, a, node_name, gpus=8, labels=dict([label]), wait_ready=False
        )
        bound = await asyncio.to_thread(kube.wait_pod, a, name, phase="Running")
        assert bound.spec.node_name == node_name
        state = daemon.state

        async def cleared() -> bool:
            return f"default/{name}" not in state.pending_pods.get(a, {})

        await async_wait_until("pending pod cleared", cleared, timeout_s=AWAIT_S, interval_s=0.05)
    finally:
        stream.cancel()
        await asyncio.to_thread(core.delete_namespaced_pod, name, "default", grace_period_seconds=0)
        await asyncio.to_thread(kube.delete_node, a, node_name)


async def test_kafka_pending_pod_gets_a_scale_up_and_its_removal_clears_it(
    start: Start, publisher: TelemetryPublisher, kafka_bootstrap: str
) -> None:
    cluster = unique("edge-pending")
    await publisher.publish_node(node(cluster, "n0", busy_gpus=8))
    await publisher.publish_pool(pool(cluster, current=1))
    await publisher.flush()
    daemon, client = await start(
        sources={"kafka": kafka_section(kafka_bootstrap, publisher.topic, [cluster])},
        autoscaling={"interval_s": 0.05},
    )
    assert daemon.state is not None
    state = daemon.state
    stream = client.pools.WatchScaleDecisions(nodepools_pb2.WatchScaleDecisionsRequest())
    # A record that does not validate (published under another pod's key) is dead-lettered.
    bad = encode_pending_pod_deleted(cluster, "ml", "x", sequence=1, observed_unix_ms=1)
    await publisher.producer.send(
        publisher.topic, value=bad.SerializeToString(), key=f"{cluster}/pending/ml/y".encode()
    )
    # The cluster's scheduler could not place an 8-GPU pod: the agent reports it pending.
    pod = PendingPod(
        cluster, "ml", "train-0", "uid-train-0",
        Resources(cpu_millicores=8000, memory_bytes=64 * GIB, gpus=8), priority=100,
    )  # fmt: skip
    await publisher.publish_pending_pod(pod)
    await publisher.flush()
    decision = await next_decision(aiter(stream))
    assert (decision.kind, decision.cluster, decision.pool) == (SCALE_UP, cluster, "a100")
    assert (decision.from_size, decision.to_size) == (1, 2)
    assert list(decision.workload_ids) == ["ml/train-0"]
    [dead] = await read_topic(kafka_bootstrap, f"{publisher.topic}.dlq", 1)
    assert dict(dead.headers)[DLQ_REASON_HEADER] == b"key-mismatch"
    assert "ml/train-0" in state.pending_pods[cluster]
    # Bound (or deleted) in the cluster: the removal clears it.
    await publisher.publish_pending_pod_deleted(cluster, "ml", "train-0")
    await publisher.flush()

    async def cleared() -> bool:
        return cluster not in state.pending_pods

    await async_wait_until("pending pod cleared", cleared, timeout_s=AWAIT_S, interval_s=0.05)
    stream.cancel()


ONE_GPU = Resources(cpu_millicores=16_000, memory_bytes=64 * GIB, gpus=1, pods=110)
FOUR_GPUS = Resources(cpu_millicores=64_000, memory_bytes=256 * GIB, gpus=4, pods=110)
SCALE_DOWN = nodepools_pb2.ScaleDecision.KIND_SCALE_DOWN


def t4_pool(cluster: str, name: str, res: Resources, current: int) -> NodePoolUpdate:
    """A T4 pool at 4 $/h per node, whatever its shape."""
    return NodePoolUpdate(
        cluster, name, 0, name, res, gpu_model="T4", price_per_hour=4.0, min_size=0,
        max_size=4, current_size=current, zones=("z1",),
    )  # fmt: skip


def t4_node(cluster: str, name: str, pool_name: str, res: Resources, busy: int) -> NodeUpdate:
    """A node of a T4 pool running `busy` one-GPU pods fleetd did not place."""
    pods = tuple(
        PodObserved(cluster, "batch", f"{name}-job{i}", f"{name}-uid{i}", name,
                    Resources(cpu_millicores=4000, memory_bytes=8 * GIB, gpus=1))
        for i in range(busy)
    )  # fmt: skip
    return NodeUpdate(
        cluster, name, 0, res, res, node_pool=pool_name, zone="z1", gpu_model="T4", pods=pods
    )


async def test_consolidation_on_scale_up_retires_the_old_node_once_the_new_one_is_up(
    start: Start, publisher: TelemetryPublisher, kafka_bootstrap: str
) -> None:
    # Two full 1-GPU nodes ($4/h each) and one more 1-GPU workload queued. A third 1-GPU
    # node would cost $4/h more; one 4-GPU node ($4/h) holds it and the pod of a 1-GPU
    # node, which then goes: the daemon streams the scale-up, and the scale-down of the
    # old node only once the pool reports the new one (re-checked then).
    cluster = unique("edge-cons")
    for i in range(2):
        await publisher.publish_node(t4_node(cluster, f"s{i}", "small", ONE_GPU, busy=1))
    await publisher.publish_pool(t4_pool(cluster, "small", ONE_GPU, current=2))
    await publisher.publish_pool(t4_pool(cluster, "big", FOUR_GPUS, current=0))
    await publisher.flush()
    daemon, client = await start(
        sources={"kafka": kafka_section(kafka_bootstrap, publisher.topic, [cluster])},
        autoscaling={"interval_s": 0.05, "scale_down": True, "scale_down_after_s": 0.0},
    )
    stream = aiter(client.pools.WatchScaleDecisions(nodepools_pb2.WatchScaleDecisionsRequest()))
    pod = types_pb2.PodSpec(cpu_millicores=4000, memory_bytes=8 * GIB, gpu_count=1)
    wl = placement_pb2.PlaceRequest(
        workload=types_pb2.Workload(workload_id="late", team="ml", pod=pod, cluster=cluster)
    )
    assert (await client.placement.Place(wl)).result == QUEUED
    grow = await next_decision(stream)
    assert (grow.kind, grow.pool, grow.from_size, grow.to_size) == (SCALE_UP, "big", 0, 1)
    assert list(grow.workload_ids) == ["late"]
    assert daemon.autoscaler is not None
    [retiring] = daemon.autoscaler.retiring
    [old] = retiring.decision.remove_nodes
    # The pool manager brings the 4-GPU node up: the old node's removal follows.
    await publisher.publish_node(t4_node(cluster, "b0", "big", FOUR_GPUS, busy=0))
    await publisher.publish_pool(t4_pool(cluster, "big", FOUR_GPUS, current=1))
    await publisher.flush()
    retire = await next_decision(stream)
    assert (retire.kind, retire.pool, retire.reason) == (SCALE_DOWN, "small", "cheaper-replacement")
    assert [f"{cluster}/{n}" for n in retire.nodes] == [old]  # the stream names nodes bare
    assert retire.price_per_hour_delta == -4.0
    assert not retire.dry_run
