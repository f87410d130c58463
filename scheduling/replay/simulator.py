"""Arrival-only replay of an openb workload, the FGD artifact's experiment (pure, numpy only).

Pods arrive one at a time in the given order; each is placed by the policy or, when no node
can take it, skipped (the artifact's simulator tries the next pod). There are no departures.
After every arrival the recorder's two counters are taken: GPU milli of all arrived pods and GPU
milli allocated (see `recorder.alloc_curve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from scheduling.replay.trace import MILLI_PER_GPU, NodeTrace, PodTrace


@dataclass
class ReplayState:
    """Free resources of the replayed fleet (mutated only by `ReplayState.allocate`).

    cpu_left_milli: (n_nodes,) int64; memory_left_bytes: (n_nodes,) int64;
    gpu_left_milli: (n_nodes, max_gpus) int64, 0 for GPUs the node does not have.
    """

    cpu_left_milli: NDArray[np.int64]
    memory_left_bytes: NDArray[np.int64]
    gpu_left_milli: NDArray[np.int64]
    node_model: NDArray[np.int32]

    @classmethod
    def empty(cls, nodes: NodeTrace) -> ReplayState:
        """All nodes idle."""
        max_gpus = max(int(nodes.num_gpus.max()), 1)
        present = np.arange(max_gpus)[None, :] < nodes.num_gpus[:, None]
        return cls(
            cpu_left_milli=nodes.cpu_milli.astype(np.int64).copy(),
            memory_left_bytes=nodes.memory_bytes.astype(np.int64).copy(),
            gpu_left_milli=np.where(present, MILLI_PER_GPU, 0).astype(np.int64),
            node_model=nodes.model_id.copy(),
        )

    def feasible(self, pods: PodTrace, row: int) -> NDArray[np.bool_]:
        """(n_nodes,) bool: nodes that can take pod `row` now (CPU, memory, model, GPUs)."""
        mask: NDArray[np.bool_] = (self.cpu_left_milli >= pods.cpu_milli[row]) & (
            self.memory_left_bytes >= pods.memory_bytes[row]
        )
        num_gpu = int(pods.num_gpu[row])
        if num_gpu == 0:
            return mask
        allowed = pods.spec_allowed[pods.spec_id[row]]
        model_ok = np.where(self.node_model >= 0, allowed[np.maximum(self.node_model, 0)], False)
        milli = int(pods.gpu_milli[row])
        gpu_ok = (self.gpu_left_milli >= milli).sum(axis=1) >= num_gpu
        result: NDArray[np.bool_] = mask & model_ok & gpu_ok
        return result

    def allocate(
        self, node: int, cpu_milli: int, memory_bytes: int, take_milli: NDArray[np.int64]
    ) -> None:
        """Commit a placement: take CPU, memory and `take_milli` (max_gpus,) from `node`."""
        self.cpu_left_milli[node] -= cpu_milli
        self.memory_left_bytes[node] -= memory_bytes
        self.gpu_left_milli[node] -= take_milli
        if (
            self.cpu_left_milli[node] < 0
            or self.memory_left_bytes[node] < 0
            or (self.gpu_left_milli[node] < 0).any()
        ):
            raise AssertionError(f"over-allocation on node {node}")


class ReplayPolicy(Protocol):
    """Chooses a node (and the GPUs taken) for one pod; never mutates the state."""

    def choose(
        self, state: ReplayState, pods: PodTrace, row: int, feasible: NDArray[np.bool_]
    ) -> tuple[int, NDArray[np.int64]] | None:
        """(node, (max_gpus,) milli taken from each GPU of the node), or None to skip."""
        ...


@dataclass(frozen=True)
class ReplayResult:
    """Every decision of one replay, in arrival order.

    order: (n_arrivals,) int64 pod row of each arrival.
    node: (n_arrivals,) int64 chosen node, -1 when the pod was skipped.
    gpu_take_milli: (n_arrivals, max_gpus) int64 milli taken from each GPU of the chosen node.
    arrived_gpu_milli: (n_arrivals,) int64 cumulative GPU request of arrived pods.
    used_gpu_milli: (n_arrivals,) int64 GPU milli allocated after each arrival.
    """

    order: NDArray[np.int64]
    node: NDArray[np.int64]
    gpu_take_milli: NDArray[np.int64]
    arrived_gpu_milli: NDArray[np.int64]
    used_gpu_milli: NDArray[np.int64]


def replay(
    nodes: NodeTrace, pods: PodTrace, order: NDArray[np.int64], policy: ReplayPolicy
) -> ReplayResult:
    """Replay arrivals `order` (pod rows) on an idle fleet with `policy`."""
    state = ReplayState.empty(nodes)
    max_gpus = state.gpu_left_milli.shape[1]
    n = int(order.shape[0])
    chosen = np.full(n, -1, dtype=np.int64)
    taken = np.zeros((n, max_gpus), dtype=np.int64)
    arrived = np.zeros(n, dtype=np.int64)
    used = np.zeros(n, dtype=np.int64)
    request = pods.gpu_request_milli
    arrived_total = 0
    used_total = 0
    for i, row in enumerate(order.tolist()):
        arrived_total += int(request[row])
        feasible = state.feasible(pods, row)
        if feasible.any():
            decision = policy.choose(state, pods, row, feasible)
            if decision is not None:
                node, take = decision
                if not feasible[node] or int(take.sum()) != int(request[row]):
                    raise AssertionError(f"policy returned an invalid placement for row {row}")
                state.allocate(node, int(pods.cpu_milli[row]), int(pods.memory_bytes[row]), take)
                chosen[i] = node
                taken[i] = take
                used_total += int(request[row])
        arrived[i] = arrived_total
        used[i] = used_total
    return ReplayResult(
        order=order,
        node=chosen,
        gpu_take_milli=taken,
        arrived_gpu_milli=arrived,
        used_gpu_milli=used,
    )
