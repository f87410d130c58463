"""Filters: vectorized masks over nodes, each tied to the reason code it reports.

A pod shape is first compiled against the fleet's interners (`compile_pod`: strings become
ids, tolerations become a bitmask of untolerated taints), then every filter is one numpy
expression over node columns. Static filters (node condition, cluster, labels, taints, GPU
model and memory) depend only on node attributes; resource filters depend on free
resources, which the placement engine keeps in its own scratch arrays (`Free`).
Nothing here mutates the fleet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from scheduling.explain import Explanation, Reason
from scheduling.fleet import FLAG_CORDONED, FLAG_STALE, FLAG_UNHEALTHY, GPU_MILLI, Fleet
from scheduling.workload import LabelOp, PodSpec

Rows = NDArray[np.int64]
Mask = NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class Constraints:
    """A pod shape compiled against one fleet (ids valid for that fleet's interners).

    cluster_ids / model_ids: allowed ids, None = any. requirements: (label key id or -1 if
    the key is unknown to the fleet, op, allowed value ids). untolerated: (words,) uint64
    bits of the fleet's blocking taints this pod does not tolerate.
    """

    pod: PodSpec
    cluster_ids: NDArray[np.int32] | None
    model_ids: NDArray[np.int16] | None
    requirements: tuple[tuple[int, LabelOp, NDArray[np.int32]], ...]
    untolerated: NDArray[np.uint64]
    cpu_millicores: int
    memory_bytes: int
    gpus_per_pod: int
    milli_per_gpu: int
    gpu_memory_min_mib: int


def compile_pod(fleet: Fleet, pod: PodSpec) -> Constraints:
    """Translate a pod's strings into the fleet's ids once, for vectorized filtering."""
    cluster_ids = None
    if pod.clusters:
        cluster_ids = np.array([fleet.clusters.get(c) for c in pod.clusters], np.int32)
    model_ids = None
    if pod.gpu_models:
        model_ids = np.array([fleet.gpu_models.get(m) for m in pod.gpu_models], np.int16)
    reqs = []
    for req in pod.requirements():
        values = np.array([fleet.label_values_interner.get(v) for v in req.values], np.int32)
        reqs.append((fleet.label_keys.get(req.key), req.op, values[values >= 0]))
    words = fleet.taint_bits.shape[1]
    untolerated = np.zeros(words, np.uint64)
    for tid, taint in enumerate(fleet.taints):
        if not any(t.tolerates(taint.key, taint.value, taint.effect) for t in pod.tolerations):
            untolerated[tid // 64] |= np.uint64(1 << (tid % 64))
    return Constraints(
        pod=pod,
        cluster_ids=cluster_ids,
        model_ids=model_ids,
        requirements=tuple(reqs),
        untolerated=untolerated,
        cpu_millicores=pod.cpu_millicores,
        memory_bytes=pod.memory_bytes,
        gpus_per_pod=pod.gpus_per_pod,
        milli_per_gpu=pod.milli_per_gpu,
        gpu_memory_min_mib=pod.gpu_memory_min_mib,
    )


def _row_sum(a: NDArray[Any]) -> NDArray[np.int64]:
    # (R, G) -> (R,): an integer product with ones (numpy reduces a short last axis slowly).
    g = a.shape[1]
    ones = _ONES.get(g)
    if ones is None:
        ones = _ONES[g] = np.ones(g, np.int64)
        ones.flags.writeable = False
    return np.asarray(a @ ones, np.int64)


_ONES: dict[int, NDArray[np.int64]] = {}


def _row_any(a: NDArray[np.bool_]) -> Mask:
    return np.asarray(_row_sum(a) > 0, np.bool_)


def _isin(col: NDArray[np.int32], values: NDArray[np.int32]) -> Mask:
    # A handful of values: chained == beats np.isin's sort for small sets.
    if values.size == 0:
        return np.zeros(col.shape, bool)
    out = col == values[0]
    for v in values[1:]:
        out |= col == v
    return np.asarray(out, dtype=np.bool_)


# ---- static filters (node attributes) -------------------------------------------------


def filter_schedulable(fleet: Fleet, c: Constraints, rows: Rows) -> Mask:
    """Node is not cordoned."""
    return np.asarray((fleet.flags[rows] & FLAG_CORDONED) == 0, dtype=np.bool_)


def filter_ready(fleet: Fleet, c: Constraints, rows: Rows) -> Mask:
    """Node is healthy and its telemetry is fresh."""
    return np.asarray((fleet.flags[rows] & (FLAG_UNHEALTHY | FLAG_STALE)) == 0, dtype=np.bool_)


def filter_cluster(fleet: Fleet, c: Constraints, rows: Rows) -> Mask:
    """Node is in one of the pod's allowed clusters (any if none given)."""
    if c.cluster_ids is None:
        return np.ones(rows.size, bool)
    return _isin(fleet.cluster_id[rows], c.cluster_ids)


def filter_node_affinity(fleet: Fleet, c: Constraints, rows: Rows) -> Mask:
    """Node labels satisfy every selector / required-affinity term (ANDed)."""
    ok = np.ones(rows.size, bool)
    for key_id, op, values in c.requirements:
        col = fleet.label_values.get(key_id) if key_id >= 0 else None
        if col is None:  # no node has this label key
            if op in (LabelOp.IN, LabelOp.EXISTS):
                ok[:] = False
            continue
        v = col[rows]
        if op is LabelOp.IN:
            ok &= _isin(v, values)
        elif op is LabelOp.NOT_IN:
            ok &= ~_isin(v, values)
        elif op is LabelOp.EXISTS:
            ok &= v >= 0
        else:
            ok &= v < 0
    return ok


def filter_taints(fleet: Fleet, c: Constraints, rows: Rows) -> Mask:
    """Node has no NoSchedule/NoExecute taint the pod does not tolerate."""
    words = min(c.untolerated.size, fleet.taint_bits.shape[1])
    bits = fleet.taint_bits[rows, :words] & c.untolerated[None, :words]
    return np.asarray(~bits.any(axis=1), dtype=np.bool_)


def filter_gpu_model(fleet: Fleet, c: Constraints, rows: Rows) -> Mask:
    """A GPU pod restricted to models only goes to GPU nodes of those models
    (nodes without GPUs pass here and fail on INSUFFICIENT_GPU)."""
    if c.model_ids is None or c.gpus_per_pod == 0:
        return np.ones(rows.size, bool)
    model = fleet.gpu_model_id[rows]
    return np.asarray(
        (model < 0) | _isin(model.astype(np.int32), c.model_ids.astype(np.int32)), dtype=np.bool_
    )


def filter_gpu_memory(fleet: Fleet, c: Constraints, rows: Rows) -> Mask:
    """Each GPU of a GPU node has at least the pod's minimum GPU memory."""
    if c.gpu_memory_min_mib == 0 or c.gpus_per_pod == 0:
        return np.ones(rows.size, bool)
    return np.asarray(
        (fleet.gpu_count[rows] == 0) | (fleet.gpu_memory_mib[rows] >= c.gpu_memory_min_mib),
        dtype=np.bool_,
    )


StaticFilter = Callable[[Fleet, Constraints, Rows], Mask]

#: Static filters in the order they run; a failing node is charged to the first.
STATIC_FILTERS: tuple[tuple[Reason, StaticFilter], ...] = (
    (Reason.NODE_UNSCHEDULABLE, filter_schedulable),
    (Reason.NODE_NOT_READY, filter_ready),
    (Reason.CLUSTER_NOT_ALLOWED, filter_cluster),
    (Reason.NODE_AFFINITY, filter_node_affinity),
    (Reason.UNTOLERATED_TAINT, filter_taints),
    (Reason.GPU_MODEL, filter_gpu_model),
    (Reason.GPU_MEMORY, filter_gpu_memory),
)


def static_key(c: Constraints) -> tuple[object, ...]:
    """What the static filters read from a pod: two constraints with equal keys pass or
    fail every static filter alike on every node of their fleet (keep in step with
    STATIC_FILTERS). Many shapes differ only in their requests: they share the key."""
    gpu = c.gpus_per_pod > 0
    return (
        None if c.cluster_ids is None else c.cluster_ids.tobytes(),
        tuple((key_id, op, values.tobytes()) for key_id, op, values in c.requirements),
        c.untolerated.tobytes(),
        None if c.model_ids is None or not gpu else c.model_ids.tobytes(),
        c.gpu_memory_min_mib if gpu else 0,
    )


def static_mask(fleet: Fleet, c: Constraints, rows: Rows | None = None) -> Mask:
    """(rows,) bool: the node passes every static filter (live slots only)."""
    if rows is None:
        rows = fleet.live_mask().nonzero()[0]
    ok = np.ones(rows.size, bool)
    for _, fn in STATIC_FILTERS:
        ok &= fn(fleet, c, rows)
    return ok


#: What a node's state can change (cordon, health, fresh telemetry): the static filters
#: that are not about where the pod may ever go.
_TRANSIENT = (Reason.NODE_UNSCHEDULABLE, Reason.NODE_NOT_READY)


def allowed_mask(fleet: Fleet, c: Constraints, rows: Rows | None = None) -> Mask:
    """(rows,) bool: the node is one the pod may ever go to (its cluster, selector and
    affinity, taints, GPU model and memory), whatever its cordon, health, freshness and
    load now. Live slots only."""
    if rows is None:
        rows = fleet.live_mask().nonzero()[0]
    ok = np.ones(rows.size, bool)
    for reason, fn in STATIC_FILTERS:
        if reason not in _TRANSIENT:
            ok &= fn(fleet, c, rows)
    return ok


# ---- resource filters (free resources, held by the engine) ----------------------------


@dataclass(eq=False)
class Free:
    """Free resources per slot, the engine's scratch copy of the fleet's usage.

    cpu_millicores, memory_bytes: (n_slots,) int64; gpu_milli: (n_slots, max_gpus) int32,
    0 for unhealthy or missing GPUs. Negative CPU/memory (shrunk node) fits nothing.
    """

    cpu_millicores: NDArray[np.int64]
    memory_bytes: NDArray[np.int64]
    gpu_milli: NDArray[np.int32]

    @classmethod
    def of(cls, fleet: Fleet) -> Free:
        """Snapshot the fleet's free resources."""
        n = fleet.n_slots
        return cls(
            cpu_millicores=fleet.cpu_allocatable_millicores[:n]
            - fleet.cpu_allocated_millicores[:n],
            memory_bytes=fleet.memory_allocatable_bytes[:n] - fleet.memory_allocated_bytes[:n],
            gpu_milli=fleet.usable_gpu_free_milli(),
        )

    def copy(self) -> Free:
        """An independent copy."""
        return Free(self.cpu_millicores.copy(), self.memory_bytes.copy(), self.gpu_milli.copy())


def filter_cpu(free: Free, c: Constraints, rows: Rows) -> Mask:
    """Enough free CPU."""
    return np.asarray(free.cpu_millicores[rows] >= c.cpu_millicores, dtype=np.bool_)


def filter_memory(free: Free, c: Constraints, rows: Rows) -> Mask:
    """Enough free memory."""
    return np.asarray(free.memory_bytes[rows] >= c.memory_bytes, dtype=np.bool_)


def filter_gpu_whole(free: Free, c: Constraints, rows: Rows) -> Mask:
    """Enough GPUs for the pod: `num_gpu` entirely free GPUs, or, for a share, any GPU at
    all (whether one has the share free is INSUFFICIENT_GPU_SHARE)."""
    if c.gpus_per_pod == 0:
        return np.ones(rows.size, bool)
    g = free.gpu_milli[rows]
    if c.milli_per_gpu < GPU_MILLI:
        return _row_any(g > 0)
    return np.asarray(_row_sum(g == GPU_MILLI) >= c.gpus_per_pod, dtype=np.bool_)


def filter_gpu_share(free: Free, c: Constraints, rows: Rows) -> Mask:
    """For a fractional pod: one GPU has the requested share free."""
    if c.gpus_per_pod == 0 or c.milli_per_gpu == GPU_MILLI:
        return np.ones(rows.size, bool)
    return _row_any(free.gpu_milli[rows] >= c.milli_per_gpu)


ResourceFilter = Callable[[Free, Constraints, Rows], Mask]

RESOURCE_FILTERS: tuple[tuple[Reason, ResourceFilter], ...] = (
    (Reason.INSUFFICIENT_CPU, filter_cpu),
    (Reason.INSUFFICIENT_MEMORY, filter_memory),
    (Reason.INSUFFICIENT_GPU, filter_gpu_whole),
    (Reason.INSUFFICIENT_GPU_SHARE, filter_gpu_share),
)


def pod_capacity(free: Free, c: Constraints, rows: Rows, limit: int) -> NDArray[np.int64]:
    """(rows,) int64: how many more pods of this shape fit on each node, capped at `limit`.

    Exact for identical pods: a share `m` fits floor(free_i / m) times on GPU i whatever
    order the GPUs are chosen in; whole-GPU pods need `num_gpu` entirely free GPUs each.
    """
    cap = np.empty(rows.size, np.int64)
    cap.fill(limit)
    if c.cpu_millicores:
        np.minimum(cap, free.cpu_millicores[rows] // c.cpu_millicores, out=cap)
    else:
        cap[free.cpu_millicores[rows] < 0] = 0
    if c.memory_bytes:
        np.minimum(cap, free.memory_bytes[rows] // c.memory_bytes, out=cap)
    else:
        cap[free.memory_bytes[rows] < 0] = 0
    if c.gpus_per_pod:
        g = free.gpu_milli[rows]
        if c.milli_per_gpu < GPU_MILLI:
            gcap = _row_sum(g // c.milli_per_gpu)
        else:
            gcap = _row_sum(g == GPU_MILLI) // c.gpus_per_pod
        np.minimum(cap, gcap, out=cap)
    np.maximum(cap, 0, out=cap)
    return cap


def static_profiles(fleet: Fleet, rows: Rows) -> tuple[Rows, Rows]:
    """Group `rows` by everything the static filters read (condition flags, cluster, every
    label, blocking taints, GPU model, count and memory): nodes of one profile pass or fail
    each static filter together, so a shape's filters need evaluating once per profile.

    Returns (one representative row per profile, in order of first appearance; the
    profile index of each row). Keep in step with STATIC_FILTERS.
    """
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cols = [
        (fleet.flags[rows] & (FLAG_CORDONED | FLAG_UNHEALTHY | FLAG_STALE)).astype(np.int64),
        fleet.cluster_id[rows].astype(np.int64),
        fleet.gpu_model_id[rows].astype(np.int64),
        fleet.gpu_count[rows].astype(np.int64),
        fleet.gpu_memory_mib[rows].astype(np.int64),
    ]
    cols.extend(fleet.label_values[k][rows].astype(np.int64) for k in sorted(fleet.label_values))
    cols.extend(fleet.taint_bits[rows, w].view(np.int64) for w in range(fleet.taint_bits.shape[1]))
    keys = np.ascontiguousarray(np.stack(cols, axis=1))
    flat = keys.view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
    by_first = first.argsort(kind="stable")
    renumber = np.empty(first.size, np.int64)
    renumber[by_first] = np.arange(first.size, dtype=np.int64)
    return rows[first[by_first]].astype(np.int64), renumber[inverse.reshape(-1)]


def static_first_failure(fleet: Fleet, c: Constraints, rows: Rows) -> NDArray[np.int16]:
    """(rows,) int16: the first static filter each node fails, 0 if it passes them all."""
    out = np.zeros(rows.size, np.int16)
    for reason, sfn in STATIC_FILTERS:
        out[(out == 0) & ~sfn(fleet, c, rows)] = reason
    return out


def resource_first_failure(free: Free, c: Constraints, rows: Rows) -> NDArray[np.int16]:
    """(rows,) int16: the first resource filter each node fails, 0 if the pod fits."""
    out = np.zeros(rows.size, np.int16)
    for reason, rfn in RESOURCE_FILTERS:
        out[(out == 0) & ~rfn(free, c, rows)] = reason
    return out


def first_failure(
    fleet: Fleet, c: Constraints, free: Free, rows: Rows | None = None
) -> NDArray[np.int16]:
    """(rows,) int16: the first reason each node fails for this pod, 0 if it fits."""
    if rows is None:
        rows = fleet.live_mask().nonzero()[0]
    out = static_first_failure(fleet, c, rows)
    ok = out == 0
    out[ok] = resource_first_failure(free, c, rows[ok])
    return out


def explain_pod(fleet: Fleet, pod: PodSpec, free: Free | None = None) -> Explanation:
    """Per-reason node counts for one pod against the fleet's current (or given) free state."""
    c = compile_pod(fleet, pod)
    return Explanation.from_first_failures(first_failure(fleet, c, free or Free.of(fleet)))
