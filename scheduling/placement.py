"""Batch placement: `place(fleet, batch, policy) -> PlacementResult`.

Semantics (what `reference.place_reference` implements with a plain per-node loop):
pods are taken one at a time in queue order (`Batch.order`: priority first); each goes to
the feasible node with the highest policy score, lowest slot on ties, on the GPUs the
policy picks; a pod that fits nowhere gets a reason code and the next pod is tried.
A gang is placed all-or-nothing inside one topology domain (see `_Engine.place_gang`).

`place` never mutates the fleet: it works on a scratch copy of the free resources and
returns a value. `commit(fleet, result)` applies it (re-checked, all or nothing) and
`release(fleet, result)` is its exact inverse.

Speed: identical pods placed consecutively form a *run*. For a run the static filters are
evaluated once per shape, every candidate is scored once, and because scores are
node-local only the node that just took a pod needs a new score: the run is a k-way merge
of per-node score sequences (a heap over touched nodes plus a pointer into the untouched
nodes sorted by score), with the deeper scores of each node computed in vectorized chunks
(in closed form when the GPUs taken are the default ones, `states_after`: no plugin chooses
GPUs, or the pod is CPU-only, or it takes whole GPUs and the chooser declares
`default_whole_gpus`). Scores are cached per shape
across runs: per *state class* when every plugin is state-only (nodes in the same state
share one score, and a class never changes, so its scores never go stale; `_States`; a
run ranks the classes present and touches only the rows of the best ones), or per node
with change stamps otherwise (and for FIFO-like queues of one-pod runs). In batches of many
shapes the static filters run once per node profile (`filters.static_profiles`).

Across calls: a `PlacementCache` passed to successive calls on one fleet keeps the free
resources, static filter codes and per-node scores, refreshed from the fleet's per-slot
change stamps, so placing one pod re-scores only the nodes changed since the last call.
"""

from __future__ import annotations

import heapq
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import cast

import numpy as np
from numpy.typing import NDArray

from scheduling.explain import N_REASONS, Explanation, Reason
from scheduling.filters import (
    Constraints,
    Free,
    compile_pod,
    first_failure,
    pod_capacity,
    resource_first_failure,
    static_first_failure,
    static_key,
    static_profiles,
)
from scheduling.fleet import FLAG_EMPTY_SLOT, GPU_MILLI, Allocation, AllocationError, Fleet
from scheduling.scoring import (
    DEFAULT_POLICY,
    NodeView,
    Policy,
    gpu_usable_matrix,
    gpu_usable_rows,
    pick_bits,
    row_sum,
)
from scheduling.workload import Batch, GangSpec, Order, PodSpec, QueueItem, TopologyLevel

I64 = NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class PlacementResult:
    """Decisions for every pod of a batch, indexed like `Batch.pods` (input order).

    node_slot: (P,) int64 fleet slot, -1 if not placed; gpu_mask: (P,) int64 bitmask of
    GPU indices taken; gpu_milli_per_gpu: (P,) int64 share taken on each of those GPUs;
    cpu_millicores, memory_bytes: (P,) int64 requests; reason: (P,) int16 `Reason` (0 =
    placed); order: (P,) int64 pod indices in the order they were considered.
    slot_names / slot_clusters: node and cluster name of each slot used, when placed.
    """

    pod_names: tuple[str, ...]
    node_slot: I64
    gpu_mask: I64
    gpu_milli_per_gpu: I64
    cpu_millicores: I64
    memory_bytes: I64
    reason: NDArray[np.int16]
    order: I64
    slot_names: Mapping[int, str | None]
    slot_clusters: Mapping[int, str | None]
    fleet_version: int

    def __len__(self) -> int:
        return len(self.pod_names)

    @property
    def placed(self) -> NDArray[np.bool_]:
        """(P,) bool: the pod was placed."""
        return self.node_slot >= 0

    @property
    def n_placed(self) -> int:
        """How many pods were placed."""
        return int(self.placed.sum())

    def node(self, i: int) -> str | None:
        """Node name of pod i, None if not placed."""
        s = int(self.node_slot[i])
        return self.slot_names[s] if s >= 0 else None

    def cluster(self, i: int) -> str | None:
        """Cluster of pod i, None if not placed."""
        s = int(self.node_slot[i])
        return self.slot_clusters[s] if s >= 0 else None

    def gpu_indices(self, i: int) -> tuple[int, ...]:
        """GPU indices pod i takes (each loses `gpu_milli_per_gpu[i]`)."""
        m = int(self.gpu_mask[i])
        return tuple(g for g in range(m.bit_length()) if (m >> g) & 1)

    def allocations(self) -> list[Allocation | None]:
        """Per pod, the `Allocation` to commit (None if not placed)."""
        out: list[Allocation | None] = []
        for i in range(len(self.pod_names)):
            name = self.node(i)
            out.append(
                None
                if name is None
                else Allocation(
                    name,
                    int(self.cpu_millicores[i]),
                    int(self.memory_bytes[i]),
                    self.gpu_indices(i),
                    int(self.gpu_milli_per_gpu[i]),
                )
            )
        return out

    def decisions(self) -> list[tuple[str, str | None, str | None, tuple[int, ...], int]]:
        """(pod, cluster, node, gpu indices, reason) per pod: handy for comparisons."""
        return [
            (
                self.pod_names[i],
                self.cluster(i),
                self.node(i),
                self.gpu_indices(i),
                int(self.reason[i]),
            )
            for i in range(len(self.pod_names))
        ]


# ---- commit / release ------------------------------------------------------------------


def _check_names(fleet: Fleet, result: PlacementResult, slots: I64) -> None:
    for s in np.unique(slots).tolist():
        if s >= fleet.n_slots or fleet.names[s] != result.slot_names[s]:
            raise AllocationError(
                f"node in slot {s} changed since placement ({result.slot_names[s]!r})"
            )


def commit(fleet: Fleet, result: PlacementResult) -> None:
    """Apply every placed pod of `result` to the fleet, all or nothing.

    Re-checked against the fleet's current state: AllocationError (and no change) if a
    node changed or no longer has room since the placement was computed.
    """
    sel = result.placed
    slots = result.node_slot[sel]
    _check_names(fleet, result, slots)
    fleet.allocate_many(
        slots,
        result.cpu_millicores[sel],
        result.memory_bytes[sel],
        result.gpu_mask[sel],
        result.gpu_milli_per_gpu[sel],
    )


def release(fleet: Fleet, result: PlacementResult) -> None:
    """Free everything `commit(fleet, result)` allocated: its exact inverse."""
    sel = result.placed
    slots = result.node_slot[sel]
    _check_names(fleet, result, slots)
    fleet.allocate_many(
        slots,
        result.cpu_millicores[sel],
        result.memory_bytes[sel],
        result.gpu_mask[sel],
        result.gpu_milli_per_gpu[sel],
        sign=-1,
    )


# ---- the engine ------------------------------------------------------------------------


def _topology_column(fleet: Fleet, level: TopologyLevel) -> I64:
    n = fleet.n_slots
    if level is TopologyLevel.CLUSTER:
        return fleet.cluster_id[:n].astype(np.int64)
    if level is TopologyLevel.ZONE:
        return fleet.zone_id[:n].astype(np.int64)
    if level is TopologyLevel.RACK:
        return fleet.rack_id[:n].astype(np.int64)
    return np.arange(n, dtype=np.int64)


def gang_levels(gang: GangSpec) -> list[TopologyLevel]:
    """Levels tried for a gang, tightest first: preferred, ..., required."""
    tightest = gang.preferred_level if gang.preferred_level is not None else gang.required_level
    return [TopologyLevel(v) for v in range(int(tightest), int(gang.required_level) - 1, -1)]


#: Depth chunks start this deep and double when a node needs more.
_FIRST_DEPTH = 8
#: ... except the first depths of state classes in closed form, evaluated together for the
#: classes a run meets first: a class deepened later costs an evaluation of its own, a
#: deeper state computed in the block costs little (callgrind, benchmark instance: 8 / 16 /
#: 32 / 64 -> 3,435 / 3,392 / 3,377 / 3,387 M instructions per place).
_FIRST_CLASS_DEPTH = 32
#: Stepwise depth chunks (a GPU-choosing policy) start this deep and grow by 1/this (a
#: chain call costs per numpy call more than per state: 4 / 6 / 8 / 12 -> 3,377 / 3,337 /
#: 3,315 / 3,347 M instructions per place on the benchmark instance).
_FIRST_STEPS = 8
_STEP_GROWTH = 2
#: Mean run length (pods per segment) from which nodes are scored per distinct state.
_BY_STATE_RUN = 4
#: ... and the batch has at least this many pods (the per-call set-up is O(nodes)).
_BY_STATE_MIN_PODS = 64
#: From this many shapes in a batch, static filters run once per node profile.
_BY_PROFILE_SHAPES = 8
#: A PlacementCache keeps this many syncs' worth of attribute changes before it drops its
#: static filter codes (rebuilt on demand) rather than replaying them.
_ATTR_LOG_MAX = 256
#: Room is counted up to this many pods per node (no practical limit).
_NO_LIMIT = 1 << 40
#: Untouched candidates get their deeper scores computed in chunks starting this large.
_FIRST_CHUNK = 32
_NO_PICK = np.zeros(1, np.int64)


#: `_Chunk.live` of a one-row chunk (never written in place: chunks replace `live`).
_ONE_ROW = np.zeros(1, np.int64)
_ONE_ROW.flags.writeable = False


class _Chunk:
    """Deeper scores of a group of candidate rows: scores[j][d] is the score of the
    (d+2)-th pod of the run on row j (the first comes from the run's initial scores).
    `base` is built on first use when the chunk stands for one state class (`cid`).
    Stepwise chunks keep the state of their `live` rows after `depth` more pods
    (`last_view`); a row whose `room` (pods it can take) is reached drops out, as its
    deeper scores are never read: row j has scores up to depth min(depth, room[j] - 1)."""

    __slots__ = (
        "_base",
        "base_pick",
        "carry",
        "cid",
        "cids",
        "depth",
        "last_pick",
        "last_view",
        "live",
        "picks",
        "room",
        "scores",
    )

    def __init__(
        self,
        view: NodeView | None,
        pick: I64,
        rows: int = 1,
        cid: int = -1,
        room: I64 | None = None,
    ) -> None:
        self._base = view
        self.cid = cid
        self.cids: list[int] | None = None
        self.base_pick = pick
        self.last_view = view
        self.last_pick = pick
        self.depth = 0
        n = len(view) if view is not None else rows
        # (Most chunks are one state class in closed form: never re-allocated per chunk.)
        self.live = _ONE_ROW if n == 1 else np.arange(n, dtype=np.int64)
        self.room = room
        #: What `Policy.chain` hands from one deepening to the next (rows as `live`).
        self.carry: tuple[NDArray[np.float64], ...] | None = None
        self.scores: list[list[float]] = [[]] if n == 1 else [[] for _ in range(n)]
        self.picks: list[list[int]] = [[]] if n == 1 else [[] for _ in range(n)]

    @classmethod
    def of_class(
        cls, cid: int, room: I64, depth: int, scores: list[float], picks: list[int]
    ) -> _Chunk:
        """A state class's closed-form chunk with its first `depth` scores and picks (built
        without `__init__`'s generality: thousands per call)."""
        chunk = cls.__new__(cls)
        chunk._base = None
        chunk.cid = cid
        chunk.cids = None
        chunk.base_pick = chunk.last_pick = _NO_PICK
        chunk.last_view = None
        chunk.depth = depth
        chunk.live = _ONE_ROW
        chunk.room = room
        chunk.carry = None
        chunk.scores = [scores]
        chunk.picks = [picks]
        return chunk

    @classmethod
    def of_block(
        cls,
        cids: list[int],
        room: I64,
        depth: int,
        scores: list[list[float]],
        picks: list[list[int]],
    ) -> _Chunk:
        """The first `depth` scores and picks of closed-form state classes `cids` (row j:
        class cids[j]), evaluated together; never deepened: a class that needs more depths
        gets its own chunk (`_Engine._own_chunk`), sharing its row's lists."""
        chunk = cls.of_class(-1, room, depth, [], [])
        chunk.cids = cids
        chunk.scores = scores
        chunk.picks = picks
        return chunk


#: The chunk of every state class with room for a single pod of a closed-form shape: its
#: deeper scores are never read (the merge stops at a row's room), so none are computed.
_SHALLOW = (_Chunk(None, _NO_PICK), 0)
_SHALLOW[0].depth = _NO_LIMIT


def states_after(base: NodeView, c: Constraints, depths: I64) -> NodeView:
    """Closed-form node states after j more pods of shape c, for each j in `depths`, with
    the engine's default GPU choice (used when no plugin chooses GPUs).

    Returns a view of R * len(depths) rows (row-major: all depths of row 0 first).
    Best fit fills the GPU with the least fitting free share until the share no longer
    fits, then the next (placing on the minimum keeps it the minimum), so GPU i takes
    min(max(j - pods fitting on the GPUs before it, 0), free_i // share) pods. Whole GPUs
    are taken lowest index first. Beyond a node's capacity the states are meaningless
    (never used: the engine stops at capacity).
    """
    r, d = len(base), int(depths.size)
    js = depths.astype(np.int64)
    cpu = (base.cpu_free_millicores[:, None] - js[None, :] * c.cpu_millicores).reshape(-1)
    mem = (base.memory_free_bytes[:, None] - js[None, :] * c.memory_bytes).reshape(-1)
    free = base.gpu_free_milli
    g = free.shape[1]
    if c.gpus_per_pod == 0 or g == 0:
        gpu = free.repeat(d, axis=0)  # (r * d, g): the GPUs do not change
    elif c.milli_per_gpu < GPU_MILLI:
        m = c.milli_per_gpu
        fits = free >= m
        order = np.where(fits, free, GPU_MILLI + 1).argsort(axis=1, kind="stable")
        cnt = np.take_along_axis(np.where(fits, free // m, 0), order, axis=1).astype(np.int64)
        before = cnt.cumsum(axis=1) - cnt
        taken_sorted = np.clip(js[None, :, None] - before[:, None, :], 0, cnt[:, None, :])
        taken = np.empty_like(taken_sorted)
        np.put_along_axis(
            taken, np.broadcast_to(order[:, None, :], taken.shape), taken_sorted, axis=2
        )
        gpu = free[:, None, :] - (taken * m).astype(np.int32)
    else:
        whole = free == GPU_MILLI
        rank = whole.cumsum(axis=1) - 1
        gone = whole[:, None, :] & (rank[:, None, :] < js[None, :, None] * c.gpus_per_pod)
        gpu = np.where(gone, 0, free[:, None, :]).astype(np.int32)
    return NodeView(
        slots=base.slots.repeat(d),
        cpu_free_millicores=cpu,
        memory_free_bytes=mem,
        cpu_allocatable_millicores=base.cpu_allocatable_millicores.repeat(d),
        memory_allocatable_bytes=base.memory_allocatable_bytes.repeat(d),
        gpu_free_milli=gpu.reshape(r * d, g),
        gpu_usable=base.gpu_usable.repeat(d, axis=0),
        gpu_model_id=base.gpu_model_id.repeat(d),
    )


def _row_ids(keys: NDArray[np.int64]) -> tuple[I64, I64]:
    """Distinct rows of an int64 matrix: (index of each distinct row's first occurrence,
    in order of first occurrence; id of each row's distinct row in that order)."""
    if keys.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1])))
    _, first, inverse = np.unique(flat.reshape(-1), return_index=True, return_inverse=True)
    # Renumber by first occurrence so ids do not depend on the byte order of the keys.
    by_first = first.argsort(kind="stable")
    renumber = np.empty(first.size, np.int64)
    renumber[by_first] = np.arange(first.size, dtype=np.int64)
    return first[by_first].astype(np.int64), renumber[inverse.reshape(-1)]


class _States:
    """Distinct node states ("classes") met during one `place` call.

    A class is (static type, free CPU, free memory, free share per GPU), where the static
    type groups nodes with the same allocatable CPU and memory, usable GPUs and GPU model.
    A class id always denotes the same state, so a state-only score computed for a class
    never goes stale; nodes that change state move to another (maybe new) class.
    """

    def __init__(self, fleet: Fleet, free: Free, usable: NDArray[np.bool_], rows: I64) -> None:
        n = fleet.n_slots
        g = free.gpu_milli.shape[1]
        usable_mask = np.zeros(rows.size, np.int64)
        for i in range(g):
            usable_mask |= usable[rows, i].astype(np.int64) << i
        static_key = np.ascontiguousarray(
            np.stack(
                [
                    fleet.cpu_allocatable_millicores[rows],
                    fleet.memory_allocatable_bytes[rows],
                    usable_mask,
                    fleet.gpu_model_id[rows].astype(np.int64),
                ],
                axis=1,
            )
        )
        self.static_type = np.full(n, -1, np.int64)
        self.static_type[rows] = _row_ids(static_key)[1]
        self.free = free
        self.gpus = g
        #: Class id by the bytes of its key row (`_keys`).
        self.ids: dict[bytes, int] = {}
        self._void = np.dtype((np.void, 8 * (3 + g)))
        cap = 64
        self.rep = np.zeros(cap, np.int64)  # a slot of the class's static type
        self.cpu = np.zeros(cap, np.int64)
        self.mem = np.zeros(cap, np.int64)
        self.gpu = np.zeros((cap, g), free.gpu_milli.dtype)
        self.n = 0
        self.of = np.full(n, -1, np.int64)
        # Initial classes in one vectorized pass; later moves go through `assign`.
        keys = self._keys(rows)
        first, inverse = _row_ids(keys)
        self._add(rows[first], keys[first])
        first_bytes = cast("list[bytes]", keys[first].view(self._void).ravel().tolist())
        for cid, k in enumerate(first_bytes):
            self.ids[k] = cid
        self.of[rows] = inverse

    def _keys(self, slots: I64) -> NDArray[np.int64]:
        free = self.free
        keys = np.empty((slots.size, 3 + self.gpus), np.int64)
        keys[:, 0] = self.static_type[slots]
        keys[:, 1] = free.cpu_millicores[slots]
        keys[:, 2] = free.memory_bytes[slots]
        keys[:, 3:] = free.gpu_milli.take(slots, axis=0)
        return keys

    def assign(self, slots: I64) -> None:
        """(Re)compute the class of `slots` from their current state."""
        keys = self._keys(slots)
        ids = self.ids
        # One dict look-up per slot by the key row's bytes, in C (map); only slots in a
        # state not met before take the Python loop.
        row_bytes = cast("list[bytes]", keys.view(self._void).ravel().tolist())
        out = np.fromiter(map(ids.get, row_bytes, repeat(-1)), np.int64, len(row_bytes))
        missing = (out < 0).nonzero()[0]
        if missing.size:
            new: list[int] = []  # positions of the slots that open a class
            n = self.n
            for i in missing.tolist():
                k = row_bytes[i]
                cid = ids.get(k)  # met twice in these slots
                if cid is None:
                    cid = ids[k] = n + len(new)
                    new.append(i)
                out[i] = cid
            at = np.asarray(new, np.int64)
            self._add(slots[at], keys[at])
        self.of[slots] = out

    def _add(self, slots: I64, keys: NDArray[np.int64]) -> None:
        """New classes (ids n, n + 1, ...): the state of each key row (`_keys`), and a slot
        of its static type."""
        n, m = self.n, int(slots.size)
        if n + m > self.rep.size:
            grow = max(self.rep.size, n + m - self.rep.size)
            self.rep = np.concatenate([self.rep, np.zeros(grow, np.int64)])
            self.cpu = np.concatenate([self.cpu, np.zeros(grow, np.int64)])
            self.mem = np.concatenate([self.mem, np.zeros(grow, np.int64)])
            self.gpu = np.concatenate([self.gpu, np.zeros((grow, self.gpus), self.gpu.dtype)])
        self.rep[n : n + m] = slots
        self.cpu[n : n + m] = keys[:, 1]
        self.mem[n : n + m] = keys[:, 2]
        self.gpu[n : n + m] = keys[:, 3:]
        self.n = n + m

    def free_of(self) -> Free:
        """The classes' free resources, as a `Free` indexed by class id."""
        return Free(self.cpu, self.mem, self.gpu)

    def view(self, fleet: Fleet, usable: NDArray[np.bool_], ids: I64) -> NodeView:
        """A view with one row per class id (static attributes from a representative)."""
        rep = self.rep[ids]
        return NodeView(
            slots=rep,
            cpu_free_millicores=self.cpu[ids],
            memory_free_bytes=self.mem[ids],
            cpu_allocatable_millicores=fleet.cpu_allocatable_millicores[rep],
            memory_allocatable_bytes=fleet.memory_allocatable_bytes[rep],
            gpu_free_milli=self.gpu.take(ids, axis=0),
            gpu_usable=usable.take(rep, axis=0),
            gpu_model_id=fleet.gpu_model_id[rep],
            state_ids=ids,
            state_space=self,
        )


#: A shape's scores across calls: (static-ok live rows, room, scores, picks, step they are
#: valid at, static generation of the row set). Rows without room hold -inf and pick 0.
_ScoreEntry = tuple[I64, I64, NDArray[np.float64], I64, int, int]


class PlacementCache:
    """Fleet-derived arrays and per-shape scores kept from one `place` call to the next.

    The daemon places one workload at a time on a fleet of 10,000 nodes or more: without a
    cache each call snapshots the free resources, evaluates the static filters and scores
    every node again. With one, a call refreshes only the slots the fleet stamped as changed
    since the previous call (`Fleet.slot_version` / `attr_version`) and those the previous
    call changed in its scratch state, re-scores only those rows, and places a single pod
    with an argmax over cached scores.

    Correct because plugins are node-local (scoring.py): a row's score depends only on that
    row's state, the pod shape and the policy's constants, so it stays valid until the row
    changes. A cache follows one Fleet object (another fleet, a copy included, or a fleet
    whose interners grew starts it afresh) and one Policy object (another policy drops the
    scores; build a new Policy when parameters change, e.g. FGD's target workload, and never
    mutate one in use). Write fleet arrays only through Fleet methods (or `Fleet.touch`).
    Decisions are identical with and without a cache (tests/unit/scheduling).

    Memory: per cached shape about 32 bytes per candidate node plus 2 per slot; the least
    recently used shapes are dropped beyond `max_shapes` or `max_bytes`.
    """

    def __init__(self, max_shapes: int = 64, max_bytes: int = 64 << 20) -> None:
        """Keep scores of at most `max_shapes` shapes and about `max_bytes` bytes of them."""
        if max_shapes < 1 or max_bytes < 0:
            raise ValueError("max_shapes must be >= 1 and max_bytes >= 0")
        self.max_shapes = max_shapes
        self.max_bytes = max_bytes
        self.clear()

    def clear(self) -> None:
        """Forget everything (the next call rebuilds from the fleet)."""
        self._fleet: weakref.ref[Fleet] | None = None
        self._policy: weakref.ref[Policy] | None = None
        self._parsed: dict[str, Policy] = {}
        self._sig: tuple[int, ...] = ()
        self._version = -1
        self._touched: list[I64] = []
        self.n = 0
        self.step = 0
        #: Bumped whenever static filter inputs changed: score entries re-derive their rows.
        self.static_gen = 0
        self.free = Free(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.int32))
        self.usable = np.zeros((0, 0), np.bool_)
        self.gpu_total = np.zeros(0, np.int64)
        self.live = np.zeros(0, np.bool_)
        self.live_rows = np.zeros(0, np.int64)
        self.dirty_at = np.zeros(0, np.int64)
        self.constraints: OrderedDict[Hashable, Constraints] = OrderedDict()
        # Per shape: dense static codes, and how many _attr_log entries they include.
        self.static: OrderedDict[Hashable, tuple[NDArray[np.int16], int]] = OrderedDict()
        self._attr_log: list[I64] = []  # slots whose static attributes changed, per sync
        # Per shape: live slots passing its static filters, and the static_gen they are of.
        self.candidates: OrderedDict[Hashable, tuple[I64, int]] = OrderedDict()
        self.scores: OrderedDict[Hashable, _ScoreEntry] = OrderedDict()

    def policy_for(self, spec: str) -> Policy:
        """The parsed policy of a spec string, the same object every time (scores stay)."""
        policy = self._parsed.get(spec)
        if policy is None:
            policy = self._parsed[spec] = Policy.parse(spec)
        return policy

    @staticmethod
    def _signature(fleet: Fleet) -> tuple[int, ...]:
        # Compiled constraints depend on the interners; arrays on the GPU and taint widths.
        return (
            fleet.max_gpus,
            int(fleet.taint_bits.shape[1]),
            len(fleet.clusters),
            len(fleet.gpu_models),
            len(fleet.label_keys),
            len(fleet.label_values_interner),
            len(fleet.taints),
        )

    def sync(self, fleet: Fleet, policy: Policy) -> None:
        """Bring the cache up to date with `fleet` (called by `place`)."""
        n = fleet.n_slots
        sig = self._signature(fleet)
        if self._fleet is None or self._fleet() is not fleet or sig != self._sig or n < self.n:
            self._reset(fleet, sig)
        else:
            if n > self.n:
                self._extend(n)
            changed = (fleet.slot_version[:n] > self._version).nonzero()[0]
            if self._touched:
                changed = np.union1d(changed, np.concatenate(self._touched))
            if changed.size:
                self.step += 1
                self._refresh(fleet, changed)
                self.dirty_at[changed] = self.step
            attr = (fleet.attr_version[:n] > self._version).nonzero()[0]
            if attr.size:
                # Static codes are brought up to date lazily, per shape, when next used.
                self.live_rows = self.live.nonzero()[0].astype(np.int64)
                if len(self._attr_log) >= _ATTR_LOG_MAX:
                    self.static.clear()
                    self._attr_log.clear()
                self._attr_log.append(attr)
                self.static_gen += 1
        if self._policy is None or self._policy() is not policy:
            self.scores.clear()
            self._policy = weakref.ref(policy)
        self._version = fleet.version
        self._touched = []

    def _reset(self, fleet: Fleet, sig: tuple[int, ...]) -> None:
        max_shapes, max_bytes, parsed = self.max_shapes, self.max_bytes, self._parsed
        self.clear()
        self.max_shapes, self.max_bytes, self._parsed = max_shapes, max_bytes, parsed
        self._fleet = weakref.ref(fleet)
        self._sig = sig
        self.n = fleet.n_slots
        self.free = Free.of(fleet)
        self.usable = gpu_usable_matrix(fleet)
        self.gpu_total = row_sum(self.free.gpu_milli)
        self.live = fleet.live_mask()
        self.live_rows = self.live.nonzero()[0].astype(np.int64)
        self.dirty_at = np.zeros(self.n, np.int64)

    def _extend(self, n: int) -> None:
        extra = n - self.n
        f = self.free
        g = f.gpu_milli.shape[1]
        self.free = Free(
            np.concatenate([f.cpu_millicores, np.zeros(extra, np.int64)]),
            np.concatenate([f.memory_bytes, np.zeros(extra, np.int64)]),
            np.concatenate([f.gpu_milli, np.zeros((extra, g), f.gpu_milli.dtype)]),
        )
        self.usable = np.concatenate([self.usable, np.zeros((extra, g), np.bool_)])
        self.gpu_total = np.concatenate([self.gpu_total, np.zeros(extra, np.int64)])
        self.live = np.concatenate([self.live, np.zeros(extra, np.bool_)])
        self.dirty_at = np.concatenate([self.dirty_at, np.zeros(extra, np.int64)])
        for key, (codes, gen) in self.static.items():
            self.static[key] = (np.concatenate([codes, np.zeros(extra, np.int16)]), gen)
        self.n = n  # the new slots are stamped in the fleet: the caller refreshes them

    def _refresh(self, fleet: Fleet, slots: I64) -> None:
        f = self.free
        f.cpu_millicores[slots] = (
            fleet.cpu_allocatable_millicores[slots] - fleet.cpu_allocated_millicores[slots]
        )
        f.memory_bytes[slots] = (
            fleet.memory_allocatable_bytes[slots] - fleet.memory_allocated_bytes[slots]
        )
        gpu = fleet.usable_gpu_free_milli(slots)
        f.gpu_milli[slots] = gpu
        self.usable[slots] = gpu_usable_rows(fleet, slots)
        self.gpu_total[slots] = row_sum(gpu)
        self.live[slots] = (fleet.flags[slots] & FLAG_EMPTY_SLOT) == 0

    def _finish(self, step: int, touched: list[I64]) -> None:
        self.step = step
        self._touched = touched

    def constraints_of(self, fleet: Fleet, pod: PodSpec) -> Constraints:
        """The pod shape compiled against the fleet (kept while the interners stay)."""
        key = pod.shape_key
        c = self.constraints.get(key)
        if c is None:
            c = self.constraints[key] = compile_pod(fleet, pod)
            while len(self.constraints) > 16 * self.max_shapes:
                old, _ = self.constraints.popitem(last=False)
                self.static.pop(old, None)
                self.scores.pop(old, None)
        else:
            self.constraints.move_to_end(key)
        return c

    def static_codes(self, fleet: Fleet, pod: PodSpec) -> NDArray[np.int16]:
        """(n_slots,) int16 first failing static filter per slot (live slots valid)."""
        key = pod.shape_key
        entry = self.static.get(key)
        c = self.constraints_of(fleet, pod)
        if entry is None:
            codes = np.zeros(self.n, np.int16)
            codes[self.live_rows] = static_first_failure(fleet, c, self.live_rows)
            self.static[key] = (codes, len(self._attr_log))
            limit = min(
                4 * self.max_shapes, max(self.max_shapes, self.max_bytes // (2 * self.n + 1))
            )
            while len(self.static) > limit:
                self.static.popitem(last=False)
            return codes
        codes, gen = entry
        if gen < len(self._attr_log):
            changed = np.unique(np.concatenate(self._attr_log[gen:]))
            codes[changed] = static_first_failure(fleet, c, changed)
            self.static[key] = (codes, len(self._attr_log))
        self.static.move_to_end(key)
        return codes

    def candidate_rows(self, fleet: Fleet, pod: PodSpec) -> I64:
        """Live slots passing every static filter for the pod's shape (ascending)."""
        key = pod.shape_key
        entry = self.candidates.get(key)
        if entry is not None and entry[1] == self.static_gen:
            self.candidates.move_to_end(key)
            return entry[0]
        codes = self.static_codes(fleet, pod)
        rows: I64 = self.live_rows[codes[self.live_rows] == 0]
        self.candidates[key] = (rows, self.static_gen)
        self.candidates.move_to_end(key)
        while len(self.candidates) > len(self.static):
            self.candidates.popitem(last=False)
        return rows

    def store_scores(self, key: Hashable, entry: _ScoreEntry) -> None:
        """Keep a shape's scores (least recently used shapes go first)."""
        self.scores[key] = entry
        self.scores.move_to_end(key)
        rows = sum(int(e[0].size) for e in self.scores.values())
        while len(self.scores) > 1 and (
            len(self.scores) > self.max_shapes or 32 * rows > self.max_bytes
        ):
            _, old = self.scores.popitem(last=False)
            rows -= int(old[0].size)


class _Engine:
    """One `place` call: scratch free resources and per-shape caches (the scratch arrays
    are a `PlacementCache`'s when one is given: they are resynced after the call)."""

    def __init__(
        self,
        fleet: Fleet,
        batch: Batch,
        policy: Policy,
        *,
        by_state: bool = True,
        cache: PlacementCache | None = None,
    ) -> None:
        self.fleet = fleet
        self.batch = batch
        self.policy = policy
        self.xc = cache
        self.touched: list[I64] = []  # slots whose scratch state changed (for the cache)
        if cache is not None:
            self.free = cache.free
            self.live_rows = cache.live_rows
            self.usable = cache.usable
            self.gpu_total = cache.gpu_total
            self.dirty_at = cache.dirty_at
            self.step = cache.step
        else:
            self.free = Free.of(fleet)
            self.live_rows = fleet.live_mask().nonzero()[0].astype(np.int64)
            self.usable = gpu_usable_matrix(fleet)
            self.gpu_total = row_sum(self.free.gpu_milli)  # (n_slots,) free milli-GPU
            self.dirty_at = np.zeros(fleet.n_slots, np.int64)
            self.step = 0
        self.constraints: dict[int, Constraints] = {}
        # Candidate rows per shape: passes static filters and had room at the last look.
        # Within one call free resources only shrink (trials are rolled back exactly),
        # so a row without room never gets room back.
        self.rows: dict[int, I64] = {}
        self.static: dict[int, NDArray[np.int16]] = {}
        self._static_key: dict[int, tuple[object, ...]] = {}
        self._static_by_key: dict[tuple[object, ...], NDArray[np.int16]] = {}
        self._rows_by_key: dict[tuple[object, ...], I64] = {}
        self._hist_by_key: dict[tuple[object, ...], NDArray[np.int64]] = {}
        self._gpu_room: dict[int, I64] = {}  # per share size: per class, see _class_capacity
        self._classes_by_key: dict[tuple[object, ...], tuple[int, I64, I64]] = {}
        self._summary: tuple[int, I64, NDArray[np.integer]] | None = None  # per-class GPUs
        self._profiles: tuple[I64, I64] | None = None  # filters.static_profiles of live rows
        self.exhausted: set[int] = set()
        # Per-shape cache of (rows, room, scores, picks, step) and per-slot change stamps.
        self.cache: dict[int, tuple[I64, I64, NDArray[np.float64], I64, int]] = {}
        self.in_trial = False
        self._topology: dict[TopologyLevel, I64] = {}
        self._n_domains: dict[TopologyLevel, int] = {}
        # The plugin choosing GPUs, if any (Policy.evaluate consults the first one).
        self.chooser = next((p for p, _ in policy.terms if p.chooses_gpus), None)
        # With state-only plugins, score each distinct node state once (_States).
        self.states: _States | None = None
        if by_state and all(getattr(p, "state_only", False) for p, _ in policy.terms):
            self.states = _States(fleet, self.free, self.usable, self.live_rows)
        # Per shape: scores, picks, room and a computed flag per class id.
        # Per shape (keyed by its Constraints object): depth sequences per state class.
        self.class_chunks: dict[int, dict[int, tuple[_Chunk, int]]] = {}
        self.class_cache: dict[int, tuple[NDArray[np.float64], I64, I64]] = {}

    def closed_form(self, c: Constraints) -> bool:
        """Whether the deeper states of shape c have a closed form (`states_after`): the
        GPUs are the engine's default choice, because no plugin chooses them, the pod takes
        no GPU, or it takes whole GPUs and the chooser takes the default ones for those."""
        if self.chooser is None or c.gpus_per_pod == 0:
            return True
        return c.milli_per_gpu >= GPU_MILLI and bool(
            getattr(self.chooser, "default_whole_gpus", False)
        )

    def topology(self, level: TopologyLevel) -> I64:
        col = self._topology.get(level)
        if col is None:
            col = self._topology[level] = _topology_column(self.fleet, level)
            self._n_domains[level] = int(col.max()) + 1 if col.size else 0
        return col

    def cons(self, shape: int) -> Constraints:
        c = self.constraints.get(shape)
        if c is None:
            pod = self.batch.shapes[shape]
            c = (
                compile_pod(self.fleet, pod)
                if self.xc is None
                else self.xc.constraints_of(self.fleet, pod)
            )
            self.constraints[shape] = c
        return c

    def static_codes(self, shape: int) -> NDArray[np.int16]:
        """First failing static filter per live row for the shape (0 = passes), cached."""
        codes = self.static.get(shape)
        if codes is None:
            if self.xc is None:
                # Shapes that differ only in their requests share their codes (and rows).
                key = static_key(self.cons(shape))
                codes = self._static_by_key.get(key)
                if codes is None:
                    codes = self._static_by_key[key] = self._static_first_failure(shape)
                self._static_key[shape] = key
            else:
                dense = self.xc.static_codes(self.fleet, self.batch.shapes[shape])
                codes = dense[self.live_rows]
            self.static[shape] = codes
        return codes

    def _static_first_failure(self, shape: int) -> NDArray[np.int16]:
        if len(self.batch.shapes) >= _BY_PROFILE_SHAPES:
            if self._profiles is None:
                self._profiles = static_profiles(self.fleet, self.live_rows)
            reps, profile_of = self._profiles
            return static_first_failure(self.fleet, self.cons(shape), reps)[profile_of]
        return static_first_failure(self.fleet, self.cons(shape), self.live_rows)

    def candidate_rows(self, shape: int) -> I64:
        """Live rows passing every static filter for the shape, cached."""
        rows = self.rows.get(shape)
        if rows is None:
            if self.xc is not None:
                rows = self.xc.candidate_rows(self.fleet, self.batch.shapes[shape])
            else:
                rows = self._static_rows(shape)
            self.rows[shape] = rows
        return rows

    def _static_rows(self, shape: int) -> I64:
        """Live rows passing every static filter for the shape (shared by the shapes with
        its static key; never written in place: shapes replace their rows)."""
        if self.xc is not None:
            ok: I64 = self.live_rows[self.static_codes(shape) == 0]
            return ok
        self.static_codes(shape)
        key = self._static_key[shape]
        rows = self._rows_by_key.get(key)
        if rows is None:
            rows = self._rows_by_key[key] = self.live_rows[self.static[shape] == 0]
        return rows

    def reason_for(self, shape: int) -> int:
        """Dominant reason why no node takes this shape now."""
        if not self.live_rows.size:
            return int(Reason.NO_NODES)
        codes = self.static_codes(shape)
        if self.states is None:
            ff = codes.copy()
            ok = ff == 0
            ff[ok] = resource_first_failure(self.free, self.cons(shape), self.live_rows[ok])
            why = Explanation.from_first_failures(ff)
        else:
            # Nodes of one state class fail the same resource filter: once per class, each
            # class counted with its nodes (a histogram, not a code per node).
            key = self._static_key.get(shape)
            static_hist = None if key is None else self._hist_by_key.get(key)
            if static_hist is None:
                static_hist = np.bincount(codes, minlength=N_REASONS)
                static_hist[0] = 0
                if key is not None:
                    self._hist_by_key[key] = static_hist
            hist = static_hist.copy()
            # The classes of the shape's static rows and their sizes, shared with the
            # shapes of its static key while nothing changes (reasons come at the end).
            seen = None if key is None else self._classes_by_key.get(key)
            if seen is None or seen[0] != self.step:
                counts = np.bincount(
                    self.states.of[self._static_rows(shape)], minlength=self.states.n
                )
                present = counts.nonzero()[0]
                seen = (self.step, present, counts[present])
                if key is not None:
                    self._classes_by_key[key] = seen
            _, present, sizes = seen
            per = self._class_first_failure(self.cons(shape), present)
            hist += np.bincount(per, weights=sizes, minlength=N_REASONS).astype(np.int64)
            why = Explanation.from_histogram(hist)
        return int(why.dominant) or int(Reason.INSUFFICIENT_CPU)

    def _class_first_failure(self, c: Constraints, ids: I64) -> NDArray[np.int16]:
        """`resource_first_failure` of the state classes `ids`, from per-class summaries
        made once (reasons come after the batch: classes no longer change) with 1-D
        comparisons: the same codes, without per-GPU work for every pending shape."""
        states = self.states
        assert states is not None
        if self._summary is None or self._summary[0] != states.n:
            gpu = states.gpu[: states.n]
            full = row_sum(gpu == GPU_MILLI)  # entirely free GPUs
            top = np.maximum.reduce(gpu, axis=1) if gpu.shape[1] else np.zeros(states.n, np.int64)
            self._summary = (states.n, full, top)
        _, full, top = self._summary
        # Filters in RESOURCE_FILTERS order; the first that fails wins (assigned last).
        per = np.zeros(ids.size, np.int16)
        if c.gpus_per_pod and c.milli_per_gpu < GPU_MILLI:
            at = top[ids]
            per[at < c.milli_per_gpu] = Reason.INSUFFICIENT_GPU_SHARE
            per[at <= 0] = Reason.INSUFFICIENT_GPU  # no GPU with anything free
        elif c.gpus_per_pod:
            per[full[ids] < c.gpus_per_pod] = Reason.INSUFFICIENT_GPU
        per[states.mem[ids] < c.memory_bytes] = Reason.INSUFFICIENT_MEMORY
        per[states.cpu[ids] < c.cpu_millicores] = Reason.INSUFFICIENT_CPU
        return per

    # -- one run of identical pods -------------------------------------------------------

    def _evaluate(self, rows: I64, c: Constraints) -> tuple[NDArray[np.float64], I64]:
        s0, p0 = self.policy.evaluate(NodeView.of(self.fleet, self.free, rows, self.usable), c)
        return np.where(s0 == s0, s0, -np.inf), p0  # NaN never wins

    def _scored(
        self, shape: int, c: Constraints, compact: bool = True
    ) -> tuple[I64, I64, NDArray[np.float64], I64]:
        """Rows with room for the shape, their room, depth-0 scores and GPU picks (with
        `compact=False`, rows without room may remain, with room 0 and score -inf).

        Cached per shape; a later run of the same shape (another priority, FIFO order,
        gang members) re-scores only the rows changed since (scores are node-local).
        """
        entry = self.cache.get(shape)
        if entry is None and self.xc is not None:
            rows, cap, s0, p0 = self._scored_across_calls(shape, c)
        elif entry is None:
            rows = self.candidate_rows(shape)
            cap = pod_capacity(self.free, c, rows, _NO_LIMIT)
            if not self.in_trial:
                keep = cap > 0
                rows, cap = rows[keep], cap[keep]
            s0, p0 = self._evaluate(rows, c)
        else:
            rows, cap, s0, p0, stamp = entry
            if self.step > stamp:
                changed = (self.dirty_at[rows] > stamp).nonzero()[0]
                if changed.size:
                    sub = rows[changed]
                    cap[changed] = pod_capacity(self.free, c, sub, _NO_LIMIT)
                    s0[changed], p0[changed] = self._evaluate(sub, c)
        if compact and not self.in_trial and not cap.all():
            # Outside gang trials free resources only shrink: a full row stays full.
            keep = cap > 0
            rows, cap, s0, p0 = rows[keep], cap[keep], s0[keep], p0[keep]
        self.cache[shape] = (rows, cap, s0, p0, self.step)
        if self.in_trial and not cap.all():
            keep = cap > 0
            return rows[keep], cap[keep], s0[keep], p0[keep]
        return rows, cap, s0, p0

    def _scored_across_calls(
        self, shape: int, c: Constraints
    ) -> tuple[I64, I64, NDArray[np.float64], I64]:
        """The first look at a shape in this call, from the PlacementCache: every static-ok
        row with its room and scores, re-scoring only rows changed since they were cached
        (rows without room hold -inf; the caller drops them)."""
        xc = self.xc
        assert xc is not None
        key = self.batch.shapes[shape].shape_key
        rows = self.candidate_rows(shape)
        old = xc.scores.get(key)
        todo: I64
        if old is None:
            cap = np.zeros(rows.size, np.int64)
            s0 = np.full(rows.size, -np.inf)
            p0 = np.zeros(rows.size, np.int64)
            todo = np.arange(rows.size, dtype=np.int64)
        else:
            o_rows, cap, s0, p0, stamp, gen = old
            if gen == xc.static_gen or np.array_equal(o_rows, rows):
                todo = (self.dirty_at[rows] > stamp).nonzero()[0]
            else:  # the static filters' row set changed: keep what is still there
                pos = np.minimum(o_rows.searchsorted(rows), max(o_rows.size - 1, 0))
                hit = (o_rows[pos] == rows) if o_rows.size else np.zeros(rows.size, np.bool_)
                cap = np.where(hit, cap[pos] if o_rows.size else 0, 0).astype(np.int64)
                s0 = np.where(hit, s0[pos] if o_rows.size else -np.inf, -np.inf)
                p0 = np.where(hit, p0[pos] if o_rows.size else 0, 0).astype(np.int64)
                todo = (~hit | (self.dirty_at[rows] > stamp)).nonzero()[0]
        if todo.size:
            sub = rows[todo]
            room = pod_capacity(self.free, c, sub, _NO_LIMIT)
            cap[todo] = room
            s0[todo] = -np.inf
            p0[todo] = 0
            fit = todo[room > 0]
            if fit.size:
                s0[fit], p0[fit] = self._evaluate(rows[fit], c)
        xc.store_scores(key, (rows, cap, s0, p0, self.step, xc.static_gen))
        return rows, cap, s0, p0

    def _class_table(
        self, shape: int, c: Constraints, ids: I64
    ) -> tuple[NDArray[np.float64], I64, I64]:
        """Per state class id: the shape's score, GPU pick and room, computed for `ids` if
        not yet (a class never changes state, so its values never go stale). Room -1: not
        computed yet; a class without room scores NaN (never ranked), a class with room
        whose score is NaN scores -inf (ranked last)."""
        states = self.states
        assert states is not None
        entry = self.class_cache.get(shape)
        if entry is None or entry[0].size < states.n:
            size = max(64, 2 * states.n)
            score = np.empty(size)
            pick = np.zeros(size, np.int64)
            room = np.empty(size, np.int64)
            room.fill(-1)
            if entry is not None:
                m = entry[0].size
                score[:m], pick[:m], room[:m] = entry
            entry = self.class_cache[shape] = (score, pick, room)
        score, pick, room = entry
        todo = ids[room[ids] < 0]
        if todo.size:
            room[todo] = r = self._class_capacity(c, todo)
            score[todo] = np.nan  # no room: never placed on, so never scored nor ranked
            roomy = r > 0
            todo, r = todo[roomy], r[roomy]
            if todo.size:
                view = states.view(self.fleet, self.usable, todo)
                if self.closed_form(c) and c.gpus_per_pod:
                    s, p = self._scored_with_chunks(c, view, todo, r)
                else:
                    s, p = self.policy.evaluate(view, c)
                score[todo] = np.where(s == s, s, -np.inf)  # a NaN score never wins
                pick[todo] = p
        return score, pick, room

    def _scored_with_chunks(
        self, c: Constraints, view: NodeView, ids: I64, room: I64
    ) -> tuple[NDArray[np.float64], I64]:
        """Scores and picks of the state classes `ids` (`view`, room `room` >= 1) for a
        GPU shape in closed form, and their class chunks (`_class_chunks`) from the same
        evaluation: GPUs leave a class room for a few pods only, so its deeper states cost
        little next to the evaluation a chunk of its own would take when a run first
        reaches the class (callgrind, benchmark instance: 3,195 -> 3,147 M instructions)."""
        cache = self.class_chunks.setdefault(id(c), {})
        n = int(ids.size)
        depth = min(int(np.maximum.reduce(room)), _FIRST_CLASS_DEPTH + 1) - 1
        if depth == 0:
            for cid in ids.tolist():
                cache[cid] = _SHALLOW  # room for one pod: no depth is ever read
            return self.policy.evaluate(view, c)
        # Depth 0 is the class's own state: its score and pick are the class table's.
        # Only the states within a class's room are scored (the others are never read).
        levels = np.arange(depth + 1, dtype=np.int64)
        wanted = (levels[None, :] < room[:, None]).ravel().nonzero()[0]
        flat_s = np.full(n * (depth + 1), -np.inf)
        flat_p = np.zeros(n * (depth + 1), np.int64)
        flat_s[wanted], flat_p[wanted] = self.policy.evaluate(
            states_after(view, c, levels).take(wanted), c
        )
        s = flat_s.reshape(n, depth + 1)
        p = flat_p.reshape(n, depth + 1)
        deeper = s[:, 1:]
        deeper = np.where(deeper == deeper, deeper, -np.inf)  # NaN never wins
        use = (room > 1).nonzero()[0]
        for cid in ids.tolist():
            cache[cid] = _SHALLOW  # room for one pod: no depth is ever read
        if use.size:
            cids = ids[use].tolist()
            block = _Chunk.of_block(
                cids, room[use], depth, deeper[use].tolist(), p[use, 1:].tolist()
            )
            for j, cid in enumerate(cids):
                cache[cid] = (block, j)
        return s[:, 0], p[:, 0]

    def _class_capacity(self, c: Constraints, ids: I64) -> I64:
        """`pod_capacity` of the state classes `ids` (no limit), the GPU part from per-class
        values kept per share size (shapes with the same share read them: a class's state
        never changes)."""
        states = self.states
        assert states is not None
        cap = np.empty(ids.size, np.int64)
        cap.fill(_NO_LIMIT)
        cpu, mem = states.cpu[ids], states.mem[ids]
        if c.cpu_millicores:
            np.minimum(cap, cpu // c.cpu_millicores, out=cap)
        else:
            cap[cpu < 0] = 0
        if c.memory_bytes:
            np.minimum(cap, mem // c.memory_bytes, out=cap)
        else:
            cap[mem < 0] = 0
        if c.gpus_per_pod:
            share = c.milli_per_gpu < GPU_MILLI
            m = c.milli_per_gpu if share else GPU_MILLI
            table = self._gpu_room.get(m)
            if table is None or table.size < states.n:
                grown = np.full(max(64, 2 * states.n), -1, np.int64)
                if table is not None:
                    grown[: table.size] = table
                table = self._gpu_room[m] = grown
            per = table[ids]
            miss = (per < 0).nonzero()[0]
            if miss.size:
                at = ids[miss]
                g = states.gpu[at]
                # Shares fitting on each GPU, or (whole GPUs) the GPUs entirely free.
                got = row_sum(g // m if share else g == GPU_MILLI)
                per[miss] = table[at] = got
            np.minimum(cap, per if share else per // c.gpus_per_pod, out=cap)
        np.maximum(cap, 0, out=cap)
        return cap

    def _rooms(self, shape: int, c: Constraints) -> tuple[I64, I64]:
        """Rows with room for the shape and their room (for gangs: no scores needed)."""
        states = self.states
        if states is None:
            rows, cap, _, _ = self._scored(shape, c)
            return rows, cap
        rows = self.candidate_rows(shape)
        cls = states.of.take(rows)
        present = np.bincount(cls, minlength=states.n).nonzero()[0]
        room = self._class_table(shape, c, present)[2]
        cap = room.take(cls)
        keep = cap > 0
        if not keep.all():
            rows, cap = rows[keep], cap[keep]
            if not self.in_trial:
                # Outside gang trials free resources only shrink: a full row stays full.
                self.rows[shape] = rows
        return rows, cap

    def _run_by_state(
        self, shape: int, c: Constraints, k: int, domain: tuple[I64, int] | None
    ) -> tuple[I64, I64]:
        """`run` when nodes are scored per state class: rank the classes present among the
        candidates, then touch only the rows of the best classes (at least k rows)."""
        states = self.states
        assert states is not None
        rows = self.candidate_rows(shape)
        if domain is not None:
            rows = rows[domain[0].take(rows) == domain[1]]
        # (`take`: the same values as fancy indexing, faster on thousands of rows.)
        cls = states.of.take(rows)
        counts = np.bincount(cls, minlength=states.n)
        present = counts.nonzero()[0]
        score, pick, room = self._class_table(shape, c, present)
        none = np.zeros(0, np.int64)
        # Rows go by (score descending, slot ascending), rows without room (NaN) never: the
        # first k are every row scoring above the k-th best row's score t, by score, then
        # the lowest slots scoring t (often thousands of alike nodes: not sorted).
        sc = score[present]
        # Only classes with room are ranked (most present classes have none: NaN).
        ok = (sc == sc).nonzero()[0]
        roomy = int(ok.size)
        sc = sc[ok]
        o = (-sc).argsort(kind="stable")
        reach = counts[present[ok[o]]].cumsum()
        rows_roomy = int(reach[-1]) if roomy else 0
        rs = score.take(cls)  # NaN (no room) compares false below
        if domain is None and not self.in_trial and 4 * (rows.size - rows_roomy) > rows.size:
            # Free resources only shrink outside gang trials: later runs of the shape skip
            # the rows without room (this one reads them as NaN).
            self.rows[shape] = rows[rs == rs]
        if roomy == 0 or k <= 0:
            return none, none
        t = sc[o[min(int(reach.searchsorted(k)), roomy - 1)]]
        before = (rs > t).nonzero()[0]
        if before.size:
            sel = np.concatenate(
                [
                    before[(-rs[before]).argsort(kind="stable")],
                    (rs == t).nonzero()[0][: k - before.size],
                ]
            )
        else:
            sel = (rs == t).nonzero()[0][:k]
        sel_cls = cls[sel]
        if k == 1:
            slots, picks = rows[sel], pick[sel_cls]
        else:
            sel_room = room[sel_cls]
            slots, picks = self._merge(
                c,
                k,
                rows[sel],
                np.minimum(sel_room, k),
                score[sel_cls],
                pick[sel_cls],
                np.arange(sel.size, dtype=np.int64),
                sel_room,
            )
        self.apply(c, slots, picks, sign=-1)
        return slots, picks

    def run(self, shape: int, k: int, domain: tuple[I64, int] | None = None) -> tuple[I64, I64]:
        """Place up to k pods of one shape (only on nodes whose topology column `domain[0]`
        equals `domain[1]`, if given), applying them to the scratch state. Returns (slots,
        gpu masks) of the pods placed, in order."""
        c = self.cons(shape)
        if self.states is not None:
            return self._run_by_state(shape, c, k, domain)
        if k == 1 and domain is None and self.xc is not None:
            # One pod (the daemon's Place): an argmax over the cached rows, full ones masked.
            rows, cap, s0, p0 = self._scored(shape, c, compact=False)
            if rows.size == 0:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            room = cap > 0
            masked = np.where(room, s0, -np.inf)
            j = int(masked.argmax())  # first maximum: rows ascending, so the lowest slot
            if not room[j]:  # no row with room, or every one scores -inf: the lowest slot
                if not room.any():
                    return np.zeros(0, np.int64), np.zeros(0, np.int64)
                j = int(room.argmax())
            slots, picks = rows[j : j + 1].copy(), p0[j : j + 1].copy()
            self.apply(c, slots, picks, sign=-1)
            return slots, picks
        rows, cap, s0, p0 = self._scored(shape, c)
        if domain is not None:
            inside = domain[0][rows] == domain[1]
            rows, cap, s0, p0 = rows[inside], cap[inside], s0[inside], p0[inside]
        n = int(rows.size)
        if n == 0 or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if k == 1:
            j = int(s0.argmax())  # first maximum: rows ascending, so the lowest slot
            slots, picks = rows[j : j + 1].copy(), p0[j : j + 1].copy()
        else:
            if k < n // 4:
                # Only the best k untouched nodes can be reached: sort just those (and ties).
                kth = np.partition(s0, n - k)[n - k]
                top = (s0 >= kth).nonzero()[0]
                order = top[(-s0[top]).argsort(kind="stable")]
            else:
                order = (-s0).argsort(kind="stable")  # rows ascending: ties -> lowest slot
            # At most k untouched nodes are ever reached.
            slots, picks = self._merge(c, k, rows, np.minimum(cap, k), s0, p0, order[:k])
        self.apply(c, slots, picks, sign=-1)
        return slots, picks

    def _merge(
        self,
        c: Constraints,
        k: int,
        rows: I64,
        cap: I64,
        s0: NDArray[np.float64],
        p0: I64,
        order: I64,
        room: I64 | None = None,
    ) -> tuple[I64, I64]:
        """Place k pods of shape c on `rows` (room `cap`, at most k; depth-0 scores `s0` and
        picks `p0`), the untouched rows taken in `order`: a k-way merge of per-row score
        sequences. `room`: each row's room regardless of k (class chunks outlive the run)."""
        n = int(order.size)
        neg_sorted = (-s0[order]).tolist()
        slot_sorted = rows[order].tolist()
        pick_sorted = p0[order].tolist()
        cap_sorted = cap[order].tolist()
        chunk_of: list[_Chunk] = []  # chunk per sorted position (filled lazily)
        chunk_pos: list[int] = []
        out_slots: list[int] = []
        out_picks: list[int] = []
        placed_on = [0] * n  # pods placed this run, per sorted position
        heap: list[tuple[float, int, int]] = []  # (-score, slot, sorted position)
        inf = float("inf")
        ptr = 0
        count = 0
        chunk_size = _FIRST_CHUNK
        while count < k:
            # The best head: the next untouched node or the best touched one.
            if ptr < n:
                u_neg, u_slot = neg_sorted[ptr], slot_sorted[ptr]
            else:
                u_neg, u_slot = inf, -1
            if heap and (
                ptr >= n or heap[0][0] < u_neg or (heap[0][0] == u_neg and heap[0][1] < u_slot)
            ):
                _, _, pos = heapq.heappop(heap)
                # Alternative for the streak below: the untouched head vs the new heap top.
                if heap and (
                    ptr >= n or heap[0][0] < u_neg or (heap[0][0] == u_neg and heap[0][1] < u_slot)
                ):
                    a_neg, a_slot = heap[0][0], heap[0][1]
                else:
                    a_neg, a_slot = u_neg, u_slot
            elif ptr < n:
                pos = ptr
                ptr += 1
                if pos >= len(chunk_of):  # next untouched rows: make their chunk
                    hi = min(n, pos + chunk_size)
                    chunk_size *= 2
                    idx = order[pos:hi]
                    if self.states is not None:
                        # One sequence per distinct state and shape, kept across runs: a
                        # state class never changes, so neither do its deeper scores.
                        assert room is not None
                        chunks, js = self._class_chunks(c, idx, rows, p0, room, k - count)
                        chunk_of.extend(chunks)
                        chunk_pos.extend(js)
                    else:
                        view = NodeView.of(self.fleet, self.free, rows[idx], self.usable)
                        chunk_of.extend([_Chunk(view, p0[idx], room=cap[idx])] * (hi - pos))
                        chunk_pos.extend(range(hi - pos))
                if heap and (
                    ptr >= n
                    or heap[0][0] < neg_sorted[ptr]
                    or (heap[0][0] == neg_sorted[ptr] and heap[0][1] < slot_sorted[ptr])
                ):
                    a_neg, a_slot = heap[0][0], heap[0][1]
                elif ptr < n:
                    a_neg, a_slot = neg_sorted[ptr], slot_sorted[ptr]
                else:
                    a_neg, a_slot = inf, -1
            else:
                break
            # A streak: keep placing on this node while its next score stays the best
            # (packing policies fill a node this way without touching the heap).
            slot = slot_sorted[pos]
            chunk, j = chunk_of[pos], chunk_pos[pos]
            start = done = placed_on[pos]
            limit = min(cap_sorted[pos], done + k - count)
            # (The chunk's depth and this row's scores as locals: the loop below runs
            # once per pod placed.)
            depth, row_scores = chunk.depth, chunk.scores[j]
            while True:
                done += 1
                if done >= limit:
                    break
                if depth < done:
                    if chunk.cids is not None:
                        chunk = chunk_of[pos] = self._own_chunk(c, chunk, j)
                        j = chunk_pos[pos] = 0
                    if chunk.depth < done:
                        if self.closed_form(c) and len(chunk.scores) == 1:
                            # One row (a state class) in one evaluation, however deep:
                            # straight to what the run can still place (capped by its room).
                            want = k - count - (done - start)
                        elif self.closed_form(c):  # a group of rows: doubling
                            want = max(2 * chunk.depth, _FIRST_DEPTH)
                        else:  # stepwise: the cost is per step, so overshoot little
                            want = max(chunk.depth // _STEP_GROWTH, _FIRST_STEPS)
                        self._deepen(c, chunk, min(want, k - count - (done - start)))
                    depth, row_scores = chunk.depth, chunk.scores[j]
                neg = -row_scores[done - 1]
                if neg < a_neg or (neg == a_neg and slot < a_slot):
                    continue
                heapq.heappush(heap, (neg, slot, pos))
                break
            # Pods start..done-1 of this node: the first pick from the run's initial
            # scores (depth 0), the others from the node's deeper picks.
            out_slots.extend([slot] * (done - start))
            if start == 0:
                out_picks.append(pick_sorted[pos])
                out_picks.extend(chunk.picks[j][: done - 1])
            else:
                out_picks.extend(chunk.picks[j][start - 1 : done - 1])
            count += done - start
            placed_on[pos] = done
        return np.asarray(out_slots, np.int64), np.asarray(out_picks, np.int64)

    def _class_chunks(
        self, c: Constraints, idx: I64, rows: I64, p0: I64, room: I64, remaining: int
    ) -> tuple[list[_Chunk], list[int]]:
        """The chunk and row in it of each candidate position `idx`, one row per state
        class. Classes met for the first time get theirs together: in closed form, one
        single-row chunk each with their first depths in one vectorized evaluation;
        otherwise one chunk holding all of them, deepened step by step on demand."""
        states = self.states
        assert states is not None
        cache = self.class_chunks.setdefault(id(c), {})
        cl = states.of[rows[idx]].tolist()
        new: list[int] = []
        first: dict[int, int] = {}
        for j, cid in enumerate(cl):
            if cid not in cache and cid not in first:
                first[cid] = j
                new.append(cid)
        if new:
            new.sort()
            ids = np.asarray(new, np.int64)
            if self.closed_form(c):
                steps = max(1, min(_FIRST_CLASS_DEPTH, remaining))
                # A class with room for r pods needs depths up to r - 1 at most (none for
                # one pod, e.g. an 8-GPU pod): evaluate only what some class can use.
                at = idx[np.asarray([first[cid] for cid in new], np.int64)]
                room_at = room[at]
                use = (room_at > 1).nonzero()[0]
                for cid in new:
                    cache[cid] = _SHALLOW  # room for one pod: no depth is ever read
                if use.size:
                    steps_used = min(steps, int(np.maximum.reduce(room_at)) - 1)
                    depths = np.arange(1, steps_used + 1, dtype=np.int64)
                    view = states.view(self.fleet, self.usable, ids[use])
                    s, p = self.policy.evaluate(states_after(view, c, depths), c)
                    s = np.where(s == s, s, -np.inf)
                    # One chunk for these classes' first depths: a chunk and two lists
                    # per class made garbage collection run every ~700 of them (thousands
                    # per call); a class deepened later gets its own chunk.
                    cids = [new[u] for u in use.tolist()]
                    block = _Chunk.of_block(
                        cids,
                        room_at[use],
                        steps,
                        s.reshape(use.size, steps_used).tolist(),
                        p.reshape(use.size, steps_used).tolist(),
                    )
                    for j, cid in enumerate(cids):
                        cache[cid] = (block, j)
            else:
                # The class's depth-0 pick: that of its first row here (all rows agree).
                at = idx[np.asarray([first[cid] for cid in new], np.int64)]
                group = _Chunk(states.view(self.fleet, self.usable, ids), p0[at], room=room[at])
                for j, cid in enumerate(new):
                    cache[cid] = (group, j)
        out = [cache[cid] for cid in cl]
        return [ch for ch, _ in out], [j for _, j in out]

    def _own_chunk(self, c: Constraints, block: _Chunk, j: int) -> _Chunk:
        """The chunk of row j's class of a block (`_Chunk.of_block`), made on first need:
        it starts from the block's row (the same lists, which the block never extends)."""
        assert block.cids is not None
        assert block.room is not None
        cache = self.class_chunks[id(c)]
        cid = block.cids[j]
        own = cache[cid][0]
        if own is block:
            own = _Chunk.of_class(
                cid, block.room[j : j + 1], block.depth, block.scores[j], block.picks[j]
            )
            cache[cid] = (own, 0)
        return own

    def _deepen(self, c: Constraints, chunk: _Chunk, steps: int) -> None:
        """Compute `steps` more depths of a chunk's rows, vectorized over the rows: in one
        evaluation of closed-form states when no plugin chooses GPUs, otherwise by
        simulating one more pod on every row and re-scoring, step by step."""
        r = len(chunk.scores)
        if self.closed_form(c):
            if chunk.room is not None:  # no deeper than the roomiest row can use
                steps = max(1, min(steps, int(np.maximum.reduce(chunk.room)) - 1 - chunk.depth))
            depths = np.arange(chunk.depth + 1, chunk.depth + steps + 1, dtype=np.int64)
            base = chunk._base
            if base is None:  # a state-class chunk: its one row is the class's state
                assert self.states is not None
                base = chunk._base = self.states.view(
                    self.fleet, self.usable, np.array([chunk.cid], np.int64)
                )
            s, p = self.policy.evaluate(states_after(base, c, depths), c)
            s = np.where(s == s, s, -np.inf)  # NaN never wins
            s_rows = s.reshape(r, steps).tolist()
            p_rows = p.reshape(r, steps).tolist()
            for j in range(r):
                chunk.scores[j].extend(s_rows[j])
                chunk.picks[j].extend(p_rows[j])
            chunk.depth += steps
            return
        v, pk, live, carry = chunk.last_view, chunk.last_pick, chunk.live, chunk.carry
        assert v is not None  # stepwise chunks are built with a view
        if chunk.room is not None:
            # Rows without room for another pod never need deeper scores: drop them.
            room = chunk.room[live]
            keep = (room > chunk.depth + 1).nonzero()[0]
            if keep.size < live.size:
                v, pk, live, room = v.take(keep), pk[keep], live[keep], room[keep]
                carry = None if carry is None else tuple(a[keep] for a in carry)
            # ... nor beyond its room: no more steps than the roomiest row can use.
            steps = max(1, min(steps, int(np.maximum.reduce(room)) - 1 - chunk.depth))
        scores, picks, v, carry = self.policy.chain(v, c, pk, steps, carry)
        by_step = np.asarray(scores)
        rows_s = np.where(by_step == by_step, by_step, -np.inf).T.tolist()  # NaN never wins
        rows_p = np.asarray(picks).T.tolist()
        chunk.last_view, chunk.last_pick, chunk.live, chunk.carry = v, picks[-1], live, carry
        chunk.depth += steps
        for i, j in enumerate(live.tolist()):
            chunk.scores[j].extend(rows_s[i])
            chunk.picks[j].extend(rows_p[i])

    def apply(self, c: Constraints, slots: I64, picks: I64, sign: int) -> None:
        """Add (sign=+1) or take (sign=-1) pods of shape c to/from the scratch state."""
        if slots.size == 0:
            return
        self.step += 1
        if self.states is None:  # per-node scores read the change stamps (by-state: never)
            self.dirty_at[slots] = self.step
        if self.xc is not None:
            self.touched.append(slots)
        free = self.free
        if c.cpu_millicores:
            np.add.at(free.cpu_millicores, slots, sign * c.cpu_millicores)
        if c.memory_bytes:
            np.add.at(free.memory_bytes, slots, sign * c.memory_bytes)
        # The share as a scalar of the GPU array's dtype: `add.at` with a Python int casts
        # on a path several times slower.
        share = free.gpu_milli.dtype.type(sign * c.milli_per_gpu)
        if c.gpus_per_pod == 1 and np.count_nonzero(picks) == picks.size:
            # One GPU per pod: its index is the number of bits below the pick's one bit.
            gpu_i = np.bitwise_count(picks - 1)
            np.add.at(free.gpu_milli, (slots, gpu_i), share)
            np.add.at(self.gpu_total, slots, sign * c.milli_per_gpu)
        elif c.gpus_per_pod:
            pod_i, gpu_i = pick_bits(picks, free.gpu_milli.shape[1]).nonzero()
            np.add.at(free.gpu_milli, (slots[pod_i], gpu_i), share)
            np.add.at(self.gpu_total, slots[pod_i], sign * c.milli_per_gpu)
        if self.states is not None:
            # A run places a node's pods one after another: dropping consecutive repeats
            # leaves few (re-classing a slot twice is harmless), without np.unique's sort.
            if slots.size > 1:
                slots = slots[np.concatenate(([True], slots[1:] != slots[:-1]))]
            self.states.assign(slots)

    # -- gangs ---------------------------------------------------------------------------

    def place_gang(self, gang: GangSpec, members: I64) -> tuple[I64, I64, I64]:
        """Place a gang all-or-nothing. Returns per member (slot, gpu mask, reason).

        For each level from the preferred (tightest) to the required one: the candidate
        domains are those where, for every member shape, the summed per-node room is at
        least the number of members of that shape (necessary; exact for one-shape gangs);
        they are tried tightest first (least free GPU share, then least free CPU, on the
        gang's candidate nodes; then lowest domain id) by placing the members in order with
        the policy, restricted to the domain. The first domain where all fit wins.
        """
        shapes = self.batch.shape_of[members].astype(np.int64)
        m = int(members.size)
        none = np.full(m, -1, np.int64)
        # Runs of consecutive identical members.
        starts = [0] + [i for i in range(1, m) if shapes[i] != shapes[i - 1]]
        runs = [(int(shapes[a]), b - a) for a, b in zip(starts, [*starts[1:], m], strict=True)]
        need: dict[int, int] = {}
        for s, cnt in runs:
            need[s] = need.get(s, 0) + cnt
        caps: dict[int, tuple[I64, I64]] = {}
        for s in need:
            rows, cap = self._rooms(s, self.cons(s))
            caps[s] = (rows, np.minimum(cap, need[s]))
        hopeless = [s for s in need if caps[s][0].size == 0]
        if hopeless:
            # Members that fit nowhere get their own reason at the end (-1 here).
            reasons = np.full(m, int(Reason.GANG_MEMBER), np.int64)
            for s in hopeless:
                reasons[shapes == s] = -1
            return none, np.zeros(m, np.int64), reasons
        if len(caps) == 1:
            cand = next(iter(caps.values()))[0]
        else:
            cand = np.unique(np.concatenate([rows for rows, _ in caps.values()]))
        for level in gang_levels(gang):
            dom = self.topology(level)
            n_dom = self._n_domains[level]
            ok = np.ones(n_dom, bool)
            dom_cand = dom.take(cand)
            for s, (rows, cap) in caps.items():
                dom_rows = dom_cand if rows is cand else dom.take(rows)
                room = np.bincount(dom_rows, weights=cap, minlength=n_dom)
                ok &= room >= need[s]
            gfree = np.bincount(dom_cand, weights=self.gpu_total.take(cand), minlength=n_dom)
            cfree = np.bincount(
                dom_cand, weights=self.free.cpu_millicores.take(cand), minlength=n_dom
            )
            doms = ok.nonzero()[0]
            g, cf = gfree[doms], cfree[doms]
            while doms.size:
                # The tightest domain left (least GPU, then CPU, then lowest id): two minimum
                # scans rather than a sort, as the first domain tried usually takes the gang.
                best = (g == g.min()).nonzero()[0]
                if best.size > 1:
                    best = best[cf[best] == cf[best].min()]
                i = int(best[0])
                self.in_trial = True
                try:
                    placed = self._trial(runs, dom, int(doms[i]))
                finally:
                    self.in_trial = False
                if placed is not None:
                    return placed[0], placed[1], np.zeros(m, np.int64)
                doms, g, cf = np.delete(doms, i), np.delete(g, i), np.delete(cf, i)
        return none, np.zeros(m, np.int64), np.full(m, int(Reason.GANG_TOPOLOGY), np.int64)

    def _trial(self, runs: list[tuple[int, int]], dom: I64, d: int) -> tuple[I64, I64] | None:
        done: list[tuple[int, I64, I64]] = []
        for s, cnt in runs:
            slots, picks = self.run(s, cnt, (dom, d))
            done.append((s, slots, picks))
            if slots.size < cnt:
                for s2, sl, pk in reversed(done):
                    self.apply(self.cons(s2), sl, pk, sign=+1)
                return None
        return (
            np.concatenate([sl for _, sl, _ in done]),
            np.concatenate([pk for _, _, pk in done]),
        )


def place(
    fleet: Fleet,
    batch: Batch | Sequence[QueueItem],
    policy: Policy | str | None = None,
    *,
    order: Order = Order.LARGEST_FIRST,
    cache: PlacementCache | None = None,
) -> PlacementResult:
    """Place a queue of pods and gangs on the fleet without mutating it.

    `policy` is a Policy, a spec string for `Policy.parse`, or None (DEFAULT_POLICY).
    `order` chooses GROUPED (priority, then identical shapes together: fast) or FIFO
    (priority, then exact input order). Apply the result with `commit`.
    `cache`: a PlacementCache kept by the caller across calls on this fleet, so that a call
    only re-scores what changed since the last one (same decisions, faster).
    """
    if not isinstance(batch, Batch):
        batch = Batch.of(batch)
    if not isinstance(policy, Policy):
        spec = policy or DEFAULT_POLICY
        policy = Policy.parse(spec) if cache is None else cache.policy_for(spec)
    if cache is None:
        return _place(fleet, batch, policy, order, None)
    cache.sync(fleet, policy)
    try:
        return _place(fleet, batch, policy, order, cache)
    except BaseException:
        cache.clear()  # the scratch state may be half-applied: start afresh next time
        raise


def _place(
    fleet: Fleet, batch: Batch, policy: Policy, order: Order, cache: PlacementCache | None
) -> PlacementResult:
    p = len(batch)
    node_slot = np.full(p, -1, np.int64)
    gpu_mask = np.zeros(p, np.int64)
    reason = np.zeros(p, np.int16)
    seq = batch.order(order)
    # Segments of the ordered queue: one gang, or consecutive solo pods of one shape.
    gseq = batch.gang_of[seq].astype(np.int64)
    key = np.where(gseq >= 0, -1 - gseq, batch.shape_of[seq].astype(np.int64))
    bounds = np.diff(key).nonzero()[0] + 1
    starts = [0, *bounds.tolist()]
    ends = [*bounds.tolist(), p]
    # Scoring per distinct node state pays off when runs are long; with FIFO-like queues
    # (runs of one pod) scoring only the changed rows is cheaper. Same decisions either way.
    by_state = p >= max(_BY_STATE_RUN * len(starts), _BY_STATE_MIN_PODS)
    engine = _Engine(fleet, batch, policy, by_state=by_state, cache=cache)
    pending: list[tuple[I64, int]] = []  # unplaced pods whose reason is filled in at the end
    for a, b in zip(starts, ends, strict=True):
        if a >= b:
            continue
        seg = seq[a:b]
        k = int(key[a])
        if k < 0:
            slots, masks, reasons = engine.place_gang(batch.gangs[-1 - k], seg)
            node_slot[seg] = slots
            gpu_mask[seg] = masks
            reason[seg] = reasons
            for s_ in np.unique(batch.shape_of[seg[reasons < 0]]).tolist():
                pending.append((seg[(reasons < 0) & (batch.shape_of[seg] == s_)], int(s_)))
            continue
        if k in engine.exhausted:
            pending.append((seg, k))
            continue
        slots, masks = engine.run(k, b - a)
        placed = seg[: slots.size]
        node_slot[placed] = slots
        gpu_mask[placed] = masks
        if slots.size < seg.size:
            engine.exhausted.add(k)
            pending.append((seg[slots.size :], k))
    # Reasons describe the fleet after the whole batch (resources only shrink during it).
    reasons_of: dict[int, int] = {}
    for pods_, s_ in pending:
        if s_ not in reasons_of:
            reasons_of[s_] = engine.reason_for(s_)
        reason[pods_] = reasons_of[s_]
    if cache is not None:  # the scratch changes are undone by resyncing those slots
        cache._finish(engine.step, engine.touched)
    shapes = batch.shapes
    shape_of = batch.shape_of
    milli = np.array([sp.milli_per_gpu for sp in shapes], np.int64)[shape_of]
    cpu = np.array([sp.cpu_millicores for sp in shapes], np.int64)[shape_of]
    mem = np.array([sp.memory_bytes for sp in shapes], np.int64)[shape_of]
    milli = np.where(node_slot >= 0, milli, 0)
    slot_names, slot_clusters = slot_tables(fleet, node_slot)
    return PlacementResult(
        pod_names=batch.names,
        node_slot=node_slot,
        gpu_mask=gpu_mask,
        gpu_milli_per_gpu=milli,
        cpu_millicores=cpu,
        memory_bytes=mem,
        reason=reason,
        order=seq,
        slot_names=slot_names,
        slot_clusters=slot_clusters,
        fleet_version=fleet.version,
    )


def slot_tables(
    fleet: Fleet, node_slot: I64
) -> tuple[dict[int, str | None], dict[int, str | None]]:
    """Node and cluster names of the slots pods were placed on (a result's own copy)."""
    placed = node_slot[node_slot >= 0]
    # np.unique's sorted slots by counting (slots < n_slots): no sort of every pod.
    used = np.bincount(placed, minlength=fleet.n_slots).nonzero()[0].tolist()
    clusters = fleet.clusters.names
    cids = fleet.cluster_id[used].tolist() if used else []
    return (
        {s: fleet.names[s] for s in used},
        {s: (clusters[c] if c >= 0 else None) for s, c in zip(used, cids, strict=True)},
    )


def explain(fleet: Fleet, pod: PodSpec) -> Explanation:
    """Per-reason node counts for one pod against the fleet's current state."""
    c = compile_pod(fleet, pod)
    rows = fleet.live_mask().nonzero()[0]
    return Explanation.from_first_failures(first_failure(fleet, c, Free.of(fleet), rows))
