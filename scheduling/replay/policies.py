"""Policies for the openb replay: fleetd's scoring policies by name, FGD's target workload.

- "fgd": FGD (Weng et al., ATC'23) as its artifact runs it (`FragmentationScorer` with no
  CPU term). The artifact's patched kube-scheduler (mental2008/kubernetes v1.20.5-minor,
  `selectHost`) takes the smallest node name among the best-scored nodes, and its simulator
  prefixes node names with a random permutation (`rand.Perm` in `syncClusterResourceList`);
  the replay reproduces that by adding the nodes to the fleet in a seeded random order, since
  the engine breaks ties by lowest slot. The coarse integer score makes many nodes tie, so in
  practice FGD packs onto the nodes first in that order.
- "fgd-cpu": FGD plus the CPU-stranding term (`scheduling.fragmentation.cpu_stranded_gpu_milli`);
  nodes in trace order.
- "fgd-plus": fleetd's default on GPU-sharing fleets: constraint-aware FGD (a pod type counts
  only on nodes of models it accepts) plus the CPU-stranding term, the per-GPU lookahead
  (`scheduling.fragmentation.eventual_waste_milli`, weight 0.25) and the per-model scarcity
  term (`scheduling.fragmentation.model_pressure`, from the fleet's GPUs per model); nodes in
  trace order.
- any other name is a policy of the engine's registry, e.g. "best-fit", "gpu-packing" or
  "gpu-packing:1+best-fit:1" ("+" joins weighted terms), nodes in trace order.

Every policy reads only the target workload's distribution (the trace's pod shapes, as FGD
does), never the arrival order.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from scheduling.fragmentation import TypicalPods, typical_pods
from scheduling.replay.trace import PodTrace
from scheduling.scoring import Policy

FRAGMENTATION_POLICIES = ("fgd", "fgd-cpu", "fgd-plus")
DEFAULT_POLICY = "fgd-plus"
"""fleetd's default placement policy on GPU-sharing fleets."""
RANDOM_NODE_ORDER = frozenset({"fgd"})
"""Policies replayed with the artifact's random node order (its random node names)."""


def fleet_typical_pods(
    pods: PodTrace,
    model_ids: NDArray[np.int64],
    n_fleet_models: int,
    model_gpus: NDArray[np.int64] | None = None,
) -> TypicalPods:
    """FGD's target workload of `pods`, with model columns in the fleet's GPU model ids.

    model_gpus: (n_fleet_models,) the fleet's GPUs per model id, for `model_pressure`.
    model_ids: (n_trace_models,) fleet id of each trace model (-1 if the fleet lacks it).
    """
    allowed = np.zeros((pods.spec_allowed.shape[0], n_fleet_models), dtype=bool)
    present = model_ids >= 0
    allowed[:, model_ids[present]] = pods.spec_allowed[:, present]
    return typical_pods(
        pods.cpu_milli, pods.gpu_milli, pods.num_gpu, pods.spec_id, allowed, model_gpus=model_gpus
    )


def make_policy(name: str, typical: TypicalPods) -> Policy:
    """The engine policy for `name`; fragmentation scorers get the target workload."""
    spec = name.replace("+", ",")
    params = {name: {"typical": typical} for name in FRAGMENTATION_POLICIES}
    terms = [t.partition(":")[0].strip() for t in spec.split(",") if t.strip()]
    return Policy.parse(spec, {t: params[t] for t in terms if t in params})
