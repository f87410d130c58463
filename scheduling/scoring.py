"""Score plugins: named, weighted, chosen from a policy value; higher score is better.

A plugin scores every candidate node of a `NodeView` for one pod shape at once and may also
choose *which GPU(s)* of each node the pod takes (`ScoreResult.gpu_pick`, a bitmask per
node): for fractional pods that choice is part of the policy. A policy is a weighted sum of
plugins; the first plugin that chooses GPUs (`chooses_gpus = True`) runs first and the
others score its choice. Without one, a share goes to the best-fitting GPU (least free
share that fits, lowest index) and whole GPUs are the lowest-index free ones.

Plugins must be *node-local*: a node's score depends only on that node's state and the
pod (plus constants held by the plugin, such as FGD's target workload). The engine relies
on it to re-score only the node that just received a pod.

Register more plugins with `register_scorer(name, factory)`; `Policy.parse("fgd")` or
`Policy.parse({"best-fit": 1, "dot-product": 0.5})` builds a policy from config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from scheduling.filters import Constraints, Free
from scheduling.fleet import GPU_MILLI, Fleet

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class NodeView:
    """Candidate nodes (R rows) as seen by score plugins.

    slots: (R,) int64 fleet slots; cpu_free_millicores, memory_free_bytes: (R,) int64
    (before this pod); cpu_allocatable_millicores, memory_allocatable_bytes: (R,) int64;
    gpu_free_milli: (R, G) int32 free share per GPU (0 for unhealthy or missing GPUs);
    gpu_usable: (R, G) bool GPU exists and is healthy; gpu_model_id: (R,) int16.
    state_ids, state_space: optionally, each row's node state as an id within the id space
    `state_space` (an object, e.g. one `place` call's state classes): rows with equal ids
    are in the same state and an id never denotes another state, so a state-only plugin
    may key what it remembers by them. None when unknown (views of hypothetical states).
    """

    slots: I64
    cpu_free_millicores: I64
    memory_free_bytes: I64
    cpu_allocatable_millicores: I64
    memory_allocatable_bytes: I64
    gpu_free_milli: NDArray[np.int32]
    gpu_usable: NDArray[np.bool_]
    gpu_model_id: NDArray[np.int16]
    state_ids: I64 | None = None
    state_space: object | None = None

    @classmethod
    def of(
        cls, fleet: Fleet, free: Free, rows: I64, usable_all: NDArray[np.bool_] | None = None
    ) -> NodeView:
        """Gather the candidate rows from the fleet and the engine's free arrays
        (`usable_all`: `gpu_usable_matrix(fleet)` if already computed)."""
        usable = (gpu_usable_matrix(fleet) if usable_all is None else usable_all)[rows]
        return cls(
            slots=rows,
            cpu_free_millicores=free.cpu_millicores[rows],
            memory_free_bytes=free.memory_bytes[rows],
            cpu_allocatable_millicores=fleet.cpu_allocatable_millicores[rows],
            memory_allocatable_bytes=fleet.memory_allocatable_bytes[rows],
            gpu_free_milli=free.gpu_milli[rows],
            gpu_usable=usable,
            gpu_model_id=fleet.gpu_model_id[rows],
        )

    def __len__(self) -> int:
        return int(self.slots.size)

    @cached_property
    def gpu_free_total(self) -> I64:
        """(R,) int64 free milli-GPU summed over the node's usable GPUs."""
        return row_sum(self.gpu_free_milli)

    @cached_property
    def gpu_usable_count(self) -> I64:
        """(R,) int64 number of usable GPUs."""
        return row_sum(self.gpu_usable)

    @cached_property
    def gpu_capacity_milli(self) -> I64:
        """(R,) int64 milli-GPU of the node's usable GPUs (1000 each)."""
        return self.gpu_usable_count * GPU_MILLI

    @cached_property
    def gpu_fully_free(self) -> I64:
        """(R,) int64 number of GPUs with all 1000 milli free."""
        return row_sum(self.gpu_free_milli == GPU_MILLI)

    def take(self, idx: I64) -> NodeView:
        """The sub-view of rows `idx` (`take`: the same rows as fancy indexing, faster)."""
        return NodeView(
            self.slots.take(idx),
            self.cpu_free_millicores.take(idx),
            self.memory_free_bytes.take(idx),
            self.cpu_allocatable_millicores.take(idx),
            self.memory_allocatable_bytes.take(idx),
            self.gpu_free_milli.take(idx, axis=0),
            self.gpu_usable.take(idx, axis=0),
            self.gpu_model_id.take(idx),
        )

    def after(self, c: Constraints, pick: I64) -> NodeView:
        """The view once each row has received one more pod of shape `c` on GPUs `pick`."""
        gpu = self.gpu_free_milli
        if c.gpus_per_pod:
            gpu = gpu - (pick_bits(pick, gpu.shape[1]) * c.milli_per_gpu).astype(np.int32)
        return NodeView(
            self.slots,
            self.cpu_free_millicores - c.cpu_millicores,
            self.memory_free_bytes - c.memory_bytes,
            self.cpu_allocatable_millicores,
            self.memory_allocatable_bytes,
            gpu,
            self.gpu_usable,
            self.gpu_model_id,
        )


def gpu_usable_matrix(fleet: Fleet) -> NDArray[np.bool_]:
    """(n_slots, max_gpus) bool: the GPU exists and is healthy."""
    n, g = fleet.n_slots, fleet.max_gpus
    count = fleet.gpu_count[:n].astype(np.int64)
    bad = fleet.gpu_unhealthy_mask[:n]
    idx = np.arange(g, dtype=np.int64)
    usable = (idx[None, :] < count[:, None]) & (((bad[:, None] >> idx[None, :]) & 1) == 0)
    return np.asarray(usable, np.bool_)


def gpu_usable_rows(fleet: Fleet, rows: I64) -> NDArray[np.bool_]:
    """(R, max_gpus) bool: `gpu_usable_matrix` for the slots `rows` only."""
    count = fleet.gpu_count[rows].astype(np.int64)
    bad = fleet.gpu_unhealthy_mask[rows]
    idx = np.arange(fleet.max_gpus, dtype=np.int64)
    usable = (idx[None, :] < count[:, None]) & (((bad[:, None] >> idx[None, :]) & 1) == 0)
    return np.asarray(usable, np.bool_)


def pick_bits(pick: I64, gpus: int) -> NDArray[np.int64]:
    """(R, gpus) 0/1 matrix of the GPU bitmasks `pick`."""
    return (pick[:, None] >> np.arange(gpus, dtype=np.int64)[None, :]) & 1


def row_sum(a: NDArray[Any]) -> I64:
    """(R, G) -> (R,) int64 sums over the GPU axis. numpy reduces a short trailing axis
    slowly (`sum(axis=1)`); an integer matrix product with ones is exact and several times
    faster."""
    return np.asarray(a @ _ones(a.shape[1]), np.int64)


def _ones(g: int) -> I64:
    ones = _ONES.get(g)
    if ones is None:
        ones = _ONES[g] = np.ones(g, np.int64)
    return ones


_ONES: dict[int, I64] = {}
#: Below this many rows, 2-D numpy calls (fewer, each slower per element) are cheaper.
_SMALL = 512


def row_any(a: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """(R, G) bool -> (R,) bool: any over the GPU axis (see row_sum)."""
    return np.asarray(row_sum(a) > 0, np.bool_)


def default_gpu_pick(view: NodeView, c: Constraints) -> I64:
    """(R,) int64 GPU bitmask per node: a share goes to the GPU with the least free share
    that still fits (best fit, lowest index on ties); whole GPUs are the lowest-index
    entirely free ones. 0 for CPU-only pods or nodes where the pod does not fit."""
    r = len(view)
    if c.gpus_per_pod == 0 or r == 0:
        return np.zeros(r, np.int64)
    free = view.gpu_free_milli
    g = free.shape[1]
    if c.milli_per_gpu < GPU_MILLI:
        # min over GPUs of (free * 64 + index) among those that fit: least free share,
        # then lowest index, in one comparison per column.
        none = np.int64(1) << 40
        if r < _SMALL:
            f64 = free.astype(np.int64)
            key = np.where(f64 >= c.milli_per_gpu, f64 * 64 + np.arange(g), none)
            best = key.min(axis=1) if g else np.full(r, none, np.int64)
        else:
            best = np.full(r, none, np.int64)
            for i in range(g):
                col = free[:, i].astype(np.int64)
                np.minimum(best, np.where(col >= c.milli_per_gpu, col * 64 + i, none), out=best)
        return np.where(best < none, np.left_shift(np.int64(1), best & 63), 0).astype(np.int64)
    # Whole GPUs: bitmask of entirely free GPUs, then its lowest `gpus_per_pod` set bits.
    if r < _SMALL:
        weights = np.left_shift(np.int64(1), np.arange(g, dtype=np.int64))
        whole = (free == GPU_MILLI).astype(np.int64) @ weights
    else:
        whole = np.zeros(r, np.int64)
        for i in range(g):
            whole |= (free[:, i] == GPU_MILLI).astype(np.int64) << i
    pick = np.zeros(r, np.int64)
    rest = whole
    for _ in range(c.gpus_per_pod):
        low = rest & -rest
        pick |= low
        rest = rest ^ low
    return np.where(np.bitwise_count(pick) == c.gpus_per_pod, pick, 0).astype(np.int64)


@dataclass(frozen=True, eq=False)
class ScoreResult:
    """Scores (R,) float64, higher better (built-ins use 0..100), and optionally the GPU
    bitmask each node would give the pod (None: keep the engine's choice)."""

    score: F64
    gpu_pick: I64 | None = None


@runtime_checkable
class ScorePlugin(Protocol):
    """A named, node-local score. `chooses_gpus` plugins return `gpu_pick`.

    Optional attribute `state_only = True` promises that the score depends on the node's
    state only (not on `view.slots`); the engine then scores each distinct node state once
    and a view may hold a representative slot for many nodes. Views may also hold the same
    slot several times (hypothetical states of one node, when no plugin chooses GPUs).
    Optional attribute `reads_default_pick = False` (a `chooses_gpus` plugin) says its score
    and choice never read the `pick` it is given (the engine then skips computing it).
    Optional attribute `default_whole_gpus = True` (a `chooses_gpus` plugin) promises that
    for whole-GPU pods `gpu_pick` is the default choice (the lowest-index entirely free
    GPUs, 0 where they are too few): the engine then computes deeper states of such pods in
    closed form rather than pod by pod.
    """

    name: str
    chooses_gpus: bool

    def score(self, view: NodeView, c: Constraints, pick: I64) -> ScoreResult:
        """Score each row of `view` for one pod of shape `c` taking GPUs `pick`."""
        ...


# ---- helpers shared by the built-in plugins ---------------------------------------------


def _ratio100(num: I64, den: I64) -> F64:
    # num * 100 / den, 0 where den is 0; one float multiply then one divide, in this order
    # (reference.py repeats the same operations so both produce identical floats).
    out = np.zeros(num.shape, np.float64)
    np.divide(num * 100.0, den, out=out, where=den > 0)
    return out


def _gpu_totals(view: NodeView) -> tuple[I64, I64]:
    return view.gpu_free_total, view.gpu_capacity_milli


class _Builtin:
    name: str = ""
    chooses_gpus: bool = False
    #: The score depends only on the node's state (resources, allocatable, GPU model and
    #: health), never on which slot it is: the engine may then score one node per state.
    state_only: bool = True


class LeastAllocated(_Builtin):
    """Spread (kube-scheduler NodeResourcesFit LeastAllocated): the mean over CPU, memory
    and, for GPU pods, GPU of free-after-placement / allocatable x 100."""

    name = "least-allocated"

    def score(self, view: NodeView, c: Constraints, pick: I64) -> ScoreResult:
        # e.g. cpu 8000 of 16000 free, pod 2000: (8000-2000)*100/16000 = 37.5
        total = _ratio100(
            view.cpu_free_millicores - c.cpu_millicores, view.cpu_allocatable_millicores
        )
        total = total + _ratio100(
            view.memory_free_bytes - c.memory_bytes, view.memory_allocatable_bytes
        )
        n = 2.0
        if c.gpus_per_pod:
            gfree, gtotal = _gpu_totals(view)
            total = total + _ratio100(gfree - c.gpus_per_pod * c.milli_per_gpu, gtotal)
            n = 3.0
        return ScoreResult(total / n)


class MostAllocated(_Builtin):
    """Pack (kube-scheduler MostAllocated): the mean of used-after-placement / allocatable
    x 100 over CPU, memory and, for GPU pods, GPU."""

    name = "most-allocated"

    def score(self, view: NodeView, c: Constraints, pick: I64) -> ScoreResult:
        cpu_a, mem_a = view.cpu_allocatable_millicores, view.memory_allocatable_bytes
        total = _ratio100(cpu_a - view.cpu_free_millicores + c.cpu_millicores, cpu_a)
        total = total + _ratio100(mem_a - view.memory_free_bytes + c.memory_bytes, mem_a)
        n = 2.0
        if c.gpus_per_pod:
            gfree, gtotal = _gpu_totals(view)
            total = total + _ratio100(gtotal - gfree + c.gpus_per_pod * c.milli_per_gpu, gtotal)
            n = 3.0
        return ScoreResult(total / n)


class BestFit(_Builtin):
    """Best fit as in the FGD artifact's BestFitScore: 100 x (1 - (0.5 (cpu_free - cpu_req)
    / max_cpu + 0.5 (gpu_free - gpu_req) / max_gpu)): the node left with the least
    (normalized) CPU and GPU wins. max_* are fleet-wide constants, keeping it node-local."""

    name = "best-fit"

    def __init__(self, max_cpu_millicores: int = 128_000, max_gpu_milli: int = 8 * GPU_MILLI):
        if max_cpu_millicores <= 0 or max_gpu_milli <= 0:
            raise ValueError("best-fit: max_cpu_millicores and max_gpu_milli must be > 0")
        self.max_cpu_millicores = float(max_cpu_millicores)
        self.max_gpu_milli = float(max_gpu_milli)

    def score(self, view: NodeView, c: Constraints, pick: I64) -> ScoreResult:
        # e.g. cpu left 64000-8000=56000, gpu left 8000-1000=7000 (max 128000, 8000):
        # 100 * (1 - (56000/128000*0.5 + 7000/8000*0.5)) = 100 * (1 - 0.65625) = 34.375
        gfree, _ = _gpu_totals(view)
        cpu_left = (view.cpu_free_millicores - c.cpu_millicores) / self.max_cpu_millicores * 0.5
        gpu_left = (gfree - c.gpus_per_pod * c.milli_per_gpu) / self.max_gpu_milli * 0.5
        return ScoreResult(100.0 * (1.0 - (cpu_left + gpu_left)))


class DotProduct(_Builtin):
    """Tetris alignment (Grandl et al., SIGCOMM'14) with the FGD artifact's sign: the dot
    product of the node's free vector and the pod's demand vector, both normalized by the
    node's capacity, over CPU, memory and GPU; a large product means the pod would sit in
    a roomy node, so the score is 100 x (1 - dot / dims) and snug nodes win."""

    name = "dot-product"

    def score(self, view: NodeView, c: Constraints, pick: I64) -> ScoreResult:
        # e.g. cpu 8000/16000 free, pod 4000; mem 32/64 GiB free, pod 16 GiB; no GPU:
        # dot = (8000/16000)*(4000/16000) + (32/64)*(16/64) = 0.125 + 0.125 = 0.25,
        # score = 100 * (1 - 0.25/2) = 87.5
        cpu_a = view.cpu_allocatable_millicores.astype(np.float64)
        mem_a = view.memory_allocatable_bytes.astype(np.float64)
        safe_cpu = np.where(cpu_a > 0, cpu_a, 1.0)
        safe_mem = np.where(mem_a > 0, mem_a, 1.0)
        dot = (view.cpu_free_millicores / safe_cpu) * (c.cpu_millicores / safe_cpu)
        dot = dot + (view.memory_free_bytes / safe_mem) * (c.memory_bytes / safe_mem)
        dims = 2.0
        if c.gpus_per_pod:
            gfree, gtotal = _gpu_totals(view)
            gt = np.where(gtotal > 0, gtotal, 1).astype(np.float64)
            dot = dot + (gfree / gt) * ((c.gpus_per_pod * c.milli_per_gpu) / gt)
            dims = 3.0
        return ScoreResult(100.0 * (1.0 - dot / dims))


class GpuPacking(_Builtin):
    """GPU packing as in the FGD artifact's GpuPackingScore, three tiers:
    1. the pod fits on GPUs already in use: 100 - (free % of the chosen GPUs) / 10, >= 50;
    2. it needs entirely free GPUs on a node in use: 50 - (free GPUs it takes), >= 33;
    3. the node is entirely idle: 33 - idle GPUs, >= idle GPUs.
    CPU-only pods score 0 everywhere. Uses the engine's best-fit GPU choice."""

    name = "gpu-packing"

    def score(self, view: NodeView, c: Constraints, pick: I64) -> ScoreResult:
        r = len(view)
        if c.gpus_per_pod == 0 or view.gpu_free_milli.shape[1] == 0:
            return ScoreResult(np.zeros(r))
        fully_free = view.gpu_fully_free
        if c.milli_per_gpu < GPU_MILLI:
            # A share takes one GPU: bit index of the pick = popcount(pick - 1).
            idx = np.minimum(np.bitwise_count(pick - 1), view.gpu_free_milli.shape[1] - 1)
            at = view.gpu_free_milli[np.arange(r), idx.astype(np.intp)].astype(np.int64)
            taken_full = (at == GPU_MILLI).astype(np.int64)
            # e.g. share 300 on a GPU with 400 free: 400*100//1000 = 40, 100 - 40//10 = 96
            tier1 = np.maximum(100 - (at * 100 // GPU_MILLI) // 10, 50)
        else:  # whole GPUs are always entirely free ones
            taken_full = np.full(r, c.gpus_per_pod, np.int64)
            tier1 = np.zeros(r, np.int64)
        tier2 = np.maximum(50 - taken_full, 33)
        tier3 = np.maximum(33 - fully_free, fully_free)
        idle = fully_free == view.gpu_usable_count
        score = np.where(idle, tier3, np.where(taken_full > 0, tier2, tier1))
        return ScoreResult(score.astype(np.float64))


class GpuClustering(_Builtin):
    """GPU clustering (after the FGD artifact's GpuClusteringScore): put shares of the same
    size together. fleetd does not record pod types per GPU, so a GPU in use "has the pod's
    affinity" when its used share is a multiple of the pod's share. Tiers of 25 points:
    (75, 100] every GPU in use matches; (50, 75] some do; (25, 50] idle node; [0, 25]
    none match; within a tier, 25 x GPU share in use / max_gpu_milli. CPU-only pods: 0."""

    name = "gpu-clustering"

    def __init__(self, max_gpu_milli: int = 8 * GPU_MILLI):
        if max_gpu_milli <= 0:
            raise ValueError("gpu-clustering: max_gpu_milli must be > 0")
        self.max_gpu_milli = float(max_gpu_milli)

    def score(self, view: NodeView, c: Constraints, pick: I64) -> ScoreResult:
        r = len(view)
        if c.gpus_per_pod == 0:
            return ScoreResult(np.zeros(r))
        free = view.gpu_free_milli.astype(np.int64)
        used = np.where(view.gpu_usable, GPU_MILLI - free, 0)
        in_use = used > 0
        same = in_use & (used % c.milli_per_gpu == 0)
        n_in_use = row_sum(in_use)
        n_same = row_sum(same)
        tier = np.where(
            n_in_use == 0, 1.0, np.where(n_same == n_in_use, 3.0, np.where(n_same > 0, 2.0, 0.0))
        )
        gfree, _ = _gpu_totals(view)
        # e.g. 8 GPUs, 2 in use with 500 each (pod share 250): tier 3,
        # 25 * (8000 - 7000) / 8000 + 75 = 78.125
        within = 25.0 * (self.max_gpu_milli - gfree) / self.max_gpu_milli
        return ScoreResult(within + 25.0 * tier)


_MASK64 = (1 << 64) - 1


class RandomScore(_Builtin):
    """Seeded pseudo-random scores in [0, 100): a hash of (seed, slot, node's free CPU and
    GPU share), so it is deterministic and still changes as a node fills up."""

    name = "random"
    state_only = False  # hashes the slot

    def __init__(self, seed: int = 42):
        self.seed = int(seed) & _MASK64

    def score(self, view: NodeView, c: Constraints, pick: I64) -> ScoreResult:
        gfree, _ = _gpu_totals(view)
        x = (
            view.slots.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            ^ view.cpu_free_millicores.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
            ^ gfree.astype(np.uint64) * np.uint64(0x94D049BB133111EB)
            ^ np.uint64(self.seed)
        )
        x ^= x >> np.uint64(31)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(29)
        return ScoreResult((x >> np.uint64(11)).astype(np.float64) * (100.0 / 2.0**53))


# ---- registry and policy --------------------------------------------------------------

ScorerFactory = Callable[..., ScorePlugin]

_REGISTRY: dict[str, ScorerFactory] = {
    "least-allocated": LeastAllocated,
    "most-allocated": MostAllocated,
    "best-fit": BestFit,
    "dot-product": DotProduct,
    "gpu-packing": GpuPacking,
    "gpu-clustering": GpuClustering,
    "random": RandomScore,
}

#: Alternative spellings accepted in config.
ALIASES: dict[str, str] = {
    "spread": "least-allocated",
    "pack": "most-allocated",
    "bestfit": "best-fit",
    "dotprod": "dot-product",
    "packing": "gpu-packing",
    "clustering": "gpu-clustering",
}


def register_scorer(name: str, factory: ScorerFactory, *, replace: bool = False) -> None:
    """Make a plugin available to `Policy.parse` under `name` (e.g. "fgd")."""
    if not name or name in ALIASES:
        raise ValueError(f"invalid scorer name {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"scorer {name!r} is already registered")
    _REGISTRY[name] = factory


def scorer_names() -> list[str]:
    """Registered plugin names, sorted."""
    return sorted(_REGISTRY)


def make_scorer(name: str, **params: Any) -> ScorePlugin:
    """Build a registered plugin by name (or alias) with keyword parameters."""
    canonical = ALIASES.get(name, name)
    factory = _REGISTRY.get(canonical)
    if factory is None:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(scorer_names())}")
    try:
        return factory(**params)
    except TypeError as exc:
        raise ValueError(f"scorer {name!r}: bad parameters {params}: {exc}") from None


@dataclass(frozen=True, eq=False)
class Policy:
    """A weighted sum of score plugins: score = sum(weight_i * score_i), in term order."""

    terms: tuple[tuple[ScorePlugin, float], ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("a policy needs at least one score plugin")
        for plugin, weight in self.terms:
            if not isinstance(plugin, ScorePlugin):
                raise TypeError(f"{plugin!r} is not a ScorePlugin")
            if not np.isfinite(weight):
                raise ValueError(f"weight of {plugin.name!r} must be finite")

    @classmethod
    def parse(
        cls,
        spec: str | Mapping[str, float] | Sequence[tuple[str, float]],
        params: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Policy:
        """From config: "best-fit", "gpu-packing:2,best-fit:1", {"best-fit": 1.0} or pairs.

        `params` gives keyword parameters per plugin name.
        """
        pairs: list[tuple[str, float]] = []
        if isinstance(spec, str):
            for part in spec.split(","):
                part = part.strip()
                if not part:
                    continue
                name, _, weight = part.partition(":")
                try:
                    pairs.append((name.strip(), float(weight) if weight else 1.0))
                except ValueError:
                    raise ValueError(f"bad weight in policy term {part!r}") from None
        elif isinstance(spec, Mapping):
            pairs = [(str(k), float(v)) for k, v in spec.items()]
        else:
            pairs = [(str(k), float(v)) for k, v in spec]
        params = params or {}
        terms = tuple((make_scorer(n, **dict(params.get(n, {}))), w) for n, w in pairs)
        return cls(terms)

    @property
    def name(self) -> str:
        """ "name:weight,..." as `parse` accepts it."""
        return ",".join(f"{p.name}:{w:g}" for p, w in self.terms)

    @cached_property
    def chooser(self) -> ScorePlugin | None:
        """The plugin choosing GPUs: the first with `chooses_gpus`, if any."""
        return next((p for p, _ in self.terms if p.chooses_gpus), None)

    def evaluate(self, view: NodeView, c: Constraints) -> tuple[F64, I64]:
        """Combined score (R,) float64 and GPU bitmask (R,) int64 for each row of `view`."""
        chooser = self.chooser
        results: dict[int, ScoreResult] = {}
        if chooser is not None and c.gpus_per_pod:
            # The default choice is what a chooser gets to start from, unless it declares
            # it never reads it (then it is only computed if the chooser makes no choice).
            reads = getattr(chooser, "reads_default_pick", True)
            pick = default_gpu_pick(view, c) if reads else np.zeros(len(view), np.int64)
            res = chooser.score(view, c, pick)
            if res.gpu_pick is not None:
                pick = res.gpu_pick.astype(np.int64)
            elif not reads:
                pick = default_gpu_pick(view, c)
            results[id(chooser)] = res
        else:
            pick = default_gpu_pick(view, c)
        if len(self.terms) == 1:
            plugin, weight = self.terms[0]
            res = results.get(id(plugin)) or plugin.score(view, c, pick)
            # The sum below for one term, 0.0 + weight x score, in one or two calls: the same
            # floats (x + 0.0 is 0.0 + x, and 1.0 x score is the score).
            scaled = res.score if weight == 1.0 else weight * res.score
            return np.add(scaled, 0.0, dtype=np.float64), pick
        total = np.zeros(len(view), np.float64)
        for plugin, weight in self.terms:
            res = results.get(id(plugin)) or plugin.score(view, c, pick)
            total = total + weight * res.score
        return total, pick

    def chain(
        self,
        view: NodeView,
        c: Constraints,
        pick: I64,
        steps: int,
        carry: tuple[F64, ...] | None = None,
    ) -> tuple[F64, I64, NodeView, tuple[F64, ...] | None]:
        """`steps` more pods of shape c on every row of `view`, one after another: each row
        takes one pod on GPUs `pick` and is scored (`evaluate`), then takes one on the GPUs
        just picked, and so on. Returns each step's scores and picks ((steps, R) each), the
        rows' states after
        the last step, and a `carry` (None, or per-row arrays) to pass to the call that
        continues from that state with the last picks (subset like the rows, if some are
        dropped). A policy of one GPU-choosing plugin uses the plugin's own
        `chain(view, c, pick, steps, carry)` when it has one (the same results, with less
        work per step; it may return None to decline)."""
        if len(self.terms) == 1 and c.gpus_per_pod:
            plugin, weight = self.terms[0]
            fast = getattr(plugin, "chain", None) if plugin.chooses_gpus else None
            got = fast(view, c, pick, steps, carry) if fast is not None else None
            if got is not None:
                scores, picks, last, out_carry = got
                # The same floats as `evaluate` (all steps at once).
                scaled = scores if weight == 1.0 else weight * scores
                return np.add(scaled, 0.0, dtype=np.float64), picks, last, out_carry
        out_s: list[F64] = []
        out_p: list[I64] = []
        v = view
        for _ in range(steps):
            v = v.after(c, pick)
            s, pick = self.evaluate(v, c)
            out_s.append(s)
            out_p.append(pick)
        rows = len(view)
        return (
            np.asarray(out_s, np.float64).reshape(steps, rows),
            np.asarray(out_p, np.int64).reshape(steps, rows),
            v,
            None,
        )


DEFAULT_POLICY = "gpu-packing:1,best-fit:1"
