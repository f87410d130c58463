"""Node pools as pure values: what a pool's nodes look like, what they cost, how far it may grow.

A `NodePool` is configuration (shape, price, capacity type, min/max size, provisioning
delay, disruption budget); a `PoolStatus` is what the daemon observed about it (current and
target size, last scale events). The autoscaler (autoscale.py) reads both and returns
decisions; it never changes either.

Spot pools carry the taint `SPOT_TAINT` on every node they make, so "spot only where the
workload tolerates it" is the placement engine's ordinary taint filter: a pod runs on spot
exactly when it has `SPOT_TOLERATION` (or a toleration that covers it).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from scheduling.fleet import NodeSpec, Taint
from scheduling.workload import Toleration

#: Label on every pool-made node: the capacity type ("on-demand" or "spot").
CAPACITY_TYPE_LABEL = "fleetd.io/capacity-type"
#: Label on every pool-made node: the pool's name.
POOL_LABEL = "fleetd.io/node-pool"
#: Taint on spot nodes: only pods that tolerate interruption run there (Karpenter and GKE
#: use the same pattern, e.g. cloud.google.com/gke-spot=true:NoSchedule).
SPOT_TAINT = Taint(CAPACITY_TYPE_LABEL, "spot", "NoSchedule")
#: The toleration a pod carries to run on spot capacity.
SPOT_TOLERATION = Toleration(CAPACITY_TYPE_LABEL, "Equal", "spot", "NoSchedule")


class CapacityType(enum.Enum):
    """How a pool's nodes are bought."""

    ON_DEMAND = "on-demand"
    SPOT = "spot"


@dataclass(frozen=True, slots=True)
class DisruptionBudget:
    """At most this many of a pool's nodes disrupted at once (Karpenter's `budgets.nodes`).

    `max_nodes` and `max_percent` (of the pool's target size, rounded up) both apply when
    given; None means no limit of that kind.
    """

    max_nodes: int | None = None
    max_percent: float | None = 10.0

    def __post_init__(self) -> None:
        if self.max_nodes is not None and self.max_nodes < 0:
            raise ValueError("disruption budget max_nodes must be >= 0")
        if self.max_percent is not None and not 0 <= self.max_percent <= 100:
            raise ValueError("disruption budget max_percent must be in 0..100")

    def allowed(self, pool_size: int) -> int:
        """How many nodes of a pool of `pool_size` may be disrupted at once."""
        limit = pool_size
        if self.max_nodes is not None:
            limit = min(limit, self.max_nodes)
        if self.max_percent is not None:
            limit = min(limit, math.ceil(pool_size * self.max_percent / 100.0 - 1e-9))
        return max(0, limit)


@dataclass(frozen=True, slots=True)
class NodePool:
    """One node pool of one cluster: every node it makes has the same shape and price.

    Nodes it makes are named `<name_prefix><n>`, carry its labels plus POOL_LABEL and
    CAPACITY_TYPE_LABEL, its taints (plus SPOT_TAINT for spot), and sit in `zone` / `rack`.
    `scale_up_cooldown_s`: no new scale-up of this pool within this long after the last.
    """

    name: str
    cluster: str
    cpu_millicores: int
    memory_bytes: int
    price_per_hour: float
    gpu_count: int = 0
    gpu_model: str = ""
    gpu_memory_mib: int = 0
    zone: str = ""
    rack: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    capacity_type: CapacityType = CapacityType.ON_DEMAND
    min_size: int = 0
    max_size: int = 1000
    provisioning_delay_s: float = 180.0
    scale_up_cooldown_s: float = 0.0
    disruption_budget: DisruptionBudget = DisruptionBudget()

    def __post_init__(self) -> None:
        if not self.name or not self.cluster:
            raise ValueError("a node pool needs a name and a cluster")
        if not 0 <= self.min_size <= self.max_size:
            raise ValueError(f"pool {self.name!r}: need 0 <= min_size <= max_size")
        if not (self.price_per_hour >= 0 and math.isfinite(self.price_per_hour)):
            raise ValueError(f"pool {self.name!r}: price_per_hour must be finite and >= 0")
        if self.provisioning_delay_s < 0 or self.scale_up_cooldown_s < 0:
            raise ValueError(f"pool {self.name!r}: delays must be >= 0")
        object.__setattr__(self, "capacity_type", CapacityType(self.capacity_type))
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "taints", tuple(self.taints))
        # Validate the shape once, through the same checks a node gets.
        self.node_spec(f"{self.name}-template")

    @property
    def key(self) -> tuple[str, str]:
        """(cluster, name): pool names are unique within a cluster."""
        return (self.cluster, self.name)

    @property
    def is_spot(self) -> bool:
        """Whether the pool buys spot capacity."""
        return self.capacity_type is CapacityType.SPOT

    @property
    def name_prefix(self) -> str:
        """Prefix of the names of nodes this pool makes."""
        return f"{self.name}-"

    def node_spec(self, node_name: str) -> NodeSpec:
        """The NodeSpec of one node of this pool named `node_name`."""
        labels = dict(self.labels)
        labels[POOL_LABEL] = self.name
        labels[CAPACITY_TYPE_LABEL] = self.capacity_type.value
        taints = self.taints + ((SPOT_TAINT,) if self.is_spot else ())
        return NodeSpec(
            name=node_name,
            cluster=self.cluster,
            cpu_millicores=self.cpu_millicores,
            memory_bytes=self.memory_bytes,
            gpu_count=self.gpu_count,
            gpu_model=self.gpu_model if self.gpu_count else "",
            gpu_memory_mib=self.gpu_memory_mib if self.gpu_count else 0,
            zone=self.zone,
            rack=self.rack,
            node_pool=self.name,
            labels=labels,
            taints=taints,
        )


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """What the daemon observed about one pool.

    current_size: nodes that are up; target_size: nodes asked for (current plus those being
    provisioned, minus those being removed). `last_scale_up_s` / `last_scale_down_s`: the
    injected clock's time of the last change (None: never). `backoff_until_s`: no scale-up
    before this time (e.g. the cloud had no capacity). `disrupting`: nodes being removed now.
    """

    current_size: int = 0
    target_size: int = 0
    last_scale_up_s: float | None = None
    last_scale_down_s: float | None = None
    backoff_until_s: float | None = None
    disrupting: int = 0

    def __post_init__(self) -> None:
        if self.current_size < 0 or self.target_size < 0 or self.disrupting < 0:
            raise ValueError("pool sizes must be >= 0")

    @property
    def in_flight(self) -> int:
        """Nodes asked for and not yet up."""
        return max(0, self.target_size - self.current_size)


@dataclass(frozen=True, slots=True)
class ClusterLimits:
    """Caps on what autoscaling may add to one cluster (None = no cap)."""

    max_nodes: int | None = None
    max_gpus: int | None = None
    max_price_per_hour: float | None = None


def pool_index(pools: tuple[NodePool, ...]) -> dict[tuple[str, str], int]:
    """Index of each pool by key; ValueError on duplicate keys."""
    index: dict[tuple[str, str], int] = {}
    for i, p in enumerate(pools):
        if p.key in index:
            raise ValueError(f"duplicate node pool {p.key}")
        index[p.key] = i
    return index
