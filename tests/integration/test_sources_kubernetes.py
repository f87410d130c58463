"""Kubernetes watches of both test-bed clusters, end to end."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fleetd.sources.kubernetes import KubernetesSource, KubernetesSourceSettings
from fleetd.sources.metrics import SourceMetrics
from fleetd.sources.updates import CapacityType, PodObserved, Resources
from tests.integration.sources_support import (
    AWAIT_S,
    RecordingView,
    running,
    unique,
)

pytestmark = pytest.mark.testbed

GIB = 1024**3


def _source(kube: Any, view: RecordingView, **kw: Any) -> KubernetesSource:
    settings = KubernetesSourceSettings(kubeconfig=str(kube.kubeconfig_path), **kw)
    return KubernetesSource(settings, view, metrics=SourceMetrics())


def _gpu_pod(name: str, node: str, gpus: int) -> dict[str, Any]:
    from tests.testbed.gpu_nodes import KWOK_TOLERATION

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"fleetd.io/workload-id": name}},
        "spec": {
            "nodeName": node,
            "tolerations": [KWOK_TOLERATION],
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/train:0",
                    "resources": {
                        "requests": {"cpu": "2", "memory": "8Gi"},
                        "limits": {"nvidia.com/gpu": str(gpus)},
                    },
                }
            ],
        },
    }


async def test_both_clusters_nodes_added_cordoned_removed(kube: Any) -> None:
    view = RecordingView()
    source = _source(kube, view)
    a, b = kube.contexts
    name_a, name_b = unique("gpu-a"), unique("gpu-b")
    async with running(source.run):
        await asyncio.wait_for(source.ready.wait(), AWAIT_S)
        assert source.clusters == list(kube.contexts)
        assert {("kubernetes", a), ("kubernetes", b)} <= view.synced

        await asyncio.to_thread(
            kube.create_gpu_node, a, name_a, gpus=8, zone="us-east-1a", pool="h100"
        )
        await asyncio.to_thread(
            kube.create_gpu_node, b, name_b, gpus=4, product="NVIDIA-L4", pool="l4",
            labels={"karpenter.sh/capacity-type": "spot"},
        )  # fmt: skip
        await view.wait_for(lambda: bool(view.node(a, name_a) and view.node(b, name_b)))
        # Ready arrives with kwok's status update.
        await view.wait_for(lambda: view.nodes[(a, name_a)].ready, AWAIT_S)
        node_a = view.nodes[(a, name_a)]
        assert node_a.capacity.gpus == 8
        assert (node_a.gpu_model, node_a.gpu_memory_bytes) == (
            "NVIDIA-H100-80GB-HBM3",
            81559 * 2**20,
        )
        assert (node_a.zone, node_a.node_pool) == ("us-east-1a", "h100")
        assert [g.healthy for g in node_a.gpus] == [True] * 8
        assert view.nodes[(b, name_b)].capacity_type == CapacityType.SPOT
        assert (a, name_b) not in view.nodes

        # Cordon: spec.unschedulable.
        core_a = kube.core_v1(a)
        await asyncio.to_thread(core_a.patch_node, name_a, {"spec": {"unschedulable": True}})
        await view.wait_for(lambda: view.nodes[(a, name_a)].unschedulable, AWAIT_S)
        assert not view.nodes[(a, name_a)].schedulable

        # A pod bound to the node shows up with its requests (limits-only GPUs count).
        pod_name = unique("train")
        await asyncio.to_thread(
            core_a.create_namespaced_pod, "default", _gpu_pod(pod_name, name_a, gpus=2)
        )
        await view.wait_for(lambda: any(p.name == pod_name for p in view.pods_on(a, name_a)))
        pod = next(p for p in view.pods_on(a, name_a) if p.name == pod_name)
        assert isinstance(pod, PodObserved)
        assert pod.requests == Resources(cpu_millicores=2000, memory_bytes=8 * GIB, gpus=2)
        assert dict(pod.labels)["fleetd.io/workload-id"] == pod_name
        await asyncio.to_thread(
            core_a.delete_namespaced_pod, pod_name, "default", grace_period_seconds=0
        )
        await view.wait_for(lambda: not view.pods_on(a, name_a), AWAIT_S)

        await asyncio.to_thread(kube.delete_node, a, name_a)
        await asyncio.to_thread(kube.delete_node, b, name_b)
        await view.wait_for(lambda: (a, name_a) not in view.nodes and (b, name_b) not in view.nodes)


async def test_watch_restarts_lose_no_update(kube: Any) -> None:
    """Watches that end every second (server timeout) resume from their resourceVersion:
    a burst of node creations and deletions across many restarts is seen completely."""
    view = RecordingView()
    a = kube.contexts[0]
    source = _source(kube, view, contexts=(a,), watch_timeout_s=1)
    names = [unique("burst") for _ in range(12)]
    async with running(source.run):
        await asyncio.wait_for(source.ready.wait(), AWAIT_S)
        for name in names:
            await asyncio.to_thread(kube.create_gpu_node, a, name, gpus=1, wait_ready=False)
        await view.wait_for(lambda: all((a, n) in view.nodes for n in names), AWAIT_S)
        for name in names[:6]:
            await asyncio.to_thread(kube.delete_node, a, name)
        await view.wait_for(lambda: not any((a, n) in view.nodes for n in names[:6]), AWAIT_S)
        assert all((a, n) in view.nodes for n in names[6:])
        for name in names[6:]:
            await asyncio.to_thread(kube.delete_node, a, name)
        await view.wait_for(lambda: not any((a, n) in view.nodes for n in names), AWAIT_S)


async def test_resuming_from_an_old_resource_version_catches_up(kube: Any) -> None:
    """A watcher resumes from a resourceVersion far in the past (after a long disconnect).
    Whether the API server replays history or answers 410 Gone (then the watcher relists),
    nodes removed meanwhile are reported removed and new ones added."""
    view = RecordingView()
    a = kube.contexts[0]
    settings = KubernetesSourceSettings(kubeconfig=str(kube.kubeconfig_path), contexts=(a,))
    source = KubernetesSource(settings, view, metrics=SourceMetrics())
    gone, new = unique("gone"), unique("new")
    await asyncio.to_thread(kube.create_gpu_node, a, gone, gpus=1, wait_ready=False)
    async with running(source.run):
        await asyncio.wait_for(source.ready.wait(), AWAIT_S)
        assert (a, gone) in view.nodes
    await asyncio.to_thread(kube.delete_node, a, gone)
    await asyncio.to_thread(kube.create_gpu_node, a, new, gpus=1, wait_ready=False)
    watcher = next(w for w in source._watchers if w.kind == "nodes")
    watcher.rv = "2"
    async with running(watcher.run):
        await view.wait_for(lambda: (a, new) in view.nodes and (a, gone) not in view.nodes)
    await asyncio.to_thread(kube.delete_node, a, new)


async def test_a_malformed_node_is_counted_and_skipped(kube: Any) -> None:
    """The API server accepts any label value; a GPU memory label that is not a number makes
    the node unusable for fleetd: it is counted and skipped, and the watch goes on."""
    view = RecordingView()
    metrics = SourceMetrics()
    a = kube.contexts[0]
    settings = KubernetesSourceSettings(kubeconfig=str(kube.kubeconfig_path), contexts=(a,))
    source = KubernetesSource(settings, view, metrics=metrics)
    bad, good = unique("bad-label"), unique("good")
    async with running(source.run):
        await asyncio.wait_for(source.ready.wait(), AWAIT_S)
        await asyncio.to_thread(
            kube.create_gpu_node, a, bad, gpus=1, labels={"nvidia.com/gpu.memory": "80GB"},
            wait_ready=False,
        )  # fmt: skip
        await asyncio.to_thread(kube.create_gpu_node, a, good, gpus=1, wait_ready=False)
        await view.wait_for(lambda: (a, good) in view.nodes, AWAIT_S)
        assert (a, bad) not in view.nodes
        assert metrics.kube_invalid_objects.labels(a, "nodes", "bad-gpu-label")._value.get() >= 1
    await asyncio.to_thread(kube.delete_node, a, bad)
    await asyncio.to_thread(kube.delete_node, a, good)
