"""A reservation's life against real sources: Place -> the pod appears on its node (a kube
watch, or a Kafka telemetry report) -> CONFIRMED -> the pod goes -> released, each step
awaited on WatchDecisions."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from fleetd.loadgen import produce
from fleetd.sources.updates import PodObserved, Resources, labels_of
from fleetd.v1 import placement_pb2, types_pb2
from tests.integration.sources_support import (
    AWAIT_S,
    h100_report,
    unique,
)
from tests.testbed.gpu_nodes import KWOK_TOLERATION
from tests.testbed.kube import KubeTestbed
from tests.testbed.procs import async_wait_until

from .conftest import StartDaemon, start_on_kafka

pytestmark = pytest.mark.testbed

GIB = 1024**3


def _pod(name: str, node: str, workload_id: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"fleetd.io/workload-id": workload_id}},
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


async def _next_decision(stream: Any, workload_id: str, kind: int) -> types_pb2.Decision:
    async with asyncio.timeout(AWAIT_S):
        async for d in stream:
            if d.workload_id == workload_id and d.kind == kind:
                return d  # type: ignore[no-any-return]
    raise AssertionError("decision stream ended")


async def test_reservation_confirmed_by_the_watch_and_released_when_the_pod_goes(
    start_daemon: StartDaemon, kube: KubeTestbed
) -> None:
    context = kube.contexts[1]
    pool, node = unique("rsv"), unique("rsv-node")
    await asyncio.to_thread(kube.create_gpu_node, context, node, gpus=4, pool=pool)
    daemon, client = await start_daemon(
        sources={
            "simulated": {"enabled": False},
            "kubernetes": {
                "enabled": True,
                "kubeconfig": str(kube.kubeconfig_path),
                "contexts": [context],
            },
        }
    )
    wid = unique("train")
    spec = types_pb2.PodSpec(
        cpu_millicores=2000,
        memory_bytes=8 * GIB,
        gpu_count=2,
        tolerations=[
            types_pb2.Toleration(
                key="kwok.x-k8s.io/node", operator="Equal", value="fake", effect="NoSchedule"
            )
        ],
    )
    wl = types_pb2.Workload(workload_id=wid, team="ml", pod=spec, cluster=context, pool=pool)

    async def placed() -> placement_pb2.PlaceResponse | None:
        # The pool is NOT_FOUND until the node's watch event arrives; then it fits.
        try:
            return await client.placement.Place(placement_pb2.PlaceRequest(workload=wl))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None

    resp = await async_wait_until(f"{wid} placed on {pool}", placed, timeout_s=AWAIT_S)
    assert resp.result == types_pb2.DECISION_RESULT_PLACED
    [where] = resp.placements
    assert (where.cluster, where.node, len(where.gpu_indices)) == (context, node, 2)
    stream = client.placement.WatchDecisions(
        placement_pb2.WatchDecisionsRequest(after_seq=resp.decision_seq)
    )
    core = kube.core_v1(context)
    pod_name = unique("pod")
    await asyncio.to_thread(
        core.create_namespaced_pod, "default", _pod(pod_name, node, wid, gpus=2)
    )
    confirm = await _next_decision(stream, wid, types_pb2.Decision.KIND_CONFIRM)
    assert confirm.reservation_state == types_pb2.RESERVATION_STATE_CONFIRMED
    assert [list(p.gpu_indices) for p in confirm.placements] == [list(where.gpu_indices)]
    replay = await client.placement.Place(placement_pb2.PlaceRequest(workload=wl))
    assert replay.replayed
    assert replay.reservation_state == types_pb2.RESERVATION_STATE_CONFIRMED
    await asyncio.to_thread(core.delete_namespaced_pod, pod_name, "default", grace_period_seconds=0)
    done = await _next_decision(stream, wid, types_pb2.Decision.KIND_RELEASE)
    assert done.reservation_state == types_pb2.RESERVATION_STATE_RELEASED
    assert done.explanation.summary == "every pod finished"
    stream.cancel()
    assert daemon.state is not None
    assert wid not in daemon.state.held
    await asyncio.to_thread(kube.delete_node, context, node)


async def test_reservation_confirmed_by_kafka_telemetry_and_released_when_the_pod_goes(
    start_daemon: StartDaemon, kafka_bootstrap: str
) -> None:
    _, client, topic, cluster = await start_on_kafka(start_daemon, kafka_bootstrap)
    wid = unique("job")
    spec = types_pb2.PodSpec(cpu_millicores=4000, memory_bytes=16 * GIB, gpu_count=4)
    wl = types_pb2.Workload(workload_id=wid, team="ml", pod=spec, cluster=cluster)
    resp = await client.placement.Place(placement_pb2.PlaceRequest(workload=wl))
    assert resp.result == types_pb2.DECISION_RESULT_PLACED
    [where] = resp.placements
    stream = client.placement.WatchDecisions(
        placement_pb2.WatchDecisionsRequest(after_seq=resp.decision_seq)
    )
    # The cluster's agent reports the node with the pod the client started there.
    pod = PodObserved(
        cluster=cluster,
        namespace="default",
        name=where.pod_name,
        uid=unique("uid"),
        node=where.node,
        requests=Resources(cpu_millicores=4000, memory_bytes=16 * GIB, gpus=4),
        phase="Running",
        labels=labels_of({"fleetd.io/workload-id": wid}),
    )
    await produce(kafka_bootstrap, topic, [h100_report(cluster, "n0", 2, (pod,))])
    confirm = await _next_decision(stream, wid, types_pb2.Decision.KIND_CONFIRM)
    assert confirm.reservation_state == types_pb2.RESERVATION_STATE_CONFIRMED
    # The next report has no pod: the workload finished, its GPUs are free again.
    await produce(kafka_bootstrap, topic, [h100_report(cluster, "n0", 3, ())])
    done = await _next_decision(stream, wid, types_pb2.Decision.KIND_RELEASE)
    assert done.reservation_state == types_pb2.RESERVATION_STATE_RELEASED
    stream.cancel()
    again = await client.placement.Explain(
        placement_pb2.ExplainRequest(
            workload=types_pb2.Workload(
                workload_id="probe",
                team="ml",
                pod=types_pb2.PodSpec(cpu_millicores=1000, gpu_count=8),
                cluster=cluster,
            )
        )
    )
    assert again.fits
