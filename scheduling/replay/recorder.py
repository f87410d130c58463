"""Allocation curves the way the FGD artifact reports them.

The artifact logs one `[Alloc]` line after every pod event (`ClusterGpuFragReport`): the GPU
milli allocated so far and the GPU milli of all pods that have arrived so far (counted at
arrival, whether or not the pod was placed). `experiments/analysis/merge_alloc_discrete_0920.py`
then turns the event log into one value per integer arrived %:

    arrive_ratio = round(arrived_milli / total_gpus / 10, 0)      # Python round: half to even
    alloc_ratio  = round(used_milli / total_gpus / 10, 2)
    value[k]     = round(mean(alloc_ratio of events with arrive_ratio == k), 2)
                   (events with k-1 <= arrive_ratio <= k+1 when no event rounds to k;
                    no value when there is none either)

`alloc_curve` reproduces that arithmetic exactly.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

ARRIVED_PCT_POINTS = tuple(range(131))
"""The arrived-% points 0..130 of the published table."""


def alloc_curve(
    arrived_gpu_milli: NDArray[np.int64],
    used_gpu_milli: NDArray[np.int64],
    total_gpus: int,
    points: tuple[int, ...] = ARRIVED_PCT_POINTS,
) -> dict[int, float]:
    """GPU allocation % at each arrived % point, from one event per arriving pod.

    arrived_gpu_milli: (n_events,) int64 cumulative GPU milli requested by arrived pods,
        counted when each pod arrives.
    used_gpu_milli: (n_events,) int64 GPU milli allocated after the event.
    total_gpus: cluster GPUs (the divisor x 10 turns milli into %).
    Returns {arrived %: allocation %}; points with no nearby event are left out.
    """
    if arrived_gpu_milli.shape != used_gpu_milli.shape:
        raise ValueError("arrived and used event arrays differ in length")
    if total_gpus <= 0:
        raise ValueError("total_gpus must be positive")
    # Python's round() (correctly rounded, half to even), as pandas' apply(round) uses.
    arrive_ratio = np.array(
        [round(float(a) / total_gpus / 10, 0) for a in arrived_gpu_milli.tolist()], dtype=np.float64
    )
    alloc_ratio = np.array(
        [round(float(u) / total_gpus / 10, 2) for u in used_gpu_milli.tolist()], dtype=np.float64
    )
    curve: dict[int, float] = {}
    for k in points:
        selected = alloc_ratio[arrive_ratio == k]
        if selected.size == 0:
            selected = alloc_ratio[(arrive_ratio >= k - 1) & (arrive_ratio <= k + 1)]
            if selected.size == 0:
                continue
        curve[k] = round(float(np.mean(selected)), 2)
    return curve
