"""Tiny builders for scheduling tests: gpu_node(gpus=8, model="H100"), pod(gpu_milli=250)."""

from __future__ import annotations

from collections.abc import Iterable

from scheduling import Fleet, NodeSpec, PodSpec, Taint

GIB = 1 << 30


def gpu_node(
    name: str = "n0",
    *,
    gpus: int = 8,
    model: str = "H100",
    cluster: str = "c0",
    zone: str = "z0",
    rack: str = "r0",
    cpu_millicores: int = 64_000,
    memory_bytes: int = 512 * GIB,
    gpu_memory_mib: int = 81_920,
    labels: dict[str, str] | None = None,
    taints: Iterable[Taint] = (),
    **flags: bool,
) -> NodeSpec:
    """A GPU node (8 x H100, 64 cores, 512 GiB unless told otherwise)."""
    return NodeSpec(
        name=name,
        cluster=cluster,
        zone=zone,
        rack=rack,
        cpu_millicores=cpu_millicores,
        memory_bytes=memory_bytes,
        gpu_count=gpus,
        gpu_model=model if gpus else "",
        gpu_memory_mib=gpu_memory_mib if gpus else 0,
        labels=labels or {},
        taints=tuple(taints),
        **flags,
    )


def cpu_node(name: str = "cpu0", **kw: object) -> NodeSpec:
    """A node without GPUs."""
    return gpu_node(name, gpus=0, **kw)  # type: ignore[arg-type]


def fleet_of(*nodes: NodeSpec, max_gpus: int = 8) -> Fleet:
    """A fleet holding `nodes` in slots 0, 1, 2, ..."""
    f = Fleet(max_gpus=max_gpus, initial_capacity=4)
    for n in nodes:
        f.add_node(n)
    return f


def pod(name: str = "p", **kw: object) -> PodSpec:
    """A pod; defaults to 1 core and 1 GiB."""
    kw.setdefault("cpu_millicores", 1000)
    kw.setdefault("memory_bytes", GIB)
    return PodSpec(name, **kw)  # type: ignore[arg-type]
