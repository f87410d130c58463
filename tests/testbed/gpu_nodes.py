"""Manifests of fake GPU nodes that kwok manages, shaped like real NVIDIA GPU nodes.

The labels follow what the NVIDIA GPU feature discovery / GPU operator put on real nodes
(``nvidia.com/gpu.product``, ``.count``, ``.memory`` in MiB), plus the well-known zone
label and Karpenter's node-pool label. Capacity and allocatable differ the way a kubelet
reports them: allocatable = capacity - system/kube reserved - eviction threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: kwok manages nodes carrying this annotation (``--manage-nodes-with-annotation-selector``).
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_ANNOTATION_VALUE = "fake"
#: The taint kwok nodes carry so that only pods meant for them land there.
KWOK_TAINT: dict[str, str] = {"key": KWOK_ANNOTATION, "value": "fake", "effect": "NoSchedule"}
#: Toleration for :data:`KWOK_TAINT`, for pod specs in tests.
KWOK_TOLERATION: dict[str, str] = {
    "key": KWOK_ANNOTATION,
    "operator": "Equal",
    "value": "fake",
    "effect": "NoSchedule",
}
#: Node-pool label (Karpenter's).
NODEPOOL_LABEL = "karpenter.sh/nodepool"
ZONE_LABEL = "topology.kubernetes.io/zone"
GPU_RESOURCE = "nvidia.com/gpu"

#: Memory per GPU in MiB as GPU feature discovery reports it (``nvidia.com/gpu.memory``).
GPU_MEMORY_MIB: dict[str, int] = {
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-H200": 143771,
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-A100-SXM4-40GB": 40960,
    "NVIDIA-L40S": 46068,
    "NVIDIA-L4": 23034,
    "NVIDIA-A10G": 23028,
    "Tesla-T4": 15360,
}

_GIB = 1024**3
_MIB = 1024**2
#: kubelet's default hard eviction threshold (memory.available<100Mi).
_EVICTION_BYTES = 100 * _MIB


def gpu_node_manifest(
    name: str,
    *,
    gpus: int = 8,
    product: str = "NVIDIA-H100-80GB-HBM3",
    zone: str = "us-east-1a",
    pool: str = "gpu-default",
    cpu_millicores: int | None = None,
    memory_bytes: int | None = None,
    pods: int = 110,
    gpu_memory_mib: int | None = None,
    taints: Sequence[Mapping[str, str]] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A Node object (as a dict) for kwok, with GPU capacity, GPU labels and the kwok taint.

    - ``cpu_millicores`` / ``memory_bytes`` are the *capacity*; they default to 24 cores and
      256 GiB per GPU (an 8-GPU node has 192 cores, 2 TiB: a p5.48xlarge-like shape) and
      4 cores / 16 GiB for a node without GPUs.
    - allocatable keeps back 1 % of CPU (at least 100 m) and 2 % of memory plus the 100 MiB
      eviction threshold, as a kubelet with system/kube reservations would.
    - ``taints`` are added after the kwok taint (pass e.g. ``{"key": "nvidia.com/gpu",
      "value": "present", "effect": "NoSchedule"}``); ``labels`` are merged last and win.
    """
    if gpus < 0 or pods <= 0:
        raise ValueError(f"gpus must be >= 0 and pods > 0, got gpus={gpus}, pods={pods}")
    if gpus and gpu_memory_mib is None:
        if product not in GPU_MEMORY_MIB:
            raise ValueError(
                f"unknown GPU product {product!r}: pass gpu_memory_mib "
                f"(known: {', '.join(sorted(GPU_MEMORY_MIB))})"
            )
        gpu_memory_mib = GPU_MEMORY_MIB[product]
    cpu_m = cpu_millicores if cpu_millicores is not None else (24_000 * gpus or 4_000)
    mem_b = memory_bytes if memory_bytes is not None else (256 * _GIB * gpus or 16 * _GIB)
    alloc_cpu_m = cpu_m - max(100, cpu_m // 100)
    alloc_mem_b = mem_b - mem_b // 50 - _EVICTION_BYTES
    if alloc_cpu_m <= 0 or alloc_mem_b <= 0:
        raise ValueError(f"node {name}: capacity too small ({cpu_m}m CPU, {mem_b} bytes)")

    node_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        ZONE_LABEL: zone,
        "topology.kubernetes.io/region": zone.rstrip("abcdefghijklmnopqrstuvwxyz") or zone,
        NODEPOOL_LABEL: pool,
    }
    if gpus:
        node_labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.memory": str(gpu_memory_mib),
        }
    node_labels |= dict(labels or {})

    capacity = {
        "cpu": f"{cpu_m}m",
        "memory": str(mem_b),
        "pods": str(pods),
        "ephemeral-storage": str(500 * _GIB),
    }
    allocatable = capacity | {"cpu": f"{alloc_cpu_m}m", "memory": str(alloc_mem_b)}
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
        allocatable[GPU_RESOURCE] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": node_labels,
            "annotations": {
                KWOK_ANNOTATION: KWOK_ANNOTATION_VALUE,
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": {"taints": [dict(KWOK_TAINT), *(dict(t) for t in taints or [])]},
        "status": {"capacity": capacity, "allocatable": allocatable},
    }
