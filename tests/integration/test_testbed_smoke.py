"""Smoke tests of the test bed itself: the real servers do what later tests rely on."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.testbed.gpu_nodes import GPU_RESOURCE, KWOK_TOLERATION, NODEPOOL_LABEL
from tests.testbed.kube import CLUSTERS, KubeTestbed
from tests.testbed.procs import async_wait_until, wait_until
from tests.testbed.runner import TestbedRun

pytestmark = pytest.mark.testbed

_AWAIT_S = 30.0


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_kafka_produce_then_consume(kafka_bootstrap: str) -> None:
    topic = _unique("smoke")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k1")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=_unique("smoke-group"),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), _AWAIT_S)
    finally:
        await consumer.stop()
    assert (record.topic, record.key, record.value) == (topic, b"k1", b"hello")


async def test_kafka_create_and_delete_topic(kafka_bootstrap: str) -> None:
    topic = _unique("smoke-admin")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
        described = await admin.describe_topics([topic])
        assert len(described[0]["partitions"]) == 3
        await admin.delete_topics([topic])

        async def gone() -> bool:
            return topic not in await admin.list_topics()

        # Deletion is asynchronous in the controller: poll the condition with a bound.
        await async_wait_until(f"topic {topic} deleted", gone, timeout_s=_AWAIT_S)
    finally:
        await admin.close()


def _pod(name: str, *, node_name: str | None = None, gpus: int = 1) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "main",
                "image": "registry.invalid/fleetd/train:0",
                "resources": {
                    "requests": {"cpu": "1", "memory": "1Gi", GPU_RESOURCE: str(gpus)},
                    "limits": {GPU_RESOURCE: str(gpus)},
                },
            }
        ],
        "tolerations": [KWOK_TOLERATION],
    }
    if node_name:
        spec["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_contexts_and_versions(kube: KubeTestbed) -> None:
    from kubernetes import client

    assert kube.contexts == CLUSTERS
    assert kube.kubeconfig_path.is_file()
    for ctx in kube.contexts:
        assert client.VersionApi(kube.api(ctx)).get_code().git_version == "v1.37.2"


@pytest.mark.parametrize("context", CLUSTERS)
def test_gpu_node_ready_and_bound_pod_running(kube: KubeTestbed, context: str) -> None:
    node_name = _unique("gpu-node")
    node = kube.create_gpu_node(context, node_name, gpus=8, zone="zone-1", pool="h100-pool")
    assert node.status.allocatable[GPU_RESOURCE] == "8"
    assert node.metadata.labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert node.metadata.labels[NODEPOOL_LABEL] == "h100-pool"

    pod_name = _unique("bound")
    kube.core_v1(context).create_namespaced_pod("default", _pod(pod_name, node_name=node_name))
    pod = kube.wait_pod(context, pod_name, phase="Running", timeout_s=_AWAIT_S)
    assert pod.spec.node_name == node_name
    kube.core_v1(context).delete_namespaced_pod(pod_name, "default")
    kube.delete_node(context, node_name)


def test_scheduler_binds_unbound_pod_to_kwok_node(kube: KubeTestbed) -> None:
    context = CLUSTERS[0]
    node_name = _unique("sched-node")
    kube.create_gpu_node(context, node_name, gpus=4, product="NVIDIA-A100-SXM4-80GB")
    pod_name = _unique("unbound")
    core = kube.core_v1(context)
    core.create_namespaced_pod("default", _pod(pod_name, gpus=4))
    pod = kube.wait_pod(context, pod_name, phase="Running", timeout_s=_AWAIT_S)
    # Only one node in the cluster has 4 free GPUs and tolerates nothing else: this one.
    assert pod.spec.node_name == node_name
    core.delete_namespaced_pod(pod_name, "default")
    kube.delete_node(context, node_name)


def test_clusters_are_independent(kube: KubeTestbed) -> None:
    a, b = CLUSTERS
    node_name = _unique("only-in-a")
    kube.create_gpu_node(a, node_name, gpus=2)
    names_a = {n.metadata.name for n in kube.core_v1(a).list_node().items}
    names_b = {n.metadata.name for n in kube.core_v1(b).list_node().items}
    assert node_name in names_a
    assert node_name not in names_b
    kube.delete_node(a, node_name)
    wait_until(
        f"node {node_name} deleted",
        lambda: node_name not in {n.metadata.name for n in kube.core_v1(a).list_node().items},
        timeout_s=_AWAIT_S,
    )


async def test_kafka_restart_keeps_address_and_data(
    kafka_bootstrap: str, testbed_run: TestbedRun
) -> None:
    topic = _unique("smoke-restart")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before")
    finally:
        await producer.stop()

    broker = await asyncio.to_thread(testbed_run.restart_kafka)
    assert broker.bootstrap == kafka_bootstrap

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), _AWAIT_S)
    finally:
        await consumer.stop()
    assert record.value == b"before"
