"""GPU fragmentation (FGD, Weng et al., USENIX ATC'23, section 4), vectorized over nodes.

A node's fragmentation is measured against the *target workload*: the distribution of pod
GPU request types (shapes) and their popularity. For one pod type t a node's idle GPU milli is
either usable by t or a fragment for t:

- t requests no GPU: every idle GPU milli of the node counts as a fragment (the artifact's
  `XLSatisfied` / `XRLackCPU` cases, both outside Q3);
- the node's GPU model is not allowed for t: every idle GPU milli is a fragment (`NoAccess`),
  or, constraint-aware (fleetd's refinement), t does not count on this node at all;
- the node can host t (at least `num_gpu` GPUs with `gpu_milli` free each, and enough CPU):
  only the GPUs with less than t's per-GPU milli free are fragments (Q3, partly Q2);
- otherwise (GPU or CPU lacking, Q1/Q2/Q4): every idle GPU milli is a fragment.

The node's fragmentation is the popularity-weighted sum over types (`NodeGpuShareFragAmount`
then `FragAmountSumExceptQ3` in hkust-adsl/kubernetes-scheduler-simulator, pkg/utils/frag.go).
FGD places a pod where this grows least, and a fractional pod on the GPU where it grows least.

`typical_pods` builds the target workload exactly as the artifact's `GetTypicalPods` does with
the configuration of its published runs (CPU-only pods included, popularity threshold 95 %,
increase step 1, no GPU weighting), and, given the fleet's GPUs per model, each model's
pressure (`model_pressure`): the share of its GPUs that model-constrained pods need.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field
from itertools import repeat
from typing import cast

import numpy as np
from numpy.typing import NDArray

from scheduling.filters import Constraints
from scheduling.fleet import Fleet
from scheduling.scoring import NodeView, ScoreResult, register_scorer

MILLI_PER_GPU = 1000
DEFAULT_MILLI_CPU_REQUEST = 100
"""kube-scheduler's non-zero default for a zero CPU request (`GetNonzeroRequests`), used by
the artifact when it computes pod shapes."""

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]


@dataclass(frozen=True)
class TypicalPods:
    """The target workload: pod shapes and their popularity.

    cpu_milli: (n_types,) int64 CPU request in millicores.
    gpu_milli: (n_types,) int64 milli-GPU per requested GPU (0 for CPU-only types).
    num_gpu: (n_types,) int64 GPUs requested.
    model_allowed: (n_types, n_models) bool, node models the type may use.
    freq: (n_types,) float64 popularity, summing to 1.
    model_pressure: (n_models,) float64 in [0, 1] or None (unknown): the share of each
        model's GPUs that model-constrained pods need (see `model_pressure`).
    """

    cpu_milli: IntArray
    gpu_milli: IntArray
    num_gpu: IntArray
    model_allowed: BoolArray
    freq: FloatArray
    model_pressure: FloatArray | None = None
    distinct_gpu_milli: IntArray = field(init=False, repr=False, compare=False)
    """Sorted distinct per-GPU requests (derived)."""
    distinct_index: IntArray = field(init=False, repr=False, compare=False)
    """(n_types,) index of each type's per-GPU request in `distinct_gpu_milli` (derived)."""
    gpu_type_on_model: BoolArray = field(init=False, repr=False, compare=False)
    """(n_models + 1, n_types): row 1 + model id: the type requests GPUs and may use the
    model (row 0: a node without GPU model) (derived)."""
    counts_on_model: BoolArray = field(init=False, repr=False, compare=False)
    """(n_models + 1, n_types): row 1 + model id: the type may use the model or requests no
    GPU (derived)."""
    count_tests: tuple[IntArray, NDArray[np.int8], IntArray] = field(
        init=False, repr=False, compare=False
    )
    """The distinct (per-GPU request index, GPU count) pairs of the types, and each type's
    pair: "at least num_gpu GPUs with the request free" is tested once per pair (derived)."""
    gpus_needed: NDArray[np.int8] = field(init=False, repr=False, compare=False)
    """(n_types,) int8 GPUs per pod of each type, clipped like `count_tests` (derived)."""
    cpu_levels: IntArray = field(init=False, repr=False, compare=False)
    """Sorted distinct CPU requests of the types (derived)."""
    gpus_needed_at: NDArray[np.int8] = field(init=False, repr=False, compare=False)
    """(n_models + 1, n_cpu_levels + 1, n_types) int8: `gpus_needed` where the type requests
    GPUs, may use the model (row as `gpu_type_on_model`) and fits a node whose free CPU is at
    least the first k `cpu_levels` (column k), `_NEVER` elsewhere (derived; `_need`)."""
    freq_on_model: FloatArray = field(init=False, repr=False, compare=False)
    """(n_models + 1, n_types): `freq` where the type counts on the model
    (`counts_on_model`), 0.0 elsewhere (derived; `_type_rows`)."""

    def __post_init__(self) -> None:
        values, inverse = np.unique(np.asarray(self.gpu_milli, dtype=np.int64), return_inverse=True)
        object.__setattr__(self, "distinct_gpu_milli", values)
        object.__setattr__(self, "distinct_index", inverse.reshape(-1))
        allowed = np.asarray(self.model_allowed, dtype=bool)
        accessible = np.concatenate([np.zeros((1, allowed.shape[0]), bool), allowed.T])
        gpu = np.asarray(self.gpu_milli) > 0
        object.__setattr__(self, "gpu_type_on_model", accessible & gpu[None, :])
        object.__setattr__(self, "counts_on_model", accessible | ~gpu[None, :])
        object.__setattr__(
            self, "freq_on_model", np.where(self.counts_on_model, self.freq[None, :], 0.0)
        )
        num = np.clip(np.asarray(self.num_gpu, dtype=np.int64), 0, 127)  # GPUs per node <= 63
        pairs, pair_of = np.unique(
            np.stack([inverse.reshape(-1), num], axis=1), axis=0, return_inverse=True
        )
        object.__setattr__(
            self,
            "count_tests",
            (pairs[:, 0].copy(), pairs[:, 1].astype(np.int8), pair_of.reshape(-1)),
        )
        object.__setattr__(self, "gpus_needed", num.astype(np.int8))
        levels, level_of = np.unique(
            np.asarray(self.cpu_milli, dtype=np.int64), return_inverse=True
        )
        fits = level_of.reshape(-1)[None, :] < np.arange(levels.size + 1)[:, None]
        need = np.where(
            self.gpu_type_on_model[:, None, :] & fits[None, :, :], num[None, None, :], _NEVER
        )
        object.__setattr__(self, "cpu_levels", levels)
        object.__setattr__(self, "gpus_needed_at", need.astype(np.int8))

    @property
    def n_types(self) -> int:
        """Number of pod types."""
        return int(self.freq.shape[0])


def typical_pods(
    cpu_milli: NDArray[np.integer],
    gpu_milli: NDArray[np.integer],
    num_gpu: NDArray[np.integer],
    spec_id: NDArray[np.integer],
    spec_allowed: BoolArray,
    popularity_threshold_pct: float = 95.0,
    include_cpu_pods: bool = True,
    model_gpus: NDArray[np.integer] | NDArray[np.floating] | None = None,
) -> TypicalPods:
    """The most popular pod shapes covering `popularity_threshold_pct` % of the pods.

    A shape is (CPU milli with zero read as 100, per-GPU milli, GPU count, spec id). Shapes are
    ranked by count, ties broken like the artifact's `sort.Reverse(TargetPodList)`: larger CPU,
    then larger GPU milli, larger GPU count, larger spec (spec ids must order like the spec
    strings). Shapes are taken one at a time until their cumulative count reaches the threshold,
    then their frequencies are renormalized to sum to 1.

    cpu_milli, gpu_milli, num_gpu, spec_id: (n_pods,) per pod, as in `PodTrace`.
    spec_allowed: (n_specs, n_models) bool.
    model_gpus: (n_models,) GPUs of each model in the fleet; when given, `model_pressure` is
    computed from *all* the pods (the 95 % cut drops rare shapes, and the shapes pinned to a
    small model are rare however scarce that model is).
    """
    cpu = np.where(np.asarray(cpu_milli) == 0, DEFAULT_MILLI_CPU_REQUEST, cpu_milli).astype(
        np.int64
    )
    gpu = np.asarray(gpu_milli, dtype=np.int64)
    num = np.asarray(num_gpu, dtype=np.int64)
    spec = np.asarray(spec_id, dtype=np.int64)
    keep = np.ones(cpu.shape[0], dtype=bool) if include_cpu_pods else num > 0
    keys = np.stack([cpu[keep], gpu[keep], num[keep], spec[keep]], axis=1)
    if keys.shape[0] == 0:
        raise ValueError("no pods to derive the target workload from")
    shapes, counts = np.unique(keys, axis=0, return_counts=True)
    # Descending count, then descending (cpu, gpu, num, spec): lexsort's last key is primary.
    order = np.lexsort((-shapes[:, 3], -shapes[:, 2], -shapes[:, 1], -shapes[:, 0], -counts))
    shapes, counts = shapes[order], counts[order].astype(np.float64)
    allowed = np.asarray(spec_allowed, dtype=bool)
    pressure = None
    if model_gpus is not None:
        pressure = model_pressure(
            shapes[:, 1], shapes[:, 2], allowed[shapes[:, 3]], counts, np.asarray(model_gpus)
        )
    total = float(counts.sum())
    expected = popularity_threshold_pct * total / 100.0
    cumulative = counts.cumsum()
    n_taken = int(np.searchsorted(cumulative, expected, side="left")) + 1
    n_taken = min(n_taken, shapes.shape[0])
    shapes, counts = shapes[:n_taken], counts[:n_taken]
    return TypicalPods(
        cpu_milli=shapes[:, 0].copy(),
        gpu_milli=shapes[:, 1].copy(),
        num_gpu=shapes[:, 2].copy(),
        model_allowed=allowed[shapes[:, 3]],
        freq=counts / counts.sum(),
        model_pressure=pressure,
    )


def model_pressure(
    gpu_milli: NDArray[np.integer],
    num_gpu: NDArray[np.integer],
    model_allowed: BoolArray,
    count: NDArray[np.integer] | NDArray[np.floating],
    model_gpus: NDArray[np.integer] | NDArray[np.floating],
) -> FloatArray:
    """(n_models,) the share of each model's GPUs that model-constrained pods need, in [0, 1].

    Each constrained GPU type t (it accepts some but not all of the fleet's GPUs) spreads its
    share of the GPU demand over the models it accepts in proportion to their GPUs; model k's
    pressure is what lands on it per GPU of k when the total demand equals the fleet's GPUs:
        pressure_k = min(1, sum over constrained t accepting k of
                            (demand_t / demand) x (GPUs / GPUs accepted by t)).
    E.g. 10 % of the GPU demand pinned to a model holding 25 % of the GPUs: 0.1 x 4 = 0.4.
    Unconstrained types are left out: they can go anywhere, so they add the same to every
    model. A pure function of the workload and the fleet's capacity, never of its state.

    gpu_milli, num_gpu: (n_types,) per-GPU milli and GPU count; model_allowed: (n_types,
    n_models); count: (n_types,) pods of each type; model_gpus: (n_models,) GPUs per model.
    """
    n_models = model_allowed.shape[1]
    gpus = np.asarray(model_gpus, dtype=np.float64)[:n_models]
    total_gpus = float(gpus.sum())
    gpu_type = np.asarray(gpu_milli) > 0
    demand = np.asarray(count, dtype=np.float64) * np.asarray(gpu_milli) * np.asarray(num_gpu)
    total_demand = float(demand[gpu_type].sum())
    if total_gpus <= 0 or total_demand <= 0:
        return np.zeros(n_models)
    allowed = np.asarray(model_allowed, dtype=np.float64)
    reach = allowed @ gpus
    constrained = gpu_type & (reach > 0) & (reach < total_gpus)
    density = np.where(
        constrained, demand / total_demand * total_gpus / np.where(reach > 0, reach, 1.0), 0.0
    )
    pressure: FloatArray = np.minimum(density @ allowed, 1.0)
    return pressure


def fleet_model_gpus(fleet: Fleet) -> NDArray[np.int64]:
    """(n_models,) GPUs of each GPU model id over the fleet's live nodes."""
    live = fleet.live_mask().nonzero()[0]
    model = fleet.gpu_model_id[live].astype(np.int64)
    has = model >= 0
    gpus: NDArray[np.int64] = np.bincount(
        model[has], weights=fleet.gpu_count[live][has], minlength=len(fleet.gpu_models)
    ).astype(np.int64)
    return gpus


def frag_milli(
    cpu_left_milli: IntArray,
    gpu_left_milli: IntArray,
    node_model: NDArray[np.integer],
    typical: TypicalPods,
    constraint_aware: bool = False,
) -> FloatArray:
    """Expected fragmented GPU milli of each node state (FGD's F_n(M)), vectorized.

    cpu_left_milli: (n,) free CPU of each state.
    gpu_left_milli: (n, max_gpus) free milli of each GPU (0 for absent GPUs).
    node_model: (n,) GPU model index of each state (-1 = no GPU; such a node has no idle GPU).
    constraint_aware: a GPU type that may not use the node's model adds nothing (it will never
        be offered this node) instead of all the node's idle GPU (the artifact's `NoAccess`).
    Returns (n,) float64 fragmented milli-GPU.
    """
    left = np.asarray(gpu_left_milli, dtype=np.int64)
    total: FloatArray = left.sum(axis=1).astype(np.float64)
    if left.shape[0] == 0:
        return total
    count_ge, milli_below = _gpu_stats(left, typical)
    return _frag_of_stats(
        total, count_ge[:, None, :], milli_below[:, None, :], cpu_left_milli, node_model,
        typical, constraint_aware,
    ).reshape(-1)  # fmt: skip


def _gpu_stats(left: IntArray, typical: TypicalPods) -> tuple[IntArray, IntArray]:
    """Per row and distinct per-GPU request m: GPUs with at least m free, and the milli
    free on the others ((n, n_distinct) each, integers)."""
    at_least = left[:, :, None] >= typical.distinct_gpu_milli[None, None, :]
    count_ge: IntArray = np.add.reduce(at_least, axis=1)
    milli_below: IntArray = np.add.reduce(np.where(at_least, 0, left[:, :, None]), axis=1)
    return count_ge, milli_below


def _type_rows(
    node_model: NDArray[np.integer], typical: TypicalPods, constraint_aware: bool
) -> tuple[IntArray, FloatArray | None]:
    """Per node, its row of the per-model tables (`gpus_needed_at`, `freq_on_model`: 0 for
    nodes without a GPU model) and, when constraint-aware, its `freq_on_model` row: the
    weight of each type's term, 0.0 for the types that do not count on the node's model
    (None: every type counts, weights `freq`)."""
    row = np.maximum(np.asarray(node_model, dtype=np.int64), -1) + 1
    # Row gathers of (R, T) tables here and in the scorer's hot paths use `take`: the same
    # values as fancy indexing, several times faster for rows of a 2-D table.
    return row, (typical.freq_on_model.take(row, axis=0) if constraint_aware else None)


def _need(model_row: IntArray, cpu_left: IntArray, typical: TypicalPods) -> NDArray[np.int8]:
    """(R, T) int8: GPUs per pod of type t where t requests GPUs, may use the node's model
    and fits its free CPU, `_NEVER` elsewhere (the hosting test of `_frag_of_stats`), one
    row of `gpus_needed_at` per node: cpu >= request iff the request is among the levels
    at most cpu."""
    table = typical.gpus_needed_at
    levels = table.shape[1]
    at = model_row * levels + typical.cpu_levels.searchsorted(cpu_left, side="right")
    out: NDArray[np.int8] = table.reshape(-1, table.shape[2]).take(at, axis=0)
    return out


def _model_rows(
    node_model: NDArray[np.integer], typical: TypicalPods, constraint_aware: bool
) -> tuple[BoolArray, BoolArray | None]:
    """Per node, the types' rows of `gpu_type_on_model` and, when constraint-aware,
    `counts_on_model` ((n, n_types) each)."""
    # Row per node of the per-model tables (row 0 for nodes without a GPU model).
    row = np.maximum(np.asarray(node_model, dtype=np.int64), -1) + 1
    return typical.gpu_type_on_model[row], (
        typical.counts_on_model[row] if constraint_aware else None
    )


def _frag_of_stats(
    total: FloatArray,
    count_ge_distinct: IntArray,
    milli_below_distinct: IntArray,
    cpu_left_milli: IntArray,
    node_model: NDArray[np.integer],
    typical: TypicalPods,
    constraint_aware: bool,
    model_rows: tuple[BoolArray, BoolArray | None] | None = None,
) -> FloatArray:
    """`frag_milli` from `_gpu_stats`: total (n,) idle milli, count_ge and milli_below
    (n, k, n_distinct) for k states per row (candidates sharing the row's CPU, model and
    total idle milli). Returns (n, k). `model_rows`: `_model_rows` if already known."""
    inverse = typical.distinct_index
    on_model, counts = (
        _model_rows(node_model, typical, constraint_aware) if model_rows is None else model_rows
    )
    # What depends on the row only (model, CPU) is computed once per row, not per state.
    static = on_model & (
        np.asarray(cpu_left_milli, dtype=np.int64)[:, None] >= typical.cpu_milli[None, :]
    )
    # count >= num_gpu per type, tested once per distinct (request, count) pair on int8s.
    pair_value, pair_num, pair_of = typical.count_tests
    enough = count_ge_distinct.astype(np.int8)[:, :, pair_value] >= pair_num
    hosts = static[:, None, :] & enough[:, :, pair_of]
    fallback = total[:, None]
    if counts is not None:
        # Why: the artifact's NoAccess fragment rewards every placement on a model by the
        # popularity of the types pinned elsewhere, so it steers flexible pods towards the
        # models the fewest pods are pinned to, however small (scarcity is `model_pressure`).
        # (A type that hosts may use the model: only the others can count 0.)
        fallback = np.where(counts, fallback, 0.0)
    per_type = np.where(
        hosts, milli_below_distinct.astype(np.float64)[:, :, inverse], fallback[:, None, :]
    )
    # Why not `per_type @ freq`: a matrix product sums a row in an order that depends on
    # how many rows come with it and on the layout, so one state's fragmentation changed in
    # the last bit with the batch it was computed in, and a pod that leaves fragmentation
    # unchanged (F_now - F_next = 0, score 50) could score 49 on one path and 50 on another
    # (engine vs reference loop). A reduction along each C-ordered row sums every row in
    # the same order whatever the batch.
    weighted = np.ascontiguousarray(per_type) * typical.freq
    result: FloatArray = weighted.sum(axis=-1)
    return result


def candidate_states(
    cpu_left_milli: IntArray,
    gpu_left_milli: IntArray,
    pod_cpu_milli: int,
    pod_gpu_milli: int,
    pod_num_gpu: int,
) -> tuple[IntArray, IntArray, BoolArray]:
    """The node states after placing one pod, one per way of placing it (check, no mutation).

    A fractional pod (0 < gpu_milli < 1000, one GPU) may take any GPU with enough milli free:
    one candidate per GPU. A whole-GPU pod takes the lowest-index fully free GPUs (as the
    artifact's `AllocateExclusiveGpuId`): one candidate, in column 0. A CPU-only pod: one
    candidate. CPU is taken in every candidate.

    Returns (cpu_after (n, c), gpu_after (n, c, max_gpus), valid (n, c)) with c = max_gpus for a
    fractional pod and 1 otherwise; invalid candidates hold the unchanged state.
    """
    cpu = np.asarray(cpu_left_milli, dtype=np.int64)
    left = np.asarray(gpu_left_milli, dtype=np.int64)
    n, max_gpus = left.shape
    if 0 < pod_gpu_milli < MILLI_PER_GPU:
        valid = left >= pod_gpu_milli
        gpu_after = np.repeat(left[:, None, :], max_gpus, axis=1)
        diag = np.arange(max_gpus)
        gpu_after[:, diag, diag] -= np.where(valid, pod_gpu_milli, 0)
        cpu_after = np.repeat((cpu - pod_cpu_milli)[:, None], max_gpus, axis=1)
        return cpu_after, gpu_after, valid
    if pod_num_gpu > 0:
        full = left >= MILLI_PER_GPU
        take = full & (full.cumsum(axis=1) <= pod_num_gpu)
        valid = full.sum(axis=1) >= pod_num_gpu
        gpu_after = np.where(take & valid[:, None], left - MILLI_PER_GPU, left)
        return (cpu - pod_cpu_milli)[:, None], gpu_after[:, None, :], valid[:, None]
    return (cpu - pod_cpu_milli)[:, None], left[:, None, :].copy(), np.ones((n, 1), dtype=bool)


def frag_after(
    cpu_left_milli: IntArray,
    gpu_left_milli: IntArray,
    node_model: NDArray[np.integer],
    typical: TypicalPods,
    pod_cpu_milli: int,
    pod_gpu_milli: int,
    pod_num_gpu: int,
    constraint_aware: bool = False,
) -> FloatArray:
    """Fragmentation of each node after placing the pod each possible way.

    Returns (n, c) float64 (c as in `candidate_states`), +inf where the candidate is invalid.
    """
    if 0 < pod_gpu_milli < MILLI_PER_GPU and np.asarray(gpu_left_milli).shape[0]:
        return _frag_after_share(
            cpu_left_milli, gpu_left_milli, node_model, typical, pod_cpu_milli, pod_gpu_milli,
            constraint_aware,
        )  # fmt: skip
    cpu_after, gpu_after, valid = candidate_states(
        cpu_left_milli, gpu_left_milli, pod_cpu_milli, pod_gpu_milli, pod_num_gpu
    )
    n, c, max_gpus = gpu_after.shape
    model = np.repeat(np.asarray(node_model, dtype=np.int64), c)
    frag = frag_milli(
        cpu_after.reshape(-1), gpu_after.reshape(n * c, max_gpus), model, typical, constraint_aware
    )
    out: FloatArray = np.where(valid, frag.reshape(n, c), np.inf)
    return out


def _frag_after_share(
    cpu_left_milli: IntArray,
    gpu_left_milli: IntArray,
    node_model: NDArray[np.integer],
    typical: TypicalPods,
    pod_cpu_milli: int,
    pod_gpu_milli: int,
    constraint_aware: bool,
    model_rows: tuple[BoolArray, BoolArray | None] | None = None,
) -> FloatArray:
    """`frag_after` of a fractional pod: candidate g differs from the node's state in GPU g
    only, so its GPU statistics are the state's, corrected for that GPU (the same integers
    as from the candidate states themselves, hence the same fragmentation, G times less
    work than `candidate_states` + `frag_milli`)."""
    left = np.asarray(gpu_left_milli, dtype=np.int64)
    n, g = left.shape
    values = typical.distinct_gpu_milli[None, None, :]
    ge_old = left[:, :, None] >= values
    below_old = np.where(ge_old, 0, left[:, :, None])
    total = (left.sum(axis=1) - pod_gpu_milli).astype(np.float64)
    cpu_after = np.asarray(cpu_left_milli, dtype=np.int64) - pod_cpu_milli
    valid = left >= pod_gpu_milli
    if n * g < _DEDUP_CANDIDATES:
        new = left - pod_gpu_milli
        ge_new = new[:, :, None] >= values
        # The state's statistics (`_gpu_stats`) with GPU g's part replaced by its new one.
        count_after = ge_old.sum(axis=1)[:, None, :] - ge_old + ge_new
        below_after = (
            below_old.sum(axis=1)[:, None, :] - below_old + np.where(ge_new, 0, new[:, :, None])
        )
        frag = _frag_of_stats(
            total, count_after, below_after, cpu_after, node_model, typical, constraint_aware,
            model_rows,
        )  # fmt: skip
        out: FloatArray = np.where(valid, frag, np.inf)
        return out
    # Many candidates: GPUs of a node with the same free share give the same state, so only
    # the first GPU of each share is computed (a node's idle GPUs are mostly all alike).
    first = (left[:, :, None] == left[:, None, :]).argmax(axis=2)
    row, gpu = (valid & (first == np.arange(g))).nonzero()
    new_one = left[row, gpu] - pod_gpu_milli
    ge_one = new_one[:, None] >= values[0]
    count_one = ge_old.sum(axis=1)[row] - ge_old[row, gpu] + ge_one
    below_one = (
        below_old.sum(axis=1)[row] - below_old[row, gpu] + np.where(ge_one, 0, new_one[:, None])
    )
    on_model, counts = (
        _model_rows(node_model, typical, constraint_aware) if model_rows is None else model_rows
    )
    frag_one = _frag_of_stats(
        total[row], count_one[:, None, :], below_one[:, None, :], cpu_after[row],
        np.asarray(node_model)[row], typical, constraint_aware,
        (on_model[row], None if counts is None else counts[row]),
    )  # fmt: skip
    each = np.full((n, g), np.inf)
    each[row, gpu] = frag_one[:, 0]
    # GPU g reads the first GPU with its share: computed if g is valid (the same share
    # fits it), +inf otherwise.
    out = each[np.arange(n)[:, None], first]
    return out


#: From this many candidate states (nodes x GPUs), a share's candidates are deduplicated.
_DEDUP_CANDIDATES = 64

#: States a speculative chain block scores at once (rows x steps; see `chain`).
_CHAIN_STATES = 512

#: A GPU count no node reaches (GPUs per node <= 63): "type not hosted" in `_ShareTables`.
_NEVER = np.int8(127)


@dataclass(frozen=True, eq=False)
class _ShareTables:
    """Per free share L (0..1000 milli) of one GPU and per type of the target workload,
    what taking a fractional request m from the GPU changes in a node's per-type statistics
    (`_type_stats`): a candidate's statistics are the state's plus one table row (integers,
    so the same values as computing them from the candidate's GPUs).

    count_delta: (1001, T) int8, the change in "the GPU has t's share free" (L >= m_t);
    below_delta: (1001, T) float64, the change in its free milli counted when it has not
    (both 0 where L < m); lookahead: (1001,) fgd-plus's lookahead term of taking m (None
    without it); num: (T,) int8 GPUs per pod of each type (clipped like
    `TypicalPods.count_tests`); typical: the target workload they were built for.
    """

    typical: TypicalPods
    count_delta: NDArray[np.int8]
    below_delta: FloatArray
    lookahead: FloatArray | None
    num: NDArray[np.int8]

    @classmethod
    def of(
        cls, typical: TypicalPods, pod_milli: int, waste: FloatArray | None, weight: float
    ) -> _ShareTables:
        """The tables of request `pod_milli`; `waste` (`eventual_waste_milli`) and `weight`:
        the lookahead term, the floats `FragmentationScorer._scores` computes."""
        share = np.arange(MILLI_PER_GPU + 1, dtype=np.int64)
        has = share[:, None] >= typical.gpu_milli[None, :]
        count = has.astype(np.int8)
        below = np.where(has, 0, share[:, None]).astype(np.float64)
        fits = share >= pod_milli
        rest = np.where(fits, share - pod_milli, 0)
        lookahead = None
        if waste is not None:
            lookahead = weight * np.where(fits, waste[rest] - waste[share], 0.0)
        return cls(
            typical=typical,
            count_delta=np.where(fits[:, None], count[rest] - count, 0).astype(np.int8),
            below_delta=np.where(fits[:, None], below[rest] - below, 0.0),
            lookahead=lookahead,
            num=np.clip(typical.num_gpu, 0, 127).astype(np.int8),
        )


def _gpu_bits(gpus: int) -> IntArray:
    """(gpus,) int64 bit i set at index i (a 0/1 GPU row times this is its bitmask)."""
    bits = _GPU_BITS.get(gpus)
    if bits is None:
        bits = _GPU_BITS[gpus] = np.left_shift(np.int64(1), np.arange(gpus, dtype=np.int64))
    return bits


_GPU_BITS: dict[int, IntArray] = {}


def _type_stats(gpu_left: IntArray, typical: TypicalPods) -> tuple[NDArray[np.int8], FloatArray]:
    """Per state and type of the target workload: GPUs with the type's share free, and the
    milli free on the others (float64: integers, exact) ((R, T) each; `_gpu_stats`, which
    works per distinct request: fewer columns than types)."""
    # `_gpu_stats` from a histogram instead of (R, G, requests) comparisons: a GPU with L
    # free has the share of the first k distinct requests free (k = requests <= L), so per
    # row, the GPUs counting for request d are those with k > d and the others' milli is
    # the milli of those with k <= d (integers: exact in float64).
    values = typical.distinct_gpu_milli
    rows, gpus = gpu_left.shape
    width = values.size + 1
    levels = values.searchsorted(gpu_left, side="right")
    flat = (levels + np.arange(0, rows * width, width)[:, None]).ravel()
    upto = np.bincount(flat, minlength=rows * width).reshape(rows, width).cumsum(axis=1)
    milli = np.bincount(flat, weights=gpu_left.ravel(), minlength=rows * width)
    below = milli.reshape(rows, width).cumsum(axis=1)
    index = typical.distinct_index
    return (gpus - upto).astype(np.int8)[:, index], below[:, index]


def _frag_of_type_stats(
    count: NDArray[np.int8],
    below: FloatArray,
    total: IntArray,
    cpu_left: IntArray,
    model_row: IntArray,
    weights: FloatArray | None,
    typical: TypicalPods,
) -> FloatArray:
    """(R,) `frag_milli` of states from their per-type statistics (count, below: (R, T),
    `_type_stats`; total idle milli and free CPU: (R,); model_row, weights: `_type_rows`):
    the same terms, summed along each C-ordered row, so the same floats (a type that does
    not count adds total x 0.0 rather than 0.0 x freq: 0.0 either way, total being >= 0)."""
    need = _need(model_row, cpu_left, typical)
    per_type = np.where(count >= need, below, total.astype(np.float64)[:, None])
    per_type *= typical.freq if weights is None else weights
    out: FloatArray = np.add.reduce(per_type, axis=1)
    return out


def fgd_score(frag_now: FloatArray, frag_next: FloatArray) -> IntArray:
    """The artifact's integer FGD score: int(sigmoid((F_now - F_next) / 1000) x 100).

    Truncated like Go's int64() conversion, so fragmentation changes below about 40 milli-GPU
    tie; kube-scheduler then picks uniformly at random among the best nodes.
    frag_now: broadcastable to frag_next; +inf in frag_next gives score -1 (infeasible).
    """
    finite = np.isfinite(frag_next)
    # An infeasible candidate's delta is -inf (exp gives inf, the score 0, without a
    # warning), replaced by -1 below: no masking before. The cast truncates (scores >= 0).
    delta = (np.asarray(frag_now) - frag_next) / 1000.0
    score = (100.0 / (1.0 + np.exp(-delta))).astype(np.int64)
    return np.where(finite, score, -1)


def cpu_milli_per_gpu_milli(typical: TypicalPods) -> float:
    """The target workload's CPU demand per milli-GPU: E[cpu] / E[GPU milli] over GPU types.

    Returns 0.0 when the workload has no GPU types (nothing can be stranded by CPU then).
    """
    gpu = typical.gpu_milli > 0
    gpu_milli = float((typical.freq[gpu] * typical.gpu_milli[gpu] * typical.num_gpu[gpu]).sum())
    if gpu_milli <= 0:
        return 0.0
    return float((typical.freq[gpu] * typical.cpu_milli[gpu]).sum()) / gpu_milli


def cpu_stranded_gpu_milli(
    idle_gpu_milli: NDArray[np.integer] | FloatArray,
    cpu_left_milli: NDArray[np.integer] | FloatArray,
    cpu_per_gpu_milli: float,
) -> FloatArray:
    """Idle GPU milli that the node's free CPU cannot feed at the workload's CPU/GPU ratio.

    A node with `cpu_left` free CPU can serve about cpu_left / ratio milli-GPU of typical GPU
    pods; idle GPU beyond that is stranded. FGD's measure sees CPU only through the types a
    node can no longer host, and CPU-only pods change it almost nowhere, so FGD lets them eat
    the CPU of nodes whose GPUs are still free (fleetd's refinement, see `FGD_CPU`).
    """
    idle = np.asarray(idle_gpu_milli, dtype=np.float64)
    if cpu_per_gpu_milli <= 0:
        return np.zeros_like(idle)
    servable = np.maximum(np.asarray(cpu_left_milli, dtype=np.float64), 0.0) / cpu_per_gpu_milli
    stranded: FloatArray = np.maximum(idle - servable, 0.0)
    return stranded


def _stranded(
    idle_milli: IntArray, cpu_left_milli: IntArray, cpu_per_gpu_milli: float
) -> FloatArray:
    """`cpu_stranded_gpu_milli` of int64 arrays in fewer numpy calls (the same floats: the
    integers convert to float64 exactly, in the same operations)."""
    if cpu_per_gpu_milli <= 0:
        return np.zeros(idle_milli.shape)
    out: FloatArray = np.maximum(
        idle_milli - np.maximum(cpu_left_milli, 0) / cpu_per_gpu_milli, 0.0
    )
    return out


def eventual_waste_milli(typical: TypicalPods) -> FloatArray:
    """(1001,) V[L]: expected milli a GPU with L milli free ends up wasting (a lookahead).

    The GPU keeps receiving random pods of the target workload's GPU types that fit on it
    (a whole-GPU or multi-GPU type needs the GPU entirely free) until none fits; what is
    left then is wasted: V[L] = L when no type fits, else the popularity-weighted mean of
    V[L - m_t] over the types t that fit. FGD's measure looks one pod ahead; V looks to the
    end of the GPU's life, so it tells apart two remnants that both fit the next pod but
    only one of which can be filled completely. CPU and GPU models are left to FGD's term.
    """
    gpu = typical.gpu_milli > 0
    milli = np.where(typical.num_gpu[gpu] > 1, MILLI_PER_GPU, typical.gpu_milli[gpu]).astype(
        np.int64
    )
    weight = typical.freq[gpu]
    waste = np.zeros(MILLI_PER_GPU + 1, dtype=np.float64)
    for left in range(1, MILLI_PER_GPU + 1):
        fits = milli <= left
        if not fits.any():
            waste[left] = left
            continue
        waste[left] = float((weight[fits] * waste[left - milli[fits]]).sum() / weight[fits].sum())
    return waste


def pod_candidate_shape(
    cpu_millicores: int, gpus_per_pod: int, milli_per_gpu: int
) -> tuple[int, int, int]:
    """(cpu, per-GPU milli, GPU count) of a pod as `candidate_states` takes it."""
    if gpus_per_pod == 0:
        return int(cpu_millicores), 0, 0
    if milli_per_gpu < MILLI_PER_GPU:
        return int(cpu_millicores), int(milli_per_gpu), 1
    return int(cpu_millicores), MILLI_PER_GPU, int(gpus_per_pod)


class FragmentationMemo:
    """Caches fragmentation per distinct node *state*, computing each state once.

    The FGD score of a node for a pod shape depends only on the node's state (free CPU, free
    milli per GPU, GPU model) and the shape, never on which node it is. The memo interns each
    state it is shown (`states`: one id per distinct (CPU, model, GPU row)) and keeps
    `frag_milli` of each state and `frag_after` of each (state, pod shape): many nodes in one
    state, a representative slot standing for them, or one node shown in several hypothetical
    states all read the right values. Values are exactly those of `frag_milli` / `frag_after`;
    the memo only avoids recomputing them. A long-lived policy meets ever new states: past
    `max_states` states or about `max_bytes` of arrays the memo forgets everything and starts
    afresh (about 72 bytes per state and pod shape seen, for 8-GPU nodes).
    """

    def __init__(
        self,
        typical: TypicalPods,
        constraint_aware: bool = False,
        max_states: int = 1 << 18,
        max_bytes: int = 128 << 20,
    ) -> None:
        """typical: the target workload (model columns indexed by the fleet's model ids);
        constraint_aware: as in `frag_milli`; max_states, max_bytes: bounds before starting
        afresh."""
        if max_states < 1 or max_bytes < 0:
            raise ValueError("max_states must be >= 1 and max_bytes >= 0")
        self.typical = typical
        self.constraint_aware = constraint_aware
        self.max_states = max_states
        self.max_bytes = max_bytes
        #: Incremented whenever the memo starts afresh (every state id it gave is void).
        self.generation = 0
        self._reset(0)

    def nbytes(self) -> int:
        """Bytes held by the memo's arrays."""
        return int(self._cpu.shape[0]) * self._row_bytes

    def _reset(self, gpus: int) -> None:
        self.generation += 1
        self._gpus = gpus
        self._void = np.dtype((np.void, 8 * (2 + gpus)))  # a state's key, as bytes
        self._ids: dict[bytes, int] = {}
        self._n = 0
        self._cpu = np.zeros(0, dtype=np.int64)
        self._gpu = np.zeros((0, gpus), dtype=np.int64)
        self._model = np.zeros(0, dtype=np.int64)
        self._now = np.zeros(0, dtype=np.float64)
        self._now_done = np.zeros(0, dtype=np.bool_)
        self._after: dict[Hashable, tuple[FloatArray, BoolArray]] = {}
        # A scorer's final (score, GPU pick) per state and pod shape (`scored`).
        self._scored: dict[Hashable, tuple[FloatArray, IntArray, BoolArray]] = {}
        # Bytes per state of the arrays above (grows by 8 x columns + 1 per pod shape seen).
        self._row_bytes = 8 * (gpus + 3) + 1

    def __len__(self) -> int:
        """Number of distinct states interned."""
        return self._n

    def _grow(self, needed: int) -> None:
        capacity = self._cpu.shape[0]
        if needed <= capacity:
            return
        extra = max(needed, 2 * capacity, 64) - capacity
        self._cpu = np.concatenate([self._cpu, np.zeros(extra, dtype=np.int64)])
        self._gpu = np.concatenate([self._gpu, np.zeros((extra, self._gpus), dtype=np.int64)])
        self._model = np.concatenate([self._model, np.zeros(extra, dtype=np.int64)])
        self._now = np.concatenate([self._now, np.zeros(extra)])
        self._now_done = np.concatenate([self._now_done, np.zeros(extra, dtype=np.bool_)])
        # Per pod shape arrays grow when next used (`frag_after`): most shapes are not.

    def states(self, cpu_left: IntArray, gpu_left: IntArray, model: IntArray) -> IntArray:
        """(R,) the state id of each row (free CPU, free milli per GPU, GPU model), interning
        states not seen yet. Ids stay valid until the next call (which may start afresh)."""
        cpu = np.asarray(cpu_left, dtype=np.int64)
        left = np.asarray(gpu_left, dtype=np.int64)
        gpus = int(left.shape[1])
        if gpus != self._gpus:
            self._reset(gpus)
        rows = int(cpu.shape[0])
        if rows == 0:
            return np.zeros(0, dtype=np.int64)
        keys = np.empty((rows, 2 + gpus), dtype=np.int64)
        keys[:, 0] = cpu
        keys[:, 1] = np.asarray(model, dtype=np.int64)
        keys[:, 2:] = left
        if self._n + rows > self.max_states or self.nbytes() > self.max_bytes:
            self._reset(gpus)  # bounded memory; values are recomputed on demand
        # One dict look-up per row, by the row's bytes (views are mostly small: the engine
        # shows one row per new state; a dict beats np.unique's sort there).
        table = self._ids
        new: list[int] = []
        n = self._n
        void = self._void
        row_bytes = cast("list[bytes]", keys.view(void).ravel().tolist())
        # Look-ups in C (map, -1: not found); only the rows not found take a Python loop.
        ids: IntArray = np.fromiter(map(table.get, row_bytes, repeat(-1)), np.int64, rows)
        missing = (ids < 0).nonzero()[0]
        for i in missing.tolist():
            key = row_bytes[i]
            sid = table.get(key)  # a state met twice in this view
            if sid is None:
                sid = table[key] = n + len(new)
                new.append(i)
            ids[i] = sid
        if new:
            self._grow(n + len(new))
            self._n = n + len(new)
            src = np.asarray(new, dtype=np.int64)
            self._cpu[n : self._n] = keys[src, 0]
            self._model[n : self._n] = keys[src, 1]
            self._gpu[n : self._n] = keys[src, 2:]
        return ids

    def cpu_of(self, ids: IntArray) -> IntArray:
        """(R,) free CPU of the states `ids`."""
        out: IntArray = self._cpu[ids]
        return out

    def gpu_of(self, ids: IntArray) -> IntArray:
        """(R, max_gpus) free milli per GPU of the states `ids`."""
        out: IntArray = self._gpu[ids]
        return out

    def model_of(self, ids: IntArray) -> IntArray:
        """(R,) GPU model id of the states `ids`."""
        out: IntArray = self._model[ids]
        return out

    def frag_now(self, ids: IntArray) -> FloatArray:
        """(R,) fragmentation of the states `ids` (from `states`)."""
        todo = ids[~self._now_done[ids]]  # repeats are computed twice, to the same value
        if todo.size:
            self._now[todo] = frag_milli(
                self._cpu[todo], self._gpu[todo], self._model[todo], self.typical,
                self.constraint_aware,
            )  # fmt: skip
            self._now_done[todo] = True
        result: FloatArray = self._now[ids]
        return result

    def frag_now_with(
        self, ids: IntArray, cpu_left: IntArray, gpu_left: IntArray, model: IntArray
    ) -> tuple[FloatArray, FloatArray]:
        """`frag_now(ids)`, and `frag_milli` of other states (free CPU, free milli per GPU,
        model; not interned), computed in one batch (the same floats: a state's
        fragmentation does not depend on its batch)."""
        todo = ids[~self._now_done[ids]]
        n = int(todo.size)
        both = frag_milli(
            np.concatenate([self._cpu[todo], cpu_left]),
            np.concatenate([self._gpu[todo], gpu_left]),
            np.concatenate([self._model[todo], model]),
            self.typical,
            self.constraint_aware,
        )
        if n:
            self._now[todo] = both[:n]
            self._now_done[todo] = True
        now: FloatArray = self._now[ids]
        return now, both[n:]

    def now_known(self, ids: IntArray) -> BoolArray:
        """(R,) whether `frag_now` of the states `ids` is known already."""
        known: BoolArray = self._now_done[ids]
        return known

    def set_now(self, ids: IntArray, values: FloatArray) -> None:
        """Store `frag_milli` of the states `ids` computed elsewhere (the same floats)."""
        self._now[ids] = values
        self._now_done[ids] = True

    def remember_now(
        self, ids: IntArray, count: NDArray[np.int8], below: FloatArray, total: IntArray,
        cpu_left: IntArray, model_row: IntArray, weights: FloatArray | None,
        typical: TypicalPods,
    ) -> FloatArray:  # fmt: skip
        """`frag_now(ids)`: `set_now` for the states `ids` not known yet, from their per-type
        statistics (`_type_stats`; rows aligned with `ids`): `_frag_of_type_stats`, the same
        floats; the others' from the memo."""
        unknown = (~self.now_known(ids)).nonzero()[0]
        if unknown.size == ids.size:  # all new (the usual case): no subsets to gather
            now = _frag_of_type_stats(count, below, total, cpu_left, model_row, weights, typical)
            self.set_now(ids, now)
            return now
        if unknown.size:
            self.set_now(
                ids[unknown],
                _frag_of_type_stats(
                    count[unknown], below[unknown], total[unknown], cpu_left[unknown],
                    model_row[unknown], None if weights is None else weights[unknown], typical,
                ),
            )  # fmt: skip
        known: FloatArray = self._now[ids]
        return known

    def frag_after(
        self, ids: IntArray, pod_cpu_milli: int, pod_gpu_milli: int, pod_num_gpu: int
    ) -> FloatArray:
        """(R, c) fragmentation of the states `ids` after each candidate placement (see
        `frag_after`)."""
        key = (int(pod_cpu_milli), int(pod_gpu_milli), int(pod_num_gpu))
        columns = self._gpus if 0 < pod_gpu_milli < MILLI_PER_GPU else 1
        entry = self._after.get(key)
        if entry is None:
            capacity = self._cpu.shape[0]
            entry = (
                np.zeros((capacity, columns), dtype=np.float64),
                np.zeros(capacity, dtype=np.bool_),
            )
            self._after[key] = entry
            self._row_bytes += 8 * columns + 1
        elif entry[0].shape[0] < self._cpu.shape[0]:
            extra = self._cpu.shape[0] - entry[0].shape[0]
            entry = self._after[key] = (
                np.concatenate([entry[0], np.zeros((extra, columns))]),
                np.concatenate([entry[1], np.zeros(extra, dtype=np.bool_)]),
            )
        values, done = entry
        todo = ids[~done[ids]]
        if todo.size:
            values[todo] = frag_after(
                self._cpu[todo], self._gpu[todo], self._model[todo], self.typical,
                pod_cpu_milli, pod_gpu_milli, pod_num_gpu, self.constraint_aware,
            )  # fmt: skip
            done[todo] = True
        result: FloatArray = values[ids]
        return result

    def scored(self, key: Hashable) -> tuple[FloatArray, IntArray, BoolArray]:
        """Per state id: a scorer's final score and GPU pick for the pod shape `key`, and
        whether they are known yet (arrays indexed by state id, filled by the caller).
        Valid until the next `states` call (which may start afresh)."""
        capacity = self._cpu.shape[0]
        entry = self._scored.get(key)
        if entry is None:
            entry = self._scored[key] = (
                np.zeros(capacity),
                np.zeros(capacity, dtype=np.int64),
                np.zeros(capacity, dtype=np.bool_),
            )
            self._row_bytes += 17
        elif entry[0].shape[0] < capacity:
            extra = capacity - entry[0].shape[0]
            entry = self._scored[key] = (
                np.concatenate([entry[0], np.zeros(extra)]),
                np.concatenate([entry[1], np.zeros(extra, dtype=np.int64)]),
                np.concatenate([entry[2], np.zeros(extra, dtype=np.bool_)]),
            )
        return entry


def _model_columns(typical: TypicalPods, n_models: int) -> TypicalPods:
    """`typical` with model columns for ids 0..n_models-1: a model id the workload did not
    know is allowed for unconstrained types (all columns True) and refused for the others."""
    have = typical.model_allowed.shape[1]
    if n_models <= have:
        return typical
    unconstrained: BoolArray = (
        np.asarray(typical.model_allowed.all(axis=1), dtype=bool)
        if have
        else np.ones(typical.n_types, dtype=bool)
    )
    pad = np.repeat(unconstrained[:, None], n_models - have, axis=1)
    pressure = typical.model_pressure
    if pressure is not None:
        # A model the workload did not know: no constrained type needs it.
        pressure = np.concatenate([pressure[:have], np.zeros(n_models - have)])
    return TypicalPods(
        cpu_milli=typical.cpu_milli,
        gpu_milli=typical.gpu_milli,
        num_gpu=typical.num_gpu,
        model_allowed=np.concatenate([typical.model_allowed, pad], axis=1),
        freq=typical.freq,
        model_pressure=pressure,
    )


class FragmentationScorer:
    """Score plugin "fgd" / "fgd-cpu" for the placement engine (`scheduling.scoring`).

    Scores each candidate node with the FGD artifact's integer score,
    int(sigmoid((F_now - F_next) / 1000) x 100) (0..100, higher better), where F is
    `frag_milli` against the target workload `typical`, and chooses the GPU of a fractional
    pod: the lowest-index GPU with the node's best score (`calculateGpuShareFragExtendScore`).
    Whole GPUs are the lowest-index free ones. The engine breaks ties by lowest slot.

    fleetd's refinements add to F_next, before scoring, with their weights:
    - `cpu_stranding_weight` x the increase of `cpu_stranded_gpu_milli` (idle GPU milli the
      node's free CPU can no longer feed at the workload's CPU-per-GPU ratio);
    - `lookahead_weight` x the increase of the GPUs' `eventual_waste_milli` (what the GPUs
      taken will end up wasting when filled by the workload's pods);
    - `scarcity_weight` x the GPU milli taken x (the node model's `model_pressure` - the
      lowest pressure among the models the pod accepts): a pod with a choice of models
      pays for taking GPUs that pinned pods need (0 for a pod pinned to one model).
    and with `constraint_aware` F counts only the types that may use the node's model.
    "fgd" uses none of them, "fgd-cpu" the CPU term, "fgd-plus" (fleetd's default) all.

    Node-local (a node's score depends on its state, the pod and `typical` only), as the
    engine requires, and state-only: the score and the GPU choice are functions of the
    node's free CPU, free milli per GPU and GPU model (memoized per distinct state), never
    of its slot, so the engine scores each distinct node state once.
    `typical.model_allowed` columns are the fleet's GPU model ids.
    """

    chooses_gpus = True
    #: See `scheduling.scoring.ScorePlugin`: scores depend on the node's state only.
    state_only = True
    #: ... and whole GPUs are the lowest-index free ones, the engine's default choice.
    default_whole_gpus = True
    #: `score` never reads the default `pick` it is given (it chooses every pod's GPUs).
    reads_default_pick = False

    def __init__(
        self,
        typical: TypicalPods,
        cpu_stranding_weight: float = 0.0,
        name: str = "fgd",
        lookahead_weight: float = 0.0,
        scarcity_weight: float = 0.0,
        constraint_aware: bool = False,
    ) -> None:
        """typical: target workload; weights of fleetd's refinements (0 / False = plain FGD)."""
        for label, weight in (
            ("cpu_stranding_weight", cpu_stranding_weight),
            ("lookahead_weight", lookahead_weight),
            ("scarcity_weight", scarcity_weight),
        ):
            if not np.isfinite(weight) or weight < 0:
                raise ValueError(f"{name}: {label} must be finite and >= 0")
        if typical.n_types == 0:
            raise ValueError(f"{name}: the target workload has no pod types")
        self.name = name
        self.typical = typical
        self.cpu_stranding_weight = float(cpu_stranding_weight)
        self.lookahead_weight = float(lookahead_weight)
        self.scarcity_weight = float(scarcity_weight)
        self.constraint_aware = bool(constraint_aware)
        self.cpu_per_gpu_milli = cpu_milli_per_gpu_milli(typical)
        self.eventual_waste = eventual_waste_milli(typical)
        self.memo = FragmentationMemo(typical, self.constraint_aware)
        self.pressure = _pressure_of(typical)
        self._pressure_any = bool(self.pressure.any())
        self._scarcity_tables: dict[tuple[bytes | None, int], FloatArray] = {}
        self._tables: dict[int, _ShareTables] = {}
        self._gpu_type_counts: dict[int, NDArray[np.int8]] = {}
        # (id space, memo, memo generation, memo state id per id of that space or -1).
        self._space_ids: tuple[weakref.ref[object], FragmentationMemo, int, IntArray] | None = None

    def _gpu_types(self, gpus: int) -> NDArray[np.int8]:
        """(T,) int8: `gpus` for the target workload's types that request GPUs, 0 for the
        others: what taking `gpus` entirely free GPUs removes from each type's count of
        GPUs with its share free (`_type_stats`)."""
        out = self._gpu_type_counts.get(gpus)
        if out is None:
            out = (gpus * (self.memo.typical.gpu_milli > 0)).astype(np.int8)
            self._gpu_type_counts[gpus] = out
        return out

    def _model_of(self, view: NodeView) -> IntArray:
        """The view's GPU model ids, widening the target workload's model columns first if
        the fleet has models it does not know."""
        model = np.asarray(view.gpu_model_id, dtype=np.int64)
        n_models = int(np.maximum.reduce(model)) + 1 if model.size else 0
        if n_models > self.memo.typical.model_allowed.shape[1]:
            padded = _model_columns(self.typical, n_models)
            self.memo = FragmentationMemo(padded, self.constraint_aware)
            self.pressure = _pressure_of(padded)
            self._pressure_any = bool(self.pressure.any())
            self._scarcity_tables.clear()
            self._tables.clear()
            self._gpu_type_counts.clear()
        return model

    def score(self, view: NodeView, c: Constraints, pick: IntArray) -> ScoreResult:
        """Integer FGD scores (as float64) and the GPU bitmask each node would give the pod."""
        # Never reads view.slots: the engine may pass one representative row per state.
        # Never reads `pick` either (`reads_default_pick = False`): it chooses every GPU.
        rows = int(np.asarray(view.cpu_free_millicores).shape[0])
        if rows == 0:
            return ScoreResult(np.zeros(0), np.zeros(0, dtype=np.int64))
        model = self._model_of(view)
        memo = self.memo
        ids = self._state_ids(view, model)
        pod_cpu, pod_milli, pod_num = pod_candidate_shape(
            c.cpu_millicores, c.gpus_per_pod, c.milli_per_gpu
        )
        # A state's score and pick are a function of the state and the pod shape: kept
        # per state, so a state met again (another class, a deeper state of one chunk
        # that is another's first) is not scored again. The same floats: every step below
        # is elementwise or a reduction along one row.
        key = (
            pod_cpu,
            pod_milli,
            pod_num,
            None if c.model_ids is None else np.asarray(c.model_ids).tobytes(),
        )
        score_of, pick_of, known = memo.scored(key)
        # Each state once: engine classes that differ only in what fgd does not read
        # (allocatable, free memory) are one state here (~37 % of the rows on the benchmark).
        todo = ids[~known[ids]]
        if todo.size > 1:  # np.unique's result, sorted then deduplicated
            todo = np.sort(todo)
            todo = todo[np.concatenate(([True], todo[1:] != todo[:-1]))]
        if todo.size:
            score_of[todo], pick_of[todo] = self._score_states(
                c, memo.cpu_of(todo), memo.gpu_of(todo), memo.model_of(todo), todo
            )
            known[todo] = True
        return ScoreResult(score_of[ids], pick_of[ids])

    def _state_ids(self, view: NodeView, model: IntArray) -> IntArray:
        """The memo's state id of each row of `view` (`FragmentationMemo.states`). A view
        whose rows carry ids of another id space (`NodeView.state_ids`, e.g. the engine's
        state classes) is looked up by those where already met: no key interning."""
        memo = self.memo
        sid, space = view.state_ids, view.state_space
        if sid is None or space is None:
            return memo.states(
                np.asarray(view.cpu_free_millicores, dtype=np.int64),
                np.asarray(view.gpu_free_milli, dtype=np.int64),
                model,
            )
        known = self._space_ids
        if known is None or known[0]() is not space or known[1] is not memo:
            try:
                ref = weakref.ref(space)
            except TypeError:  # an id space that cannot be referenced weakly: no table
                self._space_ids = None
                return memo.states(
                    np.asarray(view.cpu_free_millicores, dtype=np.int64),
                    np.asarray(view.gpu_free_milli, dtype=np.int64),
                    model,
                )
            known = self._space_ids = (ref, memo, memo.generation, np.full(64, -1, np.int64))
        table = known[3]
        top = int(np.maximum.reduce(sid)) + 1 if sid.size else 0
        if top > table.size or known[2] != memo.generation:
            grown = np.full(max(top, 2 * table.size), -1, np.int64)
            if known[2] == memo.generation:
                grown[: table.size] = table
            table = grown
            known = self._space_ids = (known[0], memo, memo.generation, table)
        ids: IntArray = table[sid]
        missing = (ids < 0).nonzero()[0]
        if missing.size:
            new = memo.states(
                np.asarray(view.cpu_free_millicores[missing], dtype=np.int64),
                np.asarray(view.gpu_free_milli[missing], dtype=np.int64),
                model[missing],
            )
            if memo.generation != known[2]:  # the memo started afresh: all ids are void
                self._space_ids = None
                return memo.states(
                    np.asarray(view.cpu_free_millicores, dtype=np.int64),
                    np.asarray(view.gpu_free_milli, dtype=np.int64),
                    model,
                )
            ids[missing] = new
            table[sid[missing]] = new
        return ids

    def _score_states(
        self, c: Constraints, cpu_left: IntArray, gpu_left: IntArray, model: IntArray,
        ids: IntArray,
    ) -> tuple[FloatArray, IntArray]:  # fmt: skip
        """Scores (-inf: infeasible) and GPU picks of the memo's states `ids` (their free
        CPU, free milli per GPU and model) for shape c."""
        rows = int(ids.shape[0])
        pod_cpu, pod_milli, pod_num = pod_candidate_shape(
            c.cpu_millicores, c.gpus_per_pod, c.milli_per_gpu
        )
        if 0 < pod_milli < MILLI_PER_GPU and gpu_left.shape[1]:
            share = self._share_scores(
                cpu_left, gpu_left, model, ids, c.model_ids, pod_cpu, pod_milli
            )
            if share is not None:
                return share
            now = self.memo.frag_now(ids)
            after = self.memo.frag_after(ids, pod_cpu, pod_milli, pod_num)
        elif (
            int(np.minimum.reduce(gpu_left, axis=None, initial=0)) < 0
            or int(np.maximum.reduce(gpu_left, axis=None, initial=0)) > MILLI_PER_GPU
        ):
            # Not a state the per-type shortcut covers: candidate states and `frag_milli`.
            cpu_after, gpu_after, valid = candidate_states(
                cpu_left, gpu_left, pod_cpu, pod_milli, pod_num
            )
            now, frag = self.memo.frag_now_with(ids, cpu_after[:, 0], gpu_after[:, 0], model)
            after = np.where(valid, frag[:, None], np.inf)
        else:
            # One candidate per state: a CPU-only pod changes the state's CPU only, whole
            # GPUs go from 1000 milli free to 0 (`candidate_states`), so the candidate's
            # per-type statistics are the state's with k GPUs fewer having any type's share
            # free (a type without GPUs counts every GPU either way; the milli counted below
            # a share is unchanged: 1000 and 0 both count 0), and its fragmentation and the
            # state's own come from them (the same per-type terms: the same floats).
            typical, memo = self.memo.typical, self.memo
            model_row, weights = _type_rows(model, typical, self.constraint_aware)
            count, below = _type_stats(gpu_left, typical)
            total = np.add.reduce(gpu_left, axis=1)
            now = memo.remember_now(ids, count, below, total, cpu_left, model_row, weights, typical)
            if pod_num:
                count = count - self._gpu_types(pod_num)
                total = total - MILLI_PER_GPU * pod_num
            frag = _frag_of_type_stats(
                count, below, total, cpu_left - pod_cpu, model_row, weights, typical
            )
            if pod_num:
                full = gpu_left >= MILLI_PER_GPU
                rank = full.cumsum(axis=1)
                valid = rank[:, -1] >= pod_num
                after = np.where(valid, frag, np.inf)[:, None]
                scores, _ = self._scores(c, cpu_left, gpu_left, model, now, after)
                best = scores[:, 0]
                # The lowest-index entirely free GPUs (`candidate_states`), 0 where too few.
                lowest = (full & (rank <= pod_num)).astype(np.int64) @ _gpu_bits(gpu_left.shape[1])
                gpu_pick = np.where(valid, lowest, 0)
            else:
                scores, _ = self._scores(c, cpu_left, gpu_left, model, now, frag[:, None])
                best = scores[:, 0]
                gpu_pick = np.zeros(rows, dtype=np.int64)
            return np.where(best >= 0, best, -np.inf).astype(np.float64), gpu_pick
        scores, _ = self._scores(c, cpu_left, gpu_left, model, now, after)
        best = np.maximum.reduce(scores, axis=1)
        if pod_num == 0:
            gpu_pick = np.zeros(rows, dtype=np.int64)
        elif 0 < pod_milli < MILLI_PER_GPU:
            column = scores.argmax(axis=1).astype(np.int64)
            gpu_pick = np.where(best >= 0, np.left_shift(np.int64(1), column), 0).astype(np.int64)
        else:
            full = gpu_left >= MILLI_PER_GPU
            take = full & (full.cumsum(axis=1) <= pod_num)
            weights = np.left_shift(np.int64(1), np.arange(gpu_left.shape[1], dtype=np.int64))
            gpu_pick = np.where(
                np.add.reduce(take, axis=1) == pod_num, take.astype(np.int64) @ weights, 0
            )
        return np.where(best >= 0, best, -np.inf).astype(np.float64), gpu_pick.astype(np.int64)

    def _share_scores(
        self, cpu_left: IntArray, gpu_left: IntArray, model: IntArray, ids: IntArray,
        pod_model_ids: NDArray[np.integer] | None, pod_cpu: int, pod_milli: int,
    ) -> tuple[FloatArray, IntArray] | None:  # fmt: skip
        """`_score_states` of a fractional pod through `_share_step` (the same floats, fewer
        numpy calls); None for states the tables do not cover."""
        if (
            int(np.minimum.reduce(gpu_left, axis=None)) < 0
            or int(np.maximum.reduce(gpu_left, axis=None)) > MILLI_PER_GPU
        ):
            return None
        tables = self._share_tables(pod_milli)
        model_row, weights = _type_rows(model, tables.typical, self.constraint_aware)
        total = np.add.reduce(gpu_left, axis=1)
        count, below = _type_stats(gpu_left, tables.typical)
        # The states' fragmentation from the same statistics where the memo lacks it.
        memo = self.memo
        now = memo.remember_now(
            ids, count, below, total, cpu_left, model_row, weights, tables.typical
        )
        stranded = (
            _stranded(total, cpu_left, self.cpu_per_gpu_milli)
            if self.cpu_stranding_weight
            else None
        )
        scarcity = (
            self._scarcity(model, pod_model_ids, pod_milli)[:, None]
            if self.scarcity_weight and self._pressure_any
            else None
        )
        score = self._share_step(
            tables, pod_cpu, pod_milli, cpu_left, gpu_left, total,
            count, below, now, stranded, model_row, weights, scarcity,
        )  # fmt: skip
        best = np.maximum.reduce(score, axis=1)
        ok = best >= 0
        pick = np.where(ok, np.left_shift(np.int64(1), score.argmax(axis=1)), np.int64(0))
        return np.where(ok, best, -np.inf), pick.astype(np.int64)

    def _scores(
        self,
        c: Constraints,
        cpu_left: IntArray,
        gpu_left: IntArray,
        model: IntArray,
        now: FloatArray,
        after: FloatArray,
        stranded: FloatArray | None = None,
        scarcity: FloatArray | None = None,
    ) -> tuple[IntArray, FloatArray | None]:
        """(R, candidates) integer scores from the fragmentation now and after each
        candidate placement (`frag_after`), with fleetd's refinements added to the latter;
        and the CPU-stranded milli after the placement (None without that term).
        `stranded` (the rows' `cpu_stranded_gpu_milli` now) and `scarcity` (the scarcity
        term of the rows and pod) may be passed when already known."""
        pod_cpu, pod_milli, pod_num = pod_candidate_shape(
            c.cpu_millicores, c.gpus_per_pod, c.milli_per_gpu
        )
        later = None
        if self.cpu_stranding_weight:
            idle = np.add.reduce(gpu_left, axis=1)
            request = pod_milli * pod_num
            before = (
                _stranded(idle, cpu_left, self.cpu_per_gpu_milli) if stranded is None else stranded
            )
            later = _stranded(idle - request, cpu_left - pod_cpu, self.cpu_per_gpu_milli)
            after = after + self.cpu_stranding_weight * (later - before)[:, None]
        if self.lookahead_weight and pod_num:
            waste = self.eventual_waste
            if 0 < pod_milli < MILLI_PER_GPU:
                fits = gpu_left >= pod_milli
                delta = waste[np.where(fits, gpu_left - pod_milli, 0)] - waste[gpu_left]
                after = after + self.lookahead_weight * np.where(fits, delta, 0.0)
            else:
                after = after - self.lookahead_weight * pod_num * waste[MILLI_PER_GPU]
        if scarcity is not None:
            after = after + scarcity
        elif self.scarcity_weight and pod_num and self._pressure_any:
            after = after + self._scarcity(model, c.model_ids, pod_milli * pod_num)[:, None]
        return fgd_score(now[:, None], after), later

    def chain(
        self,
        view: NodeView,
        c: Constraints,
        pick: IntArray,
        steps: int,
        carry: tuple[NDArray[np.generic], ...] | None = None,
    ) -> tuple[FloatArray, IntArray, NodeView, tuple[NDArray[np.generic], ...]] | None:
        """`score` of `steps` more pods of a fractional shape c placed one after another on
        every row: the rows take one pod on GPUs `pick` (`NodeView.after`) and are scored,
        then take one on the GPU just picked, and so on. Returns the scores and GPU picks
        of each step, the rows' states after the last, and a `carry` to pass to the call
        continuing from there (empty: nothing is carried); None for other shapes (then call
        `score` step by step).

        The same floats and picks as `score` on each state reached, computed for many steps
        at once, speculatively: fgd's pick is the first GPU that fits almost always (28,391
        of 28,397 picks on the placement benchmark), so the states a row would reach taking
        every pod on its first fitting GPU (closed form) are all scored in one vectorized
        pass (`_share_step`, a step costs per numpy call, not per row), and every pick is
        checked: the steps up to the first pick that differs are kept, the rest computed
        again from the true state.
        """
        pod_cpu, pod_milli, _ = pod_candidate_shape(
            c.cpu_millicores, c.gpus_per_pod, c.milli_per_gpu
        )
        rows = len(view)
        gpus = int(view.gpu_free_milli.shape[1])
        if not 0 < pod_milli < MILLI_PER_GPU or steps < 1 or rows == 0 or gpus == 0:
            return None
        model = self._model_of(view)
        typical, aware = self.memo.typical, self.constraint_aware
        tables = self._share_tables(pod_milli)
        model_row, weights = _type_rows(model, typical, aware)
        scarcity = (
            self._scarcity(model, c.model_ids, pod_milli)[:, None]
            if self.scarcity_weight and self._pressure_any
            else None
        )
        # The first state scored: the rows take one pod on GPUs `pick`.
        cpu = np.asarray(view.cpu_free_millicores, dtype=np.int64) - pod_cpu
        gpu = (
            np.asarray(view.gpu_free_milli, dtype=np.int64)
            - (pick[:, None] >> np.arange(gpus, dtype=np.int64)[None, :] & 1) * pod_milli
        )
        if (
            int(np.minimum.reduce(gpu, axis=None)) < 0
            or int(np.maximum.reduce(gpu, axis=None)) > MILLI_PER_GPU
        ):
            return None  # not a state the tables cover: score step by step
        out_s: list[FloatArray] = []  # (rows, steps) blocks
        out_p: list[IntArray] = []
        got = 0
        index = np.arange(rows)
        while True:
            block = max(1, min(steps - got, _CHAIN_STATES // rows))
            # The states reached taking each pod on the first GPU it fits (a GPU is filled
            # before the next; beyond the GPUs' room a pod takes CPU only): (rows, block).
            room = gpu // pod_milli
            before = room.cumsum(axis=1) - room
            ahead = np.arange(block, dtype=np.int64)
            taken = np.minimum(
                np.maximum(ahead[None, :, None] - before[:, None, :], 0), room[:, None, :]
            )
            states_gpu = (gpu[:, None, :] - taken * pod_milli).reshape(rows * block, gpus)
            states_cpu = (cpu[:, None] - ahead[None, :] * pod_cpu).reshape(-1)
            each = index.repeat(block)
            total = np.add.reduce(states_gpu, axis=1)
            count, below = _type_stats(states_gpu, typical)
            rows_model = model_row.take(each)
            rows_weights = None if weights is None else weights.take(each, axis=0)
            now = _frag_of_type_stats(
                count, below, total, states_cpu, rows_model, rows_weights, typical
            )
            stranded = (
                _stranded(total, states_cpu, self.cpu_per_gpu_milli)
                if self.cpu_stranding_weight
                else None
            )
            score = self._share_step(
                tables, pod_cpu, pod_milli, states_cpu, states_gpu, total, count, below, now,
                stranded, rows_model, rows_weights,
                None if scarcity is None else scarcity.take(each, axis=0),
            )  # fmt: skip
            best = np.maximum.reduce(score, axis=1).reshape(rows, block)
            column = score.argmax(axis=1).reshape(rows, block)
            ok = best >= 0
            fits = (states_gpu >= pod_milli).reshape(rows, block, gpus)
            guessed = fits.argmax(axis=2)
            # Steps whose state is right: those up to the first pick that is not the guess.
            right = (ok == np.logical_or.reduce(fits, axis=2)) & (~ok | (column == guessed))
            wrong = (~np.logical_and.reduce(right, axis=0)).nonzero()[0]
            done = block if wrong.size == 0 else int(wrong[0]) + 1
            scores = np.where(ok, best, -np.inf)[:, :done]
            picks = np.where(ok, np.left_shift(np.int64(1), column), np.int64(0))[:, :done]
            out_s.append(scores)
            out_p.append(picks)
            got += done
            # The state scored last, and (if more steps) the one its pick reaches.
            at = index * block + (done - 1)
            gpu, cpu = states_gpu.take(at, axis=0), states_cpu.take(at)
            if got == steps:
                break
            last_ok, last_column = ok[:, done - 1], column[:, done - 1]
            gpu = gpu.copy()
            gpu[index[last_ok], last_column[last_ok]] -= pod_milli
            cpu = cpu - pod_cpu
        last = NodeView(
            slots=view.slots,
            cpu_free_millicores=cpu,
            memory_free_bytes=view.memory_free_bytes - steps * c.memory_bytes,
            cpu_allocatable_millicores=view.cpu_allocatable_millicores,
            memory_allocatable_bytes=view.memory_allocatable_bytes,
            gpu_free_milli=gpu.astype(view.gpu_free_milli.dtype),
            gpu_usable=view.gpu_usable,
            gpu_model_id=view.gpu_model_id,
        )
        if len(out_s) == 1:
            return out_s[0].T, out_p[0].T, last, ()
        return np.concatenate(out_s, axis=1).T, np.concatenate(out_p, axis=1).T, last, ()

    def _share_step(
        self, tables: _ShareTables, pod_cpu: int, pod_milli: int, cpu: IntArray,
        gpu: IntArray, total: IntArray, count: NDArray[np.int8], below: FloatArray,
        now: FloatArray, stranded: FloatArray | None, model_row: IntArray,
        weights: FloatArray | None, scarcity: FloatArray | None,
    ) -> IntArray:  # fmt: skip
        """One fractional pod (pod_cpu, pod_milli) on each GPU of R states (free CPU, free
        milli per GPU (R, G), total idle milli; per-type statistics count and below (R, T),
        `_type_stats`; fragmentation `now`; CPU-stranded milli (None: no such term);
        `_type_rows`; the scarcity term (R, 1) or None). Returns (R, G) integer scores, -1
        where the share does not fit or the GPU is not the first with its share: from the
        floats of `frag_after`, `_scores` and `fgd_score`, so the same best score and first
        GPU with it per row."""
        typical = tables.typical
        rows, gpus = gpu.shape
        cpu_after = cpu - pod_cpu
        total_after = total - pod_milli
        # Only the first GPU of each free share in a row is a candidate of its own: GPUs
        # with the same share give the same state (a node's idle GPUs are mostly alike),
        # and the first is the one picked on a tie. The others score -1 below.
        fits = gpu >= pod_milli
        if gpus > 1:
            fits &= (gpu[:, :, None] == gpu[:, None, :]).argmax(axis=2) == np.arange(gpus)
        row, col = fits.nonzero()
        share = gpu[row, col]
        # Type t is hosted after the pod where the node's model and CPU allow it and enough
        # GPUs have t's share free (`_frag_of_stats`); "not allowed" is a GPU count no node
        # reaches.
        need = _need(model_row, cpu_after, typical)
        # count + delta >= need, with need - count per row (int8: need <= 127, count >= 0).
        hosts = tables.count_delta.take(share, axis=0) >= (need - count).take(row, axis=0)
        fallback = total_after.astype(np.float64).take(row)[:, None]
        per_type = np.where(
            hosts, below.take(row, axis=0) + tables.below_delta.take(share, axis=0), fallback
        )
        per_type *= typical.freq if weights is None else weights.take(row, axis=0)
        # Summed along each C-ordered row: the same bits as `frag_after`.
        raw_k = np.add.reduce(per_type, axis=1)
        after = raw_k
        if stranded is not None:
            later = _stranded(total_after, cpu_after, self.cpu_per_gpu_milli)
            after = after + (self.cpu_stranding_weight * (later - stranded)).take(row)
        if tables.lookahead is not None:
            after = after + tables.lookahead.take(share)
        if scarcity is not None:
            after = after + scarcity[:, 0].take(row)
        # `fgd_score`: exp(-(now - after) / 1000) is exp((after - now) / 1000) bit for bit
        # (IEEE rounding is symmetric).
        score_k = (100.0 / (1.0 + np.exp((after - now.take(row)) / 1000.0))).astype(np.int64)
        score: IntArray = np.empty((rows, gpus), np.int64)
        score.fill(-1)
        score[row, col] = score_k
        return score

    def _share_tables(self, pod_milli: int) -> _ShareTables:
        """`_ShareTables` of a fractional request against the current target workload."""
        key = int(pod_milli)
        tables = self._tables.get(key)
        if tables is None or tables.typical is not self.memo.typical:
            waste = self.eventual_waste if self.lookahead_weight else None
            tables = _ShareTables.of(self.memo.typical, key, waste, self.lookahead_weight)
            self._tables[key] = tables
        return tables

    def _scarcity(
        self, model: IntArray, pod_model_ids: NDArray[np.integer] | None, request_milli: int
    ) -> FloatArray:
        """scarcity_weight x `scarcity_milli`, from a table per GPU model kept per (models
        the pod accepts, request): the same floats, one gather per call."""
        key = (
            None if pod_model_ids is None else np.asarray(pod_model_ids).tobytes(),
            request_milli,
        )
        table = self._scarcity_tables.get(key)
        if table is None:
            n_models = self.pressure.shape[0]
            # One row per model id and one for "no GPU model" (last), as scarcity_milli
            # computes them: ids beyond the pressure table read its last entry.
            ids = np.concatenate([np.arange(n_models), [-1]]).astype(np.int64)
            per = scarcity_milli(self.pressure, ids, pod_model_ids, request_milli)
            table = self._scarcity_tables[key] = self.scarcity_weight * per
        n = table.shape[0] - 1
        out: FloatArray = table[np.where(model >= 0, np.minimum(model, max(n - 1, 0)), n)]
        return out


def _pressure_of(typical: TypicalPods) -> FloatArray:
    if typical.model_pressure is None:
        return np.zeros(typical.model_allowed.shape[1])
    return np.asarray(typical.model_pressure, dtype=np.float64)


def scarcity_milli(
    pressure: FloatArray,
    node_model: NDArray[np.integer],
    pod_model_ids: NDArray[np.integer] | None,
    request_milli: int,
) -> FloatArray:
    """(n,) GPU milli of pinned demand a pod displaces on each node: request x (pressure of
    the node's model - the lowest pressure among the models the pod accepts).

    pressure: (n_models,) `model_pressure`; node_model: (n,) model id per node;
    pod_model_ids: models the pod accepts (None = any; ids < 0 unknown to the fleet).
    A pod pinned to one model pays 0 everywhere: it has no choice to make.
    """
    n_models = pressure.shape[0]
    accepted = np.arange(n_models) if pod_model_ids is None else np.asarray(pod_model_ids)
    accepted = accepted[(accepted >= 0) & (accepted < n_models)]
    floor = float(pressure[accepted].min()) if accepted.size else 0.0
    model = np.asarray(node_model, dtype=np.int64)
    here = np.where(model >= 0, pressure[np.clip(model, 0, max(n_models - 1, 0))], floor)
    out: FloatArray = float(request_milli) * np.maximum(here - floor, 0.0)
    return out


def _fgd(typical: TypicalPods) -> FragmentationScorer:
    return FragmentationScorer(typical, 0.0, name="fgd")


def _fgd_cpu(typical: TypicalPods, cpu_stranding_weight: float = 1.0) -> FragmentationScorer:
    return FragmentationScorer(typical, cpu_stranding_weight, name="fgd-cpu")


def _fgd_plus(
    typical: TypicalPods,
    cpu_stranding_weight: float = 1.0,
    lookahead_weight: float = 0.25,
    scarcity_weight: float = 1.0,
    constraint_aware: bool = True,
) -> FragmentationScorer:
    return FragmentationScorer(
        typical, cpu_stranding_weight, "fgd-plus", lookahead_weight, scarcity_weight,
        constraint_aware,
    )  # fmt: skip


register_scorer("fgd", _fgd, replace=True)
register_scorer("fgd-cpu", _fgd_cpu, replace=True)
register_scorer("fgd-plus", _fgd_plus, replace=True)
