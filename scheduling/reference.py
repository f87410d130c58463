"""The reference placement: a straightforward per-pod, per-node Python loop.

Same semantics as `placement.place` (see its module docstring), written the obvious way:
for each pod in queue order, look at every node, check every constraint with plain Python
values, score it, keep the best (lowest slot on ties). Tests check that both make
identical decisions, and `python -m benchmarks placement` measures the engine against it.

Built-in score plugins are re-implemented here as scalar functions performing the same
floating-point operations in the same order, so the scores are bit-identical; other
plugins (e.g. "fgd") are called on a one-node view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from scheduling.explain import Explanation, Reason
from scheduling.filters import Constraints, compile_pod
from scheduling.fleet import FLAG_CORDONED, FLAG_STALE, FLAG_UNHEALTHY, GPU_MILLI, Fleet
from scheduling.placement import PlacementResult, gang_levels, slot_tables
from scheduling.scoring import (
    DEFAULT_POLICY,
    BestFit,
    DotProduct,
    GpuClustering,
    GpuPacking,
    LeastAllocated,
    MostAllocated,
    NodeView,
    Policy,
    RandomScore,
    ScorePlugin,
)
from scheduling.workload import Batch, GangSpec, LabelOp, Order, PodSpec, QueueItem, TopologyLevel


@dataclass
class _Node:
    """Plain-Python copy of one node."""

    slot: int
    flags: int
    cluster: str
    zone: int
    rack: int
    labels: dict[str, str]
    taints: list[tuple[str, str, str]]
    gpu_model: str
    gpu_memory_mib: int
    cpu_alloc: int
    mem_alloc: int
    cpu_free: int
    mem_free: int
    gpu_free: list[int]  # usable free share per GPU index (0 if unhealthy)
    gpu_usable: list[bool]


def _nodes(fleet: Fleet) -> list[_Node]:
    out = []
    key_names = fleet.label_keys.names
    val_names = fleet.label_values_interner.names
    g = fleet.max_gpus
    for s in range(fleet.n_slots):
        if fleet.names[s] is None:
            continue
        labels = {
            key_names[k]: val_names[int(col[s])]
            for k, col in fleet.label_values.items()
            if col[s] >= 0
        }
        taints = []
        for tid, t in enumerate(fleet.taints):
            if int(fleet.taint_bits[s, tid // 64]) >> (tid % 64) & 1:
                taints.append((t.key, t.value, t.effect))
        count = int(fleet.gpu_count[s])
        bad = int(fleet.gpu_unhealthy_mask[s])
        usable = [i < count and not (bad >> i) & 1 for i in range(g)]
        gfree = [int(fleet.gpu_free_milli[s, i]) if usable[i] else 0 for i in range(g)]
        mid = int(fleet.gpu_model_id[s])
        out.append(
            _Node(
                slot=s,
                flags=int(fleet.flags[s]),
                cluster=fleet.clusters.names[int(fleet.cluster_id[s])],
                zone=int(fleet.zone_id[s]),
                rack=int(fleet.rack_id[s]),
                labels=labels,
                taints=taints,
                gpu_model=fleet.gpu_models.names[mid] if mid >= 0 else "",
                gpu_memory_mib=int(fleet.gpu_memory_mib[s]),
                cpu_alloc=int(fleet.cpu_allocatable_millicores[s]),
                mem_alloc=int(fleet.memory_allocatable_bytes[s]),
                cpu_free=int(
                    fleet.cpu_allocatable_millicores[s] - fleet.cpu_allocated_millicores[s]
                ),
                mem_free=int(fleet.memory_allocatable_bytes[s] - fleet.memory_allocated_bytes[s]),
                gpu_free=gfree,
                gpu_usable=usable,
            )
        )
    return out


def first_failure_one(node: _Node, pod: PodSpec) -> Reason:
    """The first filter `node` fails for `pod`, OK if it fits (plain Python)."""
    if node.flags & FLAG_CORDONED:
        return Reason.NODE_UNSCHEDULABLE
    if node.flags & (FLAG_UNHEALTHY | FLAG_STALE):
        return Reason.NODE_NOT_READY
    if pod.clusters and node.cluster not in pod.clusters:
        return Reason.CLUSTER_NOT_ALLOWED
    for req in pod.requirements():
        value = node.labels.get(req.key)
        if req.op is LabelOp.IN and value not in req.values:
            return Reason.NODE_AFFINITY
        if req.op is LabelOp.NOT_IN and value in req.values:
            return Reason.NODE_AFFINITY
        if req.op is LabelOp.EXISTS and value is None:
            return Reason.NODE_AFFINITY
        if req.op is LabelOp.DOES_NOT_EXIST and value is not None:
            return Reason.NODE_AFFINITY
    for key, value, effect in node.taints:
        if not any(t.tolerates(key, value, effect) for t in pod.tolerations):
            return Reason.UNTOLERATED_TAINT
    gpus = pod.gpus_per_pod
    has_gpu = node.gpu_model != ""
    if gpus and pod.gpu_models and has_gpu and node.gpu_model not in pod.gpu_models:
        return Reason.GPU_MODEL
    if gpus and pod.gpu_memory_min_mib and has_gpu and node.gpu_memory_mib < pod.gpu_memory_min_mib:
        return Reason.GPU_MEMORY
    if node.cpu_free < pod.cpu_millicores:
        return Reason.INSUFFICIENT_CPU
    if node.mem_free < pod.memory_bytes:
        return Reason.INSUFFICIENT_MEMORY
    if gpus:
        m = pod.milli_per_gpu
        if m < GPU_MILLI:
            if not any(f > 0 for f in node.gpu_free):
                return Reason.INSUFFICIENT_GPU
            if not any(f >= m for f in node.gpu_free):
                return Reason.INSUFFICIENT_GPU_SHARE
        elif sum(1 for f in node.gpu_free if f == GPU_MILLI) < gpus:
            return Reason.INSUFFICIENT_GPU
    return Reason.OK


def _default_pick(node: _Node, pod: PodSpec) -> int:
    gpus, m = pod.gpus_per_pod, pod.milli_per_gpu
    if not gpus:
        return 0
    if m < GPU_MILLI:
        best, best_free = -1, GPU_MILLI + 1
        for i, f in enumerate(node.gpu_free):
            if f >= m and f < best_free:
                best, best_free = i, f
        return 1 << best if best >= 0 else 0
    mask, taken = 0, 0
    for i, f in enumerate(node.gpu_free):
        if f == GPU_MILLI and taken < gpus:
            mask |= 1 << i
            taken += 1
    return mask if taken == gpus else 0


def _r100(num: int, den: int) -> float:
    return num * 100.0 / den if den > 0 else 0.0


def _gpu_totals(node: _Node) -> tuple[int, int]:
    return sum(node.gpu_free), sum(node.gpu_usable) * GPU_MILLI


def _least(p: ScorePlugin, n: _Node, pod: PodSpec, pick: int) -> float:
    total = _r100(n.cpu_free - pod.cpu_millicores, n.cpu_alloc)
    total = total + _r100(n.mem_free - pod.memory_bytes, n.mem_alloc)
    if pod.gpus_per_pod:
        gfree, gtotal = _gpu_totals(n)
        return (total + _r100(gfree - pod.gpu_milli_total, gtotal)) / 3.0
    return total / 2.0


def _most(p: ScorePlugin, n: _Node, pod: PodSpec, pick: int) -> float:
    total = _r100(n.cpu_alloc - n.cpu_free + pod.cpu_millicores, n.cpu_alloc)
    total = total + _r100(n.mem_alloc - n.mem_free + pod.memory_bytes, n.mem_alloc)
    if pod.gpus_per_pod:
        gfree, gtotal = _gpu_totals(n)
        return (total + _r100(gtotal - gfree + pod.gpu_milli_total, gtotal)) / 3.0
    return total / 2.0


def _best_fit(p: ScorePlugin, n: _Node, pod: PodSpec, pick: int) -> float:
    assert isinstance(p, BestFit)
    gfree, _ = _gpu_totals(n)
    cpu_left = (n.cpu_free - pod.cpu_millicores) / p.max_cpu_millicores * 0.5
    gpu_left = (gfree - pod.gpu_milli_total) / p.max_gpu_milli * 0.5
    return 100.0 * (1.0 - (cpu_left + gpu_left))


def _dot(p: ScorePlugin, n: _Node, pod: PodSpec, pick: int) -> float:
    sc = float(n.cpu_alloc) if n.cpu_alloc > 0 else 1.0
    sm = float(n.mem_alloc) if n.mem_alloc > 0 else 1.0
    dot = (n.cpu_free / sc) * (pod.cpu_millicores / sc)
    dot = dot + (n.mem_free / sm) * (pod.memory_bytes / sm)
    dims = 2.0
    if pod.gpus_per_pod:
        gfree, gtotal = _gpu_totals(n)
        gt = float(gtotal) if gtotal > 0 else 1.0
        dot = dot + (gfree / gt) * (pod.gpu_milli_total / gt)
        dims = 3.0
    return 100.0 * (1.0 - dot / dims)


def _packing(p: ScorePlugin, n: _Node, pod: PodSpec, pick: int) -> float:
    if not pod.gpus_per_pod:
        return 0.0
    n_usable = sum(n.gpu_usable)
    fully_free = sum(
        1 for f, u in zip(n.gpu_free, n.gpu_usable, strict=True) if u and f == GPU_MILLI
    )
    chosen = [i for i in range(len(n.gpu_free)) if (pick >> i) & 1]
    taken_full = sum(1 for i in chosen if n.gpu_free[i] == GPU_MILLI)
    pct = sum(n.gpu_free[i] * 100 // GPU_MILLI for i in chosen)
    if fully_free == n_usable:
        return float(max(33 - fully_free, fully_free))
    if taken_full > 0:
        return float(max(50 - taken_full, 33))
    return float(max(100 - pct // 10, 50))


def _clustering(p: ScorePlugin, n: _Node, pod: PodSpec, pick: int) -> float:
    assert isinstance(p, GpuClustering)
    if not pod.gpus_per_pod:
        return 0.0
    used = [GPU_MILLI - f if u else 0 for f, u in zip(n.gpu_free, n.gpu_usable, strict=True)]
    in_use = [u for u in used if u > 0]
    same = [u for u in in_use if u % pod.milli_per_gpu == 0]
    if not in_use:
        tier = 1.0
    elif len(same) == len(in_use):
        tier = 3.0
    elif same:
        tier = 2.0
    else:
        tier = 0.0
    gfree, _ = _gpu_totals(n)
    within = 25.0 * (p.max_gpu_milli - gfree) / p.max_gpu_milli
    return within + 25.0 * tier


_M = (1 << 64) - 1


def _random(p: ScorePlugin, n: _Node, pod: PodSpec, pick: int) -> float:
    assert isinstance(p, RandomScore)
    gfree, _ = _gpu_totals(n)
    x = (
        ((n.slot * 0x9E3779B97F4A7C15) & _M)
        ^ (((n.cpu_free & _M) * 0xBF58476D1CE4E5B9) & _M)
        ^ (((gfree & _M) * 0x94D049BB133111EB) & _M)
        ^ p.seed
    )
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & _M
    x ^= x >> 29
    return float(x >> 11) * (100.0 / 2.0**53)


_SCALAR: dict[type, Callable[[ScorePlugin, _Node, PodSpec, int], float]] = {
    LeastAllocated: _least,
    MostAllocated: _most,
    BestFit: _best_fit,
    DotProduct: _dot,
    GpuPacking: _packing,
    GpuClustering: _clustering,
    RandomScore: _random,
}


class _Reference:
    def __init__(self, fleet: Fleet, policy: Policy) -> None:
        self.fleet = fleet
        self.policy = policy
        self.nodes = _nodes(fleet)
        self.compiled: dict[tuple[object, ...], Constraints] = {}

    def _one_row_view(self, n: _Node) -> NodeView:
        g = len(n.gpu_free)
        return NodeView(
            slots=np.array([n.slot], np.int64),
            cpu_free_millicores=np.array([n.cpu_free], np.int64),
            memory_free_bytes=np.array([n.mem_free], np.int64),
            cpu_allocatable_millicores=np.array([n.cpu_alloc], np.int64),
            memory_allocatable_bytes=np.array([n.mem_alloc], np.int64),
            gpu_free_milli=np.array([n.gpu_free], np.int32).reshape(1, g),
            gpu_usable=np.array([n.gpu_usable], bool).reshape(1, g),
            gpu_model_id=np.array([self.fleet.gpu_model_id[n.slot]], np.int16),
        )

    def score(self, n: _Node, pod: PodSpec) -> tuple[float, int]:
        pick = _default_pick(n, pod)
        chooser = next((p for p, _ in self.policy.terms if p.chooses_gpus), None)
        view: NodeView | None = None
        c: Constraints | None = None
        cached: dict[int, float] = {}
        if chooser is not None and pod.gpus_per_pod:
            view = self._one_row_view(n)
            c = self.cons(pod)
            res = chooser.score(view, c, np.array([pick], np.int64))
            if res.gpu_pick is not None:
                pick = int(res.gpu_pick[0])
            cached[id(chooser)] = float(res.score[0])
        total = 0.0
        for plugin, weight in self.policy.terms:
            if id(plugin) in cached:
                s = cached[id(plugin)]
            elif type(plugin) in _SCALAR:
                s = _SCALAR[type(plugin)](plugin, n, pod, pick)
            else:
                view = view or self._one_row_view(n)
                c = c or self.cons(pod)
                s = float(plugin.score(view, c, np.array([pick], np.int64)).score[0])
            total = total + weight * s
        if total != total:  # NaN never wins
            total = float("-inf")
        return total, pick

    def cons(self, pod: PodSpec) -> Constraints:
        c = self.compiled.get(pod.shape_key)
        if c is None:
            c = self.compiled[pod.shape_key] = compile_pod(self.fleet, pod)
        return c

    def best_node(self, pod: PodSpec, allowed: set[int] | None = None) -> tuple[_Node, int] | None:
        best: tuple[_Node, int] | None = None
        best_score = 0.0
        for n in self.nodes:
            if allowed is not None and n.slot not in allowed:
                continue
            if first_failure_one(n, pod) is not Reason.OK:
                continue
            s, pick = self.score(n, pod)
            if best is None or s > best_score:
                best, best_score = (n, pick), s
        return best

    def apply(self, n: _Node, pod: PodSpec, pick: int, sign: int) -> None:
        n.cpu_free -= sign * pod.cpu_millicores
        n.mem_free -= sign * pod.memory_bytes
        for i in range(len(n.gpu_free)):
            if (pick >> i) & 1:
                n.gpu_free[i] -= sign * pod.milli_per_gpu

    def capacity(self, n: _Node, pod: PodSpec, limit: int) -> int:
        """How many more copies of pod fit on n (0 if a static filter fails)."""
        if first_failure_one(n, pod) not in (
            Reason.OK,
            Reason.INSUFFICIENT_CPU,
            Reason.INSUFFICIENT_MEMORY,
            Reason.INSUFFICIENT_GPU,
            Reason.INSUFFICIENT_GPU_SHARE,
        ):
            return 0
        cap = limit
        if pod.cpu_millicores:
            cap = min(cap, n.cpu_free // pod.cpu_millicores)
        elif n.cpu_free < 0:
            cap = 0
        if pod.memory_bytes:
            cap = min(cap, n.mem_free // pod.memory_bytes)
        elif n.mem_free < 0:
            cap = 0
        if pod.gpus_per_pod:
            m = pod.milli_per_gpu
            if m < GPU_MILLI:
                cap = min(cap, sum(f // m for f in n.gpu_free))
            else:
                cap = min(cap, sum(1 for f in n.gpu_free if f == GPU_MILLI) // pod.gpus_per_pod)
        return max(cap, 0)

    def reason(self, pod: PodSpec) -> int:
        if not self.nodes:
            return int(Reason.NO_NODES)
        ff = np.array([int(first_failure_one(n, pod)) for n in self.nodes], np.int16)
        return int(Explanation.from_first_failures(ff).dominant) or int(Reason.INSUFFICIENT_CPU)

    def gang(self, gang: GangSpec, pods: list[PodSpec]) -> list[tuple[int, int] | int]:
        """Placed (slot, pick) per member, or a reason per member (-1 = own reason)."""
        need: dict[tuple[object, ...], int] = {}
        rep: dict[tuple[object, ...], PodSpec] = {}
        for pod in pods:
            need[pod.shape_key] = need.get(pod.shape_key, 0) + 1
            rep.setdefault(pod.shape_key, pod)
        caps = {
            key: {n.slot: c for n in self.nodes if (c := self.capacity(n, rep[key], need[key])) > 0}
            for key in need
        }
        if any(not caps[key] for key in need):
            return [-1 if not caps[p.shape_key] else int(Reason.GANG_MEMBER) for p in pods]
        cand = sorted(set().union(*(set(c) for c in caps.values())))
        by_slot = {n.slot: n for n in self.nodes}
        for level in gang_levels(gang):

            def dom(n: _Node, level: TopologyLevel = level) -> int:
                if level is TopologyLevel.CLUSTER:
                    return int(self.fleet.cluster_id[n.slot])
                if level is TopologyLevel.ZONE:
                    return n.zone
                if level is TopologyLevel.RACK:
                    return n.rack
                return n.slot

            doms = sorted({dom(by_slot[s]) for s in cand})
            keyed = []
            for d in doms:
                ok = all(
                    sum(c for s, c in caps[key].items() if dom(by_slot[s]) == d) >= need[key]
                    for key in need
                )
                if not ok:
                    continue
                members = [by_slot[s] for s in cand if dom(by_slot[s]) == d]
                gfree = sum(sum(n.gpu_free) for n in members)
                cfree = sum(n.cpu_free for n in members)
                keyed.append((gfree, cfree, d))
            for _, _, d in sorted(keyed):
                allowed = {s for s in cand if dom(by_slot[s]) == d}
                done: list[tuple[_Node, PodSpec, int]] = []
                for pod in pods:
                    ok_slots = {s for s in caps[pod.shape_key] if s in allowed}
                    best = self.best_node(pod, ok_slots)
                    if best is None:
                        break
                    self.apply(best[0], pod, best[1], +1)
                    done.append((best[0], pod, best[1]))
                if len(done) == len(pods):
                    return [(n.slot, pick) for n, _, pick in done]
                for n, pod, pick in reversed(done):
                    self.apply(n, pod, pick, -1)
        out: list[tuple[int, int] | int] = [int(Reason.GANG_TOPOLOGY)] * len(pods)
        return out


class ReferencePlacer:
    """The reference loop over a plain-Python copy of a fleet (built once, in __init__)."""

    def __init__(self, fleet: Fleet, policy: Policy | str | None = None) -> None:
        if not isinstance(policy, Policy):
            policy = Policy.parse(policy or DEFAULT_POLICY)
        self.fleet = fleet
        self._ref = _Reference(fleet, policy)

    def place(
        self, batch: Batch | Sequence[QueueItem], *, order: Order = Order.LARGEST_FIRST
    ) -> PlacementResult:
        """Place the queue (same semantics as `placement.place`), one pod and node at a time.

        The placer's own copy of the free resources is consumed: use a new placer per batch.
        """
        fleet, ref = self.fleet, self._ref
        if not isinstance(batch, Batch):
            batch = Batch.of(batch)
        p = len(batch)
        node_slot = np.full(p, -1, np.int64)
        gpu_mask = np.zeros(p, np.int64)
        reason = np.zeros(p, np.int16)
        pending: list[int] = []
        seq = batch.order(order).tolist()
        i = 0
        while i < p:
            pod_i = seq[i]
            g = int(batch.gang_of[pod_i])
            if g >= 0:
                j = i
                while j < p and int(batch.gang_of[seq[j]]) == g:
                    j += 1
                members = seq[i:j]
                out = ref.gang(batch.gangs[g], [batch.pods[m] for m in members])
                for m, o in zip(members, out, strict=True):
                    if isinstance(o, tuple):
                        node_slot[m], gpu_mask[m] = o
                    elif o < 0:
                        pending.append(m)
                    else:
                        reason[m] = o
                i = j
                continue
            pod = batch.pods[pod_i]
            best = ref.best_node(pod)
            if best is None:
                pending.append(pod_i)
            else:
                ref.apply(best[0], pod, best[1], +1)
                node_slot[pod_i], gpu_mask[pod_i] = best[0].slot, best[1]
            i += 1
        for m in pending:
            reason[m] = ref.reason(batch.pods[m])
        pods = batch.pods
        placed = node_slot >= 0
        slot_names, slot_clusters = slot_tables(fleet, node_slot)
        return PlacementResult(
            pod_names=tuple(pod.name for pod in pods),
            node_slot=node_slot,
            gpu_mask=gpu_mask,
            gpu_milli_per_gpu=np.array(
                [pod.milli_per_gpu if placed[i] else 0 for i, pod in enumerate(pods)], np.int64
            ),
            cpu_millicores=np.array([pod.cpu_millicores for pod in pods], np.int64),
            memory_bytes=np.array([pod.memory_bytes for pod in pods], np.int64),
            reason=reason,
            order=np.asarray(seq, np.int64),
            slot_names=slot_names,
            slot_clusters=slot_clusters,
            fleet_version=fleet.version,
        )


def place_reference(
    fleet: Fleet,
    batch: Batch | Sequence[QueueItem],
    policy: Policy | str | None = None,
    *,
    order: Order = Order.LARGEST_FIRST,
) -> PlacementResult:
    """`placement.place` computed by a plain loop over pods and nodes (slow; for checks)."""
    return ReferencePlacer(fleet, policy).place(batch, order=order)
