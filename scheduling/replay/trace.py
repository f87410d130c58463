"""The openb trace model and the FGD artifact's workload tuning (`tuneUpPods` / `tuneDownPods`).

Pure: arrays in, arrays out. Files are parsed outside the core (benchmarks/traces.py).

Reference: Weng et al., "Beware of Fragmentation: Scheduling GPU-Sharing Workloads with
Fragmentation Gradient Descent", USENIX ATC'23, and its artifact
hkust-adsl/kubernetes-scheduler-simulator (`pkg/simulator/simulator.go`: `SortClusterPods`,
`TunePodsByNodeTotalResource`, `tuneUpPods`, `tuneDownPods`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

MILLI_PER_GPU = 1000


@dataclass(frozen=True)
class NodeTrace:
    """A node list as arrays indexed by node (the trace's order).

    cpu_milli: (n_nodes,) int64 allocatable CPU in millicores.
    memory_bytes: (n_nodes,) int64 allocatable memory in bytes.
    num_gpus: (n_nodes,) int32 GPUs on the node.
    model_id: (n_nodes,) int32 index into `models`, -1 for a node without GPUs.
    models: GPU model names, sorted.
    """

    cpu_milli: NDArray[np.int64]
    memory_bytes: NDArray[np.int64]
    num_gpus: NDArray[np.int32]
    model_id: NDArray[np.int32]
    models: tuple[str, ...]

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return int(self.cpu_milli.shape[0])

    @property
    def total_gpu_milli(self) -> int:
        """Cluster GPU capacity in milli-GPU."""
        return int(self.num_gpus.sum()) * MILLI_PER_GPU


@dataclass(frozen=True)
class PodTrace:
    """A pod list as arrays indexed by pod row (rows sorted by pod name).

    cpu_milli: (n_pods,) int64 CPU request in millicores.
    memory_bytes: (n_pods,) int64 memory request in bytes.
    num_gpu: (n_pods,) int32 GPUs requested (0 for a CPU-only pod).
    gpu_milli: (n_pods,) int32 milli-GPU taken from each requested GPU: 1..999 for a fractional
        share of one GPU, 1000 for whole GPUs, 0 for a CPU-only pod.
    spec_id: (n_pods,) int32 index into `specs` (the pod's allowed-model list, "" = any model).
    spec_allowed: (n_specs, n_models) bool, which node models each spec accepts.
    specs: the spec strings, sorted (so spec ids order like the strings).
    """

    cpu_milli: NDArray[np.int64]
    memory_bytes: NDArray[np.int64]
    num_gpu: NDArray[np.int32]
    gpu_milli: NDArray[np.int32]
    spec_id: NDArray[np.int32]
    spec_allowed: NDArray[np.bool_]
    specs: tuple[str, ...]

    @property
    def n_pods(self) -> int:
        """Number of pod rows."""
        return int(self.cpu_milli.shape[0])

    @property
    def gpu_request_milli(self) -> NDArray[np.int64]:
        """(n_pods,) int64 total milli-GPU each pod requests (num_gpu x gpu_milli)."""
        return self.num_gpu.astype(np.int64) * self.gpu_milli.astype(np.int64)


def arrival_order(
    gpu_request_milli: NDArray[np.int64],
    gpu_milli: NDArray[np.int32],
    capacity_gpu_milli: int,
    ratio: float,
    rng: np.random.Generator,
) -> NDArray[np.int64]:
    """The pod rows in arrival order, tuned to `ratio` x cluster GPU capacity (FGD's method).

    Follows the artifact step by step (rows must be sorted by pod name, as the artifact sorts
    them before shuffling):
    1. shuffle all rows (`SortClusterPods` with shufflePod=true);
    2. if the total GPU request exceeds ratio x capacity, remove uniformly random pods from
       the shuffled list until it does not (`tuneDownPods`);
    3. otherwise append pods drawn uniformly with replacement from all rows until the next
       draw would push the total over ratio x capacity (`tuneUpPods`). The drawn pods arrive
       after all of the trace's own pods, in draw order.

    One quirk kept on purpose: like `tuneUpPods`, the stopping test adds the drawn pod's
    *per-GPU* milli (`podRes.MilliGpu`) while the running total adds its full request, so a
    multi-GPU draw can overshoot the target slightly.

    Difference from the artifact: the random stream is numpy's (the `rng` passed in, e.g.
    PCG64 seeded with 42..51), not Go's math/rand, so the same seed gives a different order.

    gpu_request_milli: (n_pods,) int64 total milli-GPU per pod row.
    gpu_milli: (n_pods,) int32 milli-GPU per requested GPU.
    Returns (n_arrivals,) int64 pod rows; a row appears more than once when it was redrawn.
    """
    n_pods = int(gpu_request_milli.shape[0])
    if n_pods == 0:
        return np.zeros(0, dtype=np.int64)
    if ratio > 0 and int(gpu_request_milli.sum()) <= 0:
        # The artifact panics here too: with no GPU request, tuning up never stops.
        raise ValueError("cannot tune a workload that requests no GPU")
    order = rng.permutation(n_pods).astype(np.int64)
    total = int(gpu_request_milli.sum())
    target = float(ratio) * float(capacity_gpu_milli)
    if ratio <= 0 or float(total) == target:
        return order
    if float(total) > target:
        kept = order.tolist()
        while float(total) > target and kept:
            victim = kept.pop(int(rng.integers(len(kept))))
            total -= int(gpu_request_milli[victim])
        return np.array(kept, dtype=np.int64)
    drawn: list[int] = []
    while True:
        row = int(rng.integers(n_pods))
        if float(total + int(gpu_milli[row])) > target:
            break
        total += int(gpu_request_milli[row])
        drawn.append(row)
    return np.concatenate([order, np.array(drawn, dtype=np.int64)])
