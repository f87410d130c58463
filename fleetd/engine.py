"""The daemon's adapter in front of the placement core (`scheduling`).

The state owner (`fleetd.state`) is this module's only caller, always from its serialized
path. It translates the daemon's validated values into the core's (`scheduling.PodSpec`,
`GangSpec`, `NodeSpec`), runs `scheduling.place` (which never mutates) and returns what
the state needs to commit: one `scheduling.Allocation` per pod, or the reasons why not.
Every placement, dry run and "would it fit an empty fleet" question goes through the same
packer (STYLE.md: one packer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

import scheduling
from scheduling import Allocation, Fleet, Policy, TopologyLevel
from scheduling.explain import REASON_TEXT, Reason
from scheduling.fleet import FLAG_CORDONED, FLAG_STALE, FLAG_UNHEALTHY

GPU_MILLI = scheduling.GPU_MILLI
#: Label every node carries with its pool name, so that a pool scope is a node selector.
POOL_LABEL = "fleetd.io/pool"

Arr = npt.NDArray[Any]

GANG_LEVELS = {
    "": TopologyLevel.CLUSTER,
    "cluster": TopologyLevel.CLUSTER,
    "zone": TopologyLevel.ZONE,
    "rack": TopologyLevel.RACK,
    "node": TopologyLevel.NODE,
}


def node_key(cluster: str, node: str) -> str:
    """The core's node name: node names are unique per cluster, keys across the fleet."""
    return f"{cluster}/{node}"


@dataclass(frozen=True, slots=True)
class PodRequest:
    """One validated pod: either `gpu_count` whole GPUs or one `gpu_milli` share of one GPU."""

    name: str
    cpu_millicores: int
    memory_bytes: int
    gpu_count: int = 0
    gpu_milli: int = 0
    gpu_models: tuple[str, ...] = ()
    node_selector: tuple[tuple[str, str], ...] = ()  # sorted pairs: hashable
    tolerations: tuple[tuple[str, str, str, str], ...] = ()  # key, operator, value, effect


@dataclass(frozen=True, slots=True)
class Outcome:
    """A placement attempt: an allocation per pod, or None with the reasons.

    reasons: (code, nodes, text), node-level reasons most frequent first, then pod-level
    ones (gang) with nodes = 0.
    """

    allocations: tuple[Allocation, ...] | None
    nodes_total: int
    nodes_feasible: int
    reasons: tuple[tuple[str, int, str], ...]
    summary: str
    fits_empty_fleet: bool


def policy_of(spec: str, weights: Mapping[str, float]) -> Policy:
    """The core policy from config: `weights` when given, else the `spec` string."""
    return Policy.parse(dict(weights) if weights else spec)


def to_pod(req: PodRequest, *, priority: int, cluster: str, pool: str) -> scheduling.PodSpec:
    """The core's PodSpec of a request, with the workload's scope folded in."""
    selector = dict(req.node_selector)
    if pool:
        selector[POOL_LABEL] = pool
    return scheduling.PodSpec(
        name=req.name,
        cpu_millicores=req.cpu_millicores,
        memory_bytes=req.memory_bytes,
        num_gpu=req.gpu_count,
        gpu_milli=req.gpu_milli,
        gpu_models=req.gpu_models,
        node_selector=selector,
        tolerations=tuple(
            scheduling.Toleration(key=k, operator=op, value=v, effect=e)
            for k, op, v, e in req.tolerations
        ),
        priority=priority,
        clusters=(cluster,) if cluster else (),
    )


def place(
    fleet: Fleet,
    pods: Sequence[PodRequest],
    *,
    policy: Policy,
    name: str,
    gang: bool = False,
    same: str = "",
    cluster: str = "",
    pool: str = "",
    priority: int = 0,
) -> Outcome:
    """Place one workload (a pod, or a gang all or nothing). Never mutates `fleet`."""
    specs = tuple(to_pod(p, priority=priority, cluster=cluster, pool=pool) for p in pods)
    item: scheduling.PodSpec | scheduling.GangSpec
    if gang:
        item = scheduling.GangSpec(
            name=name, pods=specs, required_level=GANG_LEVELS[same], priority=priority
        )
    else:
        item = specs[0]
    result = scheduling.place(fleet, [item], policy)
    nodes_total = len(fleet)
    if result.n_placed == len(specs):
        allocs = tuple(a for a in result.allocations() if a is not None)
        return Outcome(allocs, nodes_total, nodes_total, (), "", True)
    reasons = [int(r) for r in result.reason]
    # Explain the first pod that failed on a node-level reason (a gang may fail as a whole).
    node_level = [i for i, r in enumerate(reasons) if 0 < r < Reason.NO_NODES]
    probe = specs[node_level[0]] if node_level else specs[0]
    expl = scheduling.explain(fleet, probe)
    out = [(r.name, count, REASON_TEXT[r]) for r, count in expl.counts]
    summary = expl.text()
    for code in sorted({r for r in reasons if r >= Reason.NO_NODES}):
        reason = Reason(code)
        out.append((reason.name, 0, REASON_TEXT[reason]))
        summary += f" {REASON_TEXT[reason].capitalize()}."
    return Outcome(
        allocations=None,
        nodes_total=nodes_total,
        nodes_feasible=expl.n_feasible,
        reasons=tuple(out),
        summary=summary,
        fits_empty_fleet=_fits_empty(fleet, item, policy),
    )


def _fits_empty(
    fleet: Fleet, item: scheduling.PodSpec | scheduling.GangSpec, policy: Policy
) -> bool:
    """Would the workload fit if nothing were allocated and every node were back?

    QUEUED (wait for capacity) versus UNSCHEDULABLE (never fits as the fleet stands).
    """
    empty = fleet.copy()
    n = empty.n_slots
    empty.cpu_allocated_millicores[:n] = 0
    empty.memory_allocated_bytes[:n] = 0
    exists = np.arange(empty.max_gpus)[None, :] < empty.gpu_count[:n, None]
    empty.gpu_free_milli[:n] = np.where(exists, GPU_MILLI, 0)
    # Stale and cordoned nodes come back; unhealthy GPUs (the mask) stay out.
    empty.flags[:n] &= np.uint8(~(FLAG_STALE | FLAG_CORDONED | FLAG_UNHEALTHY) & 0xFF)
    result = scheduling.place(empty, [item], policy)
    return bool(result.n_placed == len(result))


def gpu_allocated_milli(fleet: Fleet, slot: int) -> list[int]:
    """Allocated share of each GPU of a node, in thousandths."""
    count = int(fleet.gpu_count[slot])
    return [GPU_MILLI - int(f) for f in fleet.gpu_free_milli[slot, :count]]
