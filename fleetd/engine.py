"""The daemon's adapter in front of the placement core (`scheduling`).

The state owner (`fleetd.state`) is this module's only caller, always from its serialized
path. It translates the daemon's validated values into the core's (`scheduling.PodSpec`,
`GangSpec`, `NodeSpec`), runs `scheduling.place` (which never mutates) and returns what
the state needs to commit: one `scheduling.Allocation` per pod, or the reasons why not.
Every placement, dry run and "would it fit an empty fleet" question goes through the same
packer (STYLE.md: one packer).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

import scheduling
import scheduling.pools
from scheduling import Allocation, Fleet, Policy, TopologyLevel
from scheduling.explain import REASON_TEXT, Reason
from scheduling.filters import allowed_mask, compile_pod
from scheduling.fleet import FLAG_CORDONED, FLAG_STALE, FLAG_UNHEALTHY
from scheduling.fragmentation import (
    TypicalPods,
    _model_columns,
    fleet_model_gpus,
    frag_milli,
    typical_pods,
)
from scheduling.replay.policies import FRAGMENTATION_POLICIES, make_policy

GPU_MILLI = scheduling.GPU_MILLI
#: Label every node carries with its pool name, so that a pool scope is a node selector (the
#: core's label: nodes the autoscaler imagines carry it too).
POOL_LABEL = scheduling.pools.POOL_LABEL

Arr = npt.NDArray[Any]

GANG_LEVELS = {
    "": TopologyLevel.CLUSTER,
    "cluster": TopologyLevel.CLUSTER,
    "zone": TopologyLevel.ZONE,
    "rack": TopologyLevel.RACK,
    "node": TopologyLevel.NODE,
}


def node_key(cluster: str, node: str) -> str:
    """The core's node name: node names are unique per cluster, keys across the fleet."""
    return f"{cluster}/{node}"


@dataclass(frozen=True, slots=True)
class PodRequest:
    """One validated pod: either `gpu_count` whole GPUs or one `gpu_milli` share of one GPU."""

    name: str
    cpu_millicores: int
    memory_bytes: int
    gpu_count: int = 0
    gpu_milli: int = 0
    gpu_models: tuple[str, ...] = ()
    node_selector: tuple[tuple[str, str], ...] = ()  # sorted pairs: hashable
    tolerations: tuple[tuple[str, str, str, str], ...] = ()  # key, operator, value, effect


@dataclass(frozen=True, slots=True)
class Outcome:
    """A placement attempt: an allocation per pod, or None with the reasons.

    reasons: (code, nodes, text), node-level reasons most frequent first, then pod-level
    ones (gang) with nodes = 0.
    """

    allocations: tuple[Allocation, ...] | None
    nodes_total: int
    nodes_feasible: int
    reasons: tuple[tuple[str, int, str], ...]
    summary: str
    fits_empty_fleet: bool


#: Score plugins that need FGD's target workload (Weng et al., ATC'23 §4.1).
FRAGMENTATION_PLUGINS = FRAGMENTATION_POLICIES


def policy_spec(spec: str, weights: Mapping[str, float]) -> str:
    """The policy as 'name:weight,...': `weights` when given, else `spec`."""
    if weights:
        return ",".join(f"{name}:{weight!r}" for name, weight in weights.items())
    return spec


def needs_target(spec: str) -> bool:
    """Whether the policy has a fragmentation plugin (which needs a target workload)."""
    names = {t.partition(":")[0].strip() for t in spec.split(",")}
    return bool(names & set(FRAGMENTATION_PLUGINS))


def build_policy(spec: str, typical: TypicalPods | None) -> Policy:
    """The core policy; fragmentation plugins get `typical`.

    Until a target workload is known (no requests yet), a fragmentation policy falls back to
    the core's DEFAULT_POLICY: FGD has nothing to measure fragmentation against.
    """
    if not needs_target(spec):
        return Policy.parse(spec)
    if typical is None:
        return Policy.parse(scheduling.DEFAULT_POLICY)
    return make_policy(spec, typical)


#: The target workload is replaced only when it moved by more than this total variation
#: distance (half the summed absolute change of the pod types' popularity, a type absent
#: from one side counting as 0) from the one in use: e.g. 5 % of the pods changing type.
TARGET_TOLERANCE = 0.05


def target_distance(a: TypicalPods, b: TypicalPods) -> float:
    """Total variation distance between two target workloads' type distributions (0..1), or
    the largest change of a model's scarcity (`model_pressure`) if that is larger.

    A type is (CPU, per-GPU milli, GPU count, allowed models); model columns must be the
    same fleet ids on both sides (a different number of columns makes every type differ).
    """

    def types(t: TypicalPods) -> dict[tuple[int, int, int, bytes], float]:
        out: dict[tuple[int, int, int, bytes], float] = {}
        allowed = np.ascontiguousarray(t.model_allowed)
        for i in range(t.n_types):
            key = (
                int(t.cpu_milli[i]),
                int(t.gpu_milli[i]),
                int(t.num_gpu[i]),
                allowed.shape[1].to_bytes(4, "little") + allowed[i].tobytes(),
            )
            out[key] = out.get(key, 0.0) + float(t.freq[i])
        return out

    fa, fb = types(a), types(b)
    tv = 0.5 * sum(abs(fa.get(k, 0.0) - fb.get(k, 0.0)) for k in fa.keys() | fb.keys())
    # fgd-plus's per-model scarcity (0..1 per model) counts too: the largest change of one.
    pa, pb = a.model_pressure, b.model_pressure
    if pa is None and pb is None:
        return tv
    if pa is None or pb is None or pa.shape != pb.shape:
        return 1.0
    return max(tv, float(np.abs(pa - pb).max(initial=0.0)))


class PolicyMemo:
    """Builds the core policy, and keeps handing out the same Policy object while the spec
    is unchanged and the target workload stays within TARGET_TOLERANCE of the one in use.

    The core's PlacementCache keeps scores per Policy object: rebuilding the policy on every
    re-estimate (every `target_refresh_pods` requests) would re-score the whole fleet each
    time, although a sliding window's estimate barely moves. A materially different target
    gives a new Policy, which drops the cached scores.
    """

    def __init__(self, tolerance: float = TARGET_TOLERANCE) -> None:
        """`tolerance`: total variation distance from which a new target replaces the old."""
        self.tolerance = tolerance
        self.spec: str | None = None
        #: The target workload of the policy in use (None: none needed or none known yet).
        self.typical: TypicalPods | None = None
        self.policy: Policy | None = None
        self.builds = 0

    def build(self, spec: str, typical: TypicalPods | None) -> Policy:
        """The policy for `spec` with target `typical` (see the class docstring)."""
        if (
            self.policy is not None
            and spec == self.spec
            and (typical is None) == (self.typical is None)
            and (
                typical is None
                or self.typical is None
                or target_distance(typical, self.typical) <= self.tolerance
            )
        ):
            return self.policy
        self.policy = build_policy(spec, typical)
        self.spec, self.typical = spec, typical
        self.builds += 1
        return self.policy


def check_policy(spec: str) -> None:
    """ValueError when `spec` names unknown plugins or bad weights (config validation)."""
    one_gpu = TypicalPods(
        cpu_milli=np.array([1000]),
        gpu_milli=np.array([GPU_MILLI]),
        num_gpu=np.array([1]),
        model_allowed=np.ones((1, 0), dtype=bool),
        freq=np.array([1.0]),
    )
    make_policy(spec, one_gpu)


Shape = tuple[int, int, int, tuple[str, ...]]


class TargetWorkload:
    """FGD's target workload, estimated from the shapes of the last `window` requested pods.

    The paper takes it from the cluster's workload; a daemon learns it from what it is asked
    to place. Shapes are (CPU, per-GPU share, GPU count, allowed models), as in the artifact.
    The estimate is recomputed only when the window's shape distribution moved by more than
    `tolerance` (total variation distance) since it was last computed: a sliding window
    barely moves between two refreshes, and an unchanged estimate keeps the policy (and the
    core's cached scores) valid.
    """

    def __init__(self, window: int, tolerance: float = TARGET_TOLERANCE) -> None:
        """`window` pods; `tolerance`: see the class docstring (0: recompute on any change)."""
        self.shapes: collections.deque[Shape] = collections.deque(maxlen=window)
        self.observed = 0
        self.tolerance = tolerance
        self._counts: collections.Counter[Shape] = collections.Counter()
        self._counted = 0  # len(self.shapes) the counts describe (shapes may be extended)
        #: (shape counts, total, GPU share of each model, estimate) of the last estimate.
        self._last: tuple[dict[Shape, int], int, npt.NDArray[np.float64], TypicalPods] | None = None

    def observe(self, pods: Sequence[PodRequest]) -> None:
        """Record the shapes of one request's pods."""
        for p in pods:
            if p.gpu_count:
                shape = (p.cpu_millicores, GPU_MILLI, p.gpu_count, p.gpu_models)
            elif p.gpu_milli:
                shape = (p.cpu_millicores, p.gpu_milli, 1, p.gpu_models)
            else:
                shape = (p.cpu_millicores, 0, 0, p.gpu_models)
            if len(self.shapes) == self.shapes.maxlen:
                self._counts[self.shapes[0]] -= 1  # about to leave the window
                self._counted -= 1
            self.shapes.append(shape)
            self._counts[shape] += 1
            self._counted += 1
            self.observed += 1

    def typical(self, fleet: Fleet) -> TypicalPods | None:
        """The most popular shapes (95% of pods) with model columns in the fleet's ids."""
        if not self.shapes:
            return None
        if self._counted != len(self.shapes):  # the deque was filled directly
            self._counts = collections.Counter(self.shapes)
            self._counted = len(self.shapes)
        counts = {k: v for k, v in self._counts.items() if v > 0}
        total = len(self.shapes)
        # The per-model scarcity term (fgd-plus) reads the fleet's GPUs per model: only their
        # shares matter, so a fleet that grows evenly keeps the estimate.
        model_gpus = fleet_model_gpus(fleet)
        gpu_total = float(model_gpus.sum())
        share = model_gpus / gpu_total if gpu_total > 0 else model_gpus.astype(np.float64)
        last = self._last
        if last is not None and last[2].shape == share.shape:
            old, old_total = last[0], last[1]
            moved = 0.5 * sum(
                abs(counts.get(k, 0) / total - old.get(k, 0) / old_total)
                for k in counts.keys() | old.keys()
            )
            if moved <= self.tolerance and 0.5 * np.abs(share - last[2]).sum() <= self.tolerance:
                return last[3]
        typical = self._estimate(counts, fleet, model_gpus)
        self._last = (counts, total, share, typical)
        return typical

    @staticmethod
    def _estimate(
        counts: Mapping[Shape, int], fleet: Fleet, model_gpus: npt.NDArray[np.int64]
    ) -> TypicalPods:
        # typical_pods reads a multiset of pods: each distinct shape repeated by its count.
        specs: dict[tuple[str, ...], int] = {}
        cpu, gpu, num, spec_id, reps = [], [], [], [], []
        for (c, g, n, models), k in counts.items():
            cpu.append(c)
            gpu.append(g)
            num.append(n)
            spec_id.append(specs.setdefault(models, len(specs)))
            reps.append(k)
        n_models = len(fleet.gpu_models)
        allowed = np.zeros((len(specs), n_models), dtype=bool)
        for models, sid in specs.items():
            if not models:
                allowed[sid] = True
            else:
                ids = [fleet.gpu_models.get(m) for m in models]
                allowed[sid, [i for i in ids if i >= 0]] = True
        # Spec ids must order like the spec strings (the artifact's tie-break).
        order = sorted(specs, key=lambda m: "|".join(m))
        remap = np.array([order.index(m) for m in specs], dtype=np.int64)
        allowed = allowed[np.argsort(remap)]
        r = np.asarray(reps, np.int64)
        return typical_pods(
            np.repeat(np.asarray(cpu, np.int64), r),
            np.repeat(np.asarray(gpu, np.int64), r),
            np.repeat(np.asarray(num, np.int64), r),
            np.repeat(remap[np.asarray(spec_id, np.int64)], r),
            allowed,
            model_gpus=model_gpus,
        )


def to_pod(req: PodRequest, *, priority: int, cluster: str, pool: str) -> scheduling.PodSpec:
    """The core's PodSpec of a request, with the workload's scope folded in."""
    selector = dict(req.node_selector)
    if pool:
        selector[POOL_LABEL] = pool
    return scheduling.PodSpec(
        name=req.name,
        cpu_millicores=req.cpu_millicores,
        memory_bytes=req.memory_bytes,
        num_gpu=req.gpu_count,
        gpu_milli=req.gpu_milli,
        gpu_models=req.gpu_models,
        node_selector=selector,
        tolerations=tuple(
            scheduling.Toleration(key=k, operator=op, value=v, effect=e)
            for k, op, v, e in req.tolerations
        ),
        priority=priority,
        clusters=(cluster,) if cluster else (),
    )


@dataclass(frozen=True, slots=True)
class Workload:
    """One workload to place: a pod, or a gang placed all or nothing."""

    name: str
    pods: tuple[PodRequest, ...]
    gang: bool = False
    same: str = ""
    cluster: str = ""
    pool: str = ""
    priority: int = 0

    def item(self) -> scheduling.PodSpec | scheduling.GangSpec:
        """The core's queue item."""
        specs = tuple(
            to_pod(p, priority=self.priority, cluster=self.cluster, pool=self.pool)
            for p in self.pods
        )
        if self.gang:
            return scheduling.GangSpec(
                name=self.name,
                pods=specs,
                required_level=GANG_LEVELS[self.same],
                priority=self.priority,
            )
        return specs[0]


def allowed_clusters(fleet: Fleet, workload: Workload) -> set[str]:
    """The clusters holding a node that some pod of `workload` may ever go to (its cluster,
    pool, selector, taints, GPU model and memory; whatever cordon, health, freshness and
    load say now)."""
    rows = np.flatnonzero(fleet.live_mask())
    ids: set[int] = set()
    for pod in dict.fromkeys(workload.pods):  # (a gang's identical pods once)
        spec = to_pod(pod, priority=workload.priority, cluster=workload.cluster, pool=workload.pool)
        mask = allowed_mask(fleet, compile_pod(fleet, spec), rows)
        ids.update(np.unique(fleet.cluster_id[rows[mask]]).tolist())
    return {fleet.clusters.names[i] for i in ids}


FitsEmpty = Callable[[scheduling.PodSpec | scheduling.GangSpec], bool]


def place_many(
    fleet: Fleet,
    workloads: Sequence[Workload],
    policy: Policy,
    cache: scheduling.PlacementCache | None = None,
) -> list[tuple[tuple[Allocation, ...] | None, tuple[int, ...]]]:
    """Place a batch with ONE core call (never mutates `fleet`).

    Per workload, in input order: its allocations (None unless every pod was placed) and
    the core's per-pod reason codes. The core places the batch sequentially (priority
    first, identical shapes together), so committing the successes in order is consistent.
    `cache`: the caller's PlacementCache for `fleet` (a call then re-scores only the nodes
    changed since the previous one).
    """
    items = [w.item() for w in workloads]
    result = scheduling.place(fleet, items, policy, cache=cache)
    allocs = result.allocations()
    reasons = result.reason.tolist()
    out: list[tuple[tuple[Allocation, ...] | None, tuple[int, ...]]] = []
    start = 0
    for w in workloads:
        end = start + len(w.pods)
        mine = allocs[start:end]
        placed = all(a is not None for a in mine)
        out.append(
            (tuple(a for a in mine if a is not None) if placed else None, tuple(reasons[start:end]))
        )
        start = end
    return out


def failure(
    fleet: Fleet,
    workload: Workload,
    reasons: Sequence[int],
    policy: Policy,
    fits_empty: FitsEmpty | None = None,
) -> Outcome:
    """The Outcome of a workload that did not fit: per-reason node counts (kube-scheduler
    style, against the fleet as it is now) and whether it would fit the empty fleet."""
    item = workload.item()
    specs = item.pods if isinstance(item, scheduling.GangSpec) else (item,)
    # Explain the first pod that failed on a node-level reason (a gang may fail as a whole).
    node_level = [i for i, r in enumerate(reasons) if 0 < r < Reason.NO_NODES]
    probe = specs[node_level[0]] if node_level else specs[0]
    expl = scheduling.explain(fleet, probe)
    out = [(r.name, count, REASON_TEXT[r]) for r, count in expl.counts]
    summary = expl.text()
    for code in sorted({r for r in reasons if r >= Reason.NO_NODES}):
        reason = Reason(code)
        out.append((reason.name, 0, REASON_TEXT[reason]))
        summary += f" {REASON_TEXT[reason].capitalize()}."
    return Outcome(
        allocations=None,
        nodes_total=len(fleet),
        nodes_feasible=expl.n_feasible,
        reasons=tuple(out),
        summary=summary,
        fits_empty_fleet=(fits_empty or (lambda it: fits_empty_fleet(fleet, it, policy)))(item),
    )


def place(
    fleet: Fleet,
    workload: Workload,
    policy: Policy,
    fits_empty: FitsEmpty | None = None,
    cache: scheduling.PlacementCache | None = None,
) -> Outcome:
    """Place one workload (dry run: never mutates `fleet`); the reasons when it does not fit.

    `fits_empty` answers "would it fit the empty fleet" when it does not fit now (the state
    memoizes it: the answer changes only when nodes do); default `fits_empty_fleet`.
    `cache`: as for `place_many`.
    """
    [(allocs, reasons)] = place_many(fleet, [workload], policy, cache)
    if allocs is not None:
        return Outcome(allocs, len(fleet), len(fleet), (), "", True)
    return failure(fleet, workload, reasons, policy, fits_empty)


def fits_empty_fleet(
    fleet: Fleet, item: scheduling.PodSpec | scheduling.GangSpec, policy: Policy
) -> bool:
    """Would the workload fit if nothing were allocated and every node were back?

    QUEUED (wait for capacity) versus UNSCHEDULABLE (never fits as the fleet stands).
    """
    empty = fleet.copy()
    n = empty.n_slots
    empty.cpu_allocated_millicores[:n] = 0
    empty.memory_allocated_bytes[:n] = 0
    exists = np.arange(empty.max_gpus)[None, :] < empty.gpu_count[:n, None]
    empty.gpu_free_milli[:n] = np.where(exists, GPU_MILLI, 0)
    # Stale and cordoned nodes come back; unhealthy GPUs (the mask) stay out.
    empty.flags[:n] &= np.uint8(~(FLAG_STALE | FLAG_CORDONED | FLAG_UNHEALTHY) & 0xFF)
    result = scheduling.place(empty, [item], policy)
    return bool(result.n_placed == len(result))


def gpu_allocated_milli(fleet: Fleet, slot: int) -> list[int]:
    """Allocated share of each GPU of a node, in thousandths."""
    count = int(fleet.gpu_count[slot])
    return [GPU_MILLI - int(f) for f in fleet.gpu_free_milli[slot, :count]]


def fragmented_milli(
    fleet: Fleet, slots: npt.NDArray[np.int64], typical: TypicalPods | None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(fragmented, free) GPU milli of each node in `slots`.

    With a target workload: FGD's expected fragmentation F_n(M) (Weng et al., ATC'23 §3.2),
    the free GPU share that the typical pod cannot use. Without one: the free share on GPUs
    already partly used (no whole-GPU pod can use it).
    """
    free = fleet.usable_gpu_free_milli(slots).astype(np.int64)
    free_total = free.sum(axis=1).astype(np.float64)
    if typical is None:
        partial = (free > 0) & (free < GPU_MILLI)
        return np.where(partial, free, 0).sum(axis=1).astype(np.float64), free_total
    cpu_free = fleet.cpu_allocatable_millicores[slots] - fleet.cpu_allocated_millicores[slots]
    typ = _model_columns(typical, len(fleet.gpu_models))
    model = fleet.gpu_model_id[slots].astype(np.int64)
    return frag_milli(cpu_free, free, model, typ), free_total
