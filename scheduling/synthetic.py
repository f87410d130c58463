"""Seeded synthetic fleets and workloads, for benchmarks, the demo and tests.

The fleet: 8 clusters, 3 zones each, racks (NVLink/switch domains) of 16 nodes, GPU nodes
with 8 GPUs of 4 models (A100, H100, V100, T4) plus CPU-only nodes, node pools and labels,
taints on some nodes, a few cordoned / unhealthy / stale nodes and unhealthy GPUs.

The workload is openb-like (Alibaba cluster-trace-gpu-v2023, as used by FGD): CPU-only pods,
fractional GPU shares, 1/2/4/8-GPU pods, some model-constrained, selector-constrained,
tolerating taints or limited to clusters, and gangs of 8-GPU workers with topology
requirements. Pods are drawn from a catalog of shapes with Zipf-like popularity, as real
workloads repeat a few popular shapes.

Everything is drawn from the `numpy.random.Generator` passed in.
"""

from __future__ import annotations

import numpy as np

from scheduling.fleet import Fleet, NodeSpec, Taint
from scheduling.workload import (
    GangSpec,
    LabelOp,
    LabelRequirement,
    PodSpec,
    QueueItem,
    Toleration,
    TopologyLevel,
)

GIB = 1 << 30
GPU_MODELS = ("A100", "H100", "V100", "T4")
GPU_MODEL_WEIGHTS = (0.35, 0.25, 0.2, 0.2)
GPU_MEMORY_MIB = {"A100": 81_920, "H100": 81_920, "V100": 32_768, "T4": 16_384}
DEDICATED = Taint("dedicated", "ml", "NoSchedule")
SPOT = Taint("spot", "true", "NoExecute")


def synthetic_nodes(
    n_nodes: int, rng: np.random.Generator, *, clusters: int = 8, gpu_fraction: float = 0.8
) -> list[NodeSpec]:
    """`n_nodes` heterogeneous node specs (deterministic for a given generator state)."""
    is_gpu = rng.random(n_nodes) < gpu_fraction
    model = rng.choice(len(GPU_MODELS), n_nodes, p=GPU_MODEL_WEIGHTS)
    cores = rng.choice([64, 96, 128], n_nodes)
    mem_gib = rng.choice([256, 512, 1024], n_nodes)
    roll = rng.random((n_nodes, 6))
    out = []
    for i in range(n_nodes):
        cluster = i % clusters
        within = i // clusters
        zone = within % 3
        rack = within // (3 * 16)
        gpu = bool(is_gpu[i])
        m = GPU_MODELS[int(model[i])]
        taints: tuple[Taint, ...] = ()
        if gpu and roll[i, 0] < 0.10:
            taints = (DEDICATED,)
        elif roll[i, 0] > 0.97:
            taints = (SPOT,)
        out.append(
            NodeSpec(
                name=f"c{cluster}-z{zone}-n{within:06d}",
                cluster=f"c{cluster}",
                zone=f"z{zone}",
                rack=f"r{rack}",
                node_pool=("gpu-" + m.lower()) if gpu else "cpu",
                cpu_millicores=int(cores[i]) * 1000,
                memory_bytes=int(mem_gib[i]) * GIB,
                gpu_count=8 if gpu else 0,
                gpu_model=m if gpu else "",
                gpu_memory_mib=GPU_MEMORY_MIB[m] if gpu else 0,
                labels={
                    "pool": ("gpu-" + m.lower()) if gpu else "cpu",
                    "tier": "prod" if roll[i, 1] < 0.6 else "batch",
                    **({"ssd": "true"} if roll[i, 2] < 0.3 else {}),
                },
                taints=taints,
                cordoned=bool(roll[i, 3] < 0.005),
                unhealthy=bool(roll[i, 4] < 0.003),
                stale=bool(roll[i, 5] < 0.002),
            )
        )
    return out


def synthetic_fleet(
    n_nodes: int, rng: np.random.Generator, *, clusters: int = 8, max_gpus: int = 8
) -> Fleet:
    """A fleet of `synthetic_nodes`, with 0.5 % of GPU nodes having one unhealthy GPU."""
    fleet = Fleet(max_gpus=max_gpus, initial_capacity=max(1024, n_nodes))
    for spec in synthetic_nodes(n_nodes, rng, clusters=clusters):
        fleet.add_node(spec)
        if spec.gpu_count and rng.random() < 0.005:
            fleet.set_gpu_health(spec.name, int(rng.integers(spec.gpu_count)), healthy=False)
    return fleet


def _shape(rng: np.random.Generator, clusters: int) -> PodSpec:
    kind = rng.choice(6, p=[0.15, 0.35, 0.35, 0.08, 0.04, 0.03])
    num_gpu = [0, 0, 1, 2, 4, 8][kind]
    gpu_milli = int(rng.choice([100, 200, 250, 300, 400, 500, 600, 700])) if kind == 1 else 0
    cpu = int(rng.choice([500, 1000, 2000, 4000, 8000, 16000]))
    mem = int(rng.choice([1, 2, 4, 8, 16, 32, 64])) * GIB
    gpu_models: tuple[str, ...] = ()
    if (num_gpu or gpu_milli) and rng.random() < 0.15:
        gpu_models = tuple(rng.choice(GPU_MODELS, int(rng.integers(1, 3)), replace=False).tolist())
    selector: dict[str, str] = {}
    affinity: tuple[LabelRequirement, ...] = ()
    r = rng.random()
    if r < 0.05:
        selector = {"tier": "prod"}
    elif r < 0.10:
        affinity = (LabelRequirement("ssd", LabelOp.EXISTS),)
    elif r < 0.12:
        affinity = (LabelRequirement("pool", LabelOp.NOT_IN, ("cpu",)),)
    tolerations: tuple[Toleration, ...] = ()
    if rng.random() < 0.10:
        tolerations = (Toleration("dedicated", "Equal", "ml", "NoSchedule"),)
    allowed: tuple[str, ...] = ()
    if rng.random() < 0.2:
        k = int(rng.integers(1, 4))
        allowed = tuple(f"c{c}" for c in rng.choice(clusters, k, replace=False).tolist())
    return PodSpec(
        "shape",
        cpu_millicores=cpu,
        memory_bytes=mem,
        num_gpu=num_gpu,
        gpu_milli=gpu_milli,
        gpu_models=gpu_models,
        node_selector=selector,
        affinity=affinity,
        tolerations=tolerations,
        clusters=allowed,
    )


def synthetic_workload(
    n_pods: int,
    rng: np.random.Generator,
    *,
    n_shapes: int = 300,
    clusters: int = 8,
    gang_fraction: float = 0.02,
) -> list[QueueItem]:
    """About `n_pods` pods (gang members included) drawn from `n_shapes` shapes."""
    shapes = [_shape(rng, clusters) for _ in range(n_shapes)]
    popularity = 1.0 / np.arange(1, n_shapes + 1) ** 0.8
    popularity /= popularity.sum()
    items: list[QueueItem] = []
    count = 0
    gang_id = 0
    drawn = rng.choice(n_shapes, n_pods, p=popularity)
    priorities = rng.choice([0, 1, 2], n_pods, p=[0.8, 0.15, 0.05])
    gang_roll = rng.random(n_pods)
    i = 0
    while count < n_pods:
        if gang_roll[i] < gang_fraction / 8:
            size = int(rng.choice([2, 4, 8, 16]))
            gpus = int(rng.choice([4, 8]))
            member = PodSpec("m", cpu_millicores=8000, memory_bytes=64 * GIB, num_gpu=gpus)
            required = TopologyLevel(int(rng.choice([0, 1])))
            items.append(
                GangSpec(
                    f"gang-{gang_id}",
                    tuple(
                        PodSpec(
                            f"gang-{gang_id}-w{j}",
                            cpu_millicores=member.cpu_millicores,
                            memory_bytes=member.memory_bytes,
                            num_gpu=gpus,
                        )
                        for j in range(size)
                    ),
                    required_level=required,
                    preferred_level=TopologyLevel.RACK,
                    priority=int(priorities[i]),
                )
            )
            gang_id += 1
            count += size
        else:
            s = shapes[int(drawn[i])]
            items.append(
                PodSpec(
                    f"pod-{i}",
                    cpu_millicores=s.cpu_millicores,
                    memory_bytes=s.memory_bytes,
                    num_gpu=s.num_gpu,
                    gpu_milli=s.gpu_milli,
                    gpu_models=s.gpu_models,
                    node_selector=s.node_selector,
                    affinity=s.affinity,
                    tolerations=s.tolerations,
                    clusters=s.clusters,
                    priority=int(priorities[i]),
                )
            )
            count += 1
        i += 1  # count >= i, so the draws never run out
    return items
