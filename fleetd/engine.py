"""The daemon's adapter in front of the placement core: node table, allocate/free, place, explain.

The state owner (`fleetd.state`) is this module's only caller, always from its serialized
path. The adapter keeps the columnar node arrays, translates the daemon's value types into
what the core takes, and its results back. Check-then-commit: `place` never mutates,
`allocate` and `free` are exact inverses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: Node-indexed arrays (dtype documented at each use).
Arr = npt.NDArray[Any]

GPU_MILLI = 1000
#: Devices per node the table holds; larger nodes are refused by validation.
MAX_GPUS = 64


@dataclass(frozen=True, slots=True)
class PodRequest:
    """One pod to place: either `gpu_count` whole GPUs or one `gpu_milli` share of one GPU."""

    name: str
    cpu_millicores: int
    memory_bytes: int
    gpu_count: int = 0
    gpu_milli: int = 0
    gpu_models: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[tuple[str, str, str, str], ...] = ()  # key, operator, value, effect


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one pod goes: node index and device indices, with the per-GPU share."""

    node_index: int
    gpu_indices: tuple[int, ...]
    gpu_milli: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """Result of a placement attempt: slots for every pod, or None with reason counts."""

    slots: tuple[Slot, ...] | None
    nodes_total: int
    nodes_feasible: int
    reasons: tuple[tuple[str, int], ...]  # (code, nodes), most frequent first
    fits_empty_fleet: bool


REASON_TEXT = {
    "NODE_UNSCHEDULABLE": "node unschedulable (stale, cordoned or not ready)",
    "NOT_IN_SCOPE": "node outside the requested cluster or pool",
    "GPU_MODEL_MISMATCH": "GPU model not allowed",
    "NODE_SELECTOR_MISMATCH": "node selector does not match",
    "TAINT_NOT_TOLERATED": "untolerated taint",
    "INSUFFICIENT_CPU": "Insufficient cpu",
    "INSUFFICIENT_MEMORY": "Insufficient memory",
    "INSUFFICIENT_GPU": "Insufficient nvidia.com/gpu",
    "GANG_INCOMPLETE": "gang could not be placed as a whole",
}


class NodeTable:
    """Columnar node state. Arrays are indexed by node index; removed rows are reused.

    cpu_millicores, cpu_alloc: (n,) int64 millicores; memory_bytes, memory_alloc: (n,) int64;
    gpu_count: (n,) int32; gpu_alloc_milli: (n, MAX_GPUS) int32 thousandths per device;
    gpu_healthy: (n, MAX_GPUS) bool; present, schedulable: (n,) bool.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.index: dict[tuple[str, str], int] = {}
        self.names: list[tuple[str, str]] = []
        self.free_rows: list[int] = []
        self.meta: list[dict[str, object]] = []
        self._alloc(capacity)

    cpu_millicores: Arr
    cpu_alloc: Arr
    memory_bytes: Arr
    memory_alloc: Arr
    gpu_count: Arr
    gpu_alloc_milli: Arr
    gpu_healthy: Arr
    present: Arr
    schedulable: Arr

    _COLUMNS: tuple[tuple[str, tuple[int, ...], type], ...] = (
        ("cpu_millicores", (), np.int64),
        ("cpu_alloc", (), np.int64),
        ("memory_bytes", (), np.int64),
        ("memory_alloc", (), np.int64),
        ("gpu_count", (), np.int32),
        ("gpu_alloc_milli", (MAX_GPUS,), np.int32),
        ("gpu_healthy", (MAX_GPUS,), np.bool_),
        ("present", (), np.bool_),
        ("schedulable", (), np.bool_),
    )

    def _alloc(self, capacity: int) -> None:
        """(Re)allocate every column with room for `capacity` rows, keeping the old rows."""
        for name, tail, dtype in self._COLUMNS:
            new: Arr = np.zeros((capacity, *tail), dtype=dtype)
            old = getattr(self, name, None)
            if old is not None:
                new[: old.shape[0]] = old
            setattr(self, name, new)
        self.capacity = capacity

    # -- rows -------------------------------------------------------------------------------

    def upsert(
        self,
        cluster: str,
        node: str,
        *,
        cpu_millicores: int,
        memory_bytes: int,
        gpu_count: int,
        gpu_healthy: Sequence[bool],
        schedulable: bool,
        meta: dict[str, object],
    ) -> int:
        """Insert or update a node's capacity and attributes; allocations are kept."""
        key = (cluster, node)
        row = self.index.get(key)
        if row is None:
            if self.free_rows:
                row = self.free_rows.pop()
                self.names[row] = key
                self.meta[row] = meta
            else:
                row = len(self.names)
                if row >= self.capacity:
                    self._alloc(self.capacity * 2)
                self.names.append(key)
                self.meta.append(meta)
            self.index[key] = row
            self.cpu_alloc[row] = 0
            self.memory_alloc[row] = 0
            self.gpu_alloc_milli[row] = 0
        self.meta[row] = meta
        self.cpu_millicores[row] = cpu_millicores
        self.memory_bytes[row] = memory_bytes
        self.gpu_count[row] = gpu_count
        self.gpu_healthy[row] = False
        self.gpu_healthy[row, :gpu_count] = np.asarray(gpu_healthy[:gpu_count], dtype=np.bool_)
        self.present[row] = True
        self.schedulable[row] = schedulable
        return row

    def remove(self, cluster: str, node: str) -> int | None:
        """Drop a node (its allocations with it); returns its former row."""
        row = self.index.pop((cluster, node), None)
        if row is not None:
            self.present[row] = False
            self.schedulable[row] = False
            self.gpu_count[row] = 0
            self.gpu_alloc_milli[row] = 0
            self.cpu_alloc[row] = 0
            self.memory_alloc[row] = 0
            self.free_rows.append(row)
        return row

    def allocate(self, slot: Slot, cpu_millicores: int, memory_bytes: int) -> None:
        """Commit one pod's resources on its node (the exact inverse of `free`)."""
        self.cpu_alloc[slot.node_index] += cpu_millicores
        self.memory_alloc[slot.node_index] += memory_bytes
        for g in slot.gpu_indices:
            self.gpu_alloc_milli[slot.node_index, g] += slot.gpu_milli

    def free(self, slot: Slot, cpu_millicores: int, memory_bytes: int) -> None:
        """Return one pod's resources (the exact inverse of `allocate`)."""
        self.cpu_alloc[slot.node_index] -= cpu_millicores
        self.memory_alloc[slot.node_index] -= memory_bytes
        for g in slot.gpu_indices:
            self.gpu_alloc_milli[slot.node_index, g] -= slot.gpu_milli

    def fits_slot(self, slot: Slot, cpu_millicores: int, memory_bytes: int) -> bool:
        """Would this exact slot fit now (used when reloading reservations from the journal)."""
        n = slot.node_index
        if not self.present[n]:
            return False
        if self.cpu_alloc[n] + cpu_millicores > self.cpu_millicores[n]:
            return False
        if self.memory_alloc[n] + memory_bytes > self.memory_bytes[n]:
            return False
        for g in slot.gpu_indices:
            if g >= self.gpu_count[n] or self.gpu_alloc_milli[n, g] + slot.gpu_milli > GPU_MILLI:
                return False
        return True


def _node_attr_mask(table: NodeTable, pod: PodRequest) -> dict[str, Arr]:
    """Masks of the attribute filters (model, selector, taints) over every row."""
    n = len(table.names)
    masks: dict[str, Arr] = {}
    if pod.gpu_models:
        allowed = set(pod.gpu_models)
        masks["GPU_MODEL_MISMATCH"] = np.fromiter(
            (m.get("gpu_model") in allowed for m in table.meta), dtype=np.bool_, count=n
        )
    if pod.node_selector:
        sel = dict(pod.node_selector)

        def selected(m: dict[str, object]) -> bool:
            labels = m.get("labels")
            return isinstance(labels, Mapping) and all(labels.get(k) == v for k, v in sel.items())

        masks["NODE_SELECTOR_MISMATCH"] = np.fromiter(
            (selected(m) for m in table.meta), dtype=np.bool_, count=n
        )

    def tolerated(m: dict[str, object]) -> bool:
        taints = m.get("taints") or ()
        assert isinstance(taints, tuple)
        for t_key, t_value, t_effect in taints:
            if t_effect == "PreferNoSchedule":
                continue
            if not any(
                (key == t_key or (key == "" and op == "Exists"))
                and (op == "Exists" or value == t_value)
                and (effect in ("", t_effect))
                for key, op, value, effect in pod.tolerations
            ):
                return False
        return True

    masks["TAINT_NOT_TOLERATED"] = np.fromiter(
        (tolerated(m) for m in table.meta), dtype=np.bool_, count=n
    )
    return masks


def place(
    table: NodeTable,
    pods: Sequence[PodRequest],
    scope: Arr | None = None,
) -> Outcome:
    """Place every pod (all or nothing) on scratch copies of the allocations; never mutates.

    Best-fit: each pod goes to the feasible node leaving the fewest free GPUs (then the least
    free CPU), lowest index on ties; a GPU share goes to the fullest device it fits on.
    """
    n = len(table.names)
    cpu_alloc = table.cpu_alloc[:n].copy()
    mem_alloc = table.memory_alloc[:n].copy()
    gpu_alloc = table.gpu_alloc_milli[:n].copy()
    slots: list[Slot] = []
    base = table.present[:n] & table.schedulable[:n]
    in_scope = np.ones(n, dtype=np.bool_) if scope is None else scope[:n]
    for pod in pods:
        slot, reasons, feasible = _place_one(
            table, pod, base, in_scope, cpu_alloc, mem_alloc, gpu_alloc
        )
        if slot is None:
            return Outcome(
                slots=None,
                nodes_total=int(table.present[:n].sum()),
                nodes_feasible=feasible,
                reasons=reasons if len(pods) == 1 else (*reasons, ("GANG_INCOMPLETE", len(slots))),
                fits_empty_fleet=_fits_empty(table, pods, in_scope),
            )
        cpu_alloc[slot.node_index] += pod.cpu_millicores
        mem_alloc[slot.node_index] += pod.memory_bytes
        for g in slot.gpu_indices:
            gpu_alloc[slot.node_index, g] += slot.gpu_milli
        slots.append(slot)
    total = int(table.present[:n].sum())
    return Outcome(tuple(slots), total, total, (), True)


def _fits_empty(table: NodeTable, pods: Sequence[PodRequest], in_scope: Arr) -> bool:
    n = len(table.names)
    base = table.present[:n].copy()
    zeros_cpu = np.zeros(n, dtype=np.int64)
    zeros_mem = np.zeros(n, dtype=np.int64)
    zeros_gpu = np.zeros((n, MAX_GPUS), dtype=np.int32)
    for pod in pods:
        slot, _, _ = _place_one(table, pod, base, in_scope, zeros_cpu, zeros_mem, zeros_gpu)
        if slot is None:
            return False
        zeros_cpu[slot.node_index] += pod.cpu_millicores
        zeros_mem[slot.node_index] += pod.memory_bytes
        for g in slot.gpu_indices:
            zeros_gpu[slot.node_index, g] += slot.gpu_milli
    return True


def _place_one(
    table: NodeTable,
    pod: PodRequest,
    base: Arr,
    in_scope: Arr,
    cpu_alloc: Arr,
    mem_alloc: Arr,
    gpu_alloc: Arr,
) -> tuple[Slot | None, tuple[tuple[str, int], ...], int]:
    n = len(table.names)
    healthy = table.gpu_healthy[:n]
    stages: list[tuple[str, Arr]] = [
        ("NODE_UNSCHEDULABLE", base),
        ("NOT_IN_SCOPE", in_scope),
        *_node_attr_mask(table, pod).items(),
        ("INSUFFICIENT_CPU", cpu_alloc + pod.cpu_millicores <= table.cpu_millicores[:n]),
        ("INSUFFICIENT_MEMORY", mem_alloc + pod.memory_bytes <= table.memory_bytes[:n]),
    ]
    if pod.gpu_count > 0:
        free_whole = ((gpu_alloc == 0) & healthy).sum(axis=1)
        stages.append(("INSUFFICIENT_GPU", np.asarray(free_whole >= pod.gpu_count)))
    elif pod.gpu_milli > 0:
        fits_dev = healthy & (gpu_alloc + pod.gpu_milli <= GPU_MILLI)
        stages.append(("INSUFFICIENT_GPU", np.asarray(fits_dev.any(axis=1))))
    alive = np.ones(n, dtype=np.bool_)
    counts: dict[str, int] = {}
    for code, mask in stages:
        rejected = alive & ~mask
        k = int((rejected & table.present[:n]).sum())
        if k:
            counts[code] = k
        alive &= mask
    feasible = np.flatnonzero(alive)
    reasons = tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    if feasible.size == 0:
        return None, reasons, 0
    free_gpus = (healthy[feasible] & (gpu_alloc[feasible] == 0)).sum(axis=1)
    free_cpu = table.cpu_millicores[feasible] - cpu_alloc[feasible]
    # lexsort: last key is primary; stable, so the lowest index wins ties.
    best = int(feasible[np.lexsort((free_cpu, free_gpus))[0]])
    if pod.gpu_count > 0:
        devices = np.flatnonzero((gpu_alloc[best] == 0) & healthy[best])[: pod.gpu_count]
        slot = Slot(best, tuple(int(d) for d in devices), GPU_MILLI)
    elif pod.gpu_milli > 0:
        ok = healthy[best] & (gpu_alloc[best] + pod.gpu_milli <= GPU_MILLI)
        candidates = np.flatnonzero(ok)
        fullest = candidates[np.argsort(-gpu_alloc[best][candidates], kind="stable")[0]]
        slot = Slot(best, (int(fullest),), pod.gpu_milli)
    else:
        slot = Slot(best, (), 0)
    return slot, reasons, int(feasible.size)
