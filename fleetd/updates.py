"""The values sources hand to the state owner: the one interface between telemetry and state.

A source (Kafka consumer, Kubernetes watch, simulated fleet) translates what it reads into
these small frozen values and calls `await sink.apply(update)` (see `UpdateSink`), where the
sink is `fleetd.state.FleetState`. `apply` returns once the update is in fleet state, so a
Kafka consumer may commit its offset right after it returns.

Ordering and redelivery: every update carries `source` and a `seq` that the source keeps
monotonic per (source, cluster, node) for node-scoped updates, per (source, cluster, pool)
for pools and per (source, cluster, pod_id) for pods. The state owner ignores (and counts)
an update whose seq is not greater than the last one applied for the same key, so
redelivery is harmless. Kafka offsets or Kubernetes resourceVersions make good seqs;
`observed_at_s` is the cluster-side wall-clock time (Unix seconds) the update describes,
used for telemetry lag and staleness (a node with no update for `staleness.node_stale_after_s`
is unschedulable until it reports again).

Readiness: a source sends `SourceSynced(source, cluster)` after its initial list/replay of a
cluster; the daemon is ready once every configured (source, cluster) pair has synced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Mapping fields default to an empty, immutable-by-convention dict.
_EMPTY: Mapping[str, str] = {}


@dataclass(frozen=True, slots=True)
class Taint:
    """A Kubernetes node taint."""

    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One GPU of a node, as the cluster reports it."""

    index: int
    healthy: bool = True
    xid_errors: int = 0
    utilization_pct: float = 0.0


@dataclass(frozen=True, slots=True)
class NodeUpdate:
    """The full current state of one node (a level, not a delta): replaces what state had.

    `gpu_model` is the product name (e.g. "A100-SXM4-80GB", or the openb codes "V100M32",
    "G1"); empty for CPU-only nodes. `gpus` lists every GPU device (len = GPU count).
    Resources are allocatable amounts. `unschedulable` is the cordon flag.
    """

    source: str
    cluster: str
    node: str
    seq: int
    observed_at_s: float
    cpu_millicores: int
    memory_bytes: int
    gpu_model: str = ""
    gpu_memory_bytes: int = 0
    gpus: tuple[GpuDevice, ...] = ()
    pool: str = ""
    zone: str = ""
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    taints: tuple[Taint, ...] = ()
    unschedulable: bool = False
    ready: bool = True


@dataclass(frozen=True, slots=True)
class NodeRemoved:
    """The node is gone from its cluster."""

    source: str
    cluster: str
    node: str
    seq: int
    observed_at_s: float


@dataclass(frozen=True, slots=True)
class PodObserved:
    """A pod bound to a node (or pending with `node` empty), with its requests.

    `pod_id` is "namespace/name". `workload_id` is the pod's `fleetd.io/workload-id` label (or
    telemetry field) when fleetd placed it: a pending reservation is confirmed when every pod of
    the workload is observed on its reserved node. Pods fleetd did not place consume capacity
    on their node as observed. `gpu_indices` are device indices when known (else the state
    owner picks free ones). `gpu_milli` is the per-GPU share (1000 for whole GPUs).
    """

    source: str
    cluster: str
    pod_id: str
    seq: int
    observed_at_s: float
    node: str
    cpu_millicores: int = 0
    memory_bytes: int = 0
    gpu_count: int = 0
    gpu_milli: int = 0
    gpu_indices: tuple[int, ...] = ()
    workload_id: str = ""
    phase: str = "Running"


@dataclass(frozen=True, slots=True)
class PodRemoved:
    """The pod finished or was deleted: its resources are free again."""

    source: str
    cluster: str
    pod_id: str
    seq: int
    observed_at_s: float


@dataclass(frozen=True, slots=True)
class NodePoolUpdate:
    """A node pool's definition and current size (what the autoscaler may grow or shrink)."""

    source: str
    cluster: str
    pool: str
    seq: int
    observed_at_s: float
    gpu_model: str = ""
    gpus_per_node: int = 0
    cpu_millicores: int = 0
    memory_bytes: int = 0
    price_per_hour: float = 0.0
    capacity_type: str = "on-demand"
    min_size: int = 0
    max_size: int = 0
    current_size: int = 0


@dataclass(frozen=True, slots=True)
class SourceSynced:
    """The source finished its initial sync of `cluster` (list done / backlog replayed)."""

    source: str
    cluster: str


Update = NodeUpdate | NodeRemoved | PodObserved | PodRemoved | NodePoolUpdate | SourceSynced


class UpdateSink(Protocol):
    """What a source writes to: `fleetd.state.FleetState` implements it."""

    async def apply(self, update: Update) -> bool:
        """Apply one update; False when ignored as stale/duplicate (seq not newer).

        Raises `InvalidUpdate` (a ValueError) naming the field when the update is invalid;
        a Kafka source dead-letters it with that message as the reason.
        """
        ...

    def expect_source(self, source: str, cluster: str) -> None:
        """Declare that readiness waits for `SourceSynced(source, cluster)`."""
        ...


class InvalidUpdate(ValueError):
    """An update that cannot be applied (e.g. negative resources, GPU index out of range)."""
