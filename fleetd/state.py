"""The state owner: the single writer in front of the node table and the placement core.

Every mutation (telemetry, watches, Place, Release, confirmation, expiry, staleness) is a
synchronous method of `FleetState` called on the daemon's event loop thread. None of them
awaits, so each runs to completion before any other coroutine is scheduled: that is the one
serialized path that makes "never oversubscribed" true for any number of concurrent Place
calls (which `submit` gathers into batches, one core call each; the core's `Fleet.allocate`
re-checks every commit). A mutation from another thread raises: Kubernetes watch threads
must hop onto the loop, e.g. `asyncio.run_coroutine_threadsafe(state.apply(update), loop)`.

Reservations are written to the journal before a Place reply leaves; on start, the journal's
reservations are restored and re-allocated as their nodes appear, and Place is refused
(not ready) until every configured source has synced, so nothing is allocated twice.
After that, a cluster whose source lost its sync only leaves placement (`lost_clusters`):
its nodes carry the core's stale flag, its reservations are kept, and the daemon stays
ready while any source is synced.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

import scheduling
from fleetd import engine
from fleetd.config import Config, TeamQuota, gpu_milli
from fleetd.engine import PodRequest, node_key
from fleetd.journal import Journal, QueuedWorkload, Reservation, ReservedPod, pod_fields
from fleetd.quota import ALLOWED, QUOTA_REASON, QuotaLedger, Verdict
from fleetd.sources import updates as up
from scheduling import Allocation, AllocationError, Fleet, NodeSpec
from scheduling.autoscale import ScaleDecision

Clock = Callable[[], float]
T = TypeVar("T")
WORKLOAD_LABEL = "fleetd.io/workload-id"
POD_NAME_LABEL = "fleetd.io/pod-name"
GPU_MILLI_LABEL = "fleetd.io/gpu-milli"

#: The "cluster" of a source's readiness entry when it does not know its clusters up front.
SOURCE_WIDE = "*"

#: Place requests per batch (one core call); more wait for the next turn of the loop.
MAX_BATCH = 256

#: Queue retries per capacity-freeing event: bounds the work a Release can trigger
#: (at most this many placement attempts, and no more than QUEUE_RETRY_BUDGET_S of work).
QUEUE_RETRY_BUDGET = 32
QUEUE_RETRY_BUDGET_S = 0.005

#: Pod phases in which a pod holds nothing any more (kubelet semantics).
_FINISHED_PHASES = frozenset(("Succeeded", "Failed"))


class StateError(Exception):
    """Base of the errors the API edge maps to gRPC status codes."""


class NotFound(StateError):
    """Unknown cluster, pool or workload (NOT_FOUND)."""


class Conflict(StateError):
    """The workload id already holds a different request (ALREADY_EXISTS)."""


class NotReady(StateError):
    """Initial sync not finished (UNAVAILABLE)."""


class QueueFull(StateError):
    """The queue holds limits.max_queued_workloads already (RESOURCE_EXHAUSTED)."""


class OutOfRange(StateError):
    """A resume point older than the retained history (OUT_OF_RANGE)."""


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """A validated Place/Explain request, in the daemon's own values."""

    workload_id: str
    team: str
    priority: int
    pods: tuple[PodRequest, ...]
    gang: bool = False
    same: str = ""
    cluster: str = ""
    pool: str = ""
    ttl_s: float = 0.0
    fingerprint: str = ""


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a workload does (not) fit: node counts per reason code, and a one-line summary."""

    nodes_total: int
    nodes_feasible: int
    reasons: tuple[tuple[str, int, str], ...]  # (code, nodes, text)
    summary: str


@dataclass(frozen=True, slots=True)
class Decision:
    """One entry of the decision stream (converted to protobuf at the API edge)."""

    seq: int
    time_s: float
    kind: str  # "place" | "release" | "expire" | "confirm"
    workload_id: str
    team: str
    result: str  # "placed" | "queued" | "unschedulable" | "" (release, expire)
    placements: tuple[ReservedPod, ...] = ()
    explanation: Explanation | None = None
    reservation_state: str = ""  # "pending" | "confirmed" | "released" | "expired" | ""
    expires_at_s: float = 0.0
    replayed: bool = False


@dataclass(slots=True)
class _Held:
    """A live reservation: its journal record plus the rows its pods occupy (None = not yet)."""

    record: Reservation
    slots: list[Allocation | None]
    observed: list[str | None]  # pod uid that confirmed each pod


@dataclass(slots=True)
class _Queued:
    request: WorkloadRequest
    priority: int
    seq: int
    since_s: float
    #: Why it did not fit at its last try (queued, a retry that considered it, its client's
    #: repeated Place), and when (None: not tried since a restart; the queueing decision
    #: says, if retained).
    explanation: Explanation | None = None
    explained_s: float = 0.0
    #: Whether its team's quota held it back at its last try (a TEAM_QUOTA reason), and
    #: since when that has been so, or not so (`FleetState.oldest_queued_s`).
    quota_held: bool = False
    cause_since_s: float = 0.0

    def tried(self, explanation: Explanation, now_s: float) -> None:
        """It did not fit, at `now_s`, for `explanation`'s reasons."""
        held = any(code == QUOTA_REASON for code, _, _ in explanation.reasons)
        if held != self.quota_held:
            self.quota_held, self.cause_since_s = held, now_s
        self.explanation, self.explained_s = explanation, now_s


@dataclass(slots=True)
class _RetryRound:
    """One capacity-freeing event's pass over the queue, possibly over several loop turns."""

    considered: set[str] = field(default_factory=set)
    #: Shapes that found no room this round: the core's outcome (the same for every
    #: workload of the shape; the quota's part of the reasons is each team's own).
    failed: dict[tuple[object, ...], engine.Outcome] = field(default_factory=dict)
    #: Their explanations, by shape and the quota's part (with clusters lost, an
    #: explanation counts the nodes: made once a shape, not once a workload).
    explained: dict[tuple[object, ...], Explanation] = field(default_factory=dict)
    #: Workloads tried (the budget): those their team's quota holds back do not count.
    tried: int = 0


@dataclass(slots=True)
class _ObservedPod:
    cluster: str
    node: str
    slot: Allocation | None
    labels: dict[str, str] = field(default_factory=dict)
    request: up.Resources | None = None
    reservation: tuple[str, int] | None = None  # (workload_id, pod index) when it confirmed one


@dataclass(slots=True)
class _NodeInfo:
    cluster: str
    name: str
    pool: str
    zone: str
    gpu_model: str
    labels: dict[str, str]
    taints: tuple[tuple[str, str, str], ...]
    ready: bool
    cordoned: bool
    stale: bool = False
    last_seen_s: float = 0.0
    #: The last update written to the node table in full (or its flags): `last_update` is
    #: made from it when first needed.
    applied_update: up.NodeUpdate | None = None
    #: `applied_update` without its sequence, time and pods: a repeat of it is a heartbeat.
    last_update: up.NodeUpdate | None = None
    #: What of the last applied update the node table holds (`_spec_signature`), and that
    #: update (a source that builds the next one from it shares its field objects).
    spec_signature: tuple[object, ...] | None = None
    spec_update: up.NodeUpdate | None = None
    #: `content_token` of the last applied NodeUpdate: NodeHeartbeats entries must match it.
    content_token: bytes = b""
    #: The heartbeat table and slot this `_NodeInfo` is bound (or suspended) at, kept by
    #: `_HeartbeatTable` (a node bound in several sources' tables: the last one), so that a
    #: changed report finds its slot without a lookup (`FleetState._apply_node_update`).
    beat_table: _HeartbeatTable | None = None
    beat_slot: int = -1


class _HeartbeatTable:
    """One source's heartbeat slots (`HeartbeatSlots`): the node each is bound to, with
    columns that a `NodeHeartbeats` batch checks and moves in a few numpy steps instead of
    a lookup and several writes per entry.

    A binding is dropped (`release`) whenever anything else about its node is applied (a
    new `_NodeInfo`, its removal), so a slot never refreshes replaced content; a report of
    new content only suspends it (`suspend`: unbound, but the slot keeps its node), so that
    binding the slot to the node's new content, what the source does next, is a few writes
    (`rebind`). A slot is bound when its `column` sequence is above 0. Two columns run ahead
    of what they stand for and are written back by `flush`: the gate cell's sequence
    (`column`) and the node's `last_seen_s` (`seen`).
    """

    __slots__ = ("cells", "cluster_ids", "clusters", "column", "infos", "keys", "seen",
                 "slot_of", "stale")  # fmt: skip

    def __init__(self) -> None:
        self.column = up.SequenceColumn()
        n = self.column.capacity
        #: Node key -> its slot.
        self.slot_of: dict[str, int] = {}
        self.infos: list[_NodeInfo | None] = [None] * n
        self.keys: list[str] = [""] * n
        #: The gate cell each slot was bound with (None once dropped).
        self.cells: list[up.SequenceCell | None] = [None] * n
        #: Each slot's cluster, as an index into `clusters`.
        self.cluster_ids: NDArray[np.int64] = np.zeros(n, np.int64)
        self.clusters: list[str] = []
        #: When the last heartbeat not yet written to `last_seen_s` came (0: none).
        self.seen: NDArray[np.float64] = np.zeros(n, np.float64)
        #: The node's `stale` flag (kept by `FleetState` while the binding lives).
        self.stale: NDArray[np.bool_] = np.zeros(n, np.bool_)

    def bound(self, slots: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Which of `slots` (any integers) are bound."""
        seq = self.column.seq
        inside = (slots >= 0) & (slots < len(seq))
        out = np.zeros(len(slots), np.bool_)
        out[inside] = seq[slots[inside]] > 0
        return out

    def bind(
        self,
        cluster: str,
        slots: list[int],
        keys: list[str],
        infos: list[_NodeInfo],
        cells: list[up.SequenceCell],
    ) -> None:
        """Bind slots to nodes of `cluster` (unbinding what either had before)."""
        for slot, key in zip(slots, keys, strict=True):
            if slot < len(self.infos) and self.infos[slot] is not None:
                self.unbind(slot)
            if key in self.slot_of:
                self.release(key)
        self.column.bind(slots, cells)
        grow = self.column.capacity - len(self.infos)
        if grow > 0:
            self.infos.extend([None] * grow)
            self.keys.extend([""] * grow)
            self.cells.extend([None] * grow)
            self.cluster_ids = np.concatenate([self.cluster_ids, np.zeros(grow, np.int64)])
            self.seen = np.concatenate([self.seen, np.zeros(grow, np.float64)])
            self.stale = np.concatenate([self.stale, np.zeros(grow, np.bool_)])
        if cluster not in self.clusters:
            self.clusters.append(cluster)
        table_infos, table_keys, table_cells, slot_of = (
            self.infos, self.keys, self.cells, self.slot_of
        )  # fmt: skip
        for slot, key, info, cell in zip(slots, keys, infos, cells, strict=True):
            slot_of[key] = slot
            table_infos[slot] = info
            table_keys[slot] = key
            table_cells[slot] = cell
            info.beat_table = self
            info.beat_slot = slot
        self.cluster_ids[slots] = self.clusters.index(cluster)
        self.seen[slots] = 0.0
        self.stale[slots] = [info.stale for info in infos]

    def flush(self, slot: int) -> None:
        """Write the slot's sequence and freshness back to its cell and `_NodeInfo`."""
        self.column.flush(slot)
        seen = self.seen.item(slot)
        if seen:
            info = self.infos[slot]
            if info is not None and seen > info.last_seen_s:
                info.last_seen_s = seen
            self.seen[slot] = 0.0

    def flush_all(self) -> None:
        """`flush` every slot."""
        self.column.flush_all()
        for slot in np.flatnonzero(self.seen).tolist():
            self.flush(slot)

    def unbind(self, slot: int) -> None:
        """Flush and empty a bound slot."""
        if self.slot_of.get(self.keys[slot]) == slot:
            del self.slot_of[self.keys[slot]]
        self._drop(slot)

    def release(self, key: str) -> None:
        """Unbind the node's slot, if it has one."""
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self._drop(slot)

    def suspend(self, key: str) -> up.SequenceCell | None:
        """Unbind the node's slot (new content of the node is about to be applied), its
        sequence and freshness written back, but keep the slot's node for `rebind`. Returns
        the node's gate cell when it has a slot (see `rebind`), else None."""
        slot = self.slot_of.get(key)
        return None if slot is None else self.suspend_slot(slot)

    def suspend_slot(self, slot: int) -> up.SequenceCell | None:
        """`suspend` of a slot by number (a `_NodeInfo` names its own: `beat_slot`)."""
        seq = self.column.seq
        last = seq.item(slot)
        cell = self.cells[slot]  # (the column's cell of the slot: `bind` puts both)
        if last:
            if cell is not None and last > cell.last:
                cell.last = last
            seq[slot] = 0
        seen = self.seen.item(slot)
        if seen:
            self.seen[slot] = 0.0
            info = self.infos[slot]
            if info is not None and seen > info.last_seen_s:
                info.last_seen_s = seen
        return cell

    def rebind(self, slot: int, cluster: str, name: str, token: bytes) -> bool:
        """`bind` of a suspended slot to its node's new content `token`: True when done,
        False (nothing done) when the slot is not suspended from node `name` of `cluster`
        or the node's content is not `token` (`bind` decides then).

        A suspended slot's `_NodeInfo` and gate cell are the node's current ones: a new
        `_NodeInfo` (`_node_update`) or the node's removal drops the slot (`release`), and the
        gate keeps a live node's cell. So this looks up neither the node nor its cell (a
        changed node's binding, ~5% of reports, costs a few writes)."""
        if slot >= len(self.infos):
            return False
        info = self.infos[slot]
        seq = self.column.seq
        if (
            info is None
            or seq.item(slot) != 0  # (still bound: `bind` writes it back first)
            or info.name != name  # (the slot's `_NodeInfo` is its node's: `keys[slot]`)
            or info.cluster != cluster
            or not token
            or info.content_token != token
        ):
            return False
        cell = self.cells[slot]
        assert cell is not None  # (set with the info, dropped with it)
        seq[slot] = cell.last
        self.stale[slot] = info.stale
        return True

    def _drop(self, slot: int) -> None:
        # (`flush` and `column.unbind` in one: this runs for every applied node update.)
        info = self.infos[slot]
        self.infos[slot] = None
        self.cells[slot] = None
        self.column.unbind(slot)
        if info is not None and info.beat_table is self and info.beat_slot == slot:
            info.beat_table = None
            info.beat_slot = -1
        seen = self.seen.item(slot)
        if seen:
            self.seen[slot] = 0.0
            if info is not None and seen > info.last_seen_s:
                info.last_seen_s = seen


@dataclass(slots=True)
class _SourceInfo:
    synced: bool = False
    last_update_s: float = 0.0
    last_observed_s: float = 0.0
    #: When the source last reported losing its connection (0: connected), and why.
    down_since_s: float = 0.0
    down_reason: str = ""
    #: Down for longer than the source's `sync_lost_after_s`: its sync is lost (not ready).
    lost: bool = False
    #: How far the initial sync is, as the source last said ('' when it says nothing).
    progress: str = ""


#: Explain's reason for the nodes of a cluster whose source lost its sync.
CLUSTER_SYNC_LOST = "CLUSTER_SYNC_LOST"
CLUSTER_SYNC_LOST_TEXT = "node(s) in a cluster whose telemetry is lost"

_OVERFLOW = "overflow"
_CLOSED = "closed"


@dataclass(slots=True)
class _Subscriber:
    queue: asyncio.Queue[Decision | str]
    overflowed: bool = False


@dataclass(slots=True)
class StateMetrics:
    """Hooks the state calls with what happened (set by fleetd.metrics; no-ops by default)."""

    decision: Callable[[str, str], None] = lambda kind, result: None
    telemetry_lag: Callable[[str, float], None] = lambda cluster, lag_s: None
    update_ignored: Callable[[str], None] = lambda reason: None
    #: (cluster, nodes) a node inventory removed (telemetry's relist).
    inventory_removed: Callable[[str, int], None] = lambda cluster, nodes: None
    #: (team label, "placed" | "released", seconds) a workload left the queue after waiting.
    queue_wait: Callable[[str, str, float], None] = lambda team, outcome, wait_s: None


def _signal(sub: _Subscriber, marker: str) -> None:
    """Queue an end marker for a watcher, dropping undelivered decisions if it is full."""
    while True:
        try:
            sub.queue.put_nowait(marker)
            return
        except asyncio.QueueFull:
            sub.queue.get_nowait()


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    """A scale decision of the autoscaler as streamed by NodePools.WatchScaleDecisions."""

    seq: int
    time_s: float
    decision: ScaleDecision
    from_size: int
    to_size: int
    #: Computed in dry-run mode: shown, never acted on.
    dry_run: bool = False


class Broadcast(Generic[T]):
    """Seq-ordered values kept for resume and fanned out to watchers (bounded per watcher)."""

    def __init__(self, retain: int, backlog: Callable[[], int]) -> None:
        self.history: collections.deque[T] = collections.deque(maxlen=retain)
        self.subscribers: list[_Subscriber] = []
        self.seq = 0
        self._backlog = backlog

    def publish(self, item: T) -> None:
        """Append and fan out; a watcher that fell `backlog` items behind is cut off."""
        self.history.append(item)
        for sub in self.subscribers:
            if sub.overflowed:
                continue
            try:
                sub.queue.put_nowait(item)  # type: ignore[arg-type]
            except asyncio.QueueFull:
                sub.overflowed = True
                _signal(sub, _OVERFLOW)

    async def watch(self, after_seq: int, from_now: bool) -> AsyncIterator[T]:
        """Retained items with seq > after_seq (OutOfRange if too old), then live ones."""
        backlog: list[T] = []
        if not from_now:
            oldest = self.history[0].seq if self.history else self.seq + 1  # type: ignore[attr-defined]
            if after_seq + 1 < oldest and after_seq < self.seq:
                raise OutOfRange(
                    f"after_seq {after_seq} is older than the retained history "
                    f"(oldest retained seq is {oldest})"
                )
            backlog = [d for d in self.history if d.seq > after_seq]  # type: ignore[attr-defined]
        sub = _Subscriber(asyncio.Queue(maxsize=self._backlog()))
        self.subscribers.append(sub)
        try:
            for d in backlog:
                yield d
            while True:
                item = await sub.queue.get()
                if item == _OVERFLOW:
                    raise OutOfRange("watcher fell behind; resume from the last seq received")
                if isinstance(item, str):  # _CLOSED: the daemon is shutting down
                    return
                yield item  # type: ignore[misc]
        finally:
            self.subscribers.remove(sub)

    def close(self) -> None:
        """End every watch (shutdown)."""
        for sub in self.subscribers:
            _signal(sub, _CLOSED)


class FleetState:
    """The single writer: node table, reservations, queue, decisions, source freshness."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        clock: Clock = time.time,
        metrics: StateMetrics | None = None,
    ) -> None:
        """Restore reservations from `journal`; `clock` returns Unix seconds (injected in tests)."""
        self.config = config
        self.journal = journal
        self.clock = clock
        self.metrics = metrics or StateMetrics()
        self.fleet = Fleet()
        #: Node attributes the core does not keep, by node key ("cluster/node").
        self.nodes: dict[str, _NodeInfo] = {}
        self.target = engine.TargetWorkload(config.scheduling.target_window_pods)
        self._target_seen = 0
        self._policies = engine.PolicyMemo()
        #: Scores kept across Place calls (the core re-scores only nodes changed since).
        self.placement_cache = scheduling.PlacementCache()
        self.policy = self._build_policy(config)
        self.pools: dict[tuple[str, str], up.NodePoolUpdate] = {}
        #: cluster -> "namespace/name" -> pods its scheduler could not place (not ours to
        #: place: the autoscaler plans nodes for them). `pending_version` counts changes.
        self.pending_pods: dict[str, dict[str, up.PendingPod]] = {}
        self.pending_version = 0
        #: (cluster, "namespace/name") -> when the pending pod was last reported.
        self._pending_seen_s: dict[tuple[str, str], float] = {}
        #: Bounded: removed subjects' entries expire (tombstones, `SequenceGate`); its clock
        #: is the state's, so tests control expiry. No floors: Kubernetes resourceVersions
        #: do not order a cluster's objects by publication (see `SequenceGate`).
        self._gate = up.SequenceGate(clock=clock, floors=False)
        #: cluster -> its latest applied node inventory (telemetry's relist): a report
        #: older than it of a node it does not list is obsolete (`apply_now`).
        self.inventories: dict[str, up.NodeInventory] = {}
        self.held: dict[str, _Held] = {}
        #: GPU milli the teams' held reservations hold (`teams.quotas`): charged when a
        #: reservation is granted or restored, credited when it ends.
        self.quotas = QuotaLedger()
        self.queue: dict[str, _Queued] = {}
        self._structure_version = 0  # bumped when a node is added, removed or changed
        self._fits_cache: dict[object, bool] = {}
        self._fits_cache_version = -1
        self.pods: dict[tuple[str, str], _ObservedPod] = {}
        #: Node key -> when it last changed (added, a pod placed or gone): the autoscaler's
        #: stabilization window for scale-down counts from here.
        self.node_since: dict[str, float] = {}
        #: (cluster, node) -> uids of self.pods on it: node updates touch their own pods
        #: without scanning every pod of the fleet.
        self._pods_on: dict[tuple[str, str], set[str]] = {}
        #: source -> its heartbeat slots (`HeartbeatSlots`, `_HeartbeatTable`).
        self._beats: dict[str, _HeartbeatTable] = {}
        self.sources: dict[tuple[str, str], _SourceInfo] = {}
        #: cluster -> its `sources` entries (`_cluster_sources`), valid while `sources` has
        #: `_sources_n` entries.
        self._sources_of: dict[str, tuple[_SourceInfo, ...]] = {}
        self._sources_n = 0
        #: Clusters a source lost the sync of (after the initial sync): excluded from new
        #: placements while here. Their nodes carry the core's stale flag on top of their own
        #: staleness (`_stale_flag`); reservations on them are kept (see `_update_lost`).
        self.lost_clusters: frozenset[str] = frozenset()
        #: What grpc.health.v1 last heard (`health`): the daemon is told on every change.
        self._health_seen: tuple[bool, tuple[tuple[str, bool], ...]] = (True, ())
        self.history: collections.deque[Decision] = collections.deque(
            maxlen=config.limits.decision_history
        )
        self.subscribers: list[_Subscriber] = []
        self._pending: list[tuple[WorkloadRequest, asyncio.Future[Decision]]] = []
        self._drain_scheduled = False
        #: Scale decisions (NodePools.WatchScaleDecisions): the autoscaler publishes here.
        self.scale: Broadcast[ScaleEvent] = Broadcast(
            config.limits.decision_history, lambda: self.config.server.max_stream_backlog
        )
        self.seq = journal.last_seq()
        self.started_s = clock()
        self._owner = threading.get_ident()
        self.ignored_updates = 0
        self.invalid_updates = 0
        #: Set while every expected source is synced (set now: none expected yet).
        self.ready_event = asyncio.Event()
        self.ready_event.set()
        #: Set on every change of `ready` (the daemon flips grpc.health.v1 on it, then clears).
        self.readiness_changed = asyncio.Event()
        journal.retain_decisions = config.limits.decision_history
        # Decisions made before a restart stay resumable (WatchDecisions after_seq).
        self.history.extend(
            decode_decision(body) for body in journal.decisions(config.limits.decision_history)
        )
        for record in journal.reservations():
            self.held[record.workload_id] = _Held(
                record, [None] * len(record.pods), [None] * len(record.pods)
            )
            # Usage comes back with the reservations: no quota state of its own to journal.
            self.quotas.charge(record.team, held_gpus(record.pods))
        self._restore_queue()

    def _restore_queue(self) -> None:
        """Queued workloads from the journal, in their old order; retried once ready."""
        for item in self.journal.queued():
            req = decode_request(item.request)
            priority = self.config.team_priority(req.team) + req.priority
            self.queue[item.workload_id] = _Queued(
                req, priority, item.seq, item.since_s, cause_since_s=item.since_s
            )

    # -- readiness and sources ---------------------------------------------------------------

    def expect_source(self, source: str, cluster: str) -> None:
        """Readiness waits for `ClusterSynced(cluster, source)`."""
        was = self.ready
        self.sources.setdefault((source, cluster), _SourceInfo())
        self._readiness_update(was)

    def expect_source_wide(self, source: str) -> None:
        """Readiness waits for `source_synced(source)`: a source that does not know its
        clusters up front (Kafka without a cluster list) gates readiness as a whole; it
        shows in GetStatus as cluster SOURCE_WIDE."""
        self.expect_source(source, SOURCE_WIDE)

    def source_progress(self, source: str, progress: str) -> None:
        """How far `source`'s initial sync is (e.g. records left to read), shown in the
        reason of its clusters that are not synced yet (GetStatus, `fleetd status`)."""
        for (src, _), info in self.sources.items():
            if src == source and not info.synced:
                info.progress = progress

    def source_synced(self, source: str) -> None:
        """The source-wide initial sync of `source` is done (see `expect_source_wide`)."""
        self._check_owner()
        was = self.ready
        now = self.clock()
        info = self.sources.setdefault((source, SOURCE_WIDE), _SourceInfo())
        info.synced = True
        info.last_update_s = now
        info.down_since_s, info.down_reason, info.lost = 0.0, "", False
        if self._readiness_update(was):
            self._retry_queue(now)

    @property
    def ready(self) -> bool:
        """True once every expected (source, cluster) finished its initial sync, while at
        least one of them has not lost its sync since (a source down for longer than its
        `sync_lost_after_s`). A cluster whose sync is lost only leaves placement
        (`lost_clusters`); when every source has lost its sync the daemon is not ready."""
        if not all(s.synced for s in self.sources.values()):
            return False
        return not self.sources or not all(s.lost for s in self.sources.values())

    def cluster_synced(self) -> dict[str, bool]:
        """Per cluster a source names (not SOURCE_WIDE), plus clusters lost through a
        source-wide loss: True while every source of it is synced and none lost its sync."""
        out: dict[str, bool] = {}
        for (_, cl), s in self.sources.items():
            if cl != SOURCE_WIDE:
                out[cl] = out.get(cl, True) and s.synced and not s.lost
        for cl in self.lost_clusters:
            out[cl] = False
        return out

    def health(self) -> tuple[bool, tuple[tuple[str, bool], ...]]:
        """(ready, sorted (cluster, synced) pairs): what grpc.health.v1 reports."""
        return self.ready, tuple(sorted(self.cluster_synced().items()))

    def _lost_now(self) -> frozenset[str]:
        lost = {cl for (_, cl), s in self.sources.items() if s.lost and cl != SOURCE_WIDE}
        if any(s.lost for (_, cl), s in self.sources.items() if cl == SOURCE_WIDE):
            # A source-wide source (Kafka without a cluster list) serves every cluster no
            # other source names: all of those are lost with it.
            named = {cl for (_, cl) in self.sources if cl != SOURCE_WIDE}
            known = {i.cluster for i in self.nodes.values()} | {c for c, _ in self.pools}
            lost |= known - named
        return frozenset(lost)

    def _update_lost(self, now: float) -> None:
        """Recompute `lost_clusters` after a change of source state; mask or unmask the
        nodes of clusters that changed. A cluster coming back keeps each node's own
        staleness (missing reports) and retries the queue."""
        lost = self._lost_now()
        if lost == self.lost_clusters:
            return
        changed = lost ^ self.lost_clusters
        back = self.lost_clusters - lost
        self.lost_clusters = lost
        for key, info in self.nodes.items():
            if info.cluster in changed:
                self.fleet.set_flags(key, stale=info.stale or info.cluster in lost)
        if back:
            self._retry_queue(now)

    def _stale_flag(self, cluster: str, stale: bool) -> bool:
        """The core's stale flag of a node: its own staleness, or its cluster's lost sync."""
        return stale or cluster in self.lost_clusters

    def lost_scope(self, req: WorkloadRequest) -> str:
        """Why `req` cannot be placed now because every cluster it may go to lost its sync
        (its cluster, every cluster holding its pool, or every cluster with a node its
        selector, taints, GPU models and memory allow); '' when it can try."""
        if not self.lost_clusters:
            return ""
        if req.cluster:
            scope = {req.cluster}
        elif req.pool:
            scope = {i.cluster for i in self.nodes.values() if i.pool == req.pool}
            scope |= {c for c, p in self.pools if p == req.pool}
        else:
            # Limited by its constraints: the clusters with a node it may ever go to.
            scope = engine.allowed_clusters(self.fleet, self._workload(req))
        if not scope or not scope <= self.lost_clusters:
            return ""
        why = [
            f"{src}/{cl}: {self.source_reason(src, cl)}"
            for (src, cl), s in sorted(self.sources.items())
            if s.lost and (cl in scope or cl == SOURCE_WIDE)
        ]
        names = ", ".join(repr(c) for c in sorted(scope))
        return (
            f"cluster(s) {names} lost their sync and take no new placements until "
            f"resynced ({'; '.join(why)})"
        )

    def source_reason(self, source: str, cluster: str) -> str:
        """Why (source, cluster) is not synced ('' when it is)."""
        s = self.sources.get((source, cluster))
        if s is None:
            return ""
        if s.lost:
            since = max(0.0, self.clock() - s.down_since_s)
            return f"sync lost {since:.0f} s ago: {s.down_reason}"
        if not s.synced:
            progress = f": {s.progress}" if s.progress else ""
            extra = f" ({s.down_reason})" if s.down_since_s else ""
            return "waiting for the initial sync" + progress + extra
        return ""

    def not_ready_reason(self) -> str:
        """Which sources readiness waits for, and why ('' when ready)."""
        waiting = [
            f"{src}/{cl}: {self.source_reason(src, cl)}"
            for (src, cl), s in sorted(self.sources.items())
            if not s.synced or s.lost
        ]
        return "; ".join(waiting)

    def source_connection(self, source: str, cluster: str, ok: bool, reason: str = "") -> None:
        """A source's connection to a cluster (`cluster` '': to all of its clusters) went
        down (`ok` False, with the reason) or is current again (re-listed, caught up).

        Down for longer than the source's `sync_lost_after_s` (see `check_sources`) loses the
        sync: readiness drops until the source reports it current again.
        """
        self._check_owner()
        was = self.ready
        now = self.clock()
        for (src, cl), info in self.sources.items():
            if src != source or (cluster and cl != cluster):
                continue
            if ok:
                info.down_since_s, info.down_reason = 0.0, ""
                info.lost = False
            else:
                if not info.down_since_s:
                    info.down_since_s = now
                info.down_reason = reason
        if self._readiness_update(was):
            self._retry_queue(now)  # placements held back while not ready
        if not ok:
            self.check_sources()

    def check_sources(self) -> int:
        """Mark sources down longer than their `sync_lost_after_s` as lost; returns how many
        are lost (the daemon sweeps this every second)."""
        self._check_owner()
        was = self.ready
        now = self.clock()
        lost = 0
        for (src, _), info in self.sources.items():
            bound_s = self._sync_lost_after_s(src)
            if info.down_since_s and bound_s is not None and now - info.down_since_s >= bound_s:
                info.lost = True
            lost += info.lost
        self._readiness_update(was)
        return lost

    def _sync_lost_after_s(self, source: str) -> float | None:
        section = getattr(self.config.sources, source, None)
        bound = getattr(section, "sync_lost_after_s", None)
        return float(bound) if bound is not None else None

    def _readiness_update(self, was_ready: bool) -> bool:
        """After a change of source state: update `lost_clusters`, flip the ready event and
        tell watchers (readiness or a cluster's sync changed); True when it just became
        ready."""
        self._update_lost(self.clock())
        now_ready = self.ready
        if now_ready:
            self.ready_event.set()
        else:
            self.ready_event.clear()
        seen = self.health()
        if now_ready != was_ready or seen != self._health_seen:
            self._health_seen = seen
            self.readiness_changed.set()
        return now_ready and not was_ready

    # -- updates from sources ---------------------------------------------------------------

    @property
    def gate(self) -> up.SequenceGate:
        """The state's sequence gate, with every heartbeat written back to it (for readers
        outside the apply path: tests, benchmarks)."""
        for table in self._beats.values():
            table.flush_all()
        return self._gate

    def _heartbeat_stale(self, key: str, stale: bool) -> None:
        """Keep the heartbeat tables' copy of a node's `stale` flag."""
        for table in self._beats.values():
            slot = table.slot_of.get(key)
            if slot is not None:
                table.stale[slot] = stale
                if stale:
                    table.seen[slot] = 0.0  # (no freshness to write back)

    def _release_heartbeats(self, cluster: str, name: str) -> None:
        """Write a node's heartbeats back and drop its heartbeat binding (`_HeartbeatTable`)."""
        if self._beats:
            key = node_key(cluster, name)
            for table in self._beats.values():
                table.release(key)

    async def apply(self, update: up.Update) -> bool:
        """Apply one source update (the UpdateSink interface); False when dropped as stale."""
        return self.apply_now(update)

    def apply_now(self, update: up.Update) -> bool:
        """Synchronous `apply`, for callers already on the loop."""
        if threading.get_ident() != self._owner:
            self._check_owner()  # (raises)
        if type(update) is up.NodeUpdate:
            return self._apply_node_update(update)
        if self.inventories and isinstance(update, up.NodeUpdate) and self._unlisted(update):
            self.ignored_updates += 1
            self.metrics.update_ignored("not_in_newer_inventory")
            return False
        if isinstance(update, up.NodeUpdate | up.NodeRemoved):
            # The gate looks at the node's cell next: write its heartbeats back first.
            self._release_heartbeats(update.cluster, update.name)
        if not self._gate.admit(update):
            self.ignored_updates += 1
            self.metrics.update_ignored("stale_sequence")
            return False
        now = self.clock()
        if isinstance(update, up.NodeUpdate):
            self._node_update(update, now, node_key(update.cluster, update.name))
        elif isinstance(update, up.NodeHeartbeats):
            return self._node_heartbeats(update, now) > 0
        elif isinstance(update, up.HeartbeatSlots):
            self._bind_heartbeats(update)
        elif isinstance(update, up.NodeRemoved):
            # (The gate left the removal's tombstone already.)
            self._node_removed(update.cluster, update.name, now, tombstone=False)
        elif isinstance(update, up.NodeStale):
            key = node_key(update.cluster, update.name)
            if key in self.nodes:
                info = self.nodes[key]
                info.stale = update.stale
                if update.stale:
                    # Silent (for longer than the sweep knows): stale until it reports.
                    info.last_seen_s = 0.0
                self._heartbeat_stale(key, update.stale)
                self.fleet.set_flags(key, stale=self._stale_flag(update.cluster, update.stale))
        elif isinstance(update, up.PodObserved):
            self._pod_observed(update, now)
        elif isinstance(update, up.PodRemoved):
            self._pod_removed(
                update.cluster, update.uid or f"{update.namespace}/{update.name}", now
            )
        elif isinstance(update, up.NodePoolUpdate):
            self.pools[(update.cluster, update.name)] = update
        elif isinstance(update, up.NodePoolRemoved):
            self.pools.pop((update.cluster, update.name), None)
        elif isinstance(update, up.PendingPod):
            self.pending_pod_observed(update)
        elif isinstance(update, up.PendingPodRemoved):
            self.pending_pod_removed(update.cluster, update.namespace, update.name)
        elif isinstance(update, up.ClusterSynced):
            self._cluster_synced(update, now)
        elif isinstance(update, up.NodeInventory):
            self._node_inventory(update, now)
        return True

    def _apply_node_update(self, u: up.NodeUpdate) -> bool:
        """`apply_now` of a NodeUpdate (most telemetry that is not a repeat): the same steps,
        with the node's key and gate subject made once."""
        cluster, name = u.cluster, u.name
        if self.inventories and self._unlisted(u):
            self.ignored_updates += 1
            self.metrics.update_ignored("not_in_newer_inventory")
            return False
        key = f"{cluster}/{name}"  # (`node_key`)
        info = self.nodes.get(key)
        # The gate looks at the node's cell next: write its heartbeats back first. (The
        # binding is suspended, not dropped: the source binds its slot to the new content
        # next, `_bind_heartbeats`; a new `_NodeInfo` drops it, `_node_update`.)
        cell = None
        beats = self._beats
        if beats:
            if len(beats) == 1:
                # (One source's table, the usual daemon: a bound node's `_NodeInfo` names
                # its slot, see `_HeartbeatTable.bind`; an unbound node has none.)
                table = info.beat_table if info is not None else None
                if table is not None:
                    cell = table.suspend_slot(info.beat_slot)  # type: ignore[union-attr]
            else:
                for table in beats.values():
                    cell = table.suspend(key) or cell
        # (`SequenceGate.admit` of an update that is no removal; sequence 0 is unordered.
        # A node with a heartbeat slot has its gate cell at hand: `_HeartbeatTable.rebind`.)
        sequence = u.sequence
        if sequence:
            if cell is None:
                admitted = self._gate.admit_sequence((cluster, "node", name), sequence)
            elif sequence > cell.last:
                cell.last = sequence
                admitted = True
            else:
                admitted = False
            if not admitted:
                self.ignored_updates += 1
                self.metrics.update_ignored("stale_sequence")
                return False
        now = self.clock()
        if info is not None and u.pods is not None and _same_fields(info, u):
            # The usual change: pods came or went (`_node_update`'s first case, inline).
            info.last_seen_s = now
            info.content_token = u.content_token
            info.spec_update = u
            if info.stale:
                info.stale = False
                self.fleet.set_flags(key, stale=cluster in self.lost_clusters)
            self._touch(cluster, now, u.observed_at_s)
            self._reconcile_pods(u, now, key)
            return True
        self._node_update(u, now, key)
        return True

    def _unlisted(self, u: up.NodeUpdate) -> bool:
        """A report taken before the cluster's latest inventory, of a node that inventory
        does not list: the node was gone when the list was taken (a report of a node added
        since would be newer). Such a report comes late (another partition lagging, a
        redelivery) and must not bring the node back."""
        inventory = self.inventories.get(u.cluster)
        return (
            inventory is not None
            and 0 < u.sequence < inventory.sequence
            and u.name not in inventory.names
        )

    def _node_inventory(self, u: up.NodeInventory, now: float) -> None:
        """Every node the cluster's agent saw at `u.sequence`: the cluster's nodes it does
        not list and whose last applied sequence is below it were deleted unseen (while the
        agent was down, or their NodeDeleted was lost): removed as a NodeRemoved at that
        sequence would (pods freed, reservations on them ended, the gate keeps a tombstone
        at `u.sequence`). A node that reported after the list was taken stays. The same for
        node pools when the inventory lists them."""
        self.inventories[u.cluster] = u
        gone = []
        gate = self.gate  # (heartbeats written back to the cells, once)
        for info in self.nodes.values():
            if info.cluster != u.cluster or info.name in u.names:
                continue
            cell = gate.cell((u.cluster, "node", info.name))
            if cell is None or cell.last < u.sequence:
                gone.append(info.name)
        for name in sorted(gone):
            self._node_removed(u.cluster, name, now, at_sequence=u.sequence)
        # Reservations restored from the journal onto nodes not reported since (their pods
        # wait for the node): a node the inventory does not list is gone, and a confirmed
        # reservation has no TTL to end it otherwise.
        for wid, held in list(self.held.items()):
            if any(
                p.cluster == u.cluster
                and p.node not in u.names
                and node_key(p.cluster, p.node) not in self.nodes
                for p in held.record.pods
            ):
                self._end(wid, "expire", "expired", now, reason="its node is gone (inventory)")
        if gone:
            self.metrics.inventory_removed(u.cluster, len(gone))
        if u.pools is not None:
            for cluster, pool in sorted(self.pools):
                if cluster != u.cluster or pool in u.pools:
                    continue
                cell = gate.cell((cluster, "pool", pool))
                if cell is None or cell.last < u.sequence:
                    del self.pools[(cluster, pool)]
                    gate.removed((cluster, "pool", pool), u.sequence)

    # -- pending pods (the clusters' unschedulable pods) -------------------------------------

    def pending_pod_observed(self, p: up.PendingPod) -> None:
        """Record (or refresh) a pod its cluster's scheduler could not place."""
        pods = self.pending_pods.setdefault(p.cluster, {})
        self._pending_seen_s[(p.cluster, p.key)] = self.clock()
        old = pods.get(p.key)
        # A periodic re-report (new sequence, same content) is no change to plan for.
        if old is None or replace(old, sequence=p.sequence) != p:
            pods[p.key] = p
            self.pending_version += 1

    def pending_pod_removed(self, cluster: str, namespace: str, name: str) -> None:
        """Forget a pending pod (bound, deleted, terminated); unknown ones are ignored."""
        pods = self.pending_pods.get(cluster)
        self._pending_seen_s.pop((cluster, f"{namespace}/{name}"), None)
        if pods is not None and pods.pop(f"{namespace}/{name}", None) is not None:
            self.pending_version += 1
            if not pods:
                del self.pending_pods[cluster]

    def expire_pending_pods(self, max_age_s: float) -> int:
        """Forget pending pods not reported for `max_age_s` in clusters no Kubernetes watch
        feeds (telemetry re-reports them every agent resync; an end the agent missed while
        it was down would otherwise never come). A watch's relist is authoritative, so its
        clusters' pods stay until removed. Returns how many were forgotten."""
        deadline = self.clock() - max_age_s
        watched = {c for s, c in self.sources if s == "kubernetes"}
        old = [
            key
            for key, seen in self._pending_seen_s.items()
            if seen < deadline and key[0] not in watched
        ]
        for cluster, key in old:
            namespace, _, name = key.partition("/")
            self.pending_pod_removed(cluster, namespace, name)
        return len(old)

    def pending_pod_list(self) -> list[up.PendingPod]:
        """Every pending pod, highest priority first, then by cluster/namespace/name."""
        return sorted(
            (p for pods in self.pending_pods.values() for p in pods.values()),
            key=lambda p: (-p.priority, p.cluster, p.namespace, p.name),
        )

    def _touch(self, cluster: str, now: float, observed_at_s: float) -> None:
        infos = self._sources_of.get(cluster)
        if infos is None or self._sources_n != len(self.sources):
            infos = self._cluster_sources(cluster)
        for info in infos:
            info.last_update_s = now
            if observed_at_s:
                info.last_observed_s = observed_at_s
        if observed_at_s:
            self.metrics.telemetry_lag(cluster, max(0.0, now - observed_at_s))

    def _cluster_sources(self, cluster: str) -> tuple[_SourceInfo, ...]:
        """The `sources` entries of `cluster`, kept per cluster for `_touch` (every applied
        change) until an entry is added (entries are added, never replaced or removed)."""
        if self._sources_n != len(self.sources):
            self._sources_of.clear()
            self._sources_n = len(self.sources)
        infos = self._sources_of[cluster] = tuple(
            info for (_, cl), info in self.sources.items() if cl == cluster
        )
        return infos

    def _node_heartbeats(self, u: up.NodeHeartbeats, now: float) -> int:
        """Reports whose content is the node's last applied one: only sequence and freshness
        move (no node-table write unless a stale node comes back). Returns entries applied.

        Most telemetry records end here, so a batch is checked and applied as columns of
        its source's `_HeartbeatTable`, with no Python per entry."""
        slots = u.slots
        n = len(slots)
        if n == 0:
            return 0
        table = self._beats.get(u.source)
        # An unbound slot's entry repeats content never applied here (refused), or content
        # replaced since: it refreshes nothing (the source sends full content again when
        # the node changes).
        valid = table.bound(slots) if table is not None else np.zeros(n, np.bool_)
        applied = np.zeros(n, np.bool_)
        if table is not None and valid.any():
            applied[valid] = table.column.admit(slots[valid], u.sequences[valid])
        refused = n - int(np.count_nonzero(valid))
        moved_n = int(np.count_nonzero(applied))
        stale_seq = n - refused - moved_n
        if refused:
            self.invalid_updates += refused
            for _ in range(refused):
                self.metrics.update_ignored("heartbeat_of_unapplied_content")
        if stale_seq:
            self.ignored_updates += stale_seq
            for _ in range(stale_seq):
                self.metrics.update_ignored("stale_sequence")
        if table is None or not moved_n:
            return 0
        moved = slots[applied]
        table.seen[moved] = now
        for slot in moved[table.stale[moved]].tolist():
            # A stale node reports again: schedulable once more.
            info = table.infos[slot]
            assert info is not None
            info.stale = False
            table.stale[slot] = False
            self.fleet.set_flags(table.keys[slot], stale=info.cluster in self.lost_clusters)
        observed = u.observed_at_s[applied]
        cluster_ids = table.cluster_ids[moved]
        for cid in np.flatnonzero(np.bincount(cluster_ids)).tolist():
            latest = float(observed[cluster_ids == cid].max())
            self._touch(table.clusters[cid], now, max(0.0, latest))
        return moved_n

    def _bind_heartbeats(self, u: up.HeartbeatSlots) -> None:
        """Bind a source's heartbeat slots to nodes whose last applied content is the one
        named (see `HeartbeatSlots`); a slot whose content is not is left unbound."""
        table = self._beats.get(u.source)
        if table is None:
            table = self._beats[u.source] = _HeartbeatTable()
        slots, names, tokens = u.slots, u.names, u.content_tokens
        if not len(slots) == len(names) == len(tokens):
            raise ValueError("HeartbeatSlots: slots, names and content_tokens differ in length")
        cluster, nodes, cell_of = u.cluster, self.nodes, self._gate.cell
        infos = table.infos
        bound_slots: list[int] = []
        keys: list[str] = []
        bound_infos: list[_NodeInfo] = []
        cells: list[up.SequenceCell] = []
        # The usual batch names each slot and each node once; otherwise the last binding of
        # either wins (below).
        unique = len(set(slots)) == len(slots) and len(set(names)) == len(names)
        rebind = table.rebind
        for slot, name, token in zip(slots, names, tokens, strict=True):
            if slot < 0:
                continue
            if unique and rebind(slot, cluster, name, token):
                continue  # (the usual binding: a changed node's slot, its new content)
            key = f"{cluster}/{name}"  # (`node_key`)
            info = nodes.get(key)
            cell = None
            if info is not None and token and info.content_token == token:
                # (No cell: the node's content came with sequence 0, unordered; its repeats
                # are no heartbeats.)
                cell = cell_of((cluster, "node", name))
            if slot < len(infos) and infos[slot] is not None:
                table.unbind(slot)
            if cell is not None:
                assert info is not None
                bound_slots.append(slot)
                keys.append(key)
                bound_infos.append(info)
                cells.append(cell)
        if not unique:
            # One slot per node and one node per slot, the last binding of either winning.
            last: dict[int, int] = {}
            last_of_key: dict[str, int] = {}
            for i, (slot, key) in enumerate(zip(bound_slots, keys, strict=True)):
                earlier = last_of_key.pop(key, None)
                if earlier is not None:
                    del last[bound_slots[earlier]]
                replaced = last.get(slot)
                if replaced is not None:
                    del last_of_key[keys[replaced]]
                last[slot] = i
                last_of_key[key] = i
            kept = list(last.values())
            bound_slots = [bound_slots[i] for i in kept]
            keys = [keys[i] for i in kept]
            bound_infos = [bound_infos[i] for i in kept]
            cells = [cells[i] for i in kept]
        table.bind(cluster, bound_slots, keys, bound_infos, cells)

    def _reconcile_pods(self, u: up.NodeUpdate, now: float, key: str = "") -> None:
        """The source reports the node's complete pod set (u.pods): reconcile against it.
        `key` is the node's key when the caller has it."""
        pods = u.pods
        if pods is None:
            return
        cluster, node = u.cluster, u.name
        key = key or f"{cluster}/{node}"  # (`node_key`)
        on_node = self._pods_on.get((cluster, node))
        if not on_node:
            for p in pods:
                self._pod_observed(p, now, key if p.node == node and p.cluster == cluster else "")
            return
        # A pod known on this node and reported on it again, still running, is what
        # `_pod_observed` leaves as it is: skipped without the call (most pods of a changed
        # report). The others are observed after the removals, in order. (Whether a pod is
        # skipped does not depend on the removals: they remove only pods not reported.)
        uids = []
        observe = []
        for p in pods:
            uid = p.uid or f"{p.namespace}/{p.name}"
            uids.append(uid)
            if uid in on_node and p.node == node and p.phase not in _FINISHED_PHASES:
                continue
            observe.append((p, uid))
        if not on_node.issubset(uids):
            current = set(uids)
            gone = [uid for uid in on_node if uid not in current]
            if (
                len(gone) == 1
                and len(observe) == 1
                and self._pod_replaced(cluster, node, key, gone[0], *observe[0], now)
            ):
                return
            for uid in gone:
                self._pod_removed(cluster, uid, now)
        for p, uid in observe:
            same_node = p.node == node and p.cluster == cluster
            self._pod_observed(p, now, key if same_node else "", uid)

    def _pod_replaced(
        self,
        cluster: str,
        node: str,
        key: str,
        old_uid: str,
        p: up.PodObserved,
        uid: str,
        now: float,
    ) -> bool:
        """A report whose pods differ from the known ones by one pod replaced by another
        (`_reconcile_pods`: pod `old_uid` gone, `p` new), when the new pod would hold what
        the old one held: `_pod_removed` of the old pod then `_pod_observed` of the new
        one would free an allocation and allocate an equal one (the same requests; for a
        GPU, the freest healthy one once the old pod's share is back is the old pod's), so
        the node table is left as it is and the new pod takes the old one's `Allocation`.
        True when done so, False (nothing done) otherwise: a queue to retry between the
        two (`_retry_queue`), labels or a reservation, a node that would not fit the new
        pod (its capacity shrank below what is allocated), another device."""
        if (
            self.queue
            or p.labels
            or p.node != node
            or p.cluster != cluster
            or p.phase in _FINISHED_PHASES
        ):
            return False
        pods = self.pods
        old = pods.get((cluster, old_uid))
        if (
            old is None
            or old.reservation is not None
            or old.slot is None
            or (cluster, uid) in pods
            or key not in self.nodes
        ):
            return False
        alloc, requests = old.slot, p.requests
        if (
            requests.cpu_millicores != alloc.cpu_millicores
            or requests.memory_bytes != alloc.memory_bytes
            or alloc.node != key
        ):
            return False
        fleet = self.fleet
        slot = fleet.slot(key)
        if requests.gpus <= 0:
            if alloc.gpu_indices:
                return False
        else:
            indices = alloc.gpu_indices
            if (
                requests.gpus != 1
                or len(indices) != 1
                or alloc.gpu_milli_per_gpu != engine.GPU_MILLI
            ):
                return False
            g = indices[0]
            count = fleet.gpu_count.item(slot)
            unhealthy = fleet.gpu_unhealthy_mask.item(slot)
            if not 0 <= g < count or (unhealthy >> g) & 1:
                return False
            # (`_observed_allocation` on the node with the old pod's share back.)
            free = fleet.gpu_free_milli[slot].tolist()
            del free[count:]
            free[g] += engine.GPU_MILLI
            if unhealthy:
                free = [0 if (unhealthy >> i) & 1 else f for i, f in enumerate(free)]
            if free.index(max(free)) != g:
                return False
        # (What `Fleet.allocate` checks after the free: the used amounts stay as they are.)
        if fleet.cpu_allocated_millicores.item(slot) > fleet.cpu_allocatable_millicores.item(
            slot
        ) or fleet.memory_allocated_bytes.item(slot) > fleet.memory_allocatable_bytes.item(slot):
            return False
        # `_pod_removed` of the old pod (no reservation, no queue), `_pod_observed` of the new
        # one (no labels, unknown, on this node), the fleet's free and allocate cancelling.
        del pods[(cluster, old_uid)]
        on_node = self._pods_on[(cluster, node)]
        on_node.discard(old_uid)
        on_node.add(uid)
        self.node_since[key] = now
        pods[(cluster, uid)] = _ObservedPod(cluster, node, alloc, {}, requests)
        return True

    def _node_update(self, u: up.NodeUpdate, now: float, key: str) -> None:
        info = self.nodes.get(key)
        signature = None
        if info is not None and u.pods is not None and not _same_fields(info, u):
            signature = _spec_signature(u, info)
        if (
            info is not None
            and u.pods is not None
            and (signature is None or info.spec_signature == signature)
        ):
            # Pods came or went, utilization moved: the node table has nothing to change,
            # freshness moves and the pods are reconciled.
            info.last_seen_s = now
            info.content_token = u.content_token
            info.spec_update = u
            if info.stale:
                info.stale = False
                self.fleet.set_flags(key, stale=u.cluster in self.lost_clusters)
            self._touch(u.cluster, now, u.observed_at_s)
            self._reconcile_pods(u, now, key)
            return
        if signature is None:
            signature = _spec_signature(u, info)
        if info is not None and u.pods is None:
            # Heartbeats repeat the node unchanged: only freshness moves (cheap at 10^4 nodes).
            same = replace(u, sequence=0, observed_at_s=0.0)
            if info.last_update is None and info.applied_update is not None:
                info.last_update = replace(
                    info.applied_update, sequence=0, observed_at_s=0.0, pods=None
                )
            if info.last_update == same:
                info.last_seen_s = now
                if info.stale:
                    info.stale = False
                    self.fleet.set_flags(key, stale=u.cluster in self.lost_clusters)
                self._touch(u.cluster, now, u.observed_at_s)
                return
        if info is not None and _flags_only_changed(info.spec_signature, signature):
            self._node_flags_update(key, info, u, signature, now)
            return
        labels = dict(u.labels)
        labels[engine.POOL_LABEL] = u.node_pool
        gpu_count = max(u.allocatable.gpus, len(u.gpus))
        try:
            spec = NodeSpec(
                name=key,
                cluster=u.cluster,
                cpu_millicores=u.allocatable.cpu_millicores,
                memory_bytes=u.allocatable.memory_bytes,
                gpu_count=gpu_count,
                gpu_model=u.gpu_model or ("unknown" if gpu_count else ""),
                gpu_memory_mib=u.gpu_memory_bytes // 2**20,
                zone=u.zone,
                node_pool=u.node_pool,
                labels=labels,
                taints=tuple(scheduling.Taint(t.key, t.value, t.effect) for t in u.taints),
                cordoned=u.unschedulable,
                unhealthy=not u.ready,
                stale=u.cluster in self.lost_clusters,
            )
            new = key not in self.fleet
            self.fleet.upsert_node(spec)
            if new:
                self.node_since[key] = now
            self._structure_version += 1
        except ValueError as exc:
            self.invalid_updates += 1
            self.metrics.update_ignored("invalid")
            # A ValueError tells the source to dead-letter the update, naming the problem.
            raise ValueError(f"node {key}: {exc}") from exc
        for dev in u.gpus:
            if 0 <= dev.index < gpu_count:
                self.fleet.set_gpu_health(key, dev.index, dev.healthy)
        # No heartbeat slot may keep the replaced `_NodeInfo` (see `_HeartbeatTable`).
        self._release_heartbeats(u.cluster, u.name)
        self.nodes[key] = _NodeInfo(
            cluster=u.cluster,
            name=u.name,
            pool=u.node_pool,
            zone=u.zone,
            gpu_model=u.gpu_model,
            labels=labels,
            taints=tuple((t.key, t.value, t.effect) for t in u.taints),
            ready=u.ready,
            cordoned=u.unschedulable,
            last_seen_s=now,
            applied_update=u,
            spec_signature=signature,
            spec_update=u,
            content_token=u.content_token,
        )
        self._touch(u.cluster, now, u.observed_at_s)
        if new:
            self._restore_on(key, now)
            self._allocate_waiting_pods(key, u.cluster, u.name)
        self._reconcile_pods(u, now, key)
        if new:
            self._retry_queue(now)

    def _node_flags_update(
        self, key: str, info: _NodeInfo, u: up.NodeUpdate, signature: tuple[object, ...], now: float
    ) -> None:
        """A report that changes only the node's cordon, readiness or GPU health
        (`_flags_only_changed`): the node table's flags and GPU health mask are set as the
        full write (`Fleet.update_node`, then `set_gpu_health` per device) would leave them,
        everything else it holds is the same already; `info` is brought up to `u` in place.
        (Most non-pod changes: an XID flips a GPU, a node is cordoned.)"""
        fleet = self.fleet
        fleet.set_flags(
            key,
            cordoned=u.unschedulable,
            unhealthy=not u.ready,
            stale=u.cluster in self.lost_clusters,
        )
        prev = info.spec_update
        if prev is None or u.gpus is not prev.gpus:
            # (The same GPU tuple as the update the node table holds, e.g. a cordon: its
            # health mask is what these devices set already.)
            gpu_count = max(u.allocatable.gpus, len(u.gpus))
            before = fleet.gpu_unhealthy_mask.item(fleet.slot(key))
            mask = before
            for dev in u.gpus:  # (in order: a repeated index ends as its last entry says)
                if 0 <= dev.index < gpu_count:
                    bit = 1 << dev.index
                    mask = (mask & ~bit) if dev.healthy else (mask | bit)
            changed = mask ^ before
            for g in range(gpu_count):
                if (changed >> g) & 1:
                    fleet.set_gpu_health(key, g, not ((mask >> g) & 1))
        self._structure_version += 1
        # (`apply_now` released the node's heartbeat binding already; its content changed.)
        info.ready = u.ready
        info.cordoned = u.unschedulable
        info.stale = False
        info.last_seen_s = now
        info.last_update = None
        info.applied_update = u
        info.spec_signature = signature
        info.spec_update = u
        info.content_token = u.content_token
        self._touch(u.cluster, now, u.observed_at_s)
        self._reconcile_pods(u, now, key)

    def _restore_on(self, key: str, now: float) -> None:
        """Re-allocate journal reservations whose pods sit on the node that just appeared."""
        info = self.nodes[key]
        for wid, held in list(self.held.items()):
            for i, pod in enumerate(held.record.pods):
                if held.slots[i] is None and pod.cluster == info.cluster and pod.node == info.name:
                    alloc = Allocation(
                        key, pod.cpu_millicores, pod.memory_bytes, pod.gpu_indices, pod.gpu_milli
                    )
                    try:
                        self._allocate(alloc)
                    except AllocationError as exc:
                        # The node came back smaller (or its GPUs unhealthy): the reservation
                        # cannot be honoured; end it rather than oversubscribe.
                        self._end(wid, "expire", "expired", now, reason=f"lost on restore: {exc}")
                        break
                    held.slots[i] = alloc

    def _allocate_waiting_pods(self, key: str, cluster: str, node: str) -> None:
        """Pods observed on this node before the node itself now hold their resources."""
        for uid in self._pods_on.get((cluster, node), ()):
            pod = self.pods[(cluster, uid)]
            if (
                pod.slot is None
                and pod.reservation is None
                and pod.request is not None
                and (pod.cluster, pod.node) == (cluster, node)
            ):
                fake = up.PodObserved(cluster, "", "", "", node, pod.request)
                alloc = self._observed_allocation(key, fake, pod.labels.get(GPU_MILLI_LABEL, ""))
                try:
                    self._allocate(alloc)
                    pod.slot = alloc
                except AllocationError:
                    self.metrics.update_ignored("observed_pod_does_not_fit")

    def _node_removed(
        self, cluster: str, node: str, now: float, *, tombstone: bool = True, at_sequence: int = 0
    ) -> None:
        key = node_key(cluster, node)
        if key not in self.nodes:
            return
        # Cordon first: freeing the node's pods and reservations retries the queue, which
        # must not place anything on the node that is about to go.
        self.fleet.set_flags(key, cordoned=True)
        for uid in list(self._pods_on.get((cluster, node), ())):
            self._pod_removed(cluster, uid, now)
        for wid, held in list(self.held.items()):
            if any(a is not None and a.node == key for a in held.slots):
                self._end(wid, "expire", "expired", now, reason=f"node {key} removed")
        self.fleet.remove_node(key)
        self.node_since.pop(key, None)
        self._structure_version += 1
        del self.nodes[key]
        # Autoscaled nodes come and go under new names: keep the heartbeat table and the
        # gate bounded (a relist's removal leaves a tombstone at the node's last sequence).
        self._release_heartbeats(cluster, node)
        if tombstone:
            self._gate.removed((cluster, "node", node), at_sequence)

    def _cluster_synced(self, u: up.ClusterSynced, now: float) -> None:
        if u.nodes:
            gone = [
                i.name
                for i in self.nodes.values()
                if i.cluster == u.cluster and i.name not in u.nodes
            ]
            for name in gone:
                self._node_removed(u.cluster, name, now)
            # Reservations restored from the journal onto nodes the cluster no longer has
            # would otherwise wait forever (a confirmed one has no TTL).
            for wid, held in list(self.held.items()):
                if any(p.cluster == u.cluster and p.node not in u.nodes for p in held.record.pods):
                    self._end(wid, "expire", "expired", now, reason="its node is gone")
        was = self.ready
        info = self.sources.setdefault((u.source, u.cluster), _SourceInfo())
        info.synced = True
        info.last_update_s = now
        # A (re)sync is current by definition: whatever outage came before is over.
        info.down_since_s, info.down_reason, info.lost = 0.0, "", False
        self._readiness_update(was)
        if self.ready:
            self._retry_queue(now)

    def _pod_observed(self, p: up.PodObserved, now: float, nkey: str = "", uid: str = "") -> None:
        """Record a pod bound to a node (allocating what it requests there). `nkey` is the
        key of the pod's node and `uid` the pod's uid (or namespace/name) when the caller
        has them (`_reconcile_pods`)."""
        cluster, node = p.cluster, p.node
        uid = uid or p.uid or f"{p.namespace}/{p.name}"
        key = (cluster, uid)
        if p.phase in _FINISHED_PHASES:
            # A finished pod holds nothing any more (kubelet semantics).
            self._pod_removed(cluster, uid, now)
            return
        known = self.pods.get(key)
        if known is not None:
            if known.node == node:
                return
            self._pod_removed(cluster, uid, now)
        if not node:
            return
        if p.labels:
            labels = dict(p.labels)
            wid = labels.get(WORKLOAD_LABEL, "")
            held = self.held.get(wid) if wid else None
            if held is not None:
                idx = self._match_reserved_pod(held, p, labels.get(POD_NAME_LABEL, p.name))
                if idx is not None:
                    held.observed[idx] = uid
                    self.pods[key] = _ObservedPod(cluster, node, None, reservation=(wid, idx))
                    self._pods_on.setdefault((cluster, node), set()).add(uid)
                    self._maybe_confirm(wid, now)
                    return
            milli_label = labels.get(GPU_MILLI_LABEL, "")
        else:
            labels, milli_label = {}, ""  # (most pods: no labels)
        alloc = None
        nkey = nkey or f"{cluster}/{node}"  # (`node_key`)
        if nkey in self.nodes:
            requests = p.requests
            if requests.gpus <= 0 and not milli_label:
                # (`_observed_allocation` of a pod without GPUs: no devices to choose.)
                alloc = Allocation(nkey, requests.cpu_millicores, requests.memory_bytes)
            else:
                alloc = self._observed_allocation(nkey, p, milli_label)
            try:
                self._allocate(alloc, now)
            except AllocationError:
                # The cluster runs more than fleet state thinks fits (e.g. a reservation and
                # a foreign pod raced): the node is full either way; count it, hold nothing.
                self.metrics.update_ignored("observed_pod_does_not_fit")
                alloc = None
        # A pod seen before its node (watches race) holds nothing until the node appears.
        self.pods[key] = _ObservedPod(cluster, node, alloc, labels, p.requests)
        on_node = self._pods_on.get((cluster, node))
        if on_node is None:
            self._pods_on[(cluster, node)] = {uid}
        else:
            on_node.add(uid)

    def _match_reserved_pod(self, held: _Held, p: up.PodObserved, name: str) -> int | None:
        candidates = [
            i
            for i, rp in enumerate(held.record.pods)
            if held.observed[i] is None and rp.cluster == p.cluster and rp.node == p.node
        ]
        for i in candidates:
            if held.record.pods[i].pod_name == name:
                return i
        return candidates[0] if candidates else None

    def _observed_allocation(self, key: str, p: up.PodObserved, milli_label: str) -> Allocation:
        """Devices for a pod fleetd did not place: the freest healthy ones (cluster truth)."""
        requests = p.requests
        cpu, mem, gpus = requests.cpu_millicores, requests.memory_bytes, requests.gpus
        milli = 0
        if gpus <= 0:
            if not milli_label:
                return Allocation(key, cpu, mem)  # (most pods: no devices to choose)
            try:
                milli = int(milli_label)
            except ValueError:
                milli = 0
            if not 0 < milli < engine.GPU_MILLI:
                return Allocation(key, cpu, mem)
        fleet = self.fleet
        slot = fleet.slot(key)
        count = fleet.gpu_count.item(slot)
        if not count:
            return (
                Allocation(key, cpu, mem, (), engine.GPU_MILLI)
                if gpus > 0
                else Allocation(key, cpu, mem)
            )
        # One node: plain Python over its few GPUs (numpy per call costs more here). Free
        # milli-GPU per GPU, 0 when unhealthy, freest first, lowest index on ties (what a
        # stable argsort of -free gives; `sorted(reverse=True)` keeps ties in order too).
        free = fleet.gpu_free_milli[slot].tolist()
        if len(free) > count:
            del free[count:]
        unhealthy = fleet.gpu_unhealthy_mask.item(slot)
        if unhealthy:
            free = [0 if (unhealthy >> g) & 1 else f for g, f in enumerate(free)]
        if gpus > 1:
            order = sorted(range(count), key=free.__getitem__, reverse=True)
            return Allocation(key, cpu, mem, tuple(sorted(order[:gpus])), engine.GPU_MILLI)
        freest = free.index(max(free))  # (the lowest index of the freest)
        if gpus == 1:
            return Allocation(key, cpu, mem, (freest,), engine.GPU_MILLI)
        return Allocation(key, cpu, mem, (freest,), milli)

    def _pod_removed(self, cluster: str, uid: str, now: float) -> None:
        pod = self.pods.pop((cluster, uid), None)
        if pod is None:
            return
        on_node = self._pods_on.get((cluster, pod.node))
        if on_node is not None:
            on_node.discard(uid)
            if not on_node:
                del self._pods_on[(cluster, pod.node)]
        if pod.slot is not None:
            self._free(pod.slot, now)
        if pod.reservation is not None:
            wid, idx = pod.reservation
            held = self.held.get(wid)
            if held is not None and held.observed[idx] == uid:
                # The pod finished: its share of the reservation is free; when every pod of
                # a confirmed workload is gone, the workload is done.
                held.observed[idx] = None
                alloc = held.slots[idx]
                if alloc is not None:
                    self._free(alloc)
                    held.slots[idx] = None
                if held.record.state == "confirmed" and all(s is None for s in held.slots):
                    self._end(wid, "release", "released", now, reason="every pod finished")
        if self.queue:
            self._retry_queue(now)

    def _maybe_confirm(self, wid: str, now: float) -> None:
        held = self.held[wid]
        if held.record.state == "confirmed" or any(o is None for o in held.observed):
            return
        pods = tuple(replace(p, confirmed=True) for p in held.record.pods)
        seq = self._next_seq()
        held.record = replace(held.record, state="confirmed", pods=pods)
        decision = Decision(
            seq=seq,
            time_s=now,
            kind="confirm",
            workload_id=wid,
            team=held.record.team,
            result="placed",
            placements=pods,
            reservation_state="confirmed",
        )
        self.journal.put(held.record, seq, encode_decision(decision))
        self._publish(decision)

    # -- periodic sweeps -----------------------------------------------------------------------

    def mark_stale(self) -> int:
        """Mark nodes silent for longer than `staleness.node_stale_after_s`; returns how many."""
        self._check_owner()
        limit = self.clock() - self.config.staleness.node_stale_after_s
        for beats in self._beats.values():
            beats.flush_all()
        count = 0
        for key, info in self.nodes.items():
            stale = info.last_seen_s < limit
            if stale != info.stale:
                info.stale = stale
                self.fleet.set_flags(key, stale=self._stale_flag(info.cluster, stale))
                self._heartbeat_stale(key, stale)
            count += stale
        return count

    def expire_due(self) -> int:
        """End pending reservations whose TTL passed; returns how many expired."""
        self._check_owner()
        now = self.clock()
        due = [
            wid
            for wid, held in self.held.items()
            if held.record.state == "pending"
            and held.record.expires_at_s <= now
            # A cluster that lost its sync cannot report the pods started: its reservations
            # wait for the resync (their pods show then) rather than expire unseen.
            and not any(p.cluster in self.lost_clusters for p in held.record.pods)
        ]
        for wid in due:
            self._end(wid, "expire", "expired", now, reason="TTL passed before the pods started")
        return len(due)

    def set_config(self, config: Config) -> None:
        """Apply a reloaded config (TTLs apply to new reservations, staleness to the next sweep)."""
        self._check_owner()
        if config.scheduling.target_window_pods != self.config.scheduling.target_window_pods:
            old = self.target
            self.target = engine.TargetWorkload(config.scheduling.target_window_pods)
            self.target.shapes.extend(old.shapes)
        quotas_changed = config.teams.quotas != self.config.teams.quotas
        self.config = config
        self.policy = self._build_policy(config)
        self.journal.retain_decisions = config.limits.decision_history
        if self.history.maxlen != config.limits.decision_history:
            self.history = collections.deque(self.history, maxlen=config.limits.decision_history)
        if quotas_changed and self.queue:
            # A raised (or removed) quota may let queued workloads in now.
            self._retry_queue(self.clock())

    # -- Place, Release, Explain -------------------------------------------------------------

    def place(self, req: WorkloadRequest) -> Decision:
        """Place a workload: PLACED (reservation held), QUEUED or UNSCHEDULABLE. Idempotent.

        Raises NotReady before the initial sync, when every source lost its sync, or when
        the workload is limited to clusters that lost theirs; NotFound for an unknown
        cluster or pool,
        Conflict when the workload id already holds a different request, QueueFull.
        """
        [result] = self.place_batch([req])
        if isinstance(result, StateError):
            raise result
        return result

    def place_batch(self, reqs: list[WorkloadRequest]) -> list[Decision | StateError]:
        """Place several workloads with one core call; a result (or error) per request.

        What concurrent Place calls become (see `submit`): the core places the batch in
        one pass (priority first, identical shapes together) and every success is committed
        through `Fleet.allocate`, which re-checks it, before the next one.

        Team quotas hold across the batch: before the core call each workload is checked
        against its team's usage plus what the batch's earlier workloads (priority first)
        may take; a success is re-checked against the live usage before it is committed
        (the GPU models it landed on are known only then). A workload held back by the
        batch's tally or the re-check is decided again, alone, after the batch's grants.
        """
        self._check_owner()
        if not self.ready:
            return [NotReady(self.not_ready_reason()) for _ in reqs]
        now = self.clock()
        results: list[Decision | StateError | None] = [None] * len(reqs)
        fresh: list[int] = []
        was_queued: set[str] = set()
        in_batch: set[str] = set()
        later: list[int] = []  # the same workload id twice in one batch: answered after
        for i, req in enumerate(reqs):
            if req.workload_id in in_batch:
                later.append(i)
                continue
            in_batch.add(req.workload_id)
            try:
                results[i] = self._precheck(req)
                if results[i] is None and req.workload_id not in self.queue:
                    lost = self.lost_scope(req)
                    if lost:
                        raise NotReady(lost)
            except StateError as exc:
                results[i] = exc
                continue
            if results[i] is None:
                fresh.append(i)
                if req.workload_id in self.queue:
                    was_queued.add(req.workload_id)
        if fresh:
            verdicts, workloads, again = self._batch_quotas(reqs, fresh)
            to_core = [i for i in fresh if i in workloads]
            placed = engine.place_many(
                self.fleet, [workloads[i] for i in to_core], self.policy, self.placement_cache
            )
            failed = []
            for i, (allocs, reasons) in zip(to_core, placed, strict=True):
                if allocs is None:
                    failed.append((i, workloads[i], reasons))
                elif self._over_quota(reqs[i], allocs):
                    again.append(i)  # an earlier grant of the batch took the team's room
                else:
                    dequeue = self._dequeued(reqs[i].workload_id, "placed", now)
                    results[i] = self._grant(reqs[i], allocs, now, dequeue=dequeue)
            # Reasons describe the fleet after the batch's grants (as the core's do).
            for i, w, reasons in failed:
                outcome = engine.failure(self.fleet, w, reasons, self.policy, self._fits_empty)
                outcome = self._with_quota(reqs[i], verdicts[i], outcome)
                try:
                    results[i] = self._not_placed(
                        reqs[i], outcome, now, reqs[i].workload_id in was_queued
                    )
                except StateError as exc:
                    results[i] = exc
            for i in sorted(again, key=lambda i: (-self._priority(reqs[i]), i)):
                try:
                    results[i] = self._place_alone(reqs[i], now, reqs[i].workload_id in was_queued)
                except StateError as exc:
                    results[i] = exc
            for i in fresh:
                if reqs[i].workload_id not in was_queued:
                    # Learned after placing, so that Explain (which learns nothing) agrees.
                    self._learn(reqs[i])
        for i in later:
            try:
                results[i] = self.place(reqs[i])
            except StateError as exc:
                results[i] = exc
        return [r if r is not None else StateError("internal: no result") for r in results]

    def _precheck(self, req: WorkloadRequest) -> Decision | None:
        """A replayed decision, or None to place; raises Conflict or NotFound."""
        held = self.held.get(req.workload_id)
        if held is not None:
            if held.record.fingerprint != req.fingerprint:
                raise Conflict(
                    f"workload_id {req.workload_id!r} already holds a reservation for a "
                    "different request; Release it first"
                )
            return Decision(
                seq=held.record.decision_seq,
                time_s=held.record.created_at_s,
                kind="place",
                workload_id=req.workload_id,
                team=held.record.team,
                result="placed",
                placements=held.record.pods,
                reservation_state=held.record.state,
                expires_at_s=held.record.expires_at_s,
                replayed=True,
            )
        queued = self.queue.get(req.workload_id)
        if queued is not None and queued.request.fingerprint != req.fingerprint:
            raise Conflict(
                f"workload_id {req.workload_id!r} is queued with a different request; "
                "Release it first"
            )
        self._check_scope(req.cluster, req.pool)
        return None

    # -- team quotas ------------------------------------------------------------------------

    def _quota(self, req: WorkloadRequest) -> TeamQuota | None:
        return self.config.teams.quotas.get(req.team)

    def _priority(self, req: WorkloadRequest) -> int:
        return self.config.team_priority(req.team) + req.priority

    def _gpus_of(self, allocs: Iterable[Allocation]) -> list[tuple[str, int]]:
        """(GPU model, GPU milli) of each allocation: what a grant charges its team."""
        return [
            (self.nodes[a.node].gpu_model, a.gpu_milli_per_gpu * len(a.gpu_indices))
            for a in allocs
            if a.gpu_indices
        ]

    def _over_quota(self, req: WorkloadRequest, allocs: Iterable[Allocation]) -> str:
        """'' when `req`'s team may take `allocs` now; else the quota they would exceed."""
        quota = self._quota(req)
        if quota is None:
            return ""  # (the common case: no charge list built)
        return self.quotas.admits(req.team, quota, self._gpus_of(allocs))

    def _quota_verdict(
        self, req: WorkloadRequest, extra: collections.Counter[str] | None = None
    ) -> Verdict:
        """The team quota's verdict on `req` (`extra`: GPU milli promised to the team earlier
        in the batch, "" = total). Checks, never changes anything."""
        quota = self._quota(req)
        if quota is None:
            return ALLOWED
        verdict = self.quotas.check(req.team, quota, request_gpu_pods(req), extra)
        if verdict.exclude_models and () in self._pod_models(req, verdict):
            return Verdict(False, text=verdict.text)  # a pod has no model left it may use
        return verdict

    def _pod_models(self, req: WorkloadRequest, verdict: Verdict) -> list[tuple[str, ...] | None]:
        """Per pod, the GPU models it may use once the quota's full models are taken out
        (of its own `gpu_models`, or of every model of the fleet; None for a CPU-only pod).
        A pod limited to one model keeps it: the quota's check said it has room there."""
        every = self.fleet.gpu_models.names
        return [
            None
            if not (p.gpu_count or p.gpu_milli)
            else p.gpu_models
            if len(p.gpu_models) == 1
            else tuple(sorted(set(p.gpu_models or every) - verdict.exclude_models))
            for p in req.pods
        ]

    def _quota_workload(self, req: WorkloadRequest, verdict: Verdict) -> engine.Workload:
        """The workload to give the core for an allowed `req`: kept off the GPU models whose
        own quota it would exceed (`verdict.exclude_models`)."""
        w = self._workload(req)
        if not verdict.exclude_models:
            return w
        pods = tuple(
            replace(p, gpu_models=models) if models is not None else p
            for p, models in zip(req.pods, self._pod_models(req, verdict), strict=True)
        )
        return replace(w, pods=pods)

    def _batch_quotas(
        self, reqs: list[WorkloadRequest], fresh: list[int]
    ) -> tuple[dict[int, Verdict], dict[int, engine.Workload], list[int]]:
        """Quota verdicts of a batch's workloads, tallied in the core's order (priority
        first): the verdicts, the workloads to give the core (by request index), and the
        requests to decide alone after the batch (held back by the tally only)."""
        verdicts: dict[int, Verdict] = {}
        workloads: dict[int, engine.Workload] = {}
        again: list[int] = []
        tally: dict[str, collections.Counter[str]] = {}
        for i in sorted(fresh, key=lambda i: (-self._priority(reqs[i]), i)):
            req = reqs[i]
            extra = tally.get(req.team)
            verdict = self._quota_verdict(req, extra)
            verdicts[i] = verdict
            if not verdict.allowed:
                # Decided alone after the batch's grants: the earlier workloads the tally
                # counted may not all have been placed.
                again.append(i)
                continue
            workloads[i] = self._quota_workload(req, verdict)
            if self._quota(req) is not None:
                # The model it lands on is not known yet: the total is tallied; the
                # per-model quotas are re-checked when it is committed.
                team = tally.setdefault(req.team, collections.Counter())
                team[""] += request_gpu_milli(req)
        return verdicts, workloads, again

    def _place_alone(self, req: WorkloadRequest, now: float, was_queued: bool) -> Decision:
        """Decide one workload against the live quota usage (after a batch's grants)."""
        verdict = self._quota_verdict(req)
        if not verdict.allowed:
            return self._not_placed(req, self._quota_outcome(req, verdict), now, was_queued)
        w = self._quota_workload(req, verdict)
        outcome = engine.place(self.fleet, w, self.policy, self._fits_empty, self.placement_cache)
        if outcome.allocations is not None:
            text = self._over_quota(req, outcome.allocations)
            if not text:
                dequeue = self._dequeued(req.workload_id, "placed", now)
                return self._grant(req, outcome.allocations, now, dequeue=dequeue)
            verdict = Verdict(False, text=text)  # (the exclusions above make this unlikely)
            return self._not_placed(req, self._quota_outcome(req, verdict), now, was_queued)
        return self._not_placed(req, self._with_quota(req, verdict, outcome), now, was_queued)

    def _quota_outcome(self, req: WorkloadRequest, verdict: Verdict) -> engine.Outcome:
        """The Outcome of a workload its team's quota holds back (the core is not asked:
        nodes_feasible is 0). QUEUED unless it needs more than the quota itself or never
        fits the fleet."""
        item = self._workload(req).item()
        fits = not verdict.never and self._fits_empty(item)
        reasons = ((QUOTA_REASON, 0, verdict.text),)
        return engine.Outcome(None, len(self.fleet), 0, reasons, verdict.text + ".", fits)

    def _with_quota(
        self, req: WorkloadRequest, verdict: Verdict, outcome: engine.Outcome
    ) -> engine.Outcome:
        """A core failure of a workload the quota kept off some GPU models: the quota is
        one of its reasons, and it waits (QUEUED) if it would fit the empty fleet on any
        model."""
        if not verdict.exclude_models:
            return outcome
        return replace(
            outcome,
            reasons=(*outcome.reasons, (QUOTA_REASON, 0, verdict.text)),
            summary=f"{outcome.summary} {verdict.text[:1].upper()}{verdict.text[1:]}.",
            fits_empty_fleet=self._fits_empty(self._workload(req).item()),
        )

    def quota_blocked(self, req: WorkloadRequest) -> bool:
        """Whether `req`'s team quota holds it back now (capacity would not help: the
        autoscaler plans nothing for it)."""
        return not self._quota_verdict(req).allowed

    def team_usage(self) -> list[tuple[str, str, int, int | None]]:
        """(team, GPU model or '' for all, GPU milli held, quota milli or None) of every team
        that holds GPUs or has a quota, sorted."""
        rows: dict[tuple[str, str], tuple[int, int | None]] = {}
        for team, usage in self.quotas.usage.items():
            rows[(team, "")] = (usage.total_milli, None)
            for model, milli in usage.by_model_milli.items():
                if model:
                    rows[(team, model)] = (milli, None)
        for team, quota in self.config.teams.quotas.items():
            if quota.gpus is not None or (team, "") not in rows:
                cap = gpu_milli(quota.gpus) if quota.gpus is not None else None
                rows[(team, "")] = (self.quotas.held_milli(team), cap)
            for model, gpus in quota.gpus_by_model.items():
                rows[(team, model)] = (self.quotas.held_milli(team, model), gpu_milli(gpus))
        return [(t, m, held, cap) for (t, m), (held, cap) in sorted(rows.items())]

    def _not_placed(
        self, req: WorkloadRequest, outcome: engine.Outcome, now: float, was_queued: bool
    ) -> Decision:
        explanation = self._explain(outcome)
        result = "queued" if outcome.fits_empty_fleet else "unschedulable"
        enqueue = result == "queued" and req.workload_id not in self.queue
        if enqueue and len(self.queue) >= self.config.limits.max_queued_workloads:
            raise QueueFull(
                f"{len(self.queue)} workloads are queued already "
                "(limits.max_queued_workloads); retry later"
            )
        seq = self._next_seq()
        decision = Decision(
            seq=seq,
            time_s=now,
            kind="place",
            workload_id=req.workload_id,
            team=req.team,
            result=result,
            explanation=explanation,
            replayed=was_queued,
        )
        if enqueue:
            # Durable before the reply, like a reservation: kill -9 keeps the queue.
            item = QueuedWorkload(req.workload_id, seq, now, encode_request(req))
            self.journal.enqueue(item, encode_decision(decision))
            priority = self.config.team_priority(req.team) + req.priority
            queued = self.queue[req.workload_id] = _Queued(
                req, priority, seq, now, cause_since_s=now
            )
            queued.tried(explanation, now)
        else:
            self.journal.record_seq(seq, encode_decision(decision))
            again = self.queue.get(req.workload_id)
            if again is not None:  # (tried again by its client: why it waits now)
                again.tried(explanation, now)
        return self._publish(decision)

    def submit(self, req: WorkloadRequest) -> asyncio.Future[Decision]:
        """Queue a Place for the next batch (concurrent callers share one core call).

        The batch runs on the next turn of the event loop, so every Place that arrived in
        this turn joins it; at most MAX_BATCH per batch. (grpc.aio hands over about one
        call per turn, so batches stay small unless calls arrive in a burst; waiting longer
        was measured to cost more latency than it saves.)
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        self._pending.append((req, fut))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            loop.call_soon(self._drain)
        return fut

    def _drain(self) -> None:
        self._drain_scheduled = False
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        if self._pending:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)
        # A caller that went away before its turn (its deadline passed, it cancelled) is
        # not decided: it was answered DEADLINE_EXCEEDED or CANCELLED, so nothing is held on
        # its behalf. One that goes away after the decision keeps it: a retry with the same
        # workload id replays it.
        batch = [(req, fut) for req, fut in batch if not fut.done()]
        if not batch:
            return
        try:
            results = self.place_batch([req for req, _ in batch])
        except Exception as exc:  # the callers see INTERNAL; the daemon stays up
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), res in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, Exception):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    def explain(self, req: WorkloadRequest) -> tuple[Decision, bool]:
        """Dry run of `place`: the would-be decision (seq 0) and whether it fits now."""
        self._check_owner()
        self._check_scope(req.cluster, req.pool)
        verdict = self._quota_verdict(req)
        now = self.clock()
        if not verdict.allowed:
            # The fleet's answer for the workload as asked, then the quota's on top.
            outcome = self._place(req)
            quota = self._quota_outcome(req, verdict)
            if outcome.allocations is not None:
                summary = f"{quota.summary} The fleet has room for it now."
                reasons = quota.reasons
            else:
                summary = f"{quota.summary} {outcome.summary}"
                reasons = (*quota.reasons, *self._explain(outcome).reasons)
            expl = Explanation(outcome.nodes_total, outcome.nodes_feasible, reasons, summary)
            result = "queued" if quota.fits_empty_fleet else "unschedulable"
            return Decision(0, now, "place", req.workload_id, req.team, result, (), expl), False
        w = self._quota_workload(req, verdict)
        outcome = engine.place(self.fleet, w, self.policy, self._fits_empty, self.placement_cache)
        outcome = self._with_quota(req, verdict, outcome)
        if outcome.allocations is not None:
            pods = self._reserved_pods(req, outcome.allocations)
            total = outcome.nodes_total
            expl = Explanation(
                total, outcome.nodes_feasible, (), f"fits: {len(pods)} pod(s) on {total} nodes"
            )
            return (
                Decision(0, now, "place", req.workload_id, req.team, "placed", pods, expl),
                True,
            )
        result = "queued" if outcome.fits_empty_fleet else "unschedulable"
        expl = self._explain(outcome)
        return Decision(0, now, "place", req.workload_id, req.team, result, (), expl), False

    def _dequeued(self, workload_id: str, outcome: str, now: float) -> bool:
        """Take a workload out of the queue, reporting how long it waited; False when it was
        not queued."""
        queued = self.queue.pop(workload_id, None)
        if queued is None:
            return False
        team = self.config.teams.metric_label(queued.request.team)
        self.metrics.queue_wait(team, outcome, max(0.0, now - queued.since_s))
        return True

    def release(self, workload_id: str) -> Decision:
        """Release a reservation or drop a queued workload; NotFound when neither."""
        self._check_owner()
        now = self.clock()
        if workload_id in self.held:
            return self._end(workload_id, "release", "released", now, reason="released by client")
        queued = self.queue.get(workload_id)
        if queued is None:
            raise NotFound(f"workload_id {workload_id!r} holds no reservation and is not queued")
        self._dequeued(workload_id, "released", now)
        seq = self._next_seq()
        decision = Decision(seq, now, "release", workload_id, queued.request.team, "", ())
        self.journal.dequeue(workload_id, seq, encode_decision(decision))
        return self._publish(decision)

    def _build_policy(self, config: Config) -> scheduling.Policy:
        spec = engine.policy_spec(config.scheduling.policy, config.scheduling.weights)
        typical = self.target.typical(self.fleet) if engine.needs_target(spec) else None
        # The same Policy object while the target moves little: cached scores stay valid.
        policy = self._policies.build(spec, typical)
        #: The target workload in use (fragmentation in snapshots and metrics uses it).
        self.typical = self._policies.typical
        if policy is not getattr(self, "policy", None):
            self._fits_cache_version = -1  # the answers may depend on the policy's GPU picks
        return policy

    def _learn(self, req: WorkloadRequest) -> None:
        """Feed FGD's target workload; re-derive the policy every target_refresh_pods pods."""
        self.target.observe(req.pods)
        sched = self.config.scheduling
        if self.target.observed - self._target_seen >= sched.target_refresh_pods or (
            self._target_seen == 0 and engine.needs_target(sched.policy)
        ):
            self._target_seen = self.target.observed
            self.policy = self._build_policy(self.config)

    def _fits_empty(self, item: scheduling.PodSpec | scheduling.GangSpec) -> bool:
        """Memoized `engine.fits_empty_fleet`: valid until a node is added, removed or changed
        (allocations, staleness and cordons do not change the answer)."""
        if self._fits_cache_version != self._structure_version:
            self._fits_cache.clear()
            self._fits_cache_version = self._structure_version
        key = (
            item.shape_key
            if isinstance(item, scheduling.PodSpec)
            else (tuple(p.shape_key for p in item.pods), item.required_level)
        )
        hit = self._fits_cache.get(key)
        if hit is None:
            hit = self._fits_cache[key] = engine.fits_empty_fleet(self.fleet, item, self.policy)
        return hit

    def _workload(self, req: WorkloadRequest) -> engine.Workload:
        return engine.Workload(
            name=req.workload_id,
            pods=req.pods,
            gang=req.gang,
            same=req.same,
            cluster=req.cluster,
            pool=req.pool,
            priority=self.config.team_priority(req.team) + req.priority,
        )

    def workload_item(self, req: WorkloadRequest) -> scheduling.PodSpec | scheduling.GangSpec:
        """The core's queue item of a request (what the autoscaler plans for)."""
        return self._workload(req).item()

    def _place(self, req: WorkloadRequest) -> engine.Outcome:
        return engine.place(
            self.fleet, self._workload(req), self.policy, self._fits_empty, self.placement_cache
        )

    def _grant(
        self, req: WorkloadRequest, allocs: Iterable[Allocation], now: float, dequeue: bool = False
    ) -> Decision:
        """Allocate, journal and publish a reservation (`dequeue`: it leaves the queue)."""
        slots = tuple(allocs)
        done: list[Allocation] = []
        try:
            for alloc in slots:
                self._allocate(alloc)  # re-checked by the core: never oversubscribes
                done.append(alloc)
        except AllocationError:
            for alloc in done:
                self._free(alloc)
            raise
        ttl_s = min(
            req.ttl_s or self.config.reservations.default_ttl_s, self.config.reservations.max_ttl_s
        )
        seq = self._next_seq()
        pods = self._reserved_pods(req, slots)
        record = Reservation(
            workload_id=req.workload_id,
            team=req.team,
            priority=req.priority,
            state="pending",
            created_at_s=now,
            expires_at_s=now + ttl_s,
            decision_seq=seq,
            fingerprint=req.fingerprint,
            pods=pods,
        )
        decision = Decision(
            seq=seq,
            time_s=now,
            kind="place",
            workload_id=req.workload_id,
            team=req.team,
            result="placed",
            placements=pods,
            reservation_state="pending",
            expires_at_s=record.expires_at_s,
        )
        try:
            self.journal.put(record, seq, encode_decision(decision), dequeue=dequeue)
        except Exception:
            # Not durable means not granted: undo the allocation exactly.
            for alloc in slots:
                self._free(alloc)
            raise
        self.held[req.workload_id] = _Held(record, list(slots), [None] * len(pods))
        self.quotas.charge(req.team, held_gpus(pods))
        return self._publish(decision)

    def _reserved_pods(
        self, req: WorkloadRequest, allocs: Iterable[Allocation]
    ) -> tuple[ReservedPod, ...]:
        out = []
        for slot, pod in zip(allocs, req.pods, strict=True):
            info = self.nodes[slot.node]
            out.append(
                ReservedPod(
                    pod_name=pod.name,
                    cluster=info.cluster,
                    node=info.name,
                    gpu_indices=slot.gpu_indices,
                    gpu_milli=slot.gpu_milli_per_gpu if slot.gpu_indices else 0,
                    cpu_millicores=pod.cpu_millicores,
                    memory_bytes=pod.memory_bytes,
                    pool=info.pool,
                    gpu_model=info.gpu_model if slot.gpu_indices else "",
                )
            )
        return tuple(out)

    def _end(self, wid: str, kind: str, state: str, now: float, reason: str) -> Decision:
        held = self.held.pop(wid)
        # Off the team's quota usage even if its pods still run (then as observed pods).
        self.quotas.credit(held.record.team, held_gpus(held.record.pods))
        for i, slot in enumerate(held.slots):
            if slot is None:
                continue
            rp = held.record.pods[i]
            uid = held.observed[i]
            if uid is not None and (rp.cluster, uid) in self.pods:
                # The pod still runs: it keeps holding its resources, now as an observed pod.
                pod = self.pods[(rp.cluster, uid)]
                pod.slot = slot
                pod.reservation = None
            else:
                self._free(slot)
        seq = self._next_seq()
        expl = Explanation(0, 0, (), reason)
        decision = Decision(
            seq, now, kind, wid, held.record.team, "", held.record.pods, expl, state
        )
        self.journal.delete(wid, seq, encode_decision(decision))
        self._publish(decision)
        self._retry_queue(now)
        return decision

    def _retry_queue(self, now: float, round_: _RetryRound | None = None) -> None:
        """Try queued workloads again (highest priority, then oldest, first) after capacity freed.

        One capacity-freeing event considers at most QUEUE_RETRY_BUDGET queued workloads.
        On the event loop the work is also cut into slices of QUEUE_RETRY_BUDGET_S, each
        continuing the same round on a later turn of the loop, so a Release never holds the
        loop for long, yet which workloads get placed does not depend on the machine's speed.
        """
        if not self.queue or not self.ready:
            return
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # synchronous use (tests, tools): the whole round now
        r = round_ if round_ is not None else _RetryRound()
        order = sorted(self.queue.values(), key=lambda q: (-q.priority, q.seq))
        deadline = time.perf_counter() + QUEUE_RETRY_BUDGET_S  # a work budget, not a clock
        worked = 0
        # Quota verdicts by (team, pods) until the next grant changes a team's usage (many
        # queued workloads of a team over its quota are mostly the same few shapes).
        # (Keyed by what the verdict reads: team, and each pod's GPU models and amount; not the
        # pods themselves, whose client-chosen names differ from workload to workload.)
        verdicts: dict[tuple[object, ...], tuple[Verdict, Explanation | None]] = {}
        for item in order:
            req = item.request
            if req.workload_id in r.considered:
                continue
            if r.tried >= QUEUE_RETRY_BUDGET:
                return
            if loop is not None and worked and time.perf_counter() > deadline:
                # Continue this round on the next turn of the loop (RPCs run in between).
                loop.call_soon(self._continue_retry, r)
                return
            r.considered.add(req.workload_id)
            worked += 1
            key = (req.team, *((p.gpu_models, p.gpu_count, p.gpu_milli) for p in req.pods))
            known = verdicts.get(key)
            if known is None:
                verdict = self._quota_verdict(req)
                held_back = None
                if not verdict.allowed:
                    held_back = self._explain(self._quota_outcome(req, verdict))
                known = verdicts[key] = (verdict, held_back)
            verdict, held_back = known
            if held_back is not None:
                # Its team's quota holds it back: skipped without using the round's budget,
                # so one team's over-quota head never blocks other teams' work behind it.
                item.tried(held_back, now)
                continue
            r.tried += 1
            w = self._quota_workload(req, verdict)
            shape = (w.pods, req.gang, req.same, req.cluster, req.pool)
            outcome = r.failed.get(shape)
            if outcome is None:
                outcome = engine.place(
                    self.fleet, w, self.policy, self._fits_empty, self.placement_cache
                )
            # (else an identical workload just failed: this one would too, for the same
            # reasons but its own team's quota)
            if outcome.allocations is None:
                r.failed[shape] = outcome
                why_key = (shape, verdict.text if verdict.exclude_models else None)
                why = r.explained.get(why_key)
                if why is None:
                    why = self._explain(self._with_quota(req, verdict, outcome))
                    r.explained[why_key] = why
                item.tried(why, now)
            elif text := self._over_quota(req, outcome.allocations):
                # (Rare: the models the quota left were ruled out before the core's call.)
                over = self._quota_outcome(req, Verdict(False, text=text))
                item.tried(self._explain(over), now)
            else:
                self._dequeued(req.workload_id, "placed", now)
                self._grant(req, outcome.allocations, now, dequeue=True)
                verdicts.clear()

    def _continue_retry(self, round_: _RetryRound) -> None:
        self._retry_queue(self.clock(), round_)

    # -- helpers --------------------------------------------------------------------------------

    def _check_scope(self, cluster: str, pool: str) -> None:
        """NotFound for a cluster or pool fleet state has never heard of."""
        if not cluster and not pool:
            return
        clusters = {info.cluster for info in self.nodes.values()} | {c for c, _ in self.pools}
        if cluster and cluster not in clusters:
            raise NotFound(f"cluster {cluster!r} is not known to fleetd")
        if pool:
            known = {(i.cluster, i.pool) for i in self.nodes.values()} | set(self.pools)
            if not any(p == pool and (not cluster or c == cluster) for c, p in known):
                where = f" in cluster {cluster!r}" if cluster else ""
                raise NotFound(f"pool {pool!r}{where} is not known to fleetd")

    def _explain(self, outcome: engine.Outcome) -> Explanation:
        reasons, summary = outcome.reasons, outcome.summary
        if self.lost_clusters:
            reasons, summary = self._charge_lost(outcome)
        return Explanation(outcome.nodes_total, outcome.nodes_feasible, reasons, summary)

    def _charge_lost(self, outcome: engine.Outcome) -> tuple[tuple[tuple[str, int, str], ...], str]:
        """Move the nodes of lost clusters from NODE_NOT_READY (the core sees them as stale)
        to their own reason, CLUSTER_SYNC_LOST. Each uncordoned node of a lost cluster
        carries the stale flag, so the core charged it to NODE_NOT_READY (a cordoned one
        fails first on NODE_UNSCHEDULABLE and stays there)."""
        lost_n = sum(
            1 for i in self.nodes.values() if i.cluster in self.lost_clusters and not i.cordoned
        )
        not_ready = next((n for c, n, _ in outcome.reasons if c == "NODE_NOT_READY"), 0)
        moved = min(lost_n, not_ready)
        if not moved:
            return outcome.reasons, outcome.summary
        node_level: list[tuple[str, int, str]] = []
        for code, n, text in outcome.reasons:
            if code == "NODE_NOT_READY":
                if n > moved:
                    node_level.append((code, n - moved, text))
                node_level.append((CLUSTER_SYNC_LOST, moved, CLUSTER_SYNC_LOST_TEXT))
            elif n:
                node_level.append((code, n, text))
        node_level.sort(key=lambda r: -r[1])  # stable: ties keep the core's order
        pod_level = [r for r in outcome.reasons if not r[1]]
        body = ", ".join(f"{n} {text}" for _, n, text in node_level)
        summary = f"{outcome.nodes_feasible}/{outcome.nodes_total} nodes are available: {body}."
        summary += "".join(f" {text.capitalize()}." for _, _, text in pod_level)
        return (*node_level, *pod_level), summary

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def _publish(self, decision: Decision) -> Decision:
        self.history.append(decision)
        self.metrics.decision(decision.kind, decision.result or decision.reservation_state)
        for sub in self.subscribers:
            if sub.overflowed:
                continue
            try:
                sub.queue.put_nowait(decision)
            except asyncio.QueueFull:
                # A slow watcher is cut off (it can resume from its last seq) rather than
                # letting its backlog grow without bound.
                sub.overflowed = True
                _signal(sub, _OVERFLOW)
        return decision

    async def watch(self, after_seq: int, from_now: bool = False) -> AsyncIterator[Decision]:
        """Retained decisions with seq > after_seq, then live ones. OutOfRange if too old."""
        self._check_owner()
        backlog: list[Decision] = []
        if not from_now:
            oldest = self.history[0].seq if self.history else self.seq + 1
            if after_seq + 1 < oldest and after_seq < self.seq:
                raise OutOfRange(
                    f"after_seq {after_seq} is older than the retained history "
                    f"(oldest retained seq is {oldest})"
                )
            backlog = [d for d in self.history if d.seq > after_seq]
        sub = _Subscriber(asyncio.Queue(maxsize=self.config.server.max_stream_backlog))
        self.subscribers.append(sub)
        try:
            for d in backlog:
                yield d
            while True:
                item = await sub.queue.get()
                if item == _OVERFLOW:
                    raise OutOfRange("watcher fell behind; resume from the last seq received")
                if isinstance(item, str):  # _CLOSED: the daemon is shutting down
                    return
                yield item
        finally:
            self.subscribers.remove(sub)

    def close_watchers(self) -> None:
        """End every decision stream (shutdown): streams finish instead of holding the drain."""
        for sub in self.subscribers:
            _signal(sub, _CLOSED)
        self.scale.close()

    def publish_scale(
        self, decision: ScaleDecision, from_size: int | None = None, *, dry_run: bool = False
    ) -> ScaleEvent:
        """Stream one autoscaler decision. `from_size`: the pool's target size before it
        (default: its last reported size); to_size = from_size + delta. `dry_run`: marked
        as computed in dry-run mode (nobody acts on it)."""
        self._check_owner()
        pool = self.pools.get((decision.cluster, decision.pool))
        size = from_size if from_size is not None else pool.current_size if pool else 0
        self.scale.seq += 1
        event = ScaleEvent(
            self.scale.seq, self.clock(), decision, size, max(0, size + decision.delta), dry_run
        )
        self.scale.publish(event)
        return event

    def _allocate(self, alloc: Allocation, now: float | None = None) -> None:
        """The one place fleet usage grows (the core re-checks it); stamps the node with
        `now` (the clock's time when not given)."""
        self.fleet.allocate(alloc)
        self.node_since[alloc.node] = self.clock() if now is None else now

    def _free(self, alloc: Allocation, now: float | None = None) -> None:
        """The exact inverse of `_allocate`; stamps the node."""
        self.fleet.free(alloc)
        self.node_since[alloc.node] = self.clock() if now is None else now

    def _check_owner(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError("FleetState mutated off its owner thread: hop onto the event loop")

    # -- read views ---------------------------------------------------------------------------

    def oldest_queued_s(self) -> dict[str, float]:
        """How long a queued workload has waited for what holds it now, the longest such wait
        (0 when none), by cause: "quota" when its team's quota held it back at its last try
        (a TEAM_QUOTA reason: by design, the team waits for its own work to finish), else
        "capacity" (no room in the fleet for it). A workload whose cause changed counts
        from the change. (Read from each entry's last try: ~10 ms at 100,000 queued.)"""
        now = self.clock()
        queued = self.queue.values()
        held = min((q.cause_since_s for q in queued if q.quota_held), default=None)
        room = min((q.cause_since_s for q in queued if not q.quota_held), default=None)
        return {
            "capacity": 0.0 if room is None else max(0.0, now - room),
            "quota": 0.0 if held is None else max(0.0, now - held),
        }

    def counts(self) -> tuple[int, int, int]:
        """(pending reservations, confirmed reservations, queued workloads)."""
        pending = sum(1 for h in self.held.values() if h.record.state == "pending")
        return pending, len(self.held) - pending, len(self.queue)

    def source_status(self) -> list[tuple[str, str, bool, float, float]]:
        """(source, cluster, synced, last update age s, last observed time s) per source."""
        now = self.clock()
        return [
            (
                src,
                cl,
                s.synced and not s.lost,
                (now - s.last_update_s) if s.last_update_s else -1.0,
                s.last_observed_s,
            )
            for (src, cl), s in sorted(self.sources.items())
        ]

    def nodes_stale(self) -> int:
        """Nodes currently marked stale."""
        return sum(1 for info in self.nodes.values() if info.stale)


def _same_fields(info: _NodeInfo, u: up.NodeUpdate) -> bool:
    """Whether `u` leaves the node table as it is, known cheaply: the same field objects as
    the last applied update (the usual case; else `_spec_signature`s are compared)."""
    prev = info.spec_update
    return (
        prev is not None
        and u.allocatable is prev.allocatable
        and u.labels is prev.labels
        and u.taints is prev.taints
        and u.gpus is prev.gpus
        and u.unschedulable == prev.unschedulable
        and u.ready == prev.ready
        and u.node_pool == prev.node_pool
        and u.zone == prev.zone
        and u.gpu_model == prev.gpu_model
        and u.gpu_memory_bytes == prev.gpu_memory_bytes
    )


def _flags_only_changed(old: tuple[object, ...] | None, new: tuple[object, ...]) -> bool:
    """Whether two `_spec_signature`s differ at most in cordon, readiness and GPU health
    (the same number of GPUs): the node table's other columns stay as they are."""
    if old is None:
        return False
    old_gpus, new_gpus = old[9], new[9]
    return (
        old[:3] == new[:3]
        and old[5:9] == new[5:9]
        and isinstance(old_gpus, tuple)
        and isinstance(new_gpus, tuple)
        and len(old_gpus) == len(new_gpus)
    )


def _spec_signature(u: up.NodeUpdate, info: _NodeInfo | None = None) -> tuple[object, ...]:
    """Everything of a node update that the node table and `_NodeInfo` hold (not pods,
    sequence, time, capacity, utilization): equal signatures need no node-table write.
    With the node's `info`, the GPUs' part is taken from its signature when `u` has the
    same GPU tuple as the update that signature is of (`spec_update`: a cordon change)."""
    prev = info.spec_update if info is not None else None
    if (
        prev is not None
        and u.gpus is prev.gpus
        and info is not None
        and info.spec_signature is not None
    ):
        gpus = info.spec_signature[9]
    else:
        gpus = tuple([(g.index, g.healthy) for g in u.gpus])
    return (
        u.allocatable,
        u.labels,
        u.taints,
        u.unschedulable,
        u.ready,
        u.node_pool,
        u.zone,
        u.gpu_model,
        u.gpu_memory_bytes,
        gpus,
    )


def held_gpus(pods: Iterable[ReservedPod]) -> list[tuple[str, int]]:
    """(GPU model, GPU milli) of each GPU pod of a reservation: what its team is charged."""
    return [(p.gpu_model, p.gpu_milli * len(p.gpu_indices)) for p in pods if p.gpu_indices]


def request_gpu_milli(req: WorkloadRequest) -> int:
    """The GPU milli a workload asks for: 1000 a whole GPU, a share's own milli."""
    return sum(p.gpu_count * scheduling.GPU_MILLI or p.gpu_milli for p in req.pods)


def request_gpu_pods(req: WorkloadRequest) -> list[tuple[frozenset[str] | None, int]]:
    """Each GPU pod of a workload: (the GPU models it may use, None = any; its GPU milli)."""
    return [
        (frozenset(p.gpu_models) or None, p.gpu_count * scheduling.GPU_MILLI or p.gpu_milli)
        for p in req.pods
        if p.gpu_count or p.gpu_milli
    ]


def encode_decision(d: Decision) -> str:
    """A decision as compact JSON (the journal keeps recent ones for resume). Built field by
    field rather than with `dataclasses.asdict`, whose recursive deep copy was ~50 µs of
    every Place."""
    raw: dict[str, object] = {name: getattr(d, name) for name in _DECISION_FIELDS}
    raw["placements"] = [pod_fields(p) for p in d.placements]
    if d.explanation is not None:
        raw["explanation"] = {name: getattr(d.explanation, name) for name in _EXPLANATION_FIELDS}
    return json.dumps(raw, separators=(",", ":"))


_DECISION_FIELDS = tuple(f.name for f in fields(Decision))
_EXPLANATION_FIELDS = tuple(f.name for f in fields(Explanation))


def decode_decision(body: str) -> Decision:
    """The inverse of `encode_decision`."""
    raw = json.loads(body)
    raw["placements"] = tuple(
        ReservedPod(**{**p, "gpu_indices": tuple(p["gpu_indices"])}) for p in raw["placements"]
    )
    expl = raw.get("explanation")
    if expl is not None:
        expl["reasons"] = tuple(tuple(r) for r in expl["reasons"])
        raw["explanation"] = Explanation(**expl)
    return Decision(**raw)


def encode_request(req: WorkloadRequest) -> str:
    """A validated request as compact JSON (the journal keeps queued ones)."""
    return json.dumps(asdict(req), separators=(",", ":"))


def decode_request(body: str) -> WorkloadRequest:
    """The inverse of `encode_request`."""
    raw = json.loads(body)
    raw["pods"] = tuple(
        PodRequest(
            **{
                **p,
                "gpu_models": tuple(p["gpu_models"]),
                "node_selector": tuple(tuple(kv) for kv in p["node_selector"]),
                "tolerations": tuple(tuple(t) for t in p["tolerations"]),
            }
        )
        for p in raw["pods"]
    )
    return WorkloadRequest(**raw)


def fingerprint(payload: bytes) -> str:
    """The request fingerprint Place idempotency compares (sha256 of the canonical bytes)."""
    return hashlib.sha256(payload).hexdigest()
