"""The agent publishes a real kube cluster's state to the real broker; fleetd's Kafka source
reads it back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetd.agent import AgentSettings, PoolPolicy, run_agent
from fleetd.sources.kafka import KafkaSource
from fleetd.sources.updates import CapacityType, PendingPod, PendingPodRemoved
from tests.integration.sources_support import (
    AWAIT_S,
    RecordingView,
    create_topic,
    kafka_settings,
    running,
    unique,
)

pytestmark = pytest.mark.testbed


def _kafka_view(bootstrap: str, topic: str) -> tuple[KafkaSource, RecordingView]:
    view = RecordingView()
    return KafkaSource(kafka_settings(bootstrap, topic), view), view


def _bound_pod(name: str, node: str) -> dict[str, Any]:
    from tests.testbed.gpu_nodes import KWOK_TOLERATION

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "tolerations": [KWOK_TOLERATION],
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/train:0",
                    "resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "1", "memory": "1Gi"}},
                }
            ],
        },
    }


async def test_agent_publishes_nodes_pods_and_pools(kube: Any, kafka_bootstrap: str) -> None:
    topic = unique("agent")
    await create_topic(kafka_bootstrap, topic)
    context = kube.contexts[1]
    pool, node = unique("l4pool"), unique("l4")
    settings = AgentSettings(
        context=context,
        cluster="edge-b",
        bootstrap_servers=kafka_bootstrap,
        kubeconfig=str(kube.kubeconfig_path),
        topic=topic,
        resync_interval_s=3600,
        pools={pool: PoolPolicy(price_per_hour=2.5, min_size=1, max_size=9)},
    )
    source, view = _kafka_view(kafka_bootstrap, topic)
    ready = asyncio.Event()
    async with running(lambda: run_agent(settings, ready)), running(source.run):
        await asyncio.wait_for(ready.wait(), AWAIT_S)
        await asyncio.to_thread(
            kube.create_gpu_node, context, node, gpus=4, product="NVIDIA-L4", pool=pool,
            labels={"karpenter.sh/capacity-type": "spot"},
        )  # fmt: skip
        await view.wait_for(lambda: ("edge-b", node) in view.nodes, AWAIT_S)
        reported = view.nodes[("edge-b", node)]
        assert (reported.gpu_model, len(reported.gpus), reported.node_pool) == (
            "NVIDIA-L4",
            4,
            pool,
        )
        await view.wait_for(lambda: ("edge-b", pool) in view.pools, AWAIT_S)
        p = view.pools[("edge-b", pool)]
        assert (p.current_size, p.min_size, p.max_size, p.price_per_hour) == (1, 1, 9, 2.5)
        assert p.capacity_type == CapacityType.SPOT
        assert p.gpu_model == "NVIDIA-L4"

        pod = unique("infer")
        core = kube.core_v1(context)
        await asyncio.to_thread(core.create_namespaced_pod, "default", _bound_pod(pod, node))
        await view.wait_for(lambda: any(x.name == pod for x in view.pods_on("edge-b", node)))
        (seen,) = view.pods_on("edge-b", node)
        assert seen.requests.gpus == 1
        assert seen.cluster == "edge-b"

        await asyncio.to_thread(core.delete_namespaced_pod, pod, "default", grace_period_seconds=0)
        await asyncio.to_thread(kube.delete_node, context, node)
        await view.wait_for(
            lambda: ("edge-b", node) not in view.nodes and ("edge-b", pool) not in view.pools,
            AWAIT_S,
        )


async def test_fleetd_agent_command(kube: Any, kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = unique("agent-cli")
    await create_topic(kafka_bootstrap, topic)
    context = kube.contexts[0]
    node = unique("cli-node")
    await asyncio.to_thread(kube.create_gpu_node, context, node, gpus=2, wait_ready=False)
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleetd.cli", "agent",
            "--kubeconfig", str(kube.kubeconfig_path), "--context", context,
            "--bootstrap-servers", kafka_bootstrap, "--topic", topic,
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        source, view = _kafka_view(kafka_bootstrap, topic)
        async with running(source.run):
            await view.wait_for(lambda: (context, node) in view.nodes, AWAIT_S)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), AWAIT_S)
        assert code == 0, log_path.read_text()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.to_thread(kube.delete_node, context, node)


async def test_agent_and_consumer_wait_for_a_broker_that_is_down(
    kube: Any, kafka_bootstrap: str, testbed_run: Any
) -> None:
    """Both ends start while Kafka is down, retry with backoff, and work once it is back."""
    topic = unique("agent-outage")
    await create_topic(kafka_bootstrap, topic)
    context = kube.contexts[0]
    node = unique("outage")
    settings = AgentSettings(
        context=context,
        cluster="outage",
        bootstrap_servers=kafka_bootstrap,
        kubeconfig=str(kube.kubeconfig_path),
        topic=topic,
        resync_interval_s=3600,
    )
    source, view = _kafka_view(kafka_bootstrap, topic)
    await asyncio.to_thread(testbed_run.stop_kafka)
    try:
        ready = asyncio.Event()
        async with running(lambda: run_agent(settings, ready)), running(source.run):
            await asyncio.to_thread(testbed_run.restart_kafka)
            await asyncio.wait_for(ready.wait(), AWAIT_S)
            await asyncio.to_thread(kube.create_gpu_node, context, node, gpus=1, wait_ready=False)
            await view.wait_for(lambda: ("outage", node) in view.nodes, AWAIT_S)
    finally:
        if not await asyncio.to_thread(lambda: testbed_run.kafka().process.alive()):
            await asyncio.to_thread(testbed_run.restart_kafka)
        await asyncio.to_thread(kube.delete_node, context, node)


async def test_agent_publishes_unschedulable_pods_as_pending_work(
    kube: Any, kafka_bootstrap: str
) -> None:
    from tests.testbed.gpu_nodes import KWOK_TOLERATION

    topic = unique("agent-pending")
    await create_topic(kafka_bootstrap, topic)
    context = kube.contexts[1]
    settings = AgentSettings(
        context=context,
        cluster="edge-pending",
        bootstrap_servers=kafka_bootstrap,
        kubeconfig=str(kube.kubeconfig_path),
        topic=topic,
        resync_interval_s=3600,
    )
    source, view = _kafka_view(kafka_bootstrap, topic)
    name, selector = unique("wait"), {"fleetd.test/run": unique("none")}
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": selector,  # no node has it: kube-scheduler marks it Unschedulable
            "tolerations": [KWOK_TOLERATION],
            "containers": [{"name": "main", "image": "registry.invalid/train:0",
                            "resources": {"limits": {"nvidia.com/gpu": "8"}}}],
        },
    }  # fmt: skip
    core = kube.core_v1(context)
    ready = asyncio.Event()
    async with running(lambda: run_agent(settings, ready)), running(source.run):
        await asyncio.wait_for(ready.wait(), AWAIT_S)
        await asyncio.to_thread(core.create_namespaced_pod, "default", manifest)
        try:

            def reported() -> list[PendingPod]:
                return [u for u in view.log if isinstance(u, PendingPod) and u.name == name]

            await view.wait_for(lambda: bool(reported()), AWAIT_S)
            [pod] = reported()
            assert (pod.cluster, pod.namespace, pod.requests.gpus) == ("edge-pending", "default", 8)
            assert pod.node_selector == tuple(selector.items())
            assert pod.priority == 0  # from the (default) PriorityClass by admission
        finally:
            await asyncio.to_thread(
                core.delete_namespaced_pod, name, "default", grace_period_seconds=0
            )
        await view.wait_for(
            lambda: any(isinstance(u, PendingPodRemoved) and u.name == name for u in view.log),
            AWAIT_S,
        )
