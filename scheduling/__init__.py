"""fleetd's pure placement core: numpy only, values in, values out.

Public surface (see each module):
  fleet      Fleet, NodeSpec, Taint, Allocation, AllocationError, GPU_MILLI
  workload   PodSpec, GangSpec, Batch, Order, TopologyLevel, LabelRequirement, LabelOp, Toleration
  filters    Constraints, Free, compile_pod, static filters and resource filters
  scoring    Policy, register_scorer, make_scorer, NodeView, ScoreResult, ScorePlugin
  placement  place, commit, release, explain, PlacementResult, PlacementCache
  explain    Reason, Explanation, REASON_TEXT
  reference  place_reference (the plain-loop reference with the same semantics)
  fragmentation  FGD's fragmentation measure; registers the "fgd" and "fgd-cpu" scorers
"""

from scheduling import fragmentation as fragmentation  # registers "fgd", "fgd-cpu"
from scheduling.explain import REASON_TEXT, Explanation, Reason
from scheduling.fleet import GPU_MILLI, Allocation, AllocationError, Fleet, NodeSpec, Taint
from scheduling.placement import (
    PlacementCache,
    PlacementResult,
    commit,
    explain,
    place,
    release,
)
from scheduling.scoring import (
    DEFAULT_POLICY,
    NodeView,
    Policy,
    ScorePlugin,
    ScoreResult,
    make_scorer,
    register_scorer,
    scorer_names,
)
from scheduling.workload import (
    Batch,
    GangSpec,
    LabelOp,
    LabelRequirement,
    Order,
    PodSpec,
    Toleration,
    TopologyLevel,
)

__all__ = [
    "DEFAULT_POLICY",
    "GPU_MILLI",
    "REASON_TEXT",
    "Allocation",
    "AllocationError",
    "Batch",
    "Explanation",
    "Fleet",
    "GangSpec",
    "LabelOp",
    "LabelRequirement",
    "NodeSpec",
    "NodeView",
    "Order",
    "PlacementCache",
    "PlacementResult",
    "PodSpec",
    "Policy",
    "Reason",
    "ScorePlugin",
    "ScoreResult",
    "Taint",
    "Toleration",
    "TopologyLevel",
    "commit",
    "explain",
    "make_scorer",
    "place",
    "register_scorer",
    "release",
    "scorer_names",
]
