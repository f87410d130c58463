"""Kubernetes objects -> update values: tables of real-world node and pod shapes."""

from __future__ import annotations

import copy
from decimal import Decimal
from typing import Any

import pytest

from fleetd.sources.translate import (
    InvalidObject,
    capacity_type_of,
    node_pool_of,
    node_removed,
    node_update,
    parse_quantity,
    parse_resources,
    pod_removed,
    pod_update,
    sequence_of,
)
from fleetd.sources.updates import (
    CapacityType,
    NodeRemoved,
    PodObserved,
    PodRemoved,
    Resources,
    Taint,
)

GIB = 1024**3
MIB = 1024**2


def kube_node(
    name: str = "gpu-1",
    *,
    labels: dict[str, str] | None = None,
    capacity: dict[str, Any] | None = None,
    allocatable: dict[str, Any] | None = None,
    taints: list[dict[str, Any]] | None = None,
    unschedulable: bool | None = None,
    ready: str = "True",
    rv: str = "42",
) -> dict[str, Any]:
    """A Node object as the API server serves it (JSON form)."""
    cap = capacity if capacity is not None else {"cpu": "96", "memory": "768Gi", "pods": "110"}
    spec: dict[str, Any] = {}
    if taints is not None:
        spec["taints"] = taints
    if unschedulable is not None:
        spec["unschedulable"] = unschedulable
    return {
        "kind": "Node",
        "metadata": {"name": name, "resourceVersion": rv, "labels": labels or {}},
        "spec": spec,
        "status": {
            "capacity": cap,
            "allocatable": allocatable if allocatable is not None else cap,
            "conditions": [{"type": "Ready", "status": ready}],
        },
    }


def kube_pod(
    name: str = "train-0",
    *,
    node: str = "gpu-1",
    phase: str = "Running",
    containers: list[dict[str, Any]] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
    rv: str = "7",
) -> dict[str, Any]:
    """A Pod object (JSON form)."""
    spec: dict[str, Any] = {
        "containers": containers
        or [{"name": "main", "resources": {"requests": {"cpu": "4", "memory": "16Gi"}}}],
    }
    if node:
        spec["nodeName"] = node
    if init_containers is not None:
        spec["initContainers"] = init_containers
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ml", "uid": "u-1", "resourceVersion": rv},
        "spec": spec,
        "status": {"phase": phase},
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100m", Decimal("0.1")),
        ("2", Decimal(2)),
        ("1.5", Decimal("1.5")),
        ("16Gi", Decimal(16 * GIB)),
        ("129M", Decimal(129_000_000)),
        ("1e3", Decimal(1000)),
        ("0", Decimal(0)),
    ],
    ids=["milli", "int", "fraction", "binary-suffix", "decimal-suffix", "exponent", "zero"],
)
def test_parse_quantity(text: str, expected: Decimal) -> None:
    assert parse_quantity(text, what="q") == expected


@pytest.mark.parametrize(
    "text",
    ["abc", "-1", "NaN", "Infinity", "", "1Gx", None, True, [], "1" + "0" * 30],
    ids=["word", "negative", "nan", "inf", "empty", "bad-suffix", "none", "bool", "list", "huge"],
)
def test_parse_quantity_rejects(text: object) -> None:
    with pytest.raises(InvalidObject) as err:
        parse_quantity(text, what="q")
    assert err.value.reason == "bad-quantity"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # 1.5 cores = 1500 m; 250m stays 250 m; 0.1m rounds up to 1 m as Kubernetes does.
        ({"cpu": "1.5"}, Resources(cpu_millicores=1500)),
        ({"cpu": "250m"}, Resources(cpu_millicores=250)),
        ({"cpu": "0.1m"}, Resources(cpu_millicores=1)),
        ({"memory": "1Gi"}, Resources(memory_bytes=GIB)),
        ({"nvidia.com/gpu": "8"}, Resources(gpus=8)),
        (
            {"nvidia.com/mig-1g.10gb": "7", "nvidia.com/mig-3g.40gb": "0"},
            Resources(mig_devices=(("1g.10gb", 7),)),
        ),
        ({"pods": "110", "ephemeral-storage": "100Gi"}, Resources(pods=110, ephemeral_storage_bytes=100 * GIB)),
        ({"hugepages-2Mi": "0", "example.com/fpga": "2"}, Resources()),
        (None, Resources()),
    ],
    ids=["cpu-cores", "cpu-milli", "cpu-round-up", "memory", "gpu", "mig", "pods-storage", "ignored", "none"],
)  # fmt: skip
def test_parse_resources(raw: dict[str, str] | None, expected: Resources) -> None:
    assert parse_resources(raw, what="r") == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"nvidia.com/gpu": "1.5"}, "bad-quantity"),
        ({"nvidia.com/gpu": "-1"}, "bad-quantity"),
        ({"nvidia.com/mig-big": "1"}, "bad-mig-profile"),
        ({"cpu": {"x": 1}}, "bad-quantity"),
        (["cpu"], "bad-resources"),
    ],
    ids=["fractional-gpu", "negative-gpu", "bad-mig-name", "cpu-object", "list"],
)
def test_parse_resources_rejects(raw: object, reason: str) -> None:
    with pytest.raises(InvalidObject) as err:
        parse_resources(raw, what="r")
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("labels", "pool", "capacity_type"),
    [
        ({"karpenter.sh/nodepool": "gpu", "karpenter.sh/capacity-type": "spot",
          "eks.amazonaws.com/nodegroup": "ignored"}, "gpu", CapacityType.SPOT),
        ({"karpenter.sh/nodepool": "gpu", "karpenter.sh/capacity-type": "reserved"}, "gpu", CapacityType.RESERVED),
        ({"cloud.google.com/gke-nodepool": "a3", "cloud.google.com/gke-spot": "true"}, "a3", CapacityType.SPOT),
        ({"cloud.google.com/gke-nodepool": "a3", "cloud.google.com/gke-preemptible": "true"}, "a3", CapacityType.SPOT),
        ({"cloud.google.com/gke-nodepool": "a2"}, "a2", CapacityType.ON_DEMAND),
        ({"eks.amazonaws.com/nodegroup": "p5", "eks.amazonaws.com/capacityType": "ON_DEMAND"}, "p5", CapacityType.ON_DEMAND),
        ({"eks.amazonaws.com/nodegroup": "p5", "eks.amazonaws.com/capacityType": "CAPACITY_BLOCK"}, "p5", CapacityType.RESERVED),
        ({"kubernetes.azure.com/agentpool": "nd", "kubernetes.azure.com/scalesetpriority": "spot"}, "nd", CapacityType.SPOT),
        ({"agentpool": "nc"}, "nc", CapacityType.ON_DEMAND),
        ({}, "", CapacityType.UNSPECIFIED),
    ],
    ids=["karpenter-spot", "karpenter-reserved", "gke-spot", "gke-preemptible", "gke-on-demand",
         "eks-on-demand", "eks-capacity-block", "aks-spot", "aks-legacy-label", "none"],
)  # fmt: skip
def test_node_pool_and_capacity_type(
    labels: dict[str, str], pool: str, capacity_type: CapacityType
) -> None:
    assert node_pool_of(labels) == pool
    assert capacity_type_of(labels) == capacity_type


def test_gpu_node_with_feature_discovery_labels() -> None:
    obj = kube_node(
        labels={
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "nvidia.com/gpu.memory": "81559",
            "nvidia.com/gpu.count": "8",
            "topology.kubernetes.io/zone": "us-east1-b",
            "topology.kubernetes.io/region": "us-east1",
            "node.kubernetes.io/instance-type": "a3-highgpu-8g",
            "cloud.google.com/gke-nodepool": "a3",
        },
        capacity={"cpu": "208", "memory": "1872Gi", "nvidia.com/gpu": "8", "pods": "110"},
        # One GPU withdrawn by the device plugin (unhealthy): allocatable 7 of 8.
        allocatable={"cpu": "207500m", "memory": "1800Gi", "nvidia.com/gpu": "7", "pods": "110"},
        taints=[{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        rv="1234",
    )
    u = node_update("cluster-a", obj, observed_at_s=5.0)
    assert (u.cluster, u.name, u.sequence) == ("cluster-a", "gpu-1", 1234)
    assert u.capacity == Resources(
        cpu_millicores=208_000, memory_bytes=1872 * GIB, gpus=8, pods=110
    )
    assert u.allocatable.cpu_millicores == 207_500
    assert u.allocatable.gpus == 7
    assert (u.gpu_model, u.gpu_memory_bytes) == ("NVIDIA-H100-80GB-HBM3", 81559 * MIB)
    assert [g.healthy for g in u.gpus] == [True] * 7 + [False]
    assert [g.index for g in u.gpus] == list(range(8))
    assert (u.zone, u.region, u.instance_type) == ("us-east1-b", "us-east1", "a3-highgpu-8g")
    assert (u.node_pool, u.capacity_type) == ("a3", CapacityType.ON_DEMAND)
    assert u.taints == (Taint("nvidia.com/gpu", "present", "NoSchedule"),)
    assert u.schedulable
    assert u.pods is None  # pods come from the pod watch
    assert u.observed_at_s == 5.0


def test_mig_node_counts_physical_gpus_from_the_count_label() -> None:
    # Mixed MIG strategy: nvidia.com/gpu counts only non-MIG GPUs (here none).
    obj = kube_node(
        labels={"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.count": "2"},
        capacity={"cpu": "64", "memory": "512Gi", "nvidia.com/mig-1g.10gb": "14"},
    )
    u = node_update("c", obj)
    assert u.capacity.gpus == 0
    assert u.capacity.mig_devices == (("1g.10gb", 14),)
    assert len(u.gpus) == 2


@pytest.mark.parametrize(
    ("kwargs", "schedulable"),
    [
        ({}, True),
        ({"unschedulable": True}, False),
        ({"ready": "False"}, False),
        ({"ready": "Unknown"}, False),
    ],
    ids=["ready", "cordoned", "not-ready", "unknown"],
)
def test_cordon_and_readiness(kwargs: dict[str, Any], schedulable: bool) -> None:
    assert node_update("c", kube_node(**kwargs)).schedulable is schedulable


def test_legacy_zone_label() -> None:
    obj = kube_node(labels={"failure-domain.beta.kubernetes.io/zone": "z1"})
    assert node_update("c", obj).zone == "z1"


def _break(obj: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    cursor = obj
    for p in parents:
        cursor = cursor.setdefault(p, {})
    cursor[leaf] = value
    return obj


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("metadata.name", "", "bad-name"),
        ("metadata.name", "Has Spaces", "bad-name"),
        ("metadata.name", 7, "bad-name"),
        ("metadata", "x", "bad-structure"),
        ("metadata.labels", {"a": 1}, "bad-labels"),
        ("metadata.labels", {"nvidia.com/gpu.memory": "80GB"}, "bad-gpu-label"),
        ("metadata.labels", {"nvidia.com/gpu.count": "-1"}, "bad-gpu-label"),
        ("status.capacity", {"cpu": "lots"}, "bad-quantity"),
        ("status.allocatable", {"nvidia.com/gpu": "0.5"}, "bad-quantity"),
        ("spec.taints", [{"key": "k", "effect": "Sometimes"}], "bad-taint"),
        ("spec.taints", [{"effect": "NoSchedule"}], "bad-taint"),
        ("spec.taints", "k=v:NoSchedule", "bad-taint"),
        ("spec.unschedulable", "yes", "bad-structure"),
        ("status", [], "bad-structure"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_malformed_node_is_rejected_with_a_reason(path: str, value: object, reason: str) -> None:
    with pytest.raises(InvalidObject) as err:
        node_update("c", _break(kube_node(), path, value))
    assert err.value.reason == reason


@pytest.mark.parametrize("obj", [None, [], "node", 3], ids=["none", "list", "str", "int"])
def test_non_objects_are_rejected(obj: object) -> None:
    with pytest.raises(InvalidObject):
        node_update("c", obj)
    with pytest.raises(InvalidObject):
        pod_update("c", obj)


def test_node_removed() -> None:
    assert node_removed("c", kube_node("n-9")) == NodeRemoved(cluster="c", name="n-9")


@pytest.mark.parametrize(
    ("containers", "init_containers", "expected"),
    [
        # Two containers sum: 4+2 cores, 16+8 GiB, 1+1 GPUs.
        (
            [{"resources": {"requests": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}}},
             {"resources": {"requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"}}}],
            None,
            Resources(cpu_millicores=6000, memory_bytes=24 * GIB, gpus=2),
        ),
        # Limits only: the request defaults to the limit (GPUs are usually given so).
        (
            [{"resources": {"limits": {"nvidia.com/gpu": "4", "cpu": "8"}}}],
            None,
            Resources(cpu_millicores=8000, gpus=4),
        ),
        # Init container larger than the sum: max(6 cores, 10 cores) = 10 cores.
        (
            [{"resources": {"requests": {"cpu": "6"}}}],
            [{"resources": {"requests": {"cpu": "10", "memory": "1Gi"}}}],
            Resources(cpu_millicores=10_000, memory_bytes=GIB),
        ),
        (
            [{"resources": {"requests": {"nvidia.com/mig-1g.10gb": "2"}}}],
            None,
            Resources(mig_devices=(("1g.10gb", 2),)),
        ),
        ([{"name": "no-resources"}], None, Resources()),
    ],
    ids=["sum", "limits-only", "init-max", "mig", "none"],
)  # fmt: skip
def test_pod_requests(
    containers: list[dict[str, Any]],
    init_containers: list[dict[str, Any]] | None,
    expected: Resources,
) -> None:
    u = pod_update("c", kube_pod(containers=containers, init_containers=init_containers))
    assert isinstance(u, PodObserved)
    assert u.requests == expected


def test_bound_pod() -> None:
    u = pod_update("c", kube_pod(rv="99"))
    assert u == PodObserved(
        cluster="c", namespace="ml", name="train-0", uid="u-1", node="gpu-1",
        requests=Resources(cpu_millicores=4000, memory_bytes=16 * GIB), phase="Running",
        sequence=99,
    )  # fmt: skip


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_terminated_pod_holds_nothing(phase: str) -> None:
    assert isinstance(pod_update("c", kube_pod(phase=phase)), PodRemoved)


def test_unbound_pod_is_ignored() -> None:
    assert pod_update("c", kube_pod(node="")) is None
    assert pod_removed("c", kube_pod(node="")) is None


def test_pod_removed() -> None:
    assert pod_removed("c", kube_pod()) == PodRemoved(
        cluster="c", namespace="ml", name="train-0", uid="u-1", node="gpu-1", sequence=7
    )


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.containers", []),
        ("spec.containers", [{"resources": {"requests": {"cpu": "x"}}}]),
        ("spec.nodeName", 3),
        ("status.phase", "Exploded"),
        ("metadata.namespace", ""),
        ("spec.initContainers", {}),
    ],
    ids=["no-containers", "bad-cpu", "node-int", "phase", "namespace", "init-map"],
)
def test_malformed_pod_is_rejected(path: str, value: object) -> None:
    with pytest.raises(InvalidObject):
        pod_update("c", _break(kube_pod(), path, value))


@pytest.mark.parametrize(
    ("rv", "seq"),
    [("12", 12), ("", 0), ("abc", 0), ("9" * 30, 0)],
    ids=["int", "empty", "opaque", "huge"],
)
def test_sequence_of_resource_version(rv: str, seq: int) -> None:
    assert sequence_of(rv) == seq
