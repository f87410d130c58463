"""Request validation: protobuf in, the state's values out, or InvalidArgument naming the field.

Every check that can be made without fleet state happens here, so a bad request is refused
before it reaches the single writer. Limits come from the config's `limits` section.
"""

from __future__ import annotations

import re

from fleetd.config import GPU_MODEL_RE, LimitsConfig
from fleetd.engine import GPU_MILLI, PodRequest
from fleetd.state import WorkloadRequest, fingerprint
from fleetd.v1 import placement_pb2, types_pb2

#: Workload ids: printable, no spaces, up to 253 characters (a Kubernetes object name fits).
WORKLOAD_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,252}$")
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
LABEL_KEY_RE = re.compile(
    r"^([A-Za-z0-9.-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
GANG_TOPOLOGIES = ("", "cluster", "zone", "rack", "node")
TOLERATION_OPERATORS = ("", "Equal", "Exists")
TAINT_EFFECTS = ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
MAX_PRIORITY = 1_000_000
MAX_SELECTOR_TERMS = 64
MAX_GPU_MODELS = 64
MAX_TOLERATIONS = 64


class InvalidArgument(ValueError):
    """A request field is invalid: `field` is its path, e.g. 'workload.gang.pods[3].gpu_milli'."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def check_name(value: str, field: str, pattern: re.Pattern[str], what: str) -> None:
    """InvalidArgument naming `field` unless `value` matches `pattern` (a `what`)."""
    if not pattern.match(value):
        raise InvalidArgument(field, f"{value[:80]!r} is not a valid {what}")


def pod_request(
    pod: types_pb2.PodSpec, field: str, default_name: str, limits: LimitsConfig
) -> PodRequest:
    """Validate one PodSpec into a PodRequest."""
    name = pod.name or default_name
    check_name(name, f"{field}.name", NAME_RE, "pod name")
    if pod.cpu_millicores < 0:
        raise InvalidArgument(f"{field}.cpu_millicores", "must not be negative")
    if pod.cpu_millicores > limits.max_cpu_millicores:
        raise InvalidArgument(
            f"{field}.cpu_millicores", f"{pod.cpu_millicores} exceeds {limits.max_cpu_millicores}"
        )
    if pod.memory_bytes < 0:
        raise InvalidArgument(f"{field}.memory_bytes", "must not be negative")
    if pod.memory_bytes > limits.max_memory_bytes:
        raise InvalidArgument(
            f"{field}.memory_bytes", f"{pod.memory_bytes} exceeds {limits.max_memory_bytes}"
        )
    if pod.gpu_count > limits.max_gpus_per_pod:
        raise InvalidArgument(
            f"{field}.gpu_count", f"{pod.gpu_count} exceeds {limits.max_gpus_per_pod}"
        )
    if pod.gpu_milli >= GPU_MILLI:
        raise InvalidArgument(
            f"{field}.gpu_milli", f"a share of one GPU is 1..999 thousandths, got {pod.gpu_milli}"
        )
    if pod.gpu_milli and pod.gpu_count:
        raise InvalidArgument(
            f"{field}.gpu_milli", "set either gpu_count (whole GPUs) or gpu_milli (a share)"
        )
    if (
        pod.cpu_millicores == 0
        and pod.memory_bytes == 0
        and not pod.gpu_count
        and not pod.gpu_milli
    ):
        raise InvalidArgument(field, "requests no resources")
    if len(pod.gpu_models) > MAX_GPU_MODELS:
        raise InvalidArgument(f"{field}.gpu_models", f"more than {MAX_GPU_MODELS} models")
    for i, model in enumerate(pod.gpu_models):
        if not GPU_MODEL_RE.match(model):
            raise InvalidArgument(
                f"{field}.gpu_models[{i}]",
                f"{model[:80]!r} is not a GPU model name ([A-Za-z0-9][A-Za-z0-9._-]{{0,62}})",
            )
    if len(pod.node_selector) > MAX_SELECTOR_TERMS:
        raise InvalidArgument(f"{field}.node_selector", f"more than {MAX_SELECTOR_TERMS} terms")
    for key, value in sorted(pod.node_selector.items()):
        check_name(key, f"{field}.node_selector[{key[:80]!r}]", LABEL_KEY_RE, "label key")
        check_name(value, f"{field}.node_selector[{key!r}]", LABEL_VALUE_RE, "label value")
    if len(pod.tolerations) > MAX_TOLERATIONS:
        raise InvalidArgument(f"{field}.tolerations", f"more than {MAX_TOLERATIONS} tolerations")
    tolerations = []
    for i, t in enumerate(pod.tolerations):
        tf = f"{field}.tolerations[{i}]"
        if t.operator not in TOLERATION_OPERATORS:
            raise InvalidArgument(f"{tf}.operator", "must be Equal or Exists")
        if t.effect not in TAINT_EFFECTS:
            raise InvalidArgument(f"{tf}.effect", f"must be one of {TAINT_EFFECTS[1:]}")
        if t.key:
            check_name(t.key, f"{tf}.key", LABEL_KEY_RE, "taint key")
        elif t.operator != "Exists":
            raise InvalidArgument(f"{tf}.key", "an empty key needs operator Exists")
        if t.operator == "Exists" and t.value:
            raise InvalidArgument(f"{tf}.value", "must be empty with operator Exists")
        check_name(t.value, f"{tf}.value", LABEL_VALUE_RE, "taint value")
        tolerations.append((t.key, t.operator or "Equal", t.value, t.effect))
    return PodRequest(
        name=name,
        cpu_millicores=pod.cpu_millicores,
        memory_bytes=pod.memory_bytes,
        gpu_count=pod.gpu_count,
        gpu_milli=pod.gpu_milli,
        gpu_models=tuple(pod.gpu_models),
        node_selector=tuple(sorted(pod.node_selector.items())),
        tolerations=tuple(tolerations),
    )


def workload_request(
    workload: types_pb2.Workload, limits: LimitsConfig, ttl_s: float = 0.0, field: str = "workload"
) -> WorkloadRequest:
    """Validate a Workload (of a Place or Explain request) into a WorkloadRequest."""
    if not workload.workload_id:
        raise InvalidArgument(f"{field}.workload_id", "is required")
    check_name(workload.workload_id, f"{field}.workload_id", WORKLOAD_ID_RE, "workload id")
    if not workload.team:
        raise InvalidArgument(f"{field}.team", "is required")
    check_name(workload.team, f"{field}.team", NAME_RE, "team name")
    if not -MAX_PRIORITY <= workload.priority <= MAX_PRIORITY:
        raise InvalidArgument(f"{field}.priority", f"must be within +-{MAX_PRIORITY}")
    if workload.cluster:
        check_name(workload.cluster, f"{field}.cluster", NAME_RE, "cluster name")
    if workload.pool:
        check_name(workload.pool, f"{field}.pool", NAME_RE, "pool name")
    kind = workload.WhichOneof("spec")
    same = ""
    pods: tuple[PodRequest, ...]
    if kind == "pod":
        pods = (pod_request(workload.pod, f"{field}.pod", f"{workload.workload_id}-0", limits),)
    elif kind == "gang":
        gang = workload.gang
        if not gang.pods:
            raise InvalidArgument(f"{field}.gang.pods", "a gang needs at least one pod")
        if len(gang.pods) > limits.max_gang_pods:
            raise InvalidArgument(
                f"{field}.gang.pods", f"{len(gang.pods)} pods exceed {limits.max_gang_pods}"
            )
        if gang.same not in GANG_TOPOLOGIES:
            raise InvalidArgument(f"{field}.gang.same", f"must be one of {GANG_TOPOLOGIES}")
        same = gang.same
        pods = tuple(
            pod_request(p, f"{field}.gang.pods[{i}]", f"{workload.workload_id}-{i}", limits)
            for i, p in enumerate(gang.pods)
        )
        seen: dict[str, int] = {}
        for i, p in enumerate(pods):
            if p.name in seen:
                raise InvalidArgument(
                    f"{field}.gang.pods[{i}].name",
                    f"duplicate pod name {p.name!r} (also pods[{seen[p.name]}])",
                )
            seen[p.name] = i
    else:
        raise InvalidArgument(f"{field}.spec", "set pod or gang")
    return WorkloadRequest(
        workload_id=workload.workload_id,
        team=workload.team,
        priority=workload.priority,
        pods=pods,
        gang=kind == "gang",
        same=same,
        cluster=workload.cluster,
        pool=workload.pool,
        ttl_s=ttl_s,
        fingerprint=fingerprint(workload.SerializeToString(deterministic=True)),
    )


def place_request(
    request: placement_pb2.PlaceRequest, limits: LimitsConfig, max_ttl_s: float
) -> WorkloadRequest:
    """Validate a PlaceRequest."""
    if not request.HasField("workload"):
        raise InvalidArgument("workload", "is required")
    if request.ttl_s > max_ttl_s:
        raise InvalidArgument(
            "ttl_s", f"{request.ttl_s} exceeds reservations.max_ttl_s {max_ttl_s:g}"
        )
    return workload_request(request.workload, limits, float(request.ttl_s))
