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

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

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


@dataclass(frozen=True, slots=True)
class NodeHeartbeats:
    """Reports of one cluster's nodes whose content did not change: columnar, one entry per
    report (`names[i]`, `sequences[i]`, `observed_at_s[i]`, `content_tokens[i]`).

    Each entry stands for a `NodeUpdate` with the same content as the node's last applied
    one, the one whose `content_token` equals `content_tokens[i]`: applying it only moves the
    node's sequence and freshness. An entry whose token does not match the node's last
    applied content (the node is unknown, or that update was refused) is refused too.
    Periodic telemetry is mostly such reports, so they travel without per-node objects.
    """

    cluster: str
    names: tuple[str, ...]
    sequences: tuple[int, ...]
    observed_at_s: tuple[float, ...]
    content_tokens: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class NodeRemoved:
    """A node left its cluster; its pods go with it."""

    cluster: str
    name: str
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class NodeStale:
    """A node's telemetry stopped (stale=True: unschedulable until it reports) or resumed."""

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


Update = (
    NodeUpdate
    | NodeHeartbeats
    | NodeRemoved
    | NodeStale
    | PodObserved
    | PodRemoved
    | NodePoolUpdate
    | NodePoolRemoved
    | PendingPod
    | PendingPodRemoved
    | ClusterSynced
)


def subject_of(update: Update) -> tuple[str, str, str] | None:
    """The (cluster, kind, name) whose sequence orders `update`, or None if unordered."""
    if isinstance(update, NodeUpdate | NodeRemoved):
        return (update.cluster, "node", update.name)
    if isinstance(update, NodePoolUpdate | NodePoolRemoved):
        return (update.cluster, "pool", update.name)
    if isinstance(update, PodObserved | PodRemoved):
        return (update.cluster, "pod", update.uid or f"{update.namespace}/{update.name}")
    if isinstance(update, PendingPod | PendingPodRemoved):
        return (update.cluster, "pending", f"{update.namespace}/{update.name}")
    return None


class SequenceGate:
    """Drops updates that are not newer than the last one admitted for their subject.

    Redelivered Kafka records and replayed watch events carry a sequence at or below the
    last applied one, so passing every update through the gate makes redelivery harmless.
    A removal is remembered too (a late update for a removed subject with an older
    sequence stays dropped). Sequence 0 means "unordered" and is always admitted.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[tuple[str, str, str], int] = {}

    def admit(self, update: Update) -> bool:
        """True when `update` is newer than everything admitted for its subject."""
        subject = subject_of(update)
        if subject is None:
            return True
        sequence: int = update.sequence  # type: ignore[union-attr]
        if sequence == 0:
            return True
        last = self._last.get(subject)
        if last is not None and sequence <= last:
            return False
        self._last[subject] = sequence
        return True

    def admit_sequence(self, subject: tuple[str, str, str], sequence: int) -> bool:
        """`admit` for a bare (subject, sequence): the heartbeat path, without an update value."""
        last = self._last.get(subject)
        if last is not None and sequence <= last:
            return False
        self._last[subject] = sequence
        return True

    @property
    def last_by_subject(self) -> dict[tuple[str, str, str], int]:
        """The subject -> last admitted sequence table itself, for hot loops that inline
        `admit_sequence` (a dict get and set per record instead of a call)."""
        return self._last

    def filter(self, updates: Iterable[Update]) -> list[Update]:
        """The admitted subset of `updates`, in order."""
        return [u for u in updates if self.admit(u)]

    def last(self, cluster: str, kind: str, name: str) -> int | None:
        """The last admitted sequence of a subject, if any."""
        return self._last.get((cluster, kind, name))

    def forget_cluster(self, cluster: str) -> None:
        """Drop every remembered sequence of `cluster` (after a relist)."""
        self._last = {k: v for k, v in self._last.items() if k[0] != cluster}
