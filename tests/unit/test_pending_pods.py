"""Pending pods from the clusters (PodScheduled=False, Unschedulable): translation and
validation of the Pod objects, the state's per-cluster table, and the autoscaler planning
scale-ups for them next to queued workloads."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleetd.api.servicers import snapshot
from fleetd.autoscaler import Autoscaler, pending_pod_spec
from fleetd.config import Config
from fleetd.engine import PodRequest
from fleetd.journal import Journal
from fleetd.metrics import Metrics
from fleetd.sources import codec
from fleetd.sources import updates as up
from fleetd.sources.translate import InvalidObject, pending_pod, pending_pod_removed
from fleetd.state import FleetState, WorkloadRequest
from fleetd.v1 import telemetry_pb2 as pb
from scheduling.workload import LabelOp

GIB = 1024**3
RES = up.Resources(cpu_millicores=64_000, memory_bytes=512 * GIB, gpus=8)
UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
}


def kube_pod(**spec: Any) -> dict[str, Any]:
    """An unbound pod the scheduler marked Unschedulable (override spec fields by keyword)."""
    return {
        "metadata": {"name": "train-0", "namespace": "ml", "uid": "u-1", "resourceVersion": "42"},
        "spec": {
            "containers": [
                {"name": "c", "resources": {"requests": {"cpu": "4", "memory": "16Gi",
                                                         "nvidia.com/gpu": "8"}}}
            ],
            **spec,
        },
        "status": {"phase": "Pending", "conditions": [dict(UNSCHEDULABLE)]},
    }  # fmt: skip


def test_unschedulable_pod_becomes_pending_work() -> None:
    obj = kube_pod(
        nodeSelector={"nvidia.com/gpu.product": "A100"},
        tolerations=[{"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["b", "a"]},
            ]}]}}},
        priority=1000,
    )  # fmt: skip
    p = pending_pod("c1", obj)
    assert isinstance(p, up.PendingPod)
    assert (p.cluster, p.key, p.uid, p.sequence, p.priority) == (
        "c1",
        "ml/train-0",
        "u-1",
        42,
        1000,
    )
    assert (p.requests.cpu_millicores, p.requests.memory_bytes, p.requests.gpus) == (
        4000, 16 * GIB, 8,
    )  # fmt: skip
    assert p.node_selector == (("nvidia.com/gpu.product", "A100"),)
    assert p.affinity == (up.NodeRequirement("topology.kubernetes.io/zone", "In", ("a", "b")),)
    assert p.tolerations == (up.PodToleration("kwok.x-k8s.io/node", "Exists", "", "NoSchedule"),)
    spec = pending_pod_spec(p)
    assert spec is not None
    assert (spec.name, spec.num_gpu, spec.clusters, spec.priority) == (
        "ml/train-0",
        8,
        ("c1",),
        1000,
    )
    assert spec.affinity[0].op is LabelOp.IN


@pytest.mark.parametrize(
    "change",
    [
        lambda o: o["spec"].update(nodeName="n1"),  # bound
        lambda o: o["status"].update(phase="Succeeded"),  # done
        lambda o: o["status"].update(phase="Failed"),
        lambda o: o["status"].update(conditions=[]),  # not tried yet
        lambda o: o["status"]["conditions"][0].update(reason="SchedulingGated"),
        lambda o: o["status"]["conditions"][0].update(status="True"),
    ],
)
def test_pods_that_are_not_unschedulable_are_removals(change: Any) -> None:
    obj = kube_pod()
    change(obj)
    assert pending_pod("c1", obj) == up.PendingPodRemoved("c1", "ml", "train-0", sequence=42)


def test_deleted_pod_is_a_removal() -> None:
    assert pending_pod_removed("c1", kube_pod()) == up.PendingPodRemoved(
        "c1", "ml", "train-0", sequence=42
    )


def test_several_affinity_terms_are_not_narrowed() -> None:
    term = {"matchExpressions": [{"key": "k", "operator": "Exists"}]}
    obj = kube_pod(affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [term, term]}}})  # fmt: skip
    p = pending_pod("c1", obj)
    assert isinstance(p, up.PendingPod)
    assert p.affinity == ()


def _bad(path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(kube_pod())
    *parents, last = path.split(".")
    target: Any = obj
    for key in parents:
        target = target[key]
    target[last] = value
    return obj


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ("not an object", "bad-structure"),
        (_bad("metadata.name", "Not_A_Name"), "bad-name"),
        (_bad("metadata.namespace", 7), "bad-name"),
        (_bad("spec.containers", []), "bad-structure"),
        (_bad("spec.nodeSelector", {"k": 1}), "bad-labels"),
        (_bad("spec.tolerations", [{"key": "k", "operator": "Sometimes"}]), "bad-toleration"),
        (_bad("spec.tolerations", "all"), "bad-toleration"),
        (_bad("spec.priority", "high"), "bad-structure"),
        (_bad("spec.affinity", {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
            {"nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "In"}]}]}}}),
         "bad-affinity"),
        (_bad("status.phase", "Dancing"), "bad-structure"),
    ],
)  # fmt: skip
def test_invalid_pods_raise_invalid_object(obj: Any, reason: str) -> None:
    with pytest.raises(InvalidObject) as exc:
        pending_pod("c1", obj)
    assert exc.value.reason == reason


def pool_update(current: int, cluster: str = "c1") -> up.NodePoolUpdate:
    return up.NodePoolUpdate(
        cluster, "a100", 1, "p4d", RES, gpu_model="A100", price_per_hour=30.0,
        min_size=0, max_size=4, current_size=current, labels=(("team", "ml"),),
    )  # fmt: skip


def full_state(tmp_path: Path) -> FleetState:
    """Clusters c1 and c2, each with one a100 pool; c1's one node is full."""
    state = FleetState(Config(), Journal(tmp_path / "j.db"), lambda: 1000.0)
    state.expect_source("t", "c1")
    state.apply_now(pool_update(1))
    state.apply_now(pool_update(0, "c2"))
    state.apply_now(up.NodeUpdate("c1", "n0", 1, RES, RES, gpu_model="A100", node_pool="a100"))
    state.apply_now(up.ClusterSynced("c1", "t"))
    fill = WorkloadRequest("fill", "ml", 0, (PodRequest("fill-0", 1000, GIB, gpu_count=8),),
                           fingerprint="fill")  # fmt: skip
    assert state.place(fill).result == "placed"
    return state


def gpu_pod(name: str, cluster: str = "c1", **kw: Any) -> up.PendingPod:
    return up.PendingPod(cluster, "ml", name, f"uid-{name}",
                         up.Resources(cpu_millicores=1000, memory_bytes=GIB, gpus=8), **kw)  # fmt: skip


def test_state_keeps_pending_pods_per_cluster(tmp_path: Path) -> None:
    state = full_state(tmp_path)
    state.apply_now(gpu_pod("a", sequence=5))
    state.apply_now(gpu_pod("b", "c2"))
    assert set(state.pending_pods) == {"c1", "c2"}
    assert not state.apply_now(gpu_pod("a", sequence=4))  # stale: dropped
    state.apply_now(up.PendingPodRemoved("c1", "ml", "a", sequence=6))
    assert set(state.pending_pods) == {"c2"}
    state.apply_now(up.PendingPodRemoved("c1", "ml", "never-seen"))  # harmless
    assert [p.key for p in state.pending_pod_list()] == ["ml/b"]


def test_pending_pods_show_in_snapshot_and_metrics(tmp_path: Path) -> None:
    state = full_state(tmp_path)
    state.apply_now(gpu_pod("a"))
    state.apply_now(gpu_pod("b"))
    state.apply_now(gpu_pod("c", "c3"))  # a cluster known only by its pending pod
    snap = snapshot(state, "", include_nodes=False)
    assert {c.name: c.pods_pending for c in snap.clusters} == {"c1": 2, "c2": 0, "c3": 1}
    assert [c.pods_pending for c in snapshot(state, "c3", include_nodes=False).clusters] == [1]
    metrics = Metrics()
    metrics.refresh(state)
    assert metrics.registry.get_sample_value("fleetd_cluster_pods_pending", {"cluster": "c1"}) == 2
    state.apply_now(up.PendingPodRemoved("c3", "ml", "c"))
    metrics.refresh(state)
    # The gauge of a cluster with nothing pending goes away with its last pod.
    assert (
        metrics.registry.get_sample_value("fleetd_cluster_pods_pending", {"cluster": "c3"}) is None
    )
    assert "c3" not in {c.name for c in snapshot(state, "", include_nodes=False).clusters}


def test_autoscaler_plans_for_pending_pods_in_their_cluster(tmp_path: Path) -> None:
    state = full_state(tmp_path)
    scaler = Autoscaler(state, lambda: state.config, lambda: 1000.0)
    assert scaler.step() == []  # nothing pending
    state.apply_now(gpu_pod("a"))
    [decision] = scaler.step()
    assert (decision.cluster, decision.pool, decision.delta) == ("c1", "a100", 1)
    assert decision.unblocks == ("ml/a",)
    assert scaler.step() == []  # same state: nothing new
    # With a queued workload in the same plan; a pod of c2 scales c2's pool only.
    wait = WorkloadRequest("wait", "ml", 0, (PodRequest("wait-0", 1000, GIB, gpu_count=8),),
                           fingerprint="wait", cluster="c1")  # fmt: skip
    assert state.place(wait).result == "queued"
    state.apply_now(gpu_pod("b", "c2"))
    decisions = scaler.step()
    by_cluster = {d.cluster: d for d in decisions}
    assert set(by_cluster) == {"c1", "c2"}
    # The node in flight takes one of the two 8-GPU items, one more node the other.
    assert by_cluster["c1"].delta == 1
    assert scaler.targets[("c1", "a100")] == 3
    assert set(by_cluster["c1"].unblocks) <= {"wait", "ml/a"}
    assert by_cluster["c2"].unblocks == ("ml/b",)


def test_pending_pod_selector_must_match_a_pool(tmp_path: Path) -> None:
    state = full_state(tmp_path)
    scaler = Autoscaler(state, lambda: state.config, lambda: 1000.0)
    state.apply_now(gpu_pod("nowhere", node_selector=(("team", "other"),)))
    assert scaler.step() == []
    state.apply_now(up.PendingPodRemoved("c1", "ml", "nowhere"))
    state.apply_now(gpu_pod("mine", node_selector=(("team", "ml"),)))
    [decision] = scaler.step()
    assert decision.unblocks == ("ml/mine",)


def test_pending_pod_telemetry_round_trips() -> None:
    pod = up.PendingPod(
        "c1", "ml", "train-0", "u-1", up.Resources(cpu_millicores=4000, memory_bytes=GIB, gpus=8),
        node_selector=(("team", "ml"),),
        affinity=(up.NodeRequirement("zone", "In", ("a", "b")),),
        tolerations=(up.PodToleration("gpu", "Exists", "", "NoSchedule"),),
        priority=-5,
    )  # fmt: skip
    record = codec.encode_pending_pod(pod, sequence=7, observed_unix_ms=1)
    key = codec.record_key(record)
    assert key == b"c1/pending/ml/train-0"
    assert codec.decode(key, record.SerializeToString()) == replace(pod, sequence=7)
    gone = codec.encode_pending_pod_deleted("c1", "ml", "train-0", sequence=8, observed_unix_ms=1)
    assert codec.decode(codec.record_key(gone), gone.SerializeToString()) == (
        up.PendingPodRemoved("c1", "ml", "train-0", sequence=8)
    )


def _record(**pending: Any) -> pb.TelemetryRecord:
    record = pb.TelemetryRecord(cluster="c1", sequence=1)
    record.pending_pod.namespace = "ml"
    record.pending_pod.name = "p"
    for field, value in pending.items():
        getattr(record.pending_pod, field).extend(value)
    return record


@pytest.mark.parametrize(
    ("record", "key", "reason"),
    [
        (_record(), b"c1/pending/ml/other", "key-mismatch"),
        (_record(affinity=[pb.NodeSelectorRequirement(key="k", operator="Gt")]), None,
         "bad-pending-pod"),
        (_record(affinity=[pb.NodeSelectorRequirement(key="k", operator="In")]), None,
         "bad-pending-pod"),
        (_record(tolerations=[pb.PodToleration(operator="Equal", value="v")]), None,
         "bad-pending-pod"),
        (_record(tolerations=[pb.PodToleration(key="k", effect="Sometimes")]), None,
         "bad-pending-pod"),
    ],
)  # fmt: skip
def test_invalid_pending_pod_telemetry(record: pb.TelemetryRecord, key: bytes | None,
                                       reason: str) -> None:  # fmt: skip
    with pytest.raises(codec.InvalidTelemetry) as exc:
        codec.decode(key, record.SerializeToString())
    assert exc.value.reason == reason


def test_invalid_pending_pod_names() -> None:
    record = _record()
    record.pending_pod.name = "bad/name"
    with pytest.raises(codec.InvalidTelemetry) as exc:
        codec.decode(None, record.SerializeToString())
    assert exc.value.reason == "bad-name"
    resources = _record()
    resources.pending_pod.requests.gpus = -1
    with pytest.raises(codec.InvalidTelemetry) as exc:
        codec.decode(None, resources.SerializeToString())
    assert exc.value.reason == "bad-resources"


def test_reported_pending_pods_expire_unless_a_watch_feeds_their_cluster(tmp_path: Path) -> None:
    clock = [1000.0]
    state = FleetState(Config(), Journal(tmp_path / "j.db"), lambda: clock[0])
    state.expect_source("kubernetes", "watched")
    state.apply_now(gpu_pod("a", sequence=1))
    state.apply_now(gpu_pod("w", "watched"))
    version = state.pending_version
    clock[0] += 100
    state.apply_now(gpu_pod("a", sequence=2))  # the agent's periodic re-report
    assert state.pending_version == version  # same content: nothing new to plan
    clock[0] += 100
    # "a" was re-reported 100 s ago; "w" (200 s) is kept: its cluster's watch relists.
    assert state.expire_pending_pods(150.0) == 0
    assert [p.key for p in state.pending_pod_list()] == ["ml/a", "ml/w"]
    clock[0] += 100
    assert state.expire_pending_pods(150.0) == 1
    assert set(state.pending_pods) == {"watched"}
