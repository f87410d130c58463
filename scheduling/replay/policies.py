"""Fragmentation-aware placement policies for the replay (FGD and fleetd's refinement)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from scheduling.fragmentation import MILLI_PER_GPU, FragmentationMemo, TypicalPods, fgd_score
from scheduling.replay.simulator import ReplayState
from scheduling.replay.trace import PodTrace


def _take_vector(state: ReplayState, node: int, column: int, milli: int, num_gpu: int) -> NDArray[np.int64]:
    left = state.gpu_left_milli[node]
    take = np.zeros(left.shape[0], dtype=np.int64)
    if num_gpu == 0:
        return take
    if 0 < milli < MILLI_PER_GPU:
        take[column] = milli
        return take
    full = np.flatnonzero(left >= MILLI_PER_GPU)[:num_gpu]
    take[full] = MILLI_PER_GPU
    return take


class FGDPolicy:
    """FGD as the artifact runs it: integer scores, ties to a per-run random node order.

    Score = int(sigmoid(frag decrease / 1000) x 100) per candidate; a fractional pod goes to the
    lowest-index GPU with the node's best score (`calculateGpuShareFragExtendScore`). Among the
    nodes with the best score the artifact's patched kube-scheduler (mental2008/kubernetes
    v1.20.5-minor, `selectHost`) takes the smallest node name, and the simulator prefixes node
    names with a random permutation (`rand.Perm` in `syncClusterResourceList`): so ties go to
    the node with the lowest `node_rank`, a seeded random permutation of the nodes.
    """

    def __init__(self, typical: TypicalPods, node_model: NDArray[np.integer], node_rank: NDArray[np.integer]) -> None:
        """typical: target workload; node_model, node_rank: (n_nodes,) model and tie-break rank."""
        self.memo = FragmentationMemo(typical, node_model)
        self.node_rank = np.asarray(node_rank, dtype=np.int64)

    def choose(
        self, state: ReplayState, pods: PodTrace, row: int, feasible: NDArray[np.bool_]
    ) -> tuple[int, NDArray[np.int64]] | None:
        """See `ReplayPolicy.choose`."""
        cpu, milli, num = int(pods.cpu_milli[row]), int(pods.gpu_milli[row]), int(pods.num_gpu[row])
        now = self.memo.frag_now(state.cpu_left_milli, state.gpu_left_milli)
        after = self.memo.frag_after(state.cpu_left_milli, state.gpu_left_milli, cpu, milli, num)
        scores = fgd_score(now[:, None], after)
        best_column = scores.argmax(axis=1)
        node_score = np.where(feasible, scores.max(axis=1), -2)
        top = np.flatnonzero(node_score == node_score.max())
        node = int(top[self.node_rank[top].argmin()])
        return node, _take_vector(state, node, int(best_column[node]), milli, num)


class FragPackPolicy:
    """fleetd's fragmentation-aware policy: exact FGD deltas, then packing tie-breaks.

    1. Least fragmentation increase, exact (no integer rounding): deltas within `epsilon_milli`
       count as equal.
    2. Among those, the node left with the least free GPU milli (pack: keep idle nodes whole
       for multi-GPU pods, and send CPU-only pods to nodes whose GPUs are already taken).
    3. Then the least free CPU after placement, then the lowest node index (deterministic).
    A fractional pod takes the GPU with the least fragmentation after placement, ties to the
    GPU with the least milli left (best fit), then the lowest index.
    """

    def __init__(self, typical: TypicalPods, node_model: NDArray[np.integer], epsilon_milli: float = 1e-6) -> None:
        """typical: target workload; node_model: (n_nodes,) model per node."""
        self.memo = FragmentationMemo(typical, node_model)
        self.epsilon_milli = epsilon_milli

    def choose(
        self, state: ReplayState, pods: PodTrace, row: int, feasible: NDArray[np.bool_]
    ) -> tuple[int, NDArray[np.int64]] | None:
        """See `ReplayPolicy.choose`."""
        cpu, milli, num = int(pods.cpu_milli[row]), int(pods.gpu_milli[row]), int(pods.num_gpu[row])
        now = self.memo.frag_now(state.cpu_left_milli, state.gpu_left_milli)
        after = self.memo.frag_after(state.cpu_left_milli, state.gpu_left_milli, cpu, milli, num)
        if after.shape[1] > 1:
            # Best GPU per node: least frag after, then least milli left on that GPU (best fit).
            left = state.gpu_left_milli
            key = np.where(np.isfinite(after), left, np.iinfo(np.int64).max)
            best_frag = after.min(axis=1, keepdims=True)
            near = after <= best_frag + self.epsilon_milli
            column = np.where(near, key, np.iinfo(np.int64).max).argmin(axis=1)
            delta = best_frag[:, 0] - now
        else:
            column = np.zeros(after.shape[0], dtype=np.int64)
            delta = after[:, 0] - now
        delta = np.where(feasible, delta, np.inf)
        candidates = np.flatnonzero(delta <= delta.min() + self.epsilon_milli)
        gpu_free_after = state.gpu_left_milli[candidates].sum(axis=1) - int(pods.gpu_request_milli[row])
        cpu_free_after = state.cpu_left_milli[candidates] - cpu
        pick = np.lexsort((candidates, cpu_free_after, gpu_free_after))[0]
        node = int(candidates[pick])
        return node, _take_vector(state, node, int(column[node]), milli, num)
