"""Columnar node state: one array per attribute, indexed by node slot.

A `Fleet` holds up to hundreds of thousands of nodes as numpy columns so that every
constraint is a vectorized mask (filters.py) and every score a float array (scoring.py).
Strings (cluster, zone, rack, node pool, GPU model, label keys and values, taints) are
interned to small integers once, when a node is added or updated.

Slots: a removed node's slot goes onto a free list and is reused (lowest slot first, so
the slot layout depends only on the sequence of operations). Arrays grow by doubling, so
adding a node costs amortized O(1) and updating or removing one costs O(1).

Check, then commit: `fits` and the filter masks never mutate; `allocate` and `free` are the
only functions that change allocated resources, and they are exact inverses (integer
arithmetic only).

Change stamps: every mutation bumps `version` and stamps the slots it touched
(`slot_version`: anything changed; `attr_version`: attributes the static filters read), so
a cache of derived values (`scheduling.placement.PlacementCache`) can refresh exactly the
slots changed since it last looked. Mutate a fleet only through its methods, or call
`touch` after writing its arrays directly.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

#: One whole GPU in milli-GPU: fractional shares are exact integers.
GPU_MILLI = 1000
#: GPU indices are held in int64 bitmasks, so a node has at most 63 GPUs.
MAX_GPUS_LIMIT = 63

# Node flag bits (Fleet.flags). A node is schedulable only when its flags are 0.
FLAG_CORDONED = 1
FLAG_UNHEALTHY = 2
FLAG_STALE = 4
FLAG_EMPTY_SLOT = 128

#: Taint effects that keep pods off a node unless tolerated (PreferNoSchedule does not).
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class Interner:
    """Maps strings to dense ids 0, 1, 2, ... and back; ids are never reused."""

    __slots__ = ("ids", "names")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.names: list[str] = []

    def intern(self, name: str) -> int:
        """The id of `name`, adding it if new."""
        i = self.ids.get(name)
        if i is None:
            i = len(self.names)
            self.ids[name] = i
            self.names.append(name)
        return i

    def get(self, name: str) -> int:
        """The id of `name`, or -1 if it was never interned."""
        return self.ids.get(name, -1)

    def __len__(self) -> int:
        return len(self.names)

    def copy(self) -> Interner:
        """An independent copy."""
        other = Interner()
        other.ids = dict(self.ids)
        other.names = list(self.names)
        return other


@dataclass(frozen=True, slots=True)
class Taint:
    """A Kubernetes node taint. Only NoSchedule and NoExecute keep untolerating pods off."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("taint key must not be empty")
        if self.effect not in TAINT_EFFECTS:
            raise ValueError(f"taint effect {self.effect!r} is not one of {TAINT_EFFECTS}")

    @property
    def text(self) -> str:
        """`key=value:Effect`, as kubectl prints it."""
        return f"{self.key}={self.value}:{self.effect}"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """Everything the placement core knows about one node (capacity, not usage).

    `zone` and `rack` are names within the cluster (resp. zone): two clusters may both have
    a zone "a"; they are different topology domains. `rack` is the NVLink/switch domain.
    """

    name: str
    cluster: str
    cpu_millicores: int
    memory_bytes: int
    gpu_count: int = 0
    gpu_model: str = ""
    gpu_memory_mib: int = 0
    zone: str = ""
    rack: str = ""
    node_pool: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    cordoned: bool = False
    unhealthy: bool = False
    stale: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("node name must not be empty")
        if not self.cluster:
            raise ValueError(f"node {self.name!r}: cluster must not be empty")
        if self.cpu_millicores < 0 or self.memory_bytes < 0:
            raise ValueError(f"node {self.name!r}: cpu_millicores and memory_bytes must be >= 0")
        if not 0 <= self.gpu_count <= MAX_GPUS_LIMIT:
            raise ValueError(
                f"node {self.name!r}: gpu_count {self.gpu_count} outside 0..{MAX_GPUS_LIMIT}"
            )
        if self.gpu_count > 0 and not self.gpu_model:
            raise ValueError(f"node {self.name!r}: a node with GPUs needs a gpu_model")
        if self.gpu_memory_mib < 0:
            raise ValueError(f"node {self.name!r}: gpu_memory_mib must be >= 0")


@dataclass(frozen=True, slots=True)
class Allocation:
    """Resources one pod holds on one node: the unit of `Fleet.allocate` and `Fleet.free`.

    `gpu_indices` each lose `gpu_milli_per_gpu` (1000 for whole GPUs, less for a share).
    """

    node: str
    cpu_millicores: int
    memory_bytes: int
    gpu_indices: tuple[int, ...] = ()
    gpu_milli_per_gpu: int = 0


class AllocationError(ValueError):
    """An allocation does not fit (or a free does not match what is held)."""


def _mask_of(indices: Iterable[int]) -> int:
    mask = 0
    for i in indices:
        mask |= 1 << i
    return mask


class Fleet:
    """Columnar state of every node. Public arrays are indexed by slot in [0, n_slots).

    Columns (capacity rows; rows >= n_slots and empty slots hold zeros):
      cpu_allocatable_millicores, cpu_allocated_millicores: (cap,) int64 millicores
      memory_allocatable_bytes, memory_allocated_bytes: (cap,) int64 bytes
      gpu_count: (cap,) int8 GPUs on the node
      gpu_free_milli: (cap, max_gpus) int16 free milli-GPU per GPU (0 beyond gpu_count)
      gpu_unhealthy_mask: (cap,) int64 bit i set = GPU i unhealthy (never allocated)
      gpu_model_id: (cap,) int16 id in `gpu_models`, -1 for none
      gpu_memory_mib: (cap,) int32 memory of each GPU
      cluster_id, zone_id, rack_id, pool_id: (cap,) int32 ids in the interners
        (zone and rack ids name whole domains: "cluster/zone", "cluster/zone/rack")
      label_values: {label key id: (cap,) int32 value id in `label_values_interner`, -1 absent}
      taint_bits: (cap, words) uint64 bit t set = node has blocking taint id t
      flags: (cap,) uint8 FLAG_* bits; 0 = schedulable
      slot_version, attr_version: (cap,) int64 `version` when the slot last changed (any
        change / a change of what static filters read: attributes, flags, GPU health)
    """

    def __init__(self, max_gpus: int = 8, initial_capacity: int = 1024) -> None:
        if not 0 <= max_gpus <= MAX_GPUS_LIMIT:
            raise ValueError(f"max_gpus {max_gpus} outside 0..{MAX_GPUS_LIMIT}")
        cap = max(1, initial_capacity)
        self.capacity = cap
        self.max_gpus = max_gpus
        self.n_slots = 0
        self.version = 0
        self.cpu_allocatable_millicores = np.zeros(cap, np.int64)
        self.cpu_allocated_millicores = np.zeros(cap, np.int64)
        self.memory_allocatable_bytes = np.zeros(cap, np.int64)
        self.memory_allocated_bytes = np.zeros(cap, np.int64)
        self.gpu_count = np.zeros(cap, np.int8)
        self.gpu_free_milli = np.zeros((cap, max_gpus), np.int16)
        self.gpu_unhealthy_mask = np.zeros(cap, np.int64)
        self.gpu_model_id = np.full(cap, -1, np.int16)
        self.gpu_memory_mib = np.zeros(cap, np.int32)
        self.cluster_id = np.full(cap, -1, np.int32)
        self.zone_id = np.full(cap, -1, np.int32)
        self.rack_id = np.full(cap, -1, np.int32)
        self.pool_id = np.full(cap, -1, np.int32)
        self.label_values: dict[int, NDArray[np.int32]] = {}
        self.taint_bits = np.zeros((cap, 1), np.uint64)
        self.flags = np.full(cap, FLAG_EMPTY_SLOT, np.uint8)
        # Change stamps (not state: `state_equal` ignores them): the `version` at which the
        # slot last changed at all, and last changed an attribute static filters read.
        self.slot_version = np.zeros(cap, np.int64)
        self.attr_version = np.zeros(cap, np.int64)
        self.clusters = Interner()
        self.zones = Interner()
        self.racks = Interner()
        self.pools = Interner()
        self.gpu_models = Interner()
        self.label_keys = Interner()
        self.label_values_interner = Interner()
        #: Blocking taints (key, value, effect) by id; bit t of taint_bits.
        self.taints: list[Taint] = []
        self._taint_ids: dict[Taint, int] = {}
        self.names: list[str | None] = []
        self._slot_of: dict[str, int] = {}
        self._free_slots: list[int] = []  # min-heap: reuse the lowest slot first

    # ---- sizing ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, name: object) -> bool:
        return name in self._slot_of

    def _columns(self) -> list[str]:
        return [
            "cpu_allocatable_millicores",
            "cpu_allocated_millicores",
            "memory_allocatable_bytes",
            "memory_allocated_bytes",
            "gpu_count",
            "gpu_free_milli",
            "gpu_unhealthy_mask",
            "gpu_model_id",
            "gpu_memory_mib",
            "cluster_id",
            "zone_id",
            "rack_id",
            "pool_id",
            "taint_bits",
            "flags",
        ]

    @staticmethod
    def _stamp_columns() -> tuple[str, str]:
        return ("slot_version", "attr_version")

    def _stamp(self, slot: int, *, attr: bool) -> None:
        """Bump `version` and stamp `slot` as changed (and its attributes, if `attr`)."""
        self.version += 1
        self.slot_version[slot] = self.version
        if attr:
            self.attr_version[slot] = self.version

    def touch(self, slots: NDArray[np.int64] | None = None) -> None:
        """Stamp `slots` (all slots if None) as changed in every way: call after writing the
        arrays directly, so that caches of derived values see the change."""
        self.version += 1
        n = self.n_slots
        sel = slice(0, n) if slots is None else np.asarray(slots, np.int64)
        self.slot_version[sel] = self.version
        self.attr_version[sel] = self.version

    def _grow(self, need: int) -> None:
        new_cap = self.capacity
        while new_cap < need:
            new_cap *= 2
        if new_cap == self.capacity:
            return
        extra = new_cap - self.capacity
        fill = {"gpu_model_id": -1, "cluster_id": -1, "zone_id": -1, "rack_id": -1}
        fill |= {"pool_id": -1, "flags": FLAG_EMPTY_SLOT}
        for name in self._columns():
            old = getattr(self, name)
            pad = np.full((extra, *old.shape[1:]), fill.get(name, 0), old.dtype)
            setattr(self, name, np.concatenate([old, pad]))
        for key, col in self.label_values.items():
            self.label_values[key] = np.concatenate([col, np.full(extra, -1, np.int32)])
        for name in self._stamp_columns():
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(extra, np.int64)]))
        self.capacity = new_cap

    def _ensure_gpu_width(self, gpus: int) -> None:
        if gpus > self.max_gpus:
            pad = np.zeros((self.capacity, gpus - self.max_gpus), np.int16)
            self.gpu_free_milli = np.concatenate([self.gpu_free_milli, pad], axis=1)
            self.max_gpus = gpus

    def nbytes(self) -> int:
        """Bytes held by the columns, the name table and the slot index (interners excluded)."""
        total = sum(getattr(self, name).nbytes for name in self._columns())
        total += sum(getattr(self, name).nbytes for name in self._stamp_columns())
        total += sum(col.nbytes for col in self.label_values.values())
        total += sys.getsizeof(self.names) + sys.getsizeof(self._slot_of)
        total += sum(sys.getsizeof(n) for n in self._slot_of)
        return int(total)

    # ---- names and slots ------------------------------------------------------------

    def slot(self, name: str) -> int:
        """The slot of node `name` (KeyError if unknown)."""
        try:
            return self._slot_of[name]
        except KeyError:
            raise KeyError(f"unknown node {name!r}") from None

    def name_of(self, slot: int) -> str:
        """The name of the node in `slot` (KeyError if the slot is empty)."""
        name = self.names[slot] if 0 <= slot < self.n_slots else None
        if name is None:
            raise KeyError(f"slot {slot} holds no node")
        return name

    def node_names(self) -> list[str]:
        """Names of all nodes, in slot order."""
        return [n for n in self.names if n is not None]

    def live_mask(self) -> NDArray[np.bool_]:
        """(n_slots,) bool: slot holds a node."""
        return np.asarray((self.flags[: self.n_slots] & FLAG_EMPTY_SLOT) == 0, dtype=np.bool_)

    # ---- add, update, remove --------------------------------------------------------

    def add_node(self, spec: NodeSpec) -> int:
        """Add a node with nothing allocated; returns its slot. ValueError if it exists."""
        if spec.name in self._slot_of:
            raise ValueError(f"node {spec.name!r} already exists")
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        else:
            slot = self.n_slots
            self._grow(slot + 1)
            self.n_slots += 1
            self.names.append(None)
        self.names[slot] = spec.name
        self._slot_of[spec.name] = slot
        self.cpu_allocated_millicores[slot] = 0
        self.memory_allocated_bytes[slot] = 0
        self._ensure_gpu_width(spec.gpu_count)
        self.gpu_free_milli[slot] = 0
        self.gpu_free_milli[slot, : spec.gpu_count] = GPU_MILLI
        self.gpu_unhealthy_mask[slot] = 0
        self._write_spec(slot, spec)
        self._stamp(slot, attr=True)
        return slot

    def update_node(self, spec: NodeSpec) -> int:
        """Replace a node's capacity and attributes, keeping what is allocated on it.

        CPU or memory may shrink below what is allocated (the node then fits nothing more);
        GPUs may only be removed if they are entirely free (ValueError otherwise).
        """
        slot = self.slot(spec.name)
        old_count = int(self.gpu_count[slot])
        if spec.gpu_count < old_count:
            gone = self.gpu_free_milli[slot, spec.gpu_count : old_count]
            if (gone != GPU_MILLI).any():
                raise ValueError(
                    f"node {spec.name!r}: cannot drop GPUs {spec.gpu_count}..{old_count - 1} "
                    "while pods hold them"
                )
            self.gpu_free_milli[slot, spec.gpu_count : old_count] = 0
            self.gpu_unhealthy_mask[slot] &= (1 << spec.gpu_count) - 1
        elif spec.gpu_count > old_count:
            self._ensure_gpu_width(spec.gpu_count)
            self.gpu_free_milli[slot, old_count : spec.gpu_count] = GPU_MILLI
        self._write_spec(slot, spec)
        self._stamp(slot, attr=True)
        return slot

    def upsert_node(self, spec: NodeSpec) -> int:
        """Add the node, or update it if it exists; returns its slot."""
        if spec.name in self._slot_of:
            return self.update_node(spec)
        return self.add_node(spec)

    def remove_node(self, name: str) -> None:
        """Remove a node (and whatever is allocated on it); its slot is reused later."""
        slot = self._slot_of.pop(name, None)
        if slot is None:
            raise KeyError(f"unknown node {name!r}")
        self.names[slot] = None
        for col in (
            self.cpu_allocatable_millicores,
            self.cpu_allocated_millicores,
            self.memory_allocatable_bytes,
            self.memory_allocated_bytes,
            self.gpu_count,
            self.gpu_unhealthy_mask,
            self.gpu_memory_mib,
        ):
            col[slot] = 0
        self.gpu_free_milli[slot] = 0
        self.taint_bits[slot] = 0
        for col32 in (self.gpu_model_id, self.cluster_id, self.zone_id, self.rack_id):
            col32[slot] = -1
        self.pool_id[slot] = -1
        for values in self.label_values.values():
            values[slot] = -1
        self.flags[slot] = FLAG_EMPTY_SLOT
        heapq.heappush(self._free_slots, slot)
        self._stamp(slot, attr=True)

    def _taint_id(self, taint: Taint) -> int:
        tid = self._taint_ids.get(taint)
        if tid is None:
            tid = len(self.taints)
            self.taints.append(taint)
            self._taint_ids[taint] = tid
            words = tid // 64 + 1
            if words > self.taint_bits.shape[1]:
                pad = np.zeros((self.capacity, words - self.taint_bits.shape[1]), np.uint64)
                self.taint_bits = np.concatenate([self.taint_bits, pad], axis=1)
        return tid

    def _write_spec(self, slot: int, spec: NodeSpec) -> None:
        self.cpu_allocatable_millicores[slot] = spec.cpu_millicores
        self.memory_allocatable_bytes[slot] = spec.memory_bytes
        self.gpu_count[slot] = spec.gpu_count
        self.gpu_model_id[slot] = self.gpu_models.intern(spec.gpu_model) if spec.gpu_count else -1
        self.gpu_memory_mib[slot] = spec.gpu_memory_mib
        self.cluster_id[slot] = self.clusters.intern(spec.cluster)
        self.zone_id[slot] = self.zones.intern(f"{spec.cluster}/{spec.zone}")
        self.rack_id[slot] = self.racks.intern(f"{spec.cluster}/{spec.zone}/{spec.rack}")
        self.pool_id[slot] = self.pools.intern(spec.node_pool)
        for values in self.label_values.values():
            values[slot] = -1
        for key, value in spec.labels.items():
            kid = self.label_keys.intern(key)
            col = self.label_values.get(kid)
            if col is None:
                col = np.full(self.capacity, -1, np.int32)
                self.label_values[kid] = col
            col[slot] = self.label_values_interner.intern(value)
        self.taint_bits[slot] = 0
        for taint in spec.taints:
            if taint.effect in BLOCKING_EFFECTS:
                tid = self._taint_id(taint)
                self.taint_bits[slot, tid // 64] |= np.uint64(1 << (tid % 64))
        self.flags[slot] = (
            (FLAG_CORDONED if spec.cordoned else 0)
            | (FLAG_UNHEALTHY if spec.unhealthy else 0)
            | (FLAG_STALE if spec.stale else 0)
        )

    def set_flags(
        self,
        name: str,
        *,
        cordoned: bool | None = None,
        unhealthy: bool | None = None,
        stale: bool | None = None,
    ) -> None:
        """Set or clear the cordoned / unhealthy / stale flags of a node (None = unchanged)."""
        slot = self.slot(name)
        flags = int(self.flags[slot])
        for value, bit in ((cordoned, FLAG_CORDONED), (unhealthy, FLAG_UNHEALTHY)):
            if value is not None:
                flags = (flags | bit) if value else (flags & ~bit)
        if stale is not None:
            flags = (flags | FLAG_STALE) if stale else (flags & ~FLAG_STALE)
        if flags != int(self.flags[slot]):
            self.flags[slot] = flags
            self._stamp(slot, attr=True)

    def set_gpu_health(self, name: str, gpu_index: int, healthy: bool) -> None:
        """Mark one GPU healthy or unhealthy. An unhealthy GPU is never allocated; pods
        already on it keep their allocation until freed."""
        slot = self.slot(name)
        if not 0 <= gpu_index < int(self.gpu_count[slot]):
            raise ValueError(f"node {name!r} has no GPU {gpu_index}")
        bit = 1 << gpu_index
        mask = int(self.gpu_unhealthy_mask[slot])
        new = (mask & ~bit) if healthy else (mask | bit)
        if new != mask:
            self.gpu_unhealthy_mask[slot] = new
            self._stamp(slot, attr=True)

    # ---- derived views --------------------------------------------------------------

    def usable_gpu_free_milli(self, rows: NDArray[np.int64] | None = None) -> NDArray[np.int32]:
        """(rows, max_gpus) int32: free milli per GPU, 0 for unhealthy or missing GPUs."""
        free = self.gpu_free_milli[: self.n_slots] if rows is None else self.gpu_free_milli[rows]
        bad = (
            self.gpu_unhealthy_mask[: self.n_slots]
            if rows is None
            else self.gpu_unhealthy_mask[rows]
        )
        out = free.astype(np.int32)
        if self.max_gpus:
            bits = (bad[:, None] >> np.arange(self.max_gpus, dtype=np.int64)) & 1
            out[bits.astype(bool)] = 0
        return out

    # ---- check, then commit ---------------------------------------------------------

    def fits(self, alloc: Allocation) -> bool:
        """Whether `alloc` fits on its node now (never mutates)."""
        return self._misfit(alloc) is None

    def _misfit(self, alloc: Allocation) -> str | None:
        slot = self._slot_of.get(alloc.node)
        if slot is None:
            return f"unknown node {alloc.node!r}"
        return self._misfit_at(slot, alloc)

    def _misfit_at(self, slot: int, alloc: Allocation) -> str | None:
        # (Scalars read with `.item`: Python ints compare faster than numpy scalars, and
        # this runs for every pod a cluster reports starting.)
        cpu, mem = alloc.cpu_millicores, alloc.memory_bytes
        if cpu < 0 or mem < 0:
            return "negative request"
        if cpu > self.cpu_allocatable_millicores.item(slot) - self.cpu_allocated_millicores.item(
            slot
        ):
            return f"node {alloc.node!r}: insufficient cpu"
        if mem > self.memory_allocatable_bytes.item(slot) - self.memory_allocated_bytes.item(slot):
            return f"node {alloc.node!r}: insufficient memory"
        indices = alloc.gpu_indices
        if not indices:
            return None
        if len(set(indices)) != len(indices):
            return "duplicate GPU index"
        milli = alloc.gpu_milli_per_gpu
        if not 0 < milli <= GPU_MILLI:
            return f"gpu_milli_per_gpu {milli} outside 1..{GPU_MILLI}"
        bad = self.gpu_unhealthy_mask.item(slot)
        count = self.gpu_count.item(slot)
        free = self.gpu_free_milli
        for g in indices:
            if not 0 <= g < count:
                return f"node {alloc.node!r} has no GPU {g}"
            if (bad >> g) & 1:
                return f"node {alloc.node!r}: GPU {g} is unhealthy"
            if free.item(slot, g) < milli:
                return f"node {alloc.node!r}: GPU {g} has too little free share"
        return None

    def allocate(self, alloc: Allocation) -> None:
        """Commit one allocation (AllocationError if it does not fit; nothing changes then)."""
        slot = self._slot_of.get(alloc.node)
        if slot is None:
            raise AllocationError(f"unknown node {alloc.node!r}")
        # The fit check of `_misfit_at` for the usual allocation (whole or shared GPUs on
        # distinct healthy indices), each column read once as a Python scalar (this runs
        # for every pod a cluster reports starting); anything it does not accept goes
        # through `_misfit_at`, which names the problem.
        cpu, mem, indices = alloc.cpu_millicores, alloc.memory_bytes, alloc.gpu_indices
        cpu_col, mem_col = self.cpu_allocated_millicores, self.memory_allocated_bytes
        cpu_used, mem_used = cpu_col.item(slot), mem_col.item(slot)
        ok = (
            0 <= cpu <= self.cpu_allocatable_millicores.item(slot) - cpu_used
            and 0 <= mem <= self.memory_allocatable_bytes.item(slot) - mem_used
        )
        if ok and indices:
            milli = alloc.gpu_milli_per_gpu
            free = self.gpu_free_milli
            count = self.gpu_count.item(slot)
            bad = self.gpu_unhealthy_mask.item(slot)
            if len(indices) == 1:
                g = indices[0]
                ok = 0 < milli <= GPU_MILLI and 0 <= g < count and not (bad >> g) & 1
                ok = ok and free.item(slot, g) >= milli
            else:
                ok = False  # (several GPUs: `_misfit_at` checks them)
        if not ok:
            problem = self._misfit_at(slot, alloc)
            if problem is not None:
                raise AllocationError(problem)
        cpu_col[slot] = cpu_used + cpu
        mem_col[slot] = mem_used + mem
        if indices:
            free = self.gpu_free_milli
            milli = alloc.gpu_milli_per_gpu
            for g in indices:
                free[slot, g] = free.item(slot, g) - milli
        self.version = version = self.version + 1
        self.slot_version[slot] = version

    def free(self, alloc: Allocation) -> None:
        """Release one allocation: the exact inverse of `allocate`.

        AllocationError if the node does not hold that much (a double free).
        """
        slot = self._slot_of.get(alloc.node)
        if slot is None:
            raise AllocationError(f"unknown node {alloc.node!r}")
        cpu, mem, indices = alloc.cpu_millicores, alloc.memory_bytes, alloc.gpu_indices
        cpu_col, mem_col = self.cpu_allocated_millicores, self.memory_allocated_bytes
        cpu_used, mem_used = cpu_col.item(slot), mem_col.item(slot)
        if cpu > cpu_used or mem > mem_used:
            raise AllocationError(f"node {alloc.node!r} does not hold {alloc}")
        if indices:
            milli = alloc.gpu_milli_per_gpu
            count = self.gpu_count.item(slot)
            free = self.gpu_free_milli
            for g in indices:
                if not 0 <= g < count or free.item(slot, g) + milli > GPU_MILLI:
                    raise AllocationError(f"node {alloc.node!r} does not hold GPU {g} share")
        cpu_col[slot] = cpu_used - cpu
        mem_col[slot] = mem_used - mem
        if indices:
            for g in indices:
                free[slot, g] = free.item(slot, g) + milli
        self.version = version = self.version + 1
        self.slot_version[slot] = version

    def allocate_many(
        self,
        slots: NDArray[np.int64],
        cpu_millicores: NDArray[np.int64],
        memory_bytes: NDArray[np.int64],
        gpu_mask: NDArray[np.int64],
        gpu_milli_per_gpu: NDArray[np.int64],
        *,
        sign: int = 1,
    ) -> None:
        """Vectorized `allocate` (sign=1) or `free` (sign=-1) of many pods at once.

        All-or-nothing: every node and GPU total is checked before anything changes
        (AllocationError otherwise). Arrays are (k,), one entry per pod.
        """
        slots = np.asarray(slots, np.int64)
        if slots.size == 0:
            return
        n = self.n_slots
        if slots.min() < 0 or slots.max() >= n or not self.live_mask()[slots].all():
            raise AllocationError("allocation on an empty or unknown slot")
        cpu = np.zeros(n, np.int64)
        np.add.at(cpu, slots, np.asarray(cpu_millicores, np.int64))
        mem = np.zeros(n, np.int64)
        np.add.at(mem, slots, np.asarray(memory_bytes, np.int64))
        gpus = np.zeros((n, self.max_gpus), np.int64)
        masks = np.asarray(gpu_mask, np.int64)
        milli = np.asarray(gpu_milli_per_gpu, np.int64)
        if self.max_gpus:
            bits = ((masks[:, None] >> np.arange(self.max_gpus, dtype=np.int64)) & 1).astype(bool)
            if ((masks >> self.max_gpus) != 0).any() or (masks < 0).any():
                raise AllocationError("GPU index beyond the node's GPUs")
            pod_idx, gpu_idx = np.nonzero(bits)
            np.add.at(gpus, (slots[pod_idx], gpu_idx), milli[pod_idx])
        elif (masks != 0).any():
            raise AllocationError("GPU index beyond the node's GPUs")
        exists = np.arange(self.max_gpus)[None, :] < self.gpu_count[:n, None]
        if (gpus[~exists] != 0).any():
            raise AllocationError("GPU index beyond the node's GPUs")
        if sign > 0:
            ok_cpu = self.cpu_allocated_millicores[:n] + cpu <= self.cpu_allocatable_millicores[:n]
            ok_mem = self.memory_allocated_bytes[:n] + mem <= self.memory_allocatable_bytes[:n]
            free = self.usable_gpu_free_milli().astype(np.int64)
            ok_gpu = (gpus <= free).all(axis=1)
        else:
            ok_cpu = cpu <= self.cpu_allocated_millicores[:n]
            ok_mem = mem <= self.memory_allocated_bytes[:n]
            ok_gpu = (self.gpu_free_milli[:n].astype(np.int64) + gpus <= GPU_MILLI).all(axis=1)
        touched = cpu.astype(bool) | mem.astype(bool) | gpus.any(axis=1)
        bad = touched & ~(ok_cpu & ok_mem & ok_gpu)
        if bad.any():
            names = [self.names[int(s)] for s in np.flatnonzero(bad)[:3]]
            verb = "allocation does not fit" if sign > 0 else "free exceeds what is held"
            raise AllocationError(f"{verb} on node(s) {names}")
        self.cpu_allocated_millicores[:n] += sign * cpu
        self.memory_allocated_bytes[:n] += sign * mem
        self.gpu_free_milli[:n] -= (sign * gpus).astype(np.int16)
        self.version += 1
        self.slot_version[np.unique(slots)] = self.version

    # ---- copies and equality --------------------------------------------------------

    def copy(self) -> Fleet:
        """A deep, independent copy (what-if simulations run on copies)."""
        other = Fleet.__new__(Fleet)
        other.__dict__.update(self.__dict__)
        for name in (*self._columns(), *self._stamp_columns()):
            setattr(other, name, getattr(self, name).copy())
        other.label_values = {k: v.copy() for k, v in self.label_values.items()}
        for name in ("clusters", "zones", "racks", "pools", "gpu_models", "label_keys"):
            setattr(other, name, getattr(self, name).copy())
        other.label_values_interner = self.label_values_interner.copy()
        other.taints = list(self.taints)
        other._taint_ids = dict(self._taint_ids)
        other.names = list(self.names)
        other._slot_of = dict(self._slot_of)
        other._free_slots = list(self._free_slots)
        return other

    def state_equal(self, other: Fleet) -> bool:
        """Same nodes in the same slots with the same capacity, usage and attributes."""
        if self.n_slots != other.n_slots or self.names != other.names:
            return False
        n = self.n_slots
        for name in self._columns():
            a, b = getattr(self, name)[:n], getattr(other, name)[:n]
            if a.shape != b.shape or not np.array_equal(a, b):
                return False
        return True

    # ---- convenience ----------------------------------------------------------------

    def add_nodes(self, specs: Sequence[NodeSpec]) -> list[int]:
        """Add many nodes; returns their slots."""
        return [self.add_node(s) for s in specs]

    def allocation_for(
        self, slot: int, cpu_millicores: int, memory_bytes: int, gpu_mask: int, gpu_milli: int
    ) -> Allocation:
        """An `Allocation` value for a node slot and a GPU bitmask."""
        idx = tuple(g for g in range(self.max_gpus) if (gpu_mask >> g) & 1)
        return Allocation(self.name_of(slot), cpu_millicores, memory_bytes, idx, gpu_milli)

    def gpu_mask_of(self, indices: Iterable[int]) -> int:
        """Bitmask of GPU indices."""
        return _mask_of(indices)
