"""Update values: what telemetry sources hand to the fleet state (the single writer).

Sources (Kafka, Kubernetes watches, the simulated fleet) translate the outside world into
these small frozen values; the state applies them in order. Nothing here knows about
protobuf, Kafka records or Kubernetes objects.

Ordering: every update of one subject carries a `sequence` that only grows (Kafka: the
publisher's per-node sequence; Kubernetes: the object's resourceVersion). An update whose
sequence is not above the last one applied for its subject is stale and must be dropped;
`SequenceGate` does that bookkeeping.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

Labels = tuple[tuple[str, str], ...]
"""Labels as sorted (key, value) pairs: hashable, deterministic order."""


def labels_of(mapping: Mapping[str, str]) -> Labels:
    """Freeze a label mapping into sorted pairs."""
    return tuple(sorted(mapping.items()))


class CapacityType(enum.Enum):
    """How a node is bought."""

    UNSPECIFIED = "unspecified"
    ON_DEMAND = "on-demand"
    SPOT = "spot"
    RESERVED = "reserved"


@dataclass(frozen=True, slots=True)
class Taint:
    """A node taint; `effect` is NoSchedule, PreferNoSchedule or NoExecute."""

    key: str
    value: str
    effect: str


@dataclass(frozen=True, slots=True)
class Resources:
    """Resources in integer base units.

    `mig_devices` maps a MIG profile ("1g.10gb") to a slice count, sorted by profile.
    """

    cpu_millicores: int = 0
    memory_bytes: int = 0
    gpus: int = 0
    mig_devices: tuple[tuple[str, int], ...] = ()
    pods: int = 0
    ephemeral_storage_bytes: int = 0


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One physical GPU of a node and its health."""

    index: int
    model: str
    memory_bytes: int
    healthy: bool
    uuid: str = ""
    xid_errors: tuple[int, ...] = ()
    utilization_ratio: float = 0.0
    mig_profile: str = ""


@dataclass(frozen=True, slots=True)
class PodObserved:
    """A pod bound to a node (running or about to), with its summed requests."""

    cluster: str
    namespace: str
    name: str
    uid: str
    node: str
    requests: Resources
    phase: str = "Running"
    labels: Labels = ()
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class PodRemoved:
    """A pod is gone from its node (deleted, or terminated and no longer holding resources)."""

    cluster: str
    namespace: str
    name: str
    uid: str
    node: str
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class NodeUpdate:
    """The whole observed state of one node.

    `pods` is the complete set of pods bound to the node when the source reports pods with
    the node (Kafka telemetry); it is None when pods arrive as separate PodObserved /
    PodRemoved values (Kubernetes watches) and the node's pods must be left as they are.
    `gpu_model` and `gpu_memory_bytes` describe the node's GPUs as a whole (GPU feature
    discovery); `gpus` lists devices individually when the source knows them.
    """

    cluster: str
    name: str
    sequence: int
    capacity: Resources
    allocatable: Resources
    labels: Labels = ()
    taints: tuple[Taint, ...] = ()
    unschedulable: bool = False
    ready: bool = True
    node_pool: str = ""
    zone: str = ""
    region: str = ""
    instance_type: str = ""
    capacity_type: CapacityType = CapacityType.UNSPECIFIED
    gpu_model: str = ""
    gpu_memory_bytes: int = 0
    gpus: tuple[GpuDevice, ...] = ()
    pods: tuple[PodObserved, ...] | None = None
    observed_at_s: float = 0.0
    """When the source observed this state, Unix epoch seconds (0 when unknown)."""
    content_token: bytes = field(default=b"", compare=False)
    """Identifies the reported content (Kafka: the node's telemetry bytes), so that a later
    `NodeHeartbeats` entry can say "unchanged since this update"; b"" when not used."""

    @property
    def schedulable(self) -> bool:
        """Cordoned or not Ready nodes take no new pods."""
        return self.ready and not self.unschedulable


_V = TypeVar("_V")


def fast_constructor(cls: type[_V]) -> Callable[..., _V]:
    """A constructor of the frozen slotted dataclass `cls` that takes every field,
    positionally, and makes the same value as `cls(...)` at a fifth of the cost (the Kafka
    source's change path makes one `NodeUpdate` and a few `PodObserved` per changed report).

    Why it is faster: a frozen dataclass's `__init__` must set each field through
    `object.__setattr__` (its own `__setattr__` refuses), a call per field (~3 µs for a
    `NodeUpdate`'s 20). This makes the value as an instance of a mutable twin with the same
    slots, whose `__init__` stores them directly, then gives it the class `cls`: CPython
    allows `__class__` assignment between classes whose instances are laid out alike (the
    same base and `__slots__`), and the value is from then on a `cls` like any other,
    frozen, equal and hashing as one."""
    names = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    if getattr(cls, "__slots__", None) != names or cls.__bases__ != (object,):
        raise TypeError(f"{cls.__name__}: not a slotted dataclass of object")
    if hasattr(cls, "__post_init__"):
        # (The twin's `__init__` would skip it: checks or derived fields left out.)
        raise TypeError(f"{cls.__name__}: has a __post_init__, which this would skip")
    twin: Any = dataclasses.make_dataclass(
        cls.__name__, names, slots=True, eq=False, repr=False, match_args=False
    )

    def new(*values: Any) -> _V:
        value = twin(*values)
        value.__class__ = cls
        return value  # type: ignore[no-any-return]

    new.__doc__ = f"{cls.__name__}(...) with every field given, positionally (`fast_constructor`)."
    return new


#: `fast_constructor`s of the values a changed telemetry report makes.
new_node_update = fast_constructor(NodeUpdate)
new_pod_observed = fast_constructor(PodObserved)
new_gpu_device = fast_constructor(GpuDevice)


@dataclass(frozen=True, slots=True)
class HeartbeatSlots:
    """Binds slots of a source's heartbeat slot space to nodes: from now on, a
    `NodeHeartbeats` entry of `source` with slot `slots[i]` is a report of node `names[i]`
    of `cluster` repeating the content `content_tokens[i]` (the `content_token` of the
    node's last applied `NodeUpdate`, sent before this in the same batch or earlier).

    A slot keeps its binding until it is bound again; the receiver drops a node's binding
    when anything else about the node is applied (a new update, its removal), so entries
    never refresh content that was replaced. A binding whose token is not the node's last
    applied content (the update was refused) binds nothing.
    """

    source: str
    cluster: str
    slots: tuple[int, ...]
    names: tuple[str, ...]
    content_tokens: tuple[bytes, ...]


@dataclass(frozen=True, slots=True, eq=False)
class NodeHeartbeats:
    """Reports whose content did not change, as columns: entry i is a report, at sequence
    `sequences[i]` and observed at `observed_at_s[i]` (Unix seconds, 0 when unknown), of the
    node bound to slot `slots[i]` of `source` (`HeartbeatSlots`), with the content it was
    bound with: applying it moves only the node's sequence and freshness. An entry of an
    unbound slot is refused.

    Periodic telemetry is mostly such reports, so they travel as arrays, without an object
    or a lookup per node.
    """

    source: str
    slots: NDArray[np.int64]
    sequences: NDArray[np.int64]
    observed_at_s: NDArray[np.float64]

    @staticmethod
    def of(
        source: str, slots: Iterable[int], sequences: Iterable[int], observed_at_s: Iterable[float]
    ) -> NodeHeartbeats:
        """From plain sequences (tests, small batches)."""
        return NodeHeartbeats(
            source,
            np.asarray(list(slots), np.int64),
            np.asarray(list(sequences), np.int64),
            np.asarray(list(observed_at_s), np.float64),
        )


@dataclass(frozen=True, slots=True)
class NodeRemoved:
    """A node left its cluster; its pods go with it."""

    cluster: str
    name: str
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class NodeStale:
    """A node's telemetry stopped (stale=True: unschedulable until it reports again) or
    resumed."""

    cluster: str
    name: str
    stale: bool


@dataclass(frozen=True, slots=True)
class NodePoolUpdate:
    """A node pool definition: shape of its nodes, price and size bounds."""

    cluster: str
    name: str
    sequence: int
    instance_type: str
    allocatable: Resources
    gpu_model: str = ""
    gpu_memory_bytes: int = 0
    price_per_hour: float = 0.0
    capacity_type: CapacityType = CapacityType.UNSPECIFIED
    min_size: int = 0
    max_size: int = 0
    current_size: int = 0
    zones: tuple[str, ...] = ()
    labels: Labels = ()
    taints: tuple[Taint, ...] = ()


@dataclass(frozen=True, slots=True)
class NodePoolRemoved:
    """A node pool was deleted."""

    cluster: str
    name: str
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class NodeRequirement:
    """One `key op values` term of a pod's required node affinity (In, NotIn, Exists,
    DoesNotExist; Gt/Lt are not understood and never produced)."""

    key: str
    operator: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PodToleration:
    """A pod's toleration (Kubernetes semantics; operator Equal or Exists)."""

    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""


@dataclass(frozen=True, slots=True)
class PendingPod:
    """A pod the cluster's scheduler could not place (PodScheduled=False, Unschedulable):
    pending work the autoscaler plans nodes for. fleetd does not place it; the cluster's
    scheduler does once nodes arrive. Keyed by (cluster, namespace, name).

    `node_selector` and `affinity` (required node affinity, one term: ANDed) constrain the
    nodes it can use; `tolerations` the taints it accepts; larger `priority` plans first.
    """

    cluster: str
    namespace: str
    name: str
    uid: str
    requests: Resources
    node_selector: Labels = ()
    affinity: tuple[NodeRequirement, ...] = ()
    tolerations: tuple[PodToleration, ...] = ()
    priority: int = 0
    sequence: int = 0

    @property
    def key(self) -> str:
        """`namespace/name`: how scale decisions name it in `unblocks`."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class PendingPodRemoved:
    """A pending pod is no longer pending (bound, deleted, terminated or schedulable)."""

    cluster: str
    namespace: str
    name: str
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class ClusterSynced:
    """A source finished listing a cluster: everything it holds for the cluster is now known.

    `nodes` names every node the source currently knows in the cluster, so the state can
    drop nodes that vanished while the source was disconnected.
    """

    cluster: str
    source: str
    nodes: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class NodeInventoryChunk:
    """One chunk of a cluster's node inventory as a telemetry record carries it (see
    `NodeInventory`); the Kafka source joins the `chunk_count` chunks of one `sequence`."""

    cluster: str
    sequence: int
    chunk_index: int
    chunk_count: int
    names: tuple[str, ...]
    #: The cluster's node pools (chunk 0), or None when the agent does not list them.
    pools: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class NodeInventory:
    """Every node a cluster's agent saw at `sequence` (a relist, for telemetry).

    Applying it removes the cluster's nodes that are not in `names` and whose last applied
    sequence is below `sequence` (each as a `NodeRemoved` at `sequence` would), and likewise
    its node pools not in `pools` when that is given: they were
    gone when the agent took the list, and nothing newer said otherwise. A node whose
    report is newer was added (or seen again) after the list was taken, and stays. That
    needs `sequence` and the node sequences from one clock per cluster, as the Kafka
    publisher's are (`max(last + 1, wall clock µs)` per agent).
    """

    cluster: str
    sequence: int
    names: frozenset[str]
    #: The cluster's node pools, removed the same way when given (None: not listed, left
    #: alone).
    pools: frozenset[str] | None = None


Update = (
    NodeUpdate
    | NodeHeartbeats
    | HeartbeatSlots
    | NodeRemoved
    | NodeInventory
    | NodeInventoryChunk
    | NodeStale
    | PodObserved
    | PodRemoved
    | NodePoolUpdate
    | NodePoolRemoved
    | PendingPod
    | PendingPodRemoved
    | ClusterSynced
)


Subject = tuple[str, str, str]
"""(cluster, kind, name): what one sequence orders (`subject_of`)."""


def subject_of(update: Update) -> Subject | None:
    """The (cluster, kind, name) whose sequence orders `update`, or None if unordered."""
    if isinstance(update, NodeUpdate | NodeRemoved):
        return (update.cluster, "node", update.name)
    if isinstance(update, NodePoolUpdate | NodePoolRemoved):
        return (update.cluster, "pool", update.name)
    if isinstance(update, PodObserved | PodRemoved):
        return (update.cluster, "pod", update.uid or f"{update.namespace}/{update.name}")
    if isinstance(update, PendingPod | PendingPodRemoved):
        return (update.cluster, "pending", f"{update.namespace}/{update.name}")
    if isinstance(update, NodeInventory):
        return (update.cluster, "inventory", "")
    if isinstance(update, NodeInventoryChunk):
        return (update.cluster, "inventory-chunk", str(update.chunk_index))
    return None


#: Updates that end their subject: the gate keeps a tombstone for them (see SequenceGate).
_REMOVALS = (NodeRemoved, NodePoolRemoved, PodRemoved, PendingPodRemoved)


class SequenceCell:
    """The last sequence admitted for one subject. The gate keeps one per subject; hot loops
    that hold a subject's cell (the Kafka source's memory of a node, the state's heartbeat
    cache) compare and move `last` without a table lookup."""

    __slots__ = ("last",)

    def __init__(self, last: int) -> None:
        self.last = last


class SequenceColumn:
    """The sequences of many gate cells as one array, so that a batch of reports moves them
    in one numpy step (`admit`) instead of one attribute write each.

    A holder (the Kafka source's memory of each node's content, the state's heartbeat table)
    puts the cell of a subject it will see many bare sequence reports of at a slot (`add`
    picks a free one, `bind` takes a given one); `admit` then gates a batch of (slot,
    sequence) against `seq` and moves it. `seq[slot]` runs ahead of the cell: the holder
    must `flush` the slot before the gate itself looks at the cell (an update of the
    subject, its removal), and `release` (`unbind`) it when it forgets the subject. An empty
    slot's `seq` is 0 (a cell's sequence is never 0: unordered updates have no cell).
    """

    __slots__ = ("_cells", "_free", "seq")

    def __init__(self, capacity: int = 1024) -> None:
        self.seq: NDArray[np.int64] = np.zeros(capacity, np.int64)
        self._cells: list[SequenceCell | None] = [None] * capacity
        self._free: list[int] = list(range(capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        """Slots allocated; holders size their own per-slot arrays to match."""
        return len(self._cells)

    def _grow(self, need: int) -> None:
        old = len(self._cells)
        new = max(need, 2 * old)
        self.seq = np.concatenate([self.seq, np.zeros(new - old, np.int64)])
        self._cells.extend([None] * (new - old))
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    def add(self, cell: SequenceCell) -> int:
        """A free slot for `cell`, its sequence copied in."""
        if not self._free:
            self._grow(len(self._cells) + 1)
        slot = self._free.pop()
        self._cells[slot] = cell
        self.seq[slot] = cell.last
        return slot

    def reset(self, slot: int, cell: SequenceCell) -> None:
        """Put `cell` at an `add` slot again, its sequence copied in (`release` then `add`,
        keeping the slot): its holder's subject was just admitted through the gate."""
        stored = self._cells[slot]
        if stored is not None and stored is not cell:
            self.flush(slot)
        self._cells[slot] = cell
        self.seq[slot] = cell.last

    def release(self, slot: int) -> None:
        """Flush and free an `add` slot (its holder forgets the subject)."""
        self.unbind(slot)
        self._free.append(slot)

    def bind(self, slots: list[int], cells: list[SequenceCell]) -> None:
        """Put `cells` at slots numbered by someone else (a source's slot space), growing
        the column as needed; what was there is flushed first."""
        if not slots:
            return
        top = max(slots)
        if top >= len(self._cells):
            self._grow(top + 1)
        stored = self._cells
        for slot, cell in zip(slots, cells, strict=True):
            if stored[slot] is not None:
                self.flush(slot)
            stored[slot] = cell
        self.seq[slots] = [cell.last for cell in cells]

    def unbind(self, slot: int) -> None:
        """Flush a slot and leave it empty."""
        self.flush(slot)
        self._cells[slot] = None
        self.seq[slot] = 0

    def flush(self, slot: int) -> None:
        """Write the slot's sequence back to its cell."""
        cell = self._cells[slot]
        if cell is not None:
            last = self.seq.item(slot)
            if last > cell.last:
                cell.last = last

    def refresh(self, slot: int) -> None:
        """Copy the cell's sequence to its slot again (its subject was just admitted through
        the gate, or `admit_at`): `reset` with the cell the slot holds."""
        cell = self._cells[slot]
        assert cell is not None
        self.seq[slot] = cell.last

    def admit_at(self, slot: int, sequence: int) -> bool:
        """Gate one update of the subject whose cell is at `slot` as the gate would
        (`SequenceGate.admit_sequence`, the slot flushed first), without the gate's lookup:
        True, and the cell moved, when `sequence` is above the cell's last. Only for a
        cell that is the gate's (the holder keeps the gate's cell of a live subject)."""
        cell = self._cells[slot]
        assert cell is not None
        last = self.seq.item(slot)
        if last > cell.last:
            cell.last = last
        if sequence <= cell.last:
            return False
        cell.last = sequence
        return True

    def flush_all(self) -> None:
        """`flush` every slot."""
        for slot in np.flatnonzero(self.seq).tolist():
            self.flush(slot)

    def admit(self, slots: NDArray[np.int64], sequences: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Gate a batch in order: entry i is admitted when `sequences[i]` is above its slot's
        last sequence (including the entries before it in the batch); the admitted ones
        move their slots. Returns the admitted mask."""
        if len(slots) == 0:
            return np.zeros(0, np.bool_)
        seq = self.seq
        counts = np.bincount(slots)
        if counts.max() == 1:
            # The usual batch: one report per subject, no order among them to respect.
            admitted = sequences > seq[slots]
            seq[slots[admitted]] = sequences[admitted]
            return admitted
        # Some slot more than once (a poll spanning the end of one resync round and the start
        # of the next has two reports of some nodes): the entries of the slots seen once are
        # gated together, then the k-th entries of the others, k = 0, 1, ..., which keeps
        # each slot's entries in order. (One at a time in Python, ~0.15 us an entry, was
        # most of a Kafka poll's gating.)
        repeated = counts[slots] > 1
        admitted = np.zeros(len(slots), np.bool_)
        groups = [np.flatnonzero(~repeated)]
        entries = np.flatnonzero(repeated)
        # Each entry's rank among its slot's entries (0 for the first): a stable sort by slot,
        # then the position in the sorted order minus where the slot's run starts.
        order = np.argsort(slots[entries], kind="stable")
        by_slot = slots[entries][order]
        starts = np.ones(len(order), np.bool_)
        starts[1:] = by_slot[1:] != by_slot[:-1]
        position = np.arange(len(order))
        rank = np.empty(len(order), np.int64)
        rank[order] = position - np.maximum.accumulate(np.where(starts, position, 0))
        groups += [entries[rank == k] for k in range(int(rank.max()) + 1)]
        for take in groups:
            at, sequence = slots[take], sequences[take]
            moved = sequence > seq[at]
            seq[at[moved]] = sequence[moved]
            admitted[take] = moved
        return admitted


class SequenceGate:
    """Drops updates that are not newer than the last one admitted for their subject.

    Redelivered Kafka records and replayed watch events carry a sequence at or below the
    last applied one, so passing every update through the gate makes redelivery harmless.
    Sequence 0 means "unordered" and is always admitted.

    Bounded memory: subjects come and go (autoscaled nodes under new names, pending pods),
    so a removal (NodeRemoved, NodePoolRemoved, PodRemoved, PendingPodRemoved, or
    `removed`) leaves a tombstone: the subject's entry stays, at the removal's sequence, for
    `tombstone_ttl_s`, so that a redelivered older update is dropped as before. Then the
    entry is dropped. With `floors` (the Kafka source's gate), the removal's sequence then
    raises a floor for its cluster and kind: an update of a subject without an entry is
    admitted only above it. So what was published before a removal never resurrects its
    subject, however late it comes, with one number per (cluster, kind) instead of one entry
    per subject ever seen. That needs sequences that order a cluster's subjects of one kind
    by publication, which the Kafka publisher's are (one hybrid clock, `max(last + 1, wall
    clock µs)`, per agent); the price is that a *new* subject's update older than a removal
    applied `tombstone_ttl_s` ago is dropped too (until its next report). Kubernetes
    resourceVersions are not such sequences (a relist hands out objects at the version of
    their last change, possibly older than another object's deletion), so the state's gate
    keeps no floors: its sources guard themselves (the Kafka source with floors, the watches
    by resuming in order or relisting what exists).
    """

    __slots__ = ("_cells", "_clock", "_floors", "_tombstoned", "_tombstones", "floors",
                 "tombstone_ttl_s")  # fmt: skip

    def __init__(
        self,
        *,
        tombstone_ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        floors: bool = True,
    ) -> None:
        self._cells: dict[Subject, SequenceCell] = {}
        #: (expires at, subject, removal sequence), oldest first.
        self._tombstones: collections.deque[tuple[float, Subject, int]] = collections.deque()
        #: (cluster, kind) -> the highest sequence of a removal whose tombstone expired.
        self._floors: dict[tuple[str, str], int] = {}
        #: subject -> the sequence of its latest tombstone; the subject is removed while its
        #: cell is still at it (admitted again otherwise). Bounded by `_tombstones`.
        self._tombstoned: dict[Subject, int] = {}
        self.tombstone_ttl_s = tombstone_ttl_s
        self._clock = clock
        self.floors = floors

    def admit(self, update: Update) -> bool:
        """True when `update` is newer than everything admitted for its subject."""
        subject = subject_of(update)
        if subject is None:
            return True
        sequence: int = update.sequence  # type: ignore[union-attr]
        if sequence == 0:
            if isinstance(update, _REMOVALS):
                self.removed(subject)  # (unordered, but gone all the same)
            return True
        if not self.admit_sequence(subject, sequence):
            return False
        if isinstance(update, _REMOVALS):
            self.removed(subject)
        return True

    def admit_sequence(self, subject: Subject, sequence: int) -> bool:
        """`admit` for a bare (subject, sequence) that is no removal."""
        cell = self._cells.get(subject)
        if cell is not None:
            if sequence <= cell.last:
                return False
            cell.last = sequence
            return True
        if sequence <= self._floors.get((subject[0], subject[1]), 0):
            return False
        self._cells[subject] = SequenceCell(sequence)
        # New subjects are what makes the table grow: expire what is due first.
        self.expire()
        return True

    def cell(self, subject: Subject) -> SequenceCell | None:
        """The subject's cell, if it has an entry. A holder must drop it when the subject
        is removed (the entry goes once its tombstone expires)."""
        return self._cells.get(subject)

    def removed(self, subject: Subject, at_sequence: int = 0) -> None:
        """The subject is gone (its removal was admitted, or its owner dropped it): keep
        its entry as a tombstone for `tombstone_ttl_s`, then drop it (see the class).

        `at_sequence`: the removal's sequence when the entry is below it (a node an
        inventory dropped): its older records are then dropped too."""
        cell = self._cells.get(subject)
        if cell is None:
            return
        if at_sequence > cell.last:
            cell.last = at_sequence
        now = self._clock()
        self._tombstones.append((now + self.tombstone_ttl_s, subject, cell.last))
        self._tombstoned[subject] = cell.last
        self.expire(now)

    def retire_unlisted(
        self, cluster: str, kind: str, listed: frozenset[str], sequence: int
    ) -> list[str]:
        """Apply an inventory of `cluster`'s subjects of `kind` taken at `sequence`: every
        live entry (not a tombstone) whose name is not in `listed` and whose last sequence
        is below `sequence` is removed at `sequence` (`removed`). Returns their names,
        sorted. One pass over the table: an inventory comes once per agent resync."""
        tombstoned = self._tombstoned
        gone = [
            subject
            for subject, cell in self._cells.items()
            if subject[0] == cluster
            and subject[1] == kind
            and cell.last < sequence
            and subject[2] not in listed
            and tombstoned.get(subject) != cell.last
        ]
        for subject in gone:
            self.removed(subject, sequence)
        return sorted(subject[2] for subject in gone)

    def expire(self, now: float | None = None) -> int:
        """Drop the entries of subjects whose tombstone expired (still removed: not
        admitted again since); returns how many."""
        tombstones = self._tombstones
        if not tombstones:
            return 0
        if now is None:
            now = self._clock()
        dropped = 0
        while tombstones and tombstones[0][0] <= now:
            _, subject, sequence = tombstones.popleft()
            if self._tombstoned.get(subject) == sequence:
                del self._tombstoned[subject]
            cell = self._cells.get(subject)
            if cell is None or cell.last != sequence:
                continue  # admitted again since (or expired by an earlier tombstone)
            del self._cells[subject]
            scope = (subject[0], subject[1])
            if self.floors and sequence > self._floors.get(scope, 0):
                self._floors[scope] = sequence
            dropped += 1
        return dropped

    def __len__(self) -> int:
        """Subjects with an entry (live or tombstoned)."""
        return len(self._cells)

    def snapshot(self) -> dict[Subject, int]:
        """subject -> last admitted sequence, for every subject with an entry (tests)."""
        return {subject: cell.last for subject, cell in self._cells.items()}

    def filter(self, updates: Iterable[Update]) -> list[Update]:
        """The admitted subset of `updates`, in order."""
        return [u for u in updates if self.admit(u)]

    def last(self, cluster: str, kind: str, name: str) -> int | None:
        """The last admitted sequence of a subject, if it has an entry."""
        cell = self._cells.get((cluster, kind, name))
        return None if cell is None else cell.last
