"""Kubernetes objects (their JSON form, as the API server sends them) -> update values.

Pure functions: no I/O, no clocks. Every function validates what it reads and raises
`InvalidObject` with a short machine reason (used as a metric label) and a detail for the
log; callers count and skip such objects, they never crash on them.

What is understood:
- resources: cpu, memory, pods, ephemeral-storage, `nvidia.com/gpu` (whole GPUs) and the
  MIG resources of the device plugin's mixed strategy, `nvidia.com/mig-<profile>`
  (e.g. `nvidia.com/mig-1g.10gb`);
- GPU feature discovery labels: `nvidia.com/gpu.product`, `nvidia.com/gpu.memory` (MiB),
  `nvidia.com/gpu.count`;
- zone and region: `topology.kubernetes.io/zone|region` and their deprecated
  `failure-domain.beta.kubernetes.io/` forms;
- node pools: Karpenter `karpenter.sh/nodepool`, GKE `cloud.google.com/gke-nodepool`,
  EKS `eks.amazonaws.com/nodegroup`, AKS `kubernetes.azure.com/agentpool` / `agentpool`;
- capacity type: Karpenter `karpenter.sh/capacity-type`, EKS `eks.amazonaws.com/capacityType`,
  GKE `cloud.google.com/gke-spot` / `gke-preemptible`, AKS `kubernetes.azure.com/scalesetpriority`;
- taints, cordon (`spec.unschedulable`) and the Ready condition;
- pending pods (unbound, PodScheduled=False with reason Unschedulable): their requests,
  `nodeSelector`, required node affinity (one term of In / NotIn / Exists / DoesNotExist),
  tolerations and `priority`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from kubernetes.utils.quantity import parse_quantity as k8s_parse_quantity

from fleetd.sources.updates import (
    CapacityType,
    GpuDevice,
    NodeRemoved,
    NodeRequirement,
    NodeUpdate,
    PendingPod,
    PendingPodRemoved,
    PodObserved,
    PodRemoved,
    PodToleration,
    Resources,
    Taint,
    labels_of,
)

GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
LABEL_GPU_PRODUCT = "nvidia.com/gpu.product"
LABEL_GPU_MEMORY_MIB = "nvidia.com/gpu.memory"
LABEL_GPU_COUNT = "nvidia.com/gpu.count"
LABEL_INSTANCE_TYPES = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")
LABEL_ZONES = ("topology.kubernetes.io/zone", "failure-domain.beta.kubernetes.io/zone")
LABEL_REGIONS = ("topology.kubernetes.io/region", "failure-domain.beta.kubernetes.io/region")
#: Node-pool labels, most specific first: a Karpenter node on EKS carries both.
LABEL_NODE_POOLS = (
    "karpenter.sh/nodepool",
    "cloud.google.com/gke-nodepool",
    "eks.amazonaws.com/nodegroup",
    "kubernetes.azure.com/agentpool",
    "agentpool",
)
TAINT_EFFECTS = frozenset({"NoSchedule", "PreferNoSchedule", "NoExecute"})
TERMINAL_POD_PHASES = frozenset({"Succeeded", "Failed"})
POD_PHASES = frozenset({"Pending", "Running", "Succeeded", "Failed", "Unknown"})
MIB = 1024 * 1024

_MAX_QUANTITY = Decimal(2**62)
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_MIG_PROFILE_RE = re.compile(r"^[0-9]+g\.[0-9]+gb$")


class InvalidObject(ValueError):
    """A Kubernetes object fleetd cannot use. `reason` is a short, stable metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_quantity(text: object, *, what: str) -> Decimal:
    """A Kubernetes quantity ("100m", "16Gi", "1e3") as a finite, non-negative Decimal."""
    if not isinstance(text, str | int) or isinstance(text, bool):
        raise InvalidObject("bad-quantity", f"{what}: expected a string, got {type(text).__name__}")
    try:
        result: Decimal = k8s_parse_quantity(  # type: ignore[no-untyped-call]
            text.strip() if isinstance(text, str) else text
        )
    except (ValueError, ArithmeticError) as exc:
        raise InvalidObject("bad-quantity", f"{what}: {text!r} is not a quantity") from exc
    # The client's parser lets "NaN", "Infinity" and negatives through.
    if not result.is_finite() or result < 0 or result > _MAX_QUANTITY:
        raise InvalidObject("bad-quantity", f"{what}: {text!r} is out of range")
    return result


def _ceil_int(value: Decimal) -> int:
    # Kubernetes rounds quantities up to the unit it counts in (1.5m cpu -> 2m).
    return math.ceil(value)


def parse_resources(raw: object, *, what: str) -> Resources:
    """A resource list (capacity, allocatable, requests) as integer base units.

    Unknown resources (hugepages, other vendors' devices) are ignored.
    """
    if raw is None:
        return Resources()
    if not isinstance(raw, dict):
        raise InvalidObject("bad-resources", f"{what}: expected a mapping")
    cpu = memory = gpus = pods = storage = 0
    mig: dict[str, int] = {}
    for name, text in raw.items():
        if not isinstance(name, str):
            raise InvalidObject("bad-resources", f"{what}: resource names must be strings")
        if name == "cpu":
            cpu = _ceil_int(parse_quantity(text, what=f"{what}.cpu") * 1000)
        elif name == "memory":
            memory = _ceil_int(parse_quantity(text, what=f"{what}.memory"))
        elif name == GPU_RESOURCE:
            gpus = _whole(parse_quantity(text, what=f"{what}.{name}"), f"{what}.{name}")
        elif name.startswith(MIG_RESOURCE_PREFIX):
            profile = name[len(MIG_RESOURCE_PREFIX) :]
            if not _MIG_PROFILE_RE.match(profile):
                raise InvalidObject("bad-mig-profile", f"{what}: {name!r}")
            count = _whole(parse_quantity(text, what=f"{what}.{name}"), f"{what}.{name}")
            if count:
                mig[profile] = count
        elif name == "pods":
            pods = _whole(parse_quantity(text, what=f"{what}.pods"), f"{what}.pods")
        elif name == "ephemeral-storage":
            storage = _ceil_int(parse_quantity(text, what=f"{what}.{name}"))
    return Resources(
        cpu_millicores=cpu,
        memory_bytes=memory,
        gpus=gpus,
        mig_devices=tuple(sorted(mig.items())),
        pods=pods,
        ephemeral_storage_bytes=storage,
    )


def _whole(value: Decimal, what: str) -> int:
    if value != value.to_integral_value():
        raise InvalidObject("bad-quantity", f"{what}: devices come in whole numbers, got {value}")
    return int(value)


def _mapping(raw: object, what: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InvalidObject("bad-structure", f"{what}: expected a mapping")
    return raw


def _string_map(raw: object, what: str) -> dict[str, str]:
    result = _mapping(raw, what)
    for key, value in result.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidObject("bad-labels", f"{what}: keys and values must be strings")
    return result


def _metadata(obj: object, kind: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InvalidObject("bad-structure", f"{kind}: expected a JSON object")
    meta = _mapping(obj.get("metadata"), f"{kind}.metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidObject("bad-name", f"{kind}: metadata.name {name!r} is not a valid name")
    return meta


def resource_version(obj: object) -> str:
    """metadata.resourceVersion of an object ("" when absent or not a string)."""
    if not isinstance(obj, dict):
        return ""
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) else ""


def sequence_of(rv: str) -> int:
    """An object's resourceVersion as an ordering sequence (0 = unordered).

    resourceVersions are opaque by contract but are etcd revisions in practice, so they
    order the versions of one object; anything else counts as unordered.
    """
    return int(rv) if rv.isdigit() and len(rv) < 19 else 0


def first_label(labels: Mapping[str, str], keys: tuple[str, ...]) -> str:
    """The value of the first of `keys` present in `labels` ("" when none is)."""
    for key in keys:
        value = labels.get(key)
        if value:
            return value
    return ""


def node_pool_of(labels: Mapping[str, str]) -> str:
    """The node pool / node group of a node from the labels of Karpenter, GKE, EKS and AKS."""
    return first_label(labels, LABEL_NODE_POOLS)


def capacity_type_of(labels: Mapping[str, str]) -> CapacityType:
    """Spot, on-demand or reserved, from the provider's labels (UNSPECIFIED when unknown)."""
    karpenter = labels.get("karpenter.sh/capacity-type", "").lower()
    if karpenter:
        return {
            "spot": CapacityType.SPOT,
            "on-demand": CapacityType.ON_DEMAND,
            "reserved": CapacityType.RESERVED,
        }.get(karpenter, CapacityType.UNSPECIFIED)
    eks = labels.get("eks.amazonaws.com/capacityType", "").upper()
    if eks:
        return {
            "SPOT": CapacityType.SPOT,
            "ON_DEMAND": CapacityType.ON_DEMAND,
            "CAPACITY_BLOCK": CapacityType.RESERVED,
        }.get(eks, CapacityType.UNSPECIFIED)
    if "cloud.google.com/gke-nodepool" in labels:
        spot = labels.get("cloud.google.com/gke-spot") == "true"
        preemptible = labels.get("cloud.google.com/gke-preemptible") == "true"
        return CapacityType.SPOT if spot or preemptible else CapacityType.ON_DEMAND
    if "kubernetes.azure.com/agentpool" in labels or "agentpool" in labels:
        priority = labels.get("kubernetes.azure.com/scalesetpriority", "").lower()
        return CapacityType.SPOT if priority == "spot" else CapacityType.ON_DEMAND
    return CapacityType.UNSPECIFIED


def _label_int(labels: Mapping[str, str], key: str) -> int | None:
    text = labels.get(key)
    if text is None:
        return None
    if not text.isdigit():
        raise InvalidObject("bad-gpu-label", f"label {key}={text!r} is not a whole number")
    return int(text)


def parse_taints(raw: object, *, what: str = "spec.taints") -> tuple[Taint, ...]:
    """spec.taints as Taint values, in their original order."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidObject("bad-taint", f"{what}: expected a list")
    taints = []
    for item in raw:
        if not isinstance(item, dict):
            raise InvalidObject("bad-taint", f"{what}: expected objects")
        key, value, effect = item.get("key"), item.get("value", ""), item.get("effect")
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise InvalidObject("bad-taint", f"{what}: key {key!r} / value {value!r}")
        if effect not in TAINT_EFFECTS:
            raise InvalidObject("bad-taint", f"{what}: effect {effect!r} of taint {key!r}")
        taints.append(Taint(key=key, value=value, effect=effect))
    return tuple(taints)


def _ready(status: Mapping[str, Any]) -> bool:
    conditions = status.get("conditions")
    if not isinstance(conditions, list):
        return False
    for cond in conditions:
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def gpu_devices(
    capacity: Resources, allocatable: Resources, gpu_model: str, gpu_memory_bytes: int, count: int
) -> tuple[GpuDevice, ...]:
    """Per-device view of a node's GPUs as far as the Kubernetes API shows it.

    The NVIDIA device plugin withdraws unhealthy devices from allocatable, so
    capacity - allocatable GPUs are unhealthy; the API does not say which, so the
    highest indices are marked.
    """
    unhealthy = max(0, capacity.gpus - allocatable.gpus)
    return tuple(
        GpuDevice(
            index=i,
            model=gpu_model,
            memory_bytes=gpu_memory_bytes,
            healthy=i < count - unhealthy,
        )
        for i in range(count)
    )


def node_update(cluster: str, obj: object, *, observed_at_s: float = 0.0) -> NodeUpdate:
    """A Node object as a NodeUpdate (pods=None: pods come from the pod watch)."""
    meta = _metadata(obj, "Node")
    assert isinstance(obj, dict)
    labels = _string_map(meta.get("labels"), "metadata.labels")
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")
    capacity = parse_resources(status.get("capacity"), what="status.capacity")
    allocatable = parse_resources(status.get("allocatable"), what="status.allocatable")
    unschedulable = spec.get("unschedulable", False)
    if not isinstance(unschedulable, bool):
        raise InvalidObject("bad-structure", "spec.unschedulable must be a boolean")
    gpu_model = labels.get(LABEL_GPU_PRODUCT, "")
    memory_mib = _label_int(labels, LABEL_GPU_MEMORY_MIB)
    gpu_memory_bytes = (memory_mib or 0) * MIB
    label_count = _label_int(labels, LABEL_GPU_COUNT)
    # With MIG (mixed strategy) nvidia.com/gpu counts only the non-MIG GPUs; the GFD count
    # label always counts physical devices.
    count = label_count if label_count is not None else capacity.gpus
    return NodeUpdate(
        cluster=cluster,
        name=meta["name"],
        sequence=sequence_of(resource_version(obj)),
        capacity=capacity,
        allocatable=allocatable,
        labels=labels_of(labels),
        taints=parse_taints(spec.get("taints")),
        unschedulable=unschedulable,
        ready=_ready(status),
        node_pool=node_pool_of(labels),
        zone=first_label(labels, LABEL_ZONES),
        region=first_label(labels, LABEL_REGIONS),
        instance_type=first_label(labels, LABEL_INSTANCE_TYPES),
        capacity_type=capacity_type_of(labels),
        gpu_model=gpu_model,
        gpu_memory_bytes=gpu_memory_bytes,
        gpus=gpu_devices(capacity, allocatable, gpu_model, gpu_memory_bytes, count),
        observed_at_s=observed_at_s,
    )


def node_removed(cluster: str, obj: object) -> NodeRemoved:
    """A deleted Node object as NodeRemoved."""
    meta = _metadata(obj, "Node")
    return NodeRemoved(cluster=cluster, name=meta["name"], sequence=0)


def _add(a: Resources, b: Resources) -> Resources:
    mig = dict(a.mig_devices)
    for profile, n in b.mig_devices:
        mig[profile] = mig.get(profile, 0) + n
    return Resources(
        cpu_millicores=a.cpu_millicores + b.cpu_millicores,
        memory_bytes=a.memory_bytes + b.memory_bytes,
        gpus=a.gpus + b.gpus,
        mig_devices=tuple(sorted(mig.items())),
        pods=a.pods + b.pods,
        ephemeral_storage_bytes=a.ephemeral_storage_bytes + b.ephemeral_storage_bytes,
    )


def _max(a: Resources, b: Resources) -> Resources:
    mig = dict(a.mig_devices)
    for profile, n in b.mig_devices:
        mig[profile] = max(mig.get(profile, 0), n)
    return Resources(
        cpu_millicores=max(a.cpu_millicores, b.cpu_millicores),
        memory_bytes=max(a.memory_bytes, b.memory_bytes),
        gpus=max(a.gpus, b.gpus),
        mig_devices=tuple(sorted(mig.items())),
        pods=max(a.pods, b.pods),
        ephemeral_storage_bytes=max(a.ephemeral_storage_bytes, b.ephemeral_storage_bytes),
    )


def _container_requests(container: object, what: str) -> Resources:
    if not isinstance(container, dict):
        raise InvalidObject("bad-structure", f"{what}: expected an object")
    resources = _mapping(container.get("resources"), f"{what}.resources")
    requests = _mapping(resources.get("requests"), f"{what}.resources.requests")
    limits = _mapping(resources.get("limits"), f"{what}.resources.limits")
    # The API server defaults a missing request to the limit; do the same for objects
    # that did not pass through defaulting.
    merged = {**limits, **requests}
    return parse_resources(merged, what=f"{what}.resources")


def pod_requests(spec: Mapping[str, Any]) -> Resources:
    """The effective requests of a pod, as kube-scheduler computes them.

    max(sum of containers, largest init container) plus the pod overhead: init
    containers run one at a time before the others.
    """
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise InvalidObject("bad-structure", "spec.containers must be a non-empty list")
    total = Resources()
    for i, c in enumerate(containers):
        total = _add(total, _container_requests(c, f"spec.containers[{i}]"))
    inits = spec.get("initContainers")
    inits = [] if inits is None else inits
    if not isinstance(inits, list):
        raise InvalidObject("bad-structure", "spec.initContainers must be a list")
    for i, c in enumerate(inits):
        total = _max(total, _container_requests(c, f"spec.initContainers[{i}]"))
    overhead = parse_resources(spec.get("overhead"), what="spec.overhead")
    return _add(total, overhead)


def _pod_fields(
    obj: object,
) -> tuple[dict[str, Any], str, str, dict[str, Any], dict[str, Any], str, str]:
    """A Pod's validated (metadata, namespace, uid, spec, status, nodeName or '', phase)."""
    meta = _metadata(obj, "Pod")
    assert isinstance(obj, dict)
    namespace = meta.get("namespace")
    if not isinstance(namespace, str) or not _NAME_RE.match(namespace):
        raise InvalidObject("bad-name", f"Pod: metadata.namespace {namespace!r}")
    uid = meta.get("uid", "")
    if not isinstance(uid, str):
        raise InvalidObject("bad-structure", "Pod: metadata.uid must be a string")
    spec = _mapping(obj.get("spec"), "spec")
    status = _mapping(obj.get("status"), "status")
    node = spec.get("nodeName") or ""
    if not isinstance(node, str):
        raise InvalidObject("bad-structure", "spec.nodeName must be a string")
    phase = status.get("phase", "Pending")
    if phase not in POD_PHASES:
        raise InvalidObject("bad-structure", f"status.phase {phase!r}")
    return meta, namespace, uid, spec, status, node, phase


def pod_update(cluster: str, obj: object) -> PodObserved | PodRemoved | None:
    """A Pod object as PodObserved (bound, not terminated), PodRemoved (terminated) or
    None (not bound to a node yet: it holds nothing)."""
    meta, namespace, uid, spec, _status, node, phase = _pod_fields(obj)
    labels = _string_map(meta.get("labels"), "metadata.labels")
    requests = pod_requests(spec)
    if not node:
        return None
    sequence = sequence_of(resource_version(obj))
    if phase in TERMINAL_POD_PHASES:
        return PodRemoved(
            cluster=cluster, namespace=namespace, name=meta["name"], uid=uid, node=node,
            sequence=sequence,
        )  # fmt: skip
    return PodObserved(
        cluster=cluster,
        namespace=namespace,
        name=meta["name"],
        uid=uid,
        node=node,
        requests=requests,
        phase=phase,
        labels=labels_of(labels),
        sequence=sequence,
    )


def pod_removed(cluster: str, obj: object) -> PodRemoved | None:
    """A deleted Pod object as PodRemoved (None when it was never bound)."""
    meta = _metadata(obj, "Pod")
    assert isinstance(obj, dict)
    spec = _mapping(obj.get("spec"), "spec")
    node = spec.get("nodeName") or ""
    if not isinstance(node, str):
        raise InvalidObject("bad-structure", "spec.nodeName must be a string")
    if not node:
        return None
    namespace = meta.get("namespace")
    uid = meta.get("uid", "")
    if not isinstance(namespace, str) or not isinstance(uid, str):
        raise InvalidObject("bad-structure", "Pod: metadata.namespace / uid")
    return PodRemoved(
        cluster=cluster, namespace=namespace, name=meta["name"], uid=uid, node=node,
        sequence=sequence_of(resource_version(obj)),
    )  # fmt: skip


AFFINITY_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


def unschedulable(status: Mapping[str, Any]) -> bool:
    """Whether the scheduler marked the pod unschedulable (PodScheduled False, Unschedulable)."""
    conditions = status.get("conditions")
    if not isinstance(conditions, list):
        return False
    for cond in conditions:
        if isinstance(cond, dict) and cond.get("type") == "PodScheduled":
            return cond.get("status") == "False" and cond.get("reason") == "Unschedulable"
    return False


def parse_tolerations(raw: object, *, what: str = "spec.tolerations") -> tuple[PodToleration, ...]:
    """spec.tolerations as PodToleration values, in their original order."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidObject("bad-toleration", f"{what}: expected a list")
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise InvalidObject("bad-toleration", f"{what}: expected objects")
        key, op = item.get("key", ""), item.get("operator", "Equal") or "Equal"
        value, effect = item.get("value", ""), item.get("effect", "")
        if not all(isinstance(x, str) for x in (key, op, value, effect)):
            raise InvalidObject("bad-toleration", f"{what}: key, operator, value, effect")
        if op not in ("Equal", "Exists") or (effect and effect not in TAINT_EFFECTS):
            raise InvalidObject("bad-toleration", f"{what}: operator {op!r} / effect {effect!r}")
        if (op == "Equal" and not key) or (op == "Exists" and value):
            raise InvalidObject("bad-toleration", f"{what}: {op} with key {key!r} value {value!r}")
        out.append(PodToleration(key=key, operator=op, value=value, effect=effect))
    return tuple(out)


def parse_required_affinity(spec: Mapping[str, Any]) -> tuple[NodeRequirement, ...]:
    """The required node affinity of a pod spec as ANDed requirements.

    Only one nodeSelectorTerm is understood (terms are ORed; fleetd's PodSpec ANDs); with
    several, none is kept (the plan may then ask for a node the pod cannot use, never
    miss one it can). matchFields and preferred terms are ignored.
    """
    affinity = _mapping(spec.get("affinity"), "spec.affinity")
    node = _mapping(affinity.get("nodeAffinity"), "spec.affinity.nodeAffinity")
    required = _mapping(
        node.get("requiredDuringSchedulingIgnoredDuringExecution"),
        "spec.affinity.nodeAffinity.required",
    )
    terms = required.get("nodeSelectorTerms")
    if terms is None:
        return ()
    if not isinstance(terms, list):
        raise InvalidObject("bad-affinity", "nodeSelectorTerms: expected a list")
    if len(terms) != 1:
        return ()
    term = _mapping(terms[0], "nodeSelectorTerms[0]")
    exprs = term.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise InvalidObject("bad-affinity", "matchExpressions: expected a list")
    out = []
    for expr in exprs:
        if not isinstance(expr, dict):
            raise InvalidObject("bad-affinity", "matchExpressions: expected objects")
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if not isinstance(key, str) or not key or op not in AFFINITY_OPERATORS:
            if op in ("Gt", "Lt") and isinstance(key, str):
                continue  # not understood: dropped (see above)
            raise InvalidObject("bad-affinity", f"matchExpressions: key {key!r} operator {op!r}")
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise InvalidObject("bad-affinity", f"matchExpressions {key!r}: values")
        if (op in ("In", "NotIn")) != bool(values):
            raise InvalidObject("bad-affinity", f"matchExpressions {key!r}: {op} and values")
        out.append(NodeRequirement(key=key, operator=op, values=tuple(sorted(set(values)))))
    return tuple(out)


def pending_pod(cluster: str, obj: object) -> PendingPod | PendingPodRemoved:
    """A Pod object as PendingPod when it is unbound, not terminated and marked
    Unschedulable by the scheduler; otherwise PendingPodRemoved (it is not pending work)."""
    meta, namespace, uid, spec, status, node, phase = _pod_fields(obj)
    sequence = sequence_of(resource_version(obj))
    if node or phase in TERMINAL_POD_PHASES or not unschedulable(status):
        return PendingPodRemoved(cluster, namespace, meta["name"], sequence=sequence)
    priority = spec.get("priority", 0)
    if priority is None:
        priority = 0
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise InvalidObject("bad-structure", "spec.priority must be an integer")
    return PendingPod(
        cluster=cluster,
        namespace=namespace,
        name=meta["name"],
        uid=uid,
        requests=pod_requests(spec),
        node_selector=labels_of(_string_map(spec.get("nodeSelector"), "spec.nodeSelector")),
        affinity=parse_required_affinity(spec),
        tolerations=parse_tolerations(spec.get("tolerations")),
        priority=priority,
        sequence=sequence,
    )


def pending_pod_removed(cluster: str, obj: object) -> PendingPodRemoved:
    """A deleted (or no longer unbound) Pod object as PendingPodRemoved."""
    meta = _metadata(obj, "Pod")
    namespace = meta.get("namespace")
    if not isinstance(namespace, str):
        raise InvalidObject("bad-structure", "Pod: metadata.namespace")
    return PendingPodRemoved(
        cluster, namespace, meta["name"], sequence=sequence_of(resource_version(obj))
    )
