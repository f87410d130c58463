"""Fragmentation-aware placement policies for the replay: FGD and fleetd's refinement.

Both score every (node, GPU) candidate with the artifact's integer FGD score,
int(sigmoid(fragmentation decrease / 1000) x 100), put a fractional pod on the lowest-index GPU
with its node's best score, and break ties between nodes by a fixed node order (`node_rank`,
lowest first; the node index when not given).

- "fgd": FGD (Weng et al., ATC'23) exactly as its artifact runs it. The artifact's patched
  kube-scheduler (mental2008/kubernetes v1.20.5-minor, `selectHost`) takes the smallest node
  name among the best, and its simulator prefixes node names with a random permutation
  (`rand.Perm` in `syncClusterResourceList`); the replay reproduces that with `node_rank`, a
  seeded random permutation. The coarse integer score makes many nodes tie, so FGD in practice
  packs pods onto the nodes first in that order.
- "fgd-cpu" (fleetd's default): FGD plus the CPU-stranding term of
  `scheduling.fragmentation.cpu_stranded_gpu_milli`: the increase of idle GPU milli that the
  node's free CPU can no longer feed is added to the fragmentation increase before scoring.
  CPU-only pods then go to CPU-rich nodes (or nodes whose GPUs are taken) instead of eating the
  CPU next to idle GPUs, and CPU-heavy GPU pods to CPU-rich nodes. It uses only the target
  workload's distribution, as FGD does. Ties go to the lowest node index (deterministic).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from scheduling.fragmentation import (
    MILLI_PER_GPU,
    FragmentationMemo,
    TypicalPods,
    cpu_milli_per_gpu_milli,
    cpu_stranded_gpu_milli,
    fgd_score,
)
from scheduling.replay.simulator import ReplayState
from scheduling.replay.trace import PodTrace

POLICY_NAMES = ("fgd", "fgd-cpu")
DEFAULT_POLICY = "fgd-cpu"
"""fleetd's default placement policy on GPU-sharing fleets."""


def take_vector(
    state: ReplayState, node: int, column: int, gpu_milli: int, num_gpu: int
) -> NDArray[np.int64]:
    """(max_gpus,) milli taken from each GPU of `node`: GPU `column` for a fractional pod, the
    lowest-index fully free GPUs for whole-GPU pods (the artifact's `AllocateExclusiveGpuId`)."""
    left = state.gpu_left_milli[node]
    take = np.zeros(left.shape[0], dtype=np.int64)
    if num_gpu == 0:
        return take
    if 0 < gpu_milli < MILLI_PER_GPU:
        take[column] = gpu_milli
        return take
    take[np.flatnonzero(left >= MILLI_PER_GPU)[:num_gpu]] = MILLI_PER_GPU
    return take


class FragmentationPolicy:
    """FGD-style scoring with an optional CPU-stranding term (see the module docstring)."""

    def __init__(
        self,
        typical: TypicalPods,
        node_model: NDArray[np.integer],
        node_rank: NDArray[np.integer] | None = None,
        cpu_stranding_weight: float = 0.0,
    ) -> None:
        """typical: target workload; node_model: (n_nodes,) GPU model per node;
        node_rank: (n_nodes,) tie-break order (lowest wins), default the node index;
        cpu_stranding_weight: weight of the CPU-stranding increase (0 = plain FGD)."""
        self.memo = FragmentationMemo(typical, node_model)
        n = int(np.asarray(node_model).shape[0])
        self.node_rank = (
            np.arange(n, dtype=np.int64)
            if node_rank is None
            else np.asarray(node_rank, dtype=np.int64)
        )
        self.cpu_stranding_weight = float(cpu_stranding_weight)
        self.cpu_per_gpu_milli = cpu_milli_per_gpu_milli(typical)

    def choose(
        self, state: ReplayState, pods: PodTrace, row: int, feasible: NDArray[np.bool_]
    ) -> tuple[int, NDArray[np.int64]] | None:
        """See `ReplayPolicy.choose`."""
        cpu, milli, num = int(pods.cpu_milli[row]), int(pods.gpu_milli[row]), int(pods.num_gpu[row])
        now = self.memo.frag_now(state.cpu_left_milli, state.gpu_left_milli)
        after = self.memo.frag_after(state.cpu_left_milli, state.gpu_left_milli, cpu, milli, num)
        if self.cpu_stranding_weight:
            idle = state.gpu_left_milli.sum(axis=1)
            request = int(pods.gpu_request_milli[row])
            stranded_now = cpu_stranded_gpu_milli(
                idle, state.cpu_left_milli, self.cpu_per_gpu_milli
            )
            stranded_after = cpu_stranded_gpu_milli(
                idle - request, state.cpu_left_milli - cpu, self.cpu_per_gpu_milli
            )
            after = after + self.cpu_stranding_weight * (stranded_after - stranded_now)[:, None]
        scores = fgd_score(now[:, None], after)
        best_column = scores.argmax(axis=1)
        node_score = np.where(feasible, scores.max(axis=1), -2)
        top = np.flatnonzero(node_score == node_score.max())
        node = int(top[self.node_rank[top].argmin()])
        return node, take_vector(state, node, int(best_column[node]), milli, num)


def make_policy(
    name: str,
    typical: TypicalPods,
    node_model: NDArray[np.integer],
    node_rank: NDArray[np.integer] | None = None,
) -> FragmentationPolicy:
    """The named policy ("fgd" or "fgd-cpu"); `node_rank` orders ties (artifact: random names)."""
    if name == "fgd":
        return FragmentationPolicy(typical, node_model, node_rank)
    if name == "fgd-cpu":
        return FragmentationPolicy(typical, node_model, node_rank, cpu_stranding_weight=1.0)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
