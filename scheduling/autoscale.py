"""Node-pool autoscaling: scale-up, scale-down and consolidation plans as values.

Everything here runs the ONE placement engine (`placement.place`) on hypothetical fleets,
as Karpenter's provisioner and disruption controller both run `Scheduler.Solve`:

* Scale-up (`plan_scale_up`): the pending workloads are first placed on the current fleet
  plus the nodes already being provisioned (in flight). For the rest, a capacity matrix
  "how many pods of shape s fit on one empty node of pool k" is computed once on a
  template fleet holding one node per pool (the same static and resource filters), and a
  greedy chooses the cheapest node additions (shapes that fit the same pools costed
  together; price per pod served, counting partly used new nodes). The choice is then
  *verified* by placing, pool by pool, the workloads sent to each pool on its new nodes,
  then any leftovers on everything; misses get another round and unused hypothetical
  nodes are dropped. The plan's allocations are the assignment those runs found.
* Scale-down (`plan_scale_down`): empty nodes first, then under-utilized ones, each removal
  simulated by releasing the node's pods and placing them on the remaining nodes; then
  replacement of several nodes by fewer or cheaper new ones (Karpenter's multi-node
  consolidation: the whole candidate group, then a binary search over its prefixes); a
  final joint placement of every displaced pod checks the whole plan.
* `recheck` re-validates a disruptive decision against a fresh snapshot before it is emitted.

Inputs are values (fleet, pending workloads, pools, their status, `now_s`); outputs are
values (`ScaleDecision`s, unschedulable workloads with reasons). Nothing here reads a clock.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray

from scheduling.explain import Explanation, Reason
from scheduling.filters import Free, compile_pod, first_failure, pod_capacity, static_mask
from scheduling.fleet import GPU_MILLI, Allocation, Fleet, NodeSpec
from scheduling.placement import PlacementResult, commit, place
from scheduling.pools import ClusterLimits, NodePool, PoolStatus, pool_index
from scheduling.scoring import DEFAULT_POLICY, Policy
from scheduling.workload import Batch, GangSpec, PodSpec, QueueItem, TopologyLevel

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

#: Pods per node are capped at this in the capacity matrix (a CPU-free pod would be infinite).
_CAP_LIMIT = 1 << 20
_EPS = 1e-9


# ---- decisions --------------------------------------------------------------------------


class DecisionKind(enum.Enum):
    """What a decision asks the pool manager to do."""

    SCALE_UP = "scale-up"  # add `delta` nodes to `pool`
    SCALE_DOWN = "scale-down"  # remove `remove_nodes` (all of `pool`)
    REPLACE = "replace"  # add `delta` nodes to `pool`, then remove `remove_nodes`


class DecisionReason(enum.Enum):
    """Why a decision was made."""

    PENDING_WORKLOADS = "pending-workloads"
    EMPTY = "empty"
    UNDERUTILIZED = "underutilized"
    CHEAPER_REPLACEMENT = "cheaper-replacement"
    # Several nodes (busy ones too) whose pods all fit on the rest of the fleet: Karpenter's
    # multi-node consolidation by deletion, which has no utilization threshold.
    CONSOLIDATION = "consolidation"


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """One change of one pool, a value the daemon streams and applies.

    `id` is derived from the decision's content and the pool's target size when it was made,
    so recomputing the same decision on the same state gives the same id (idempotent).
    delta: nodes added (> 0) or removed (< 0, = -len(remove_nodes) for SCALE_DOWN).
    cost_per_hour_delta: expected change of the fleet's price per hour.
    unblocks: pending workloads (pod or gang names) this lets run.
    moves: (pod, node) pairs: where displaced pods are expected to land (scale-down).
    add: for REPLACE, every (pool, nodes) the replacement adds (`pool`/`delta` are the
    first); the old nodes go once all of them are up.
    """

    id: str
    kind: DecisionKind
    cluster: str
    pool: str
    delta: int
    remove_nodes: tuple[str, ...]
    reason: DecisionReason
    cost_per_hour_delta: float
    unblocks: tuple[str, ...] = ()
    moves: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, int], ...] = ()

    @staticmethod
    def make(
        kind: DecisionKind,
        cluster: str,
        pool: str,
        delta: int,
        remove_nodes: Sequence[str],
        reason: DecisionReason,
        cost_per_hour_delta: float,
        *,
        target_size: int,
        unblocks: Sequence[str] = (),
        moves: Sequence[tuple[str, str]] = (),
        add: Sequence[tuple[str, int]] = (),
    ) -> ScaleDecision:
        """Build a decision with its content-derived id."""
        removed = tuple(sorted(remove_nodes))
        adds = tuple((str(p), int(n)) for p, n in add)
        key = json.dumps(
            [kind.value, cluster, pool, int(target_size), int(delta), removed, reason.value, adds],
            separators=(",", ":"),
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return ScaleDecision(
            id=f"{kind.value}-{digest}",
            kind=kind,
            cluster=cluster,
            pool=pool,
            delta=int(delta),
            remove_nodes=removed,
            reason=reason,
            cost_per_hour_delta=round(float(cost_per_hour_delta), 6),
            unblocks=tuple(sorted(unblocks)),
            moves=tuple(sorted(moves)),
            add=adds,
        )


class Block(enum.Enum):
    """Why a pending workload gets no capacity now (permanent ones are never retried)."""

    NO_POOL_FITS = "no-pool-fits"  # no pool's empty node takes a pod of it (permanent)
    GANG_NO_POOL = "gang-no-pool"  # no single pool can hold the gang at max size (permanent)
    MAX_SIZE = "max-size"
    COOLDOWN = "cooldown"
    CLUSTER_LIMIT = "cluster-limit"
    TEAM_LIMIT = "team-limit"
    NOT_PACKED = "not-packed"  # capacity was added but placement still did not fit it


PERMANENT_BLOCKS = frozenset({Block.NO_POOL_FITS, Block.GANG_NO_POOL})


@dataclass(frozen=True, slots=True)
class Unschedulable:
    """A pending workload the plan gives no capacity to, and why.

    explanation: for NO_POOL_FITS, per-reason counts over one empty node of every pool
    (its `text()` reads "0/6 nodes are available: 4 Insufficient nvidia.com/gpu, ...").
    """

    workload: str
    block: Block
    explanation: Explanation | None = None

    @property
    def permanent(self) -> bool:
        """True when no pool could ever fit it: report it, do not retry."""
        return self.block in PERMANENT_BLOCKS


# ---- requests and plans -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ScaleUpRequest:
    """Everything a scale-up decision depends on.

    fleet: the current fleet with its allocations (not mutated).
    pending: workloads placement could not fit (pods and gangs).
    pools / status: the pools and what was observed about them (missing status = empty).
    now_s: the injected clock (cooldowns and backoffs compare against it).
    team_of: workload name -> team; team_gpu_limit_milli: team -> max GPU milli the team
    may hold; team_gpu_in_use_milli: team -> GPU milli it holds now.
    anticipated: pods expected to arrive while the new nodes live (e.g. the pods that
    became pending during the last few minutes: the caller's sample of the arrival rate).
    They add no node and are never placed; they only take part in the *choice of pool*:
    the room a new node has left after the pending pods counts as serving as many of them
    as fit (weighted by `anticipation_weight`). A lone 1-GPU pod then gets a 4-GPU node at
    $0.98 per GPU-hour when more pods are on the way, rather than a 1-GPU node at $2.18.
    replaceable: running nodes (in disruption order, see `replace_candidates`) whose pods
    the new nodes may take along when capacity must be bought anyway (consolidation on
    scale-up): a prefix of them is retired when buying for the pending pods and theirs
    together saves more than `replace_min_saving_per_hour` (after
    `replace_saving_per_moved_pod_per_hour` for each pod it moves: an eviction's price)
    against buying for the pending
    pods alone and keeping them; the plan's `replace` says which. The candidates are of one
    cluster (the first's); with pools of several clusters their pods stay in it.
    """

    fleet: Fleet
    pending: tuple[QueueItem, ...]
    pools: tuple[NodePool, ...]
    status: Mapping[tuple[str, str], PoolStatus] = field(default_factory=dict)
    now_s: float = 0.0
    policy: Policy | str | None = None
    cluster_limits: Mapping[str, ClusterLimits] = field(default_factory=dict)
    team_of: Mapping[str, str] = field(default_factory=dict)
    team_gpu_limit_milli: Mapping[str, int] = field(default_factory=dict)
    team_gpu_in_use_milli: Mapping[str, int] = field(default_factory=dict)
    max_rounds: int = 3
    estimate_slack: float = 0.03
    anticipated: tuple[PodSpec, ...] = ()
    anticipation_weight: float = 1.0
    replaceable: tuple[ReplaceCandidate, ...] = ()
    replace_min_saving_per_hour: float = 1.0
    replace_saving_per_moved_pod_per_hour: float = 0.0

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be >= 1")
        if not 0 <= self.anticipation_weight <= 1:
            raise ValueError("anticipation_weight must be in 0..1")
        if self.replace_min_saving_per_hour < 0 or self.replace_saving_per_moved_pod_per_hour < 0:
            raise ValueError("replace_min_saving_per_hour and ..._per_moved_pod must be >= 0")
        if not 0 <= self.estimate_slack <= 1:
            raise ValueError("estimate_slack must be in 0..1")
        if not math.isfinite(self.now_s):
            raise ValueError("now_s must be finite")


@dataclass(frozen=True, eq=False)
class ScaleUpPlan:
    """The result of `plan_scale_up`.

    decisions: one SCALE_UP per pool that grows, in pool order.
    new_nodes: the hypothetical nodes (NodeSpecs) the decisions add, in the order the
    verification added them; `apply_scale_up(fleet, plan)` builds that fleet.
    fits_now: workloads that fit on current or in-flight capacity (no new node needed).
    unschedulable: workloads that get nothing, with the reason.
    allocations: (pod, Allocation) for every pod the plan places: one valid simultaneous
    assignment on fleet + in-flight + new nodes (what the claims rest on).
    queue: the pending workloads in the order they were simulated (`simulation_order`).
    replace: with `replaceable`, a REPLACE decision retiring the running nodes whose pods
    the new nodes also take (remove them once the new nodes are up, after `recheck`);
    the decisions and allocations then include those pods.
    """

    decisions: tuple[ScaleDecision, ...]
    new_nodes: tuple[NodeSpec, ...]
    in_flight_nodes: tuple[NodeSpec, ...]
    fits_now: tuple[str, ...]
    unschedulable: tuple[Unschedulable, ...]
    allocations: tuple[tuple[str, Allocation], ...] = ()
    queue: tuple[QueueItem, ...] = ()
    replace: ScaleDecision | None = None

    @property
    def cost_per_hour_delta(self) -> float:
        """Expected added price per hour (of the scale-up decisions)."""
        return float(sum(d.cost_per_hour_delta for d in self.decisions))

    @property
    def unblocked(self) -> tuple[str, ...]:
        """Every workload some decision unblocks."""
        return tuple(sorted({w for d in self.decisions for w in d.unblocks}))


def _status(status: Mapping[tuple[str, str], PoolStatus], pool: NodePool) -> PoolStatus:
    return status.get(pool.key, PoolStatus())


def in_flight_specs(
    pools: Sequence[NodePool], status: Mapping[tuple[str, str], PoolStatus]
) -> list[NodeSpec]:
    """Hypothetical nodes standing for the ones being provisioned (target - current)."""
    out: list[NodeSpec] = []
    for pool in pools:
        for i in range(_status(status, pool).in_flight):
            out.append(pool.node_spec(f"~{pool.cluster}/{pool.name}/{i}"))
    return out


def with_nodes(fleet: Fleet, specs: Sequence[NodeSpec]) -> Fleet:
    """A copy of `fleet` with `specs` added (empty), in order: a hypothetical fleet."""
    out = fleet.copy()
    for spec in specs:
        out.add_node(spec)
    return out


def apply_scale_up(fleet: Fleet, plan: ScaleUpPlan) -> Fleet:
    """The hypothetical fleet the plan was verified on: fleet + in-flight + new nodes."""
    return with_nodes(fleet, [*plan.in_flight_nodes, *plan.new_nodes])


# ---- capacity matrix --------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Capacity:
    """cap: (S, K) int64 pods of shape s one empty node of pool k takes (0 = never);
    first_failure: (S, K) int16 the first filter each pool's node fails for the shape."""

    cap: I64
    first_failure: NDArray[np.int16]


def capacity_matrix(pools: Sequence[NodePool], shapes: Sequence[PodSpec]) -> _Capacity:
    """How many pods of each shape fit on one empty node of each pool, computed by the
    placement engine's own filters on a template fleet holding one node per pool."""
    max_gpus = max([8, *(p.gpu_count for p in pools)])
    template = Fleet(max_gpus=max_gpus, initial_capacity=max(1, len(pools)))
    for i, pool in enumerate(pools):
        template.add_node(pool.node_spec(f"template/{i}"))
    rows = np.arange(len(pools), dtype=np.int64)
    free = Free.of(template)
    cap = np.zeros((len(shapes), len(pools)), np.int64)
    ff = np.zeros((len(shapes), len(pools)), np.int16)
    for s, shape in enumerate(shapes):
        c = compile_pod(template, shape)
        ok = static_mask(template, c, rows)
        cap[s] = np.where(ok, pod_capacity(free, c, rows, _CAP_LIMIT), 0)
        if not cap[s].any():
            ff[s] = first_failure(template, c, free, rows)
    return _Capacity(cap, ff)


# ---- scale-up ---------------------------------------------------------------------------


@dataclass
class _Budget:
    """Mutable headroom during one plan: whole nodes per pool and per-cluster caps."""

    nodes_left: F64  # (K,) nodes each pool may still add
    cluster_of: I64  # (K,) cluster index of each pool
    cluster_nodes_left: F64
    cluster_gpus_left: F64
    cluster_price_left: F64
    gpus: F64  # (K,)
    prices: F64  # (K,)

    def pool_room(self) -> F64:
        """(K,) nodes each pool may add now, counting its cluster's caps."""
        c = self.cluster_of
        room = np.minimum(self.nodes_left, self.cluster_nodes_left[c])
        with np.errstate(divide="ignore", invalid="ignore"):
            by_gpu = np.where(self.gpus > 0, self.cluster_gpus_left[c] / self.gpus, np.inf)
            by_price = np.where(self.prices > 0, self.cluster_price_left[c] / self.prices, np.inf)
        return np.maximum(0.0, np.floor(np.minimum(room, np.minimum(by_gpu, by_price)) + _EPS))

    def take(self, k: int, nodes: float) -> None:
        self.nodes_left[k] -= nodes
        c = int(self.cluster_of[k])
        self.cluster_nodes_left[c] -= nodes
        self.cluster_gpus_left[c] -= nodes * self.gpus[k]
        self.cluster_price_left[c] -= nodes * self.prices[k]


def _budget(req: ScaleUpRequest, pools: Sequence[NodePool], extra_nodes: I64) -> _Budget:
    clusters = sorted({p.cluster for p in pools})
    cidx = {c: i for i, c in enumerate(clusters)}
    k = len(pools)
    nodes_left = np.zeros(k, np.float64)
    for i, pool in enumerate(pools):
        st = _status(req.status, pool)
        cooling = (
            st.last_scale_up_s is not None
            and req.now_s < st.last_scale_up_s + pool.scale_up_cooldown_s
        ) or (st.backoff_until_s is not None and req.now_s < st.backoff_until_s)
        if not cooling:
            nodes_left[i] = max(0, pool.max_size - st.target_size) - int(extra_nodes[i])
    n_c = len(clusters)
    cn = np.full(n_c, np.inf)
    cg = np.full(n_c, np.inf)
    cp = np.full(n_c, np.inf)
    # Cluster caps count what the fleet holds now plus what is in flight.
    fleet = req.fleet
    live = fleet.live_mask()
    cl_ids = fleet.cluster_id[: fleet.n_slots]
    for name, lim in req.cluster_limits.items():
        if name not in cidx:
            continue
        i = cidx[name]
        fid = fleet.clusters.get(name)
        here = live & (cl_ids == fid) if fid >= 0 else np.zeros_like(live)
        inflight = [p for p in pools if p.cluster == name]
        fl_nodes = sum(_status(req.status, p).in_flight for p in inflight)
        fl_gpus = sum(_status(req.status, p).in_flight * p.gpu_count for p in inflight)
        fl_price = sum(_status(req.status, p).target_size * p.price_per_hour for p in inflight)
        if lim.max_nodes is not None:
            cn[i] = lim.max_nodes - int(here.sum()) - fl_nodes
        if lim.max_gpus is not None:
            cg[i] = lim.max_gpus - int(fleet.gpu_count[: fleet.n_slots][here].sum()) - fl_gpus
        if lim.max_price_per_hour is not None:
            cp[i] = lim.max_price_per_hour - fl_price
    return _Budget(
        nodes_left=np.maximum(nodes_left, 0.0),
        cluster_of=np.array([cidx[p.cluster] for p in pools], np.int64),
        cluster_nodes_left=np.maximum(cn, 0.0),
        cluster_gpus_left=np.maximum(cg, 0.0),
        cluster_price_left=np.maximum(cp, 0.0),
        gpus=np.array([p.gpu_count for p in pools], np.float64),
        prices=np.array([p.price_per_hour for p in pools], np.float64),
    )


def _blocked_reason(req: ScaleUpRequest, pools: Sequence[NodePool], fits: I64) -> Block:
    """Why pools that could fit a shape (indices `fits`) have no room: the cheapest's."""
    for k in sorted(fits.tolist(), key=lambda k: (pools[k].price_per_hour, k)):
        pool = pools[k]
        st = _status(req.status, pool)
        if (
            st.last_scale_up_s is not None
            and req.now_s < st.last_scale_up_s + pool.scale_up_cooldown_s
        ) or (st.backoff_until_s is not None and req.now_s < st.backoff_until_s):
            return Block.COOLDOWN
        if st.target_size >= pool.max_size:
            return Block.MAX_SIZE
        if pool.cluster in req.cluster_limits:
            return Block.CLUSTER_LIMIT
    return Block.MAX_SIZE


def simulation_order(
    items: Sequence[QueueItem], n_fit: Mapping[tuple[object, ...], int]
) -> list[QueueItem]:
    """The order in which the autoscaler simulates pending workloads: priority first (as
    the scheduler's queue), then the most constrained (fewest pools that fit), then the
    largest (first-fit decreasing), then input order. Constrained-first keeps workloads that
    could run anywhere (e.g. spot-tolerant ones) from taking the room opened for the rest.

    n_fit: pod shape key -> number of pools whose empty node fits that shape."""
    keys = []
    for i, it in enumerate(items):
        pods = it.pods if isinstance(it, GangSpec) else (it,)
        size = sum(p.gpu_milli_total for p in pods), sum(p.cpu_millicores for p in pods)
        fit = min(n_fit.get(p.shape_key, 0) for p in pods)
        keys.append((-it.priority, fit, -size[0], -size[1], i))
    return [items[k[-1]] for k in sorted(keys)]


def _choose_nodes(
    counts: I64,
    gangs: Sequence[tuple[int, dict[int, int], TopologyLevel]],
    shapes: Sequence[PodSpec],
    cap: I64,
    budget: _Budget,
    shape_order: Sequence[int],
    domains: Mapping[TopologyLevel, I64],
    ahead: tuple[I64, I64] | None = None,
    ahead_weight: float = 1.0,
) -> tuple[I64, I64, dict[int, int]]:
    """Greedy cheapest node additions for pod counts per shape and whole gangs.

    Fractional model: a pod of shape s uses 1/cap[s,k] of a node of pool k, and pods of
    several shapes share opened nodes (the verification runs check the real packing).
    Shapes are taken in `shape_order` (constrained first, as the simulation order).
    Returns (nodes per pool (K,), pods assigned per shape and pool (S, K), gang -> pool
    for gangs on one pool; gangs spread over several pools of one domain are left to the
    verification's shared run). domains: per level, the (K,) domain id of each pool.
    ahead: (counts (A,), cap (A, K)) of anticipated pods: a new node's room left after the
    pending pods serves as many of them as fit (weight `ahead_weight`) when pools are
    compared; what one choice counts on is not counted again by the next.
    """
    k_pools = cap.shape[1]
    used = np.zeros(k_pools, np.float64)  # fractional nodes used on each pool
    prices = budget.prices
    gang_nodes = np.zeros(k_pools, np.int64)
    gang_pool: dict[int, int] = {}
    assign = np.zeros(cap.shape, np.int64)
    # Gangs first (largest first): whole nodes of one pool, so one zone and one rack.
    order = sorted(range(len(gangs)), key=lambda g: -sum(gangs[g][1].values()))
    for g in order:
        gid, need, level = gangs[g]
        frac = np.zeros(k_pools, np.float64)
        for s, n in need.items():
            with np.errstate(divide="ignore"):
                frac += np.where(cap[s] > 0, n / np.maximum(cap[s], 1), np.inf)
        nodes = np.ceil(frac - _EPS)
        if level is TopologyLevel.NODE:
            nodes = np.where(frac <= 1 + _EPS, nodes, np.inf)
        room = budget.pool_room()
        ok = np.isfinite(nodes) & (nodes <= room)
        if not ok.any():
            # No single pool holds it: several pools of one domain of its level may.
            if level is not TopologyLevel.NODE:
                spread = _gang_spread(need, cap, room, prices, domains[level])
                if spread is not None:
                    gang_nodes += spread
                    for k in np.flatnonzero(spread).tolist():
                        budget.take(k, float(spread[k]))
            continue
        cost = np.where(ok, nodes * prices, np.inf)
        k = int(np.lexsort((np.arange(k_pools), nodes, cost))[0])
        gang_nodes[k] += int(nodes[k])
        gang_pool[gid] = k
        budget.take(k, float(nodes[k]))
    left = counts.astype(np.int64).copy()
    ahead_left = ahead[0].astype(np.int64).copy() if ahead is not None else None
    ahead_inv = (
        np.where(ahead[1] > 0, 1.0 / np.maximum(ahead[1], 1), np.inf) if ahead is not None else None
    )

    def expected_extra(k: int, room_left: float) -> tuple[I64 | None, int]:
        """Anticipated pods the room left on new nodes of pool k would serve."""
        if ahead_left is None or ahead_inv is None or room_left <= _EPS:
            return None, 0
        fits_k = np.isfinite(ahead_inv[:, k]) & (ahead_left > 0)
        if not fits_k.any():
            return None, 0
        took_a = np.zeros(ahead_left.size, np.int64)
        got, _ = _fill(ahead_left[fits_k], ahead_inv[fits_k, k], room_left)
        took_a[fits_k] = got
        return took_a, int(got.sum())

    # Shapes that fit the same pools form a group, costed together: several small shapes
    # may fill a large node that none of them would pay for alone. Groups go in the order
    # of their first shape (constrained first).
    groups: dict[tuple[bool, ...], list[int]] = {}
    for s in shape_order:
        sig = tuple((cap[s] > 0).tolist())
        if left[s] > 0 and any(sig):
            groups.setdefault(sig, []).append(s)
    for members in groups.values():
        ss = np.asarray(members, np.int64)
        inv = 1.0 / np.maximum(cap[ss], 1).astype(np.float64)  # (m, K) node share per pod
        ok = cap[ss[0]] > 0
        while left[ss].sum() > 0:
            opened = np.ceil(used - _EPS)
            spare = np.where(ok, opened - used, 0.0)
            # Room in nodes already opened costs nothing.
            filled = False
            for k in np.flatnonzero(spare > _EPS).tolist():
                took, usage = _fill(left[ss], inv[:, k], float(spare[k]))
                if took.any():
                    assign[ss, k] += took
                    left[ss] -= took
                    used[k] += usage
                    filled = True
            if filled:
                continue
            room = budget.pool_room()
            total = (left[ss][:, None] * inv).sum(axis=0)  # (K,) nodes for all of the group
            best: tuple[float, float, int, int] | None = None
            for k in np.flatnonzero(ok & (room >= 1)).tolist():
                whole = math.floor(total[k] + _EPS)
                for n_new in {min(room[k], math.ceil(total[k] - _EPS)), min(room[k], whole)}:
                    if n_new < 1:
                        continue
                    took, usage = _fill(left[ss], inv[:, k], float(n_new))
                    served = int(took.sum())
                    if served == 0:
                        continue
                    _, extra = expected_extra(k, n_new - usage)
                    spend = float(n_new * prices[k])
                    cand = (spend / (served + ahead_weight * extra), spend, k, int(n_new))
                    if best is None or cand[:3] < best[:3]:
                        best = cand
            if best is None:
                break
            _, _, k, n_open = best
            took, usage = _fill(left[ss], inv[:, k], float(n_open))
            taken_ahead, _ = expected_extra(k, n_open - usage)
            if taken_ahead is not None and ahead_left is not None:
                ahead_left -= taken_ahead
            assign[ss, k] += took
            left[ss] -= took
            used[k] = math.ceil(used[k] - _EPS) + usage
            budget.take(k, float(n_open))
    nodes_out = np.ceil(used - _EPS).astype(np.int64) + gang_nodes
    return nodes_out, assign, gang_pool


def _fill(counts: I64, share: F64, room: float) -> tuple[I64, float]:
    """Take pods (counts per member, in order) while their node shares fit in `room`
    nodes. Returns (taken per member, node share used)."""
    took = np.zeros(counts.size, np.int64)
    left = room
    for j in range(counts.size):
        if counts[j] <= 0 or share[j] > left + _EPS:
            continue
        m = min(int(counts[j]), math.floor(left / share[j] + _EPS))
        took[j] = m
        left -= m * share[j]
    return took, room - left


def plan_scale_up(req: ScaleUpRequest) -> ScaleUpPlan:
    """The cheapest node additions (see `_plan_scale_up`), and with `req.replaceable` the
    best consolidation on scale-up: for each prefix of the candidates (up to every one),
    plan for the pending pods plus the prefix's pods on the fleet without those nodes;
    keep the prefix that saves most (old nodes' price + the plain plan's cost - the joint
    plan's cost), if it saves more than `replace_min_saving_per_hour`, moves every pod of
    the prefix and leaves no more pending pods without capacity than the plain plan."""
    # Capacity rows per pod shape, shared by the plain and the joint plans (same pools).
    rows: dict[tuple[object, ...], tuple[I64, NDArray[np.int16]]] = {}
    plan = _plan_scale_up(req, rows)
    if not req.replaceable or not plan.decisions:
        return plan
    # One cluster's nodes per request (the first candidate's); with pools of several
    # clusters, the pods taken along stay in theirs.
    cluster = req.replaceable[0].cluster
    several = len({p.cluster for p in req.pools}) > 1
    plain_cost = plan.cost_per_hour_delta
    blocked = {u.workload for u in plan.unschedulable}
    drained = req.fleet.copy()
    moved: list[PodSpec] = []
    taken: list[ReplaceCandidate] = []
    best: tuple[float, ScaleUpPlan, list[ReplaceCandidate], float] | None = None
    for cand in req.replaceable:
        if cand.cluster != cluster or cand.node not in drained:
            continue
        for rp in cand.pods:
            drained.free(rp.allocation)
            moved.append(replace(rp.pod, clusters=(cluster,)) if several else rp.pod)
        drained.set_flags(cand.node, cordoned=True)
        taken.append(cand)
        joint = _plan_scale_up(
            replace(req, fleet=drained, pending=(*req.pending, *moved), replaceable=()), rows
        )
        unsched = {u.workload for u in joint.unschedulable}
        if (
            not any(d.cluster == cluster for d in joint.decisions)
            or unsched - blocked
            or any(p.name in unsched for p in moved)
        ):
            continue
        saving = sum(c.price_per_hour for c in taken) + plain_cost - joint.cost_per_hour_delta
        # Each pod moved must pay for its eviction: the prefix with the best net saving.
        net = saving - req.replace_saving_per_moved_pod_per_hour * len(moved)
        if net > req.replace_min_saving_per_hour + _EPS and (best is None or net > best[0]):
            best = (net, joint, list(taken), saving)
    if best is None:
        return plan
    _, joint, retired, saving = best
    names = {rp.pod.name for c in retired for rp in c.pods}
    pending_names = {it.name for it in req.pending}
    first = next(d for d in joint.decisions if d.cluster == cluster)
    status = _status(req.status, next(p for p in req.pools if p.key == (cluster, first.pool)))
    retire = ScaleDecision.make(
        DecisionKind.REPLACE,
        cluster,
        first.pool,
        first.delta,
        [c.node for c in retired],
        DecisionReason.CHEAPER_REPLACEMENT,
        -saving,
        target_size=status.target_size,
        moves=[(p, a.node) for p, a in joint.allocations if p in names],
        add=[(d.pool, d.delta) for d in joint.decisions if d.cluster == cluster],
    )
    decisions = tuple(
        replace(d, unblocks=tuple(w for w in d.unblocks if w in pending_names))
        for d in joint.decisions
    )
    return replace(joint, decisions=decisions, replace=retire)


def _plan_scale_up(
    req: ScaleUpRequest, cap_rows: dict[tuple[object, ...], tuple[I64, NDArray[np.int16]]]
) -> ScaleUpPlan:
    """The cheapest node additions (found greedily, verified by placement) that let the
    pending workloads run; infeasible and blocked workloads are reported with reasons.

    Steps: (1) place on the fleet plus in-flight nodes; (2) report workloads no pool fits;
    (3) choose node additions on the capacity matrix; (4) verify by placing, pool by pool,
    the workloads the choice sent to each pool on a small fleet of that pool's new nodes,
    then whatever is left on every node together; (5) repeat (3)-(4) for the rest;
    drop new nodes nothing landed on. The result's `allocations` are one valid
    simultaneous assignment of every placed pod on fleet + in-flight + new nodes.
    """
    pools = tuple(req.pools)
    pool_index(pools)  # duplicate check
    policy = (
        req.policy if isinstance(req.policy, Policy) else Policy.parse(req.policy or DEFAULT_POLICY)
    )
    inflight = in_flight_specs(pools, req.status)
    base = with_nodes(req.fleet, inflight)
    queue, unsched = _admit_teams(req, list(req.pending))
    if not queue:
        return ScaleUpPlan((), (), tuple(inflight), (), tuple(unsched), (), ())
    # One capacity matrix for every pending shape, reused by every step below.
    shapes_all = Batch.of(queue).shapes
    missing = [sh for sh in shapes_all if sh.shape_key not in cap_rows]
    if missing:
        fresh = capacity_matrix(pools, missing)
        for i, sh in enumerate(missing):
            cap_rows[sh.shape_key] = (fresh.cap[i], fresh.first_failure[i])
    capm = _Capacity(
        np.array([cap_rows[sh.shape_key][0] for sh in shapes_all], np.int64).reshape(
            len(shapes_all), len(pools)
        ),
        np.array([cap_rows[sh.shape_key][1] for sh in shapes_all], np.int16).reshape(
            len(shapes_all), len(pools)
        ),
    )
    gidx = {sh.shape_key: s for s, sh in enumerate(shapes_all)}
    ahead: tuple[I64, I64] | None = None
    if req.anticipated and req.anticipation_weight > 0:
        ab = Batch.of(list(req.anticipated))
        ahead = (
            np.bincount(ab.shape_of, minlength=len(ab.shapes)).astype(np.int64),
            capacity_matrix(pools, ab.shapes).cap,
        )
    n_fit_rows = (capm.cap > 0).sum(axis=1).tolist()
    queue = simulation_order(queue, {key: int(n_fit_rows[s]) for key, s in gidx.items()})
    domains = pool_domains(pools)
    allocs: dict[str, Allocation] = {}
    work = base
    rest = queue
    if len(base):
        first = place(base, queue, policy)
        work = commit_copy(base, first)
        _record(first, allocs)
        ok_first = _items_placed(Batch.of(queue), first)
        rest = [it for it, ok in zip(queue, ok_first, strict=True) if not ok]
    rest_ids = {id(it) for it in rest}
    fits_now = tuple(it.name for it in queue if id(it) not in rest_ids)
    # Permanently infeasible: some pod fits no pool's empty node.
    never: NDArray[np.bool_] = np.asarray(~capm.cap.any(axis=1), dtype=np.bool_)
    feasible: list[QueueItem] = []
    for it in rest:
        pods = it.pods if isinstance(it, GangSpec) else (it,)
        bad = [p for p in pods if never[gidx[p.shape_key]]]
        if bad:
            ff = capm.first_failure[gidx[bad[0].shape_key]] if pools else None
            expl = Explanation.from_first_failures(ff) if ff is not None else None
            unsched.append(Unschedulable(it.name, Block.NO_POOL_FITS, expl))
        else:
            feasible.append(it)
    added: list[NodeSpec] = []
    # New nodes and per-pool runs not yet copied into `work` (only the shared leftover
    # run needs them there, so the copy is skipped when nothing is left over).
    pending_specs: list[NodeSpec] = []
    pending_runs: list[tuple[Fleet, PlacementResult]] = []
    serial = 0
    todo = feasible
    for _ in range(max(1, req.max_rounds)):
        if not todo:
            break
        tb = Batch.of(todo)
        rows = [gidx[sh.shape_key] for sh in tb.shapes]
        tcap = capm.cap[rows]
        counts = np.bincount(tb.shape_of[tb.gang_of < 0], minlength=len(tb.shapes))
        gangs: list[tuple[int, dict[int, int], TopologyLevel]] = []
        for gi, gang in enumerate(tb.gangs):
            need: dict[int, int] = {}
            for sh in tb.shape_of[tb.gang_of == gi].tolist():
                need[int(sh)] = need.get(int(sh), 0) + 1
            gangs.append((gi, need, gang.required_level))
        extra = np.zeros(len(pools), np.int64)
        for sp in added:
            extra[_pool_of(pools, sp)] += 1
        budget = _budget(req, pools, extra)
        room0 = budget.pool_room()
        # Shapes in the order they first appear in the (constrained-first) queue.
        first_at = np.full(len(tb.shapes), len(tb.pods), np.int64)
        np.minimum.at(first_at, tb.shape_of, np.arange(len(tb.pods)))
        shape_order = np.argsort(first_at, kind="stable").tolist()
        nodes, assign, gang_pool = _choose_nodes(
            counts.astype(np.int64), gangs, tb.shapes, tcap, budget, shape_order, domains,
            ahead, req.anticipation_weight,
        )  # fmt: skip
        # Slack: the estimate assumes perfect mixing; a few spare nodes avoid another
        # round and are dropped if unused.
        nodes = np.where(
            nodes > 0,
            np.minimum(nodes + np.floor(nodes * req.estimate_slack), room0).astype(np.int64),
            0,
        )
        if not nodes.any():
            break
        round_specs: list[NodeSpec] = []
        for k in np.flatnonzero(nodes).tolist():
            pool = pools[k]
            for _ in range(int(nodes[k])):
                round_specs.append(pool.node_spec(f"+{pool.cluster}/{pool.name}/{serial}"))
                serial += 1
        added += round_specs
        pending_specs += round_specs
        # Which workloads the choice sent to which pool: the first assign[s, k] solo pods
        # of shape s (in queue order) to pool k, and each gang to its pool.
        to_pool: dict[int, list[QueueItem]] = {}
        tb_index = {sh.shape_key: i for i, sh in enumerate(tb.shapes)}
        gang_ids = {id(g): i for i, g in enumerate(tb.gangs)}
        left_of_shape = {
            s_: list(np.flatnonzero(assign[s_]).tolist()) for s_ in range(len(tb.shapes))
        }
        quota = assign.copy()
        for it in todo:
            if isinstance(it, GangSpec):
                gi = gang_ids[id(it)]
                if gi in gang_pool:
                    to_pool.setdefault(gang_pool[gi], []).append(it)
                continue
            s_ = tb_index[it.shape_key]
            ks = left_of_shape[s_]
            while ks and quota[s_, ks[0]] == 0:
                ks.pop(0)
            if ks:
                quota[s_, ks[0]] -= 1
                to_pool.setdefault(ks[0], []).append(it)
        # Each pool's share runs on a small fleet of just that pool's new (empty) nodes:
        # the same engine, a fraction of the rows.
        specs_of: dict[int, list[NodeSpec]] = {}
        for sp in round_specs:
            specs_of.setdefault(_pool_of(pools, sp), []).append(sp)
        for k in sorted(to_pool):
            specs_k = specs_of.get(k, [])
            if not specs_k:
                continue
            sub = with_nodes(Fleet(max_gpus=base.max_gpus, initial_capacity=len(specs_k)), specs_k)
            res = place(sub, to_pool[k], policy)
            pending_runs.append((sub, res))
            _record(res, allocs)
        leftover = [it for it in todo if not _all_allocated(it, allocs)]
        if leftover:
            # The shared run needs every node and every allocation so far in one fleet.
            work = with_nodes(work, pending_specs)
            for sub, res in pending_runs:
                _commit_by_name(work, sub, res)
            pending_specs, pending_runs = [], []
            res = place(work, leftover, policy)
            commit(work, res)
            _record(res, allocs)
        still = [it for it in todo if not _all_allocated(it, allocs)]
        progress = len(still) < len(todo)
        todo = still
        if not progress:
            break
    # Drop new nodes nothing landed on.
    used_nodes = {a.node for a in allocs.values()}
    kept = [sp for sp in added if sp.name in used_nodes]
    pool_of_node = {sp.name: _pool_of(pools, sp) for sp in kept}
    unblocks: dict[int, set[str]] = {}
    for it in queue:
        if it.name in fits_now or not _all_allocated(it, allocs):
            continue
        pods = it.pods if isinstance(it, GangSpec) else (it,)
        for p in pods:
            kp = pool_of_node.get(allocs[p.name].node)
            if kp is not None:
                unblocks.setdefault(kp, set()).add(it.name)
    nodes_by_pool = np.zeros(len(pools), np.int64)
    for sp in kept:
        nodes_by_pool[_pool_of(pools, sp)] += 1
    decisions = []
    for k in np.flatnonzero(nodes_by_pool).tolist():
        pool = pools[k]
        delta = int(nodes_by_pool[k])
        decisions.append(
            ScaleDecision.make(
                DecisionKind.SCALE_UP,
                pool.cluster,
                pool.name,
                delta,
                (),
                DecisionReason.PENDING_WORKLOADS,
                delta * pool.price_per_hour,
                target_size=_status(req.status, pool).target_size,
                unblocks=sorted(unblocks.get(k, set())),
            )
        )
    reported = {u.workload for u in unsched}
    placed_names = {it.name for it in queue if _all_allocated(it, allocs)}
    # Feasible but still without capacity: say which limit stopped it.
    for it in queue:
        if it.name in placed_names or it.name in reported:
            continue
        pods = it.pods if isinstance(it, GangSpec) else (it,)
        fits_k = np.flatnonzero(capm.cap[gidx[pods[0].shape_key]] > 0)
        if isinstance(it, GangSpec) and not _gang_fits_some_pool(
            it, gidx, capm.cap, pools, domains
        ):
            unsched.append(Unschedulable(it.name, Block.GANG_NO_POOL))
            continue
        room = _budget(req, pools, nodes_by_pool).pool_room()
        if (room[fits_k] >= 1).any():
            unsched.append(Unschedulable(it.name, Block.NOT_PACKED))
        else:
            unsched.append(Unschedulable(it.name, _blocked_reason(req, pools, fits_k)))
    allocations = tuple(sorted(allocs.items()))
    return ScaleUpPlan(
        decisions=tuple(decisions),
        new_nodes=tuple(kept),
        in_flight_nodes=tuple(inflight),
        fits_now=fits_now,
        unschedulable=tuple(unsched),
        allocations=allocations,
        queue=tuple(queue),
    )


def _admit_teams(
    req: ScaleUpRequest, items: list[QueueItem]
) -> tuple[list[QueueItem], list[Unschedulable]]:
    """Admit workloads in order while their team stays under its GPU limit."""
    if not req.team_gpu_limit_milli:
        return items, []
    used = dict(req.team_gpu_in_use_milli)
    kept: list[QueueItem] = []
    out: list[Unschedulable] = []
    for item in items:
        team = req.team_of.get(item.name)
        limit = req.team_gpu_limit_milli.get(team) if team is not None else None
        if team is not None and limit is not None:
            pods = item.pods if isinstance(item, GangSpec) else (item,)
            milli = sum(p.gpu_milli_total for p in pods)
            if used.get(team, 0) + milli > limit:
                out.append(Unschedulable(item.name, Block.TEAM_LIMIT))
                continue
            used[team] = used.get(team, 0) + milli
        kept.append(item)
    return kept, out


def _record(res: PlacementResult, allocs: dict[str, Allocation]) -> None:
    """Add the placed pods of a run to `allocs` (pod name -> allocation)."""
    for i in np.flatnonzero(res.placed).tolist():
        node = res.node(i)
        if node is not None:
            allocs[res.pod_names[i]] = Allocation(
                node,
                int(res.cpu_millicores[i]),
                int(res.memory_bytes[i]),
                res.gpu_indices(i),
                int(res.gpu_milli_per_gpu[i]),
            )


def _commit_by_name(work: Fleet, sub: Fleet, res: PlacementResult) -> None:
    """Commit a placement computed on `sub` into `work`, whose nodes have the same names
    (and the same GPU layout): slots are translated by name, all or nothing."""
    sel = res.placed
    if not sel.any():
        return
    to_work = np.full(sub.n_slots, -1, np.int64)
    for slot in np.flatnonzero(sub.live_mask()).tolist():
        to_work[slot] = work.slot(sub.name_of(slot))
    work.allocate_many(
        to_work[res.node_slot[sel]],
        res.cpu_millicores[sel],
        res.memory_bytes[sel],
        res.gpu_mask[sel],
        res.gpu_milli_per_gpu[sel],
    )


def _all_allocated(item: QueueItem, allocs: Mapping[str, Allocation]) -> bool:
    pods = item.pods if isinstance(item, GangSpec) else (item,)
    return all(p.name in allocs for p in pods)


def _gang_fits_some_pool(
    gang: GangSpec,
    index: Mapping[tuple[object, ...], int],
    cap: I64,
    pools: Sequence[NodePool],
    domains: Mapping[TopologyLevel, I64],
) -> bool:
    """Whether some pool, or some pools of one domain of the gang's level, could hold the
    whole gang at their max sizes (if not, it is permanently infeasible)."""
    need: dict[int, int] = {}
    for p in gang.pods:
        s = index[p.shape_key]
        need[s] = need.get(s, 0) + 1
    for k, pool in enumerate(pools):
        frac = 0.0
        for s, n in need.items():
            if cap[s, k] <= 0:
                frac = math.inf
                break
            frac += n / cap[s, k]
        if math.isinf(frac) or (gang.required_level is TopologyLevel.NODE and frac > 1 + _EPS):
            continue
        if math.ceil(frac - _EPS) <= pool.max_size:
            return True
    if gang.required_level is TopologyLevel.NODE:
        return False
    max_room = np.array([p.max_size for p in pools], np.float64)
    prices = np.array([p.price_per_hour for p in pools], np.float64)
    return _gang_spread(need, cap, max_room, prices, domains[gang.required_level]) is not None


def pool_domains(pools: Sequence[NodePool]) -> dict[TopologyLevel, I64]:
    """Per topology level, the (K,) domain id of each pool's nodes (a gang's domain)."""
    out: dict[TopologyLevel, I64] = {}
    keys: dict[TopologyLevel, list[tuple[str, ...]]] = {
        TopologyLevel.CLUSTER: [(p.cluster,) for p in pools],
        TopologyLevel.ZONE: [(p.cluster, p.zone) for p in pools],
        TopologyLevel.RACK: [(p.cluster, p.zone, p.rack) for p in pools],
    }
    for level, ks in keys.items():
        ids: dict[tuple[str, ...], int] = {}
        out[level] = np.array([ids.setdefault(k, len(ids)) for k in ks], np.int64)
    out[TopologyLevel.NODE] = np.arange(len(pools), dtype=np.int64)
    return out


def _gang_spread(need: Mapping[int, int], cap: I64, room: F64, prices: F64, dom: I64) -> I64 | None:
    """The cheapest way to hold a whole gang on several pools of ONE domain: per domain,
    fill its pools cheapest first (by what the whole gang would cost on each) up to their
    room. Returns nodes per pool (K,), or None when no domain can hold it."""
    shapes = sorted(need)
    counts = np.array([need[s] for s in shapes], np.int64)
    sub = cap[shapes].astype(np.float64)  # (m, K)
    with np.errstate(divide="ignore"):
        share = np.where(sub > 0, 1.0 / np.maximum(sub, 1.0), np.inf)
    units = (counts[:, None] * share).sum(axis=0)
    # (K,) cost of the whole gang on each pool alone (inf where some member does not fit)
    whole = np.where(np.isfinite(units), units * prices, np.inf)
    best: tuple[float, I64] | None = None
    for d in np.unique(dom).tolist():
        left = counts.copy()
        nodes = np.zeros(cap.shape[1], np.int64)
        ks = np.flatnonzero((dom == d) & (room >= 1) & (sub > 0).any(axis=0))
        for k in sorted(ks.tolist(), key=lambda k: (whole[k], k)):
            took, usage = _fill(left, share[:, k], float(room[k]))
            if took.any():
                nodes[k] = math.ceil(usage - _EPS)
                left -= took
            if not left.any():
                break
        if left.any():
            continue
        cost = float((nodes * prices).sum())
        if best is None or cost < best[0]:
            best = (cost, nodes)
    return None if best is None else best[1]


def _pool_of(pools: Sequence[NodePool], spec: NodeSpec) -> int:
    for k, pool in enumerate(pools):
        if pool.cluster == spec.cluster and pool.name == spec.node_pool:
            return k
    raise KeyError(f"node {spec.name!r} belongs to no known pool")


def _items_placed(batch: Batch, result: PlacementResult) -> list[bool]:
    """Per queue item (pod or whole gang): every pod of it was placed."""
    n = len(batch.pods)
    if n == 0:
        return []
    g = batch.gang_of.astype(np.int64)
    # An item starts at every solo pod and at the first member of each gang.
    starts = np.flatnonzero((g < 0) | np.concatenate([[True], g[1:] != g[:-1]]))
    ok = np.minimum.reduceat(result.placed.astype(np.int8), starts)
    return [bool(x) for x in ok.tolist()]


def commit_copy(fleet: Fleet, result: PlacementResult) -> Fleet:
    """A copy of `fleet` with `result` committed."""
    out = fleet.copy()
    commit(out, result)
    return out


# ---- scale-down and consolidation -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunningPod:
    """A pod running on a node: its spec and exactly what it holds there.

    do_not_disrupt: never move it (karpenter.sh/do-not-disrupt). gang: name of its gang
    ("" = none); moving one member would restart the gang, so gang pods are not moved.
    """

    pod: PodSpec
    node: str
    gpu_indices: tuple[int, ...] = ()
    do_not_disrupt: bool = False
    gang: str = ""

    @property
    def allocation(self) -> Allocation:
        """The allocation this pod holds."""
        return Allocation(
            self.node,
            self.pod.cpu_millicores,
            self.pod.memory_bytes,
            tuple(self.gpu_indices),
            self.pod.milli_per_gpu if self.gpu_indices else 0,
        )


@dataclass(frozen=True, slots=True)
class ConsolidationOptions:
    """Knobs of `plan_scale_down`.

    stabilization_window_s: a node is a candidate only once nothing changed on it for this
    long (Karpenter's consolidateAfter; cluster-autoscaler's scale-down-unneeded-time).
    empty_window_s: the same for empty nodes (None: stabilization_window_s).
    utilization_threshold: non-empty nodes are candidates below this fraction (GPU nodes:
    GPU share in use; CPU nodes: the larger of CPU and memory in use).
    delay_after_scale_up_s: no scale-down of a pool this soon after it scaled up.
    replace: also try replacing several nodes (under-utilized or not) by fewer or cheaper
    new ones of one pool.
    min_saving_per_hour: a replacement must save at least this much.
    max_replace_candidates: how many candidates the replacement search considers at once.
    """

    stabilization_window_s: float = 600.0
    empty_window_s: float | None = None
    utilization_threshold: float = 0.5
    delay_after_scale_up_s: float = 0.0
    replace: bool = True
    min_saving_per_hour: float = 0.0
    max_replace_candidates: int = 16

    def __post_init__(self) -> None:
        if self.stabilization_window_s < 0 or (self.empty_window_s or 0) < 0:
            raise ValueError("stabilization windows must be >= 0")
        if not 0 <= self.utilization_threshold <= 1:
            raise ValueError("utilization_threshold must be in 0..1")
        if self.delay_after_scale_up_s < 0 or self.min_saving_per_hour < 0:
            raise ValueError("delay_after_scale_up_s and min_saving_per_hour must be >= 0")
        if self.max_replace_candidates < 1:
            raise ValueError("max_replace_candidates must be >= 1")


@dataclass(frozen=True, eq=False)
class ScaleDownRequest:
    """Everything a scale-down decision depends on.

    fleet: current fleet with the running pods' allocations; running: those pods.
    node_since_s: node -> time of the last change on it (created, pod added or removed);
    a node missing here is treated as just changed (not a candidate).
    """

    fleet: Fleet
    running: tuple[RunningPod, ...]
    pools: tuple[NodePool, ...]
    status: Mapping[tuple[str, str], PoolStatus] = field(default_factory=dict)
    node_since_s: Mapping[str, float] = field(default_factory=dict)
    now_s: float = 0.0
    policy: Policy | str | None = None
    options: ConsolidationOptions = ConsolidationOptions()
    cluster_limits: Mapping[str, ClusterLimits] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class ScaleDownPlan:
    """decisions: SCALE_DOWN (per pool and reason) and REPLACE decisions, in the order to
    apply them. removed: every node removed. moves: (pod, node) expected re-placements."""

    decisions: tuple[ScaleDecision, ...]
    removed: tuple[str, ...]
    moves: tuple[tuple[str, str], ...]

    @property
    def cost_per_hour_delta(self) -> float:
        """Expected change of the price per hour (negative: saving)."""
        return float(sum(d.cost_per_hour_delta for d in self.decisions))


@dataclass
class _NodeFacts:
    slot: int
    name: str
    pool: int  # index in pools
    pods: list[RunningPod]
    utilization: float
    movable: bool


def node_utilization(fleet: Fleet, slot: int) -> float:
    """Fraction of a node in use: GPU share for GPU nodes, else max(CPU, memory)."""
    g = int(fleet.gpu_count[slot])
    if g > 0:
        used = g * GPU_MILLI - int(fleet.gpu_free_milli[slot, :g].astype(np.int64).sum())
        return used / (g * GPU_MILLI)
    cpu_a = int(fleet.cpu_allocatable_millicores[slot])
    mem_a = int(fleet.memory_allocatable_bytes[slot])
    cpu = int(fleet.cpu_allocated_millicores[slot]) / cpu_a if cpu_a else 0.0
    mem = int(fleet.memory_allocated_bytes[slot]) / mem_a if mem_a else 0.0
    return max(cpu, mem)


def _facts(req: ScaleDownRequest) -> dict[str, _NodeFacts]:
    pools = req.pools
    by_key = pool_index(pools)
    fleet = req.fleet
    pods_on: dict[str, list[RunningPod]] = {}
    for rp in req.running:
        pods_on.setdefault(rp.node, []).append(rp)
    out: dict[str, _NodeFacts] = {}
    for slot in np.flatnonzero(fleet.live_mask()).tolist():
        name = fleet.name_of(slot)
        cluster = fleet.clusters.names[int(fleet.cluster_id[slot])]
        pool_name = fleet.pools.names[int(fleet.pool_id[slot])]
        k = by_key.get((cluster, pool_name))
        if k is None:
            continue  # not managed by a pool
        pods = pods_on.get(name, [])
        movable = not any(p.do_not_disrupt or p.gang for p in pods)
        out[name] = _NodeFacts(slot, name, k, pods, node_utilization(fleet, slot), movable)
    return out


def _stable(req: ScaleDownRequest, node: _NodeFacts) -> bool:
    opts = req.options
    window = opts.stabilization_window_s
    if not node.pods and opts.empty_window_s is not None:
        window = opts.empty_window_s
    since = req.node_since_s.get(node.name)
    if since is None or req.now_s < since + window:
        return False
    st = _status(req.status, req.pools[node.pool])
    return not (
        st.last_scale_up_s is not None
        and req.now_s < st.last_scale_up_s + opts.delay_after_scale_up_s
    )


def overpayment(pools: Sequence[NodePool], nodes: Sequence[_NodeFacts]) -> dict[str, float]:
    """Per node, its price minus what its pods would cost at the best rate any pool offers
    them ($/h): a pod is worth the price per pod of the pool that holds such pods
    cheapest (price / pods of its shape per node, as the scale-up greedy counts).

    The most overpaid nodes are what consolidation should move first: a full 1-GPU node
    at $2.18 overpays $1.20 against 4-GPU nodes at $0.98 a GPU; price per utilization
    alone would rank it below a 4-GPU node 75% used."""
    shapes: dict[tuple[object, ...], PodSpec] = {}
    for f in nodes:
        for rp in f.pods:
            shapes.setdefault(rp.pod.shape_key, rp.pod)
    if not shapes:
        return {f.name: 0.0 for f in nodes}
    reps = list(shapes.values())
    cap = capacity_matrix(pools, reps).cap
    prices = np.array([p.price_per_hour for p in pools], np.float64)
    per_pod = np.where(cap > 0, prices[None, :] / np.maximum(cap, 1), np.inf).min(axis=1)
    worth = np.where(np.isfinite(per_pod), per_pod, 0.0)
    row = {key: i for i, key in enumerate(shapes)}
    return {
        f.name: pools[f.pool].price_per_hour
        - float(sum(worth[row[rp.pod.shape_key]] for rp in f.pods))
        for f in nodes
    }


@dataclass(frozen=True, slots=True)
class ReplaceCandidate:
    """A running node a scale-up may retire by taking its pods along (`replaceable`)."""

    node: str
    cluster: str
    pool: str
    price_per_hour: float
    pods: tuple[RunningPod, ...]


def replace_candidates(req: ScaleDownRequest, limit: int = 4) -> tuple[ReplaceCandidate, ...]:
    """The nodes consolidation could move now (pool nodes, stable for the window, no
    do-not-disrupt or gang pod, not empty: empty ones are plain deletions), most expensive
    overpaid first (`overpayment`), at most each pool's disruption allowance and `limit`
    in all."""
    facts = _facts(req)
    left = []
    for pool in req.pools:
        st = _status(req.status, pool)
        size = max(st.target_size, st.current_size)
        budget = pool.disruption_budget.allowed(size) - st.disrupting
        left.append(max(0, min(budget, st.target_size - pool.min_size)))
    stable = [f for f in facts.values() if f.movable and f.pods and _stable(req, f)]
    over = overpayment(req.pools, stable)
    cands = sorted(stable, key=lambda f: (-over[f.name], f.slot))
    out: list[ReplaceCandidate] = []
    for f in cands:
        if len(out) >= limit:
            break
        if left[f.pool] <= 0:
            continue
        left[f.pool] -= 1
        pool = req.pools[f.pool]
        out.append(
            ReplaceCandidate(f.name, pool.cluster, pool.name, pool.price_per_hour, tuple(f.pods))
        )
    return tuple(out)


def _try_drain(
    work: Fleet, nodes: Sequence[_NodeFacts], policy: Policy, extra: Sequence[NodeSpec] = ()
) -> tuple[Fleet, list[tuple[str, str]]] | None:
    """Simulate removing `nodes` from `work`: free their pods, cordon them, place the pods on
    the rest (plus `extra` hypothetical nodes). The new fleet and the moves, or None."""
    trial = work.copy()
    pods: list[PodSpec] = []
    for node in nodes:
        for rp in node.pods:
            trial.free(rp.allocation)
            pods.append(rp.pod)
        trial.set_flags(node.name, cordoned=True)
    for spec in extra:
        trial.add_node(spec)
    if not pods:
        return trial, []
    res = place(trial, pods, policy)
    if not res.placed.all():
        return None
    commit(trial, res)
    moves = [(pods[i].name, res.node(i) or "") for i in range(len(pods))]
    return trial, moves


def plan_scale_down(req: ScaleDownRequest) -> ScaleDownPlan:
    """Nodes to remove (empty first, then under-utilized) and replacements, each checked by
    re-placing the displaced pods with the placement engine; budgets, min sizes,
    do-not-disrupt and the stabilization window are honoured."""
    policy = (
        req.policy if isinstance(req.policy, Policy) else Policy.parse(req.policy or DEFAULT_POLICY)
    )
    pools = req.pools
    facts = _facts(req)
    # Per pool: how many nodes may still go (budget, min size).
    allowance: list[int] = []
    for pool in pools:
        st = _status(req.status, pool)
        size = max(st.target_size, st.current_size)
        budget = pool.disruption_budget.allowed(size) - st.disrupting
        allowance.append(max(0, min(budget, st.target_size - pool.min_size)))
    cands = [f for f in facts.values() if f.movable and _stable(req, f)]
    empty = sorted(
        (f for f in cands if not f.pods), key=lambda f: (-req.pools[f.pool].price_per_hour, f.slot)
    )
    under = sorted(
        (f for f in cands if f.pods and f.utilization < req.options.utilization_threshold),
        key=lambda f: (f.utilization, len(f.pods), -req.pools[f.pool].price_per_hour, f.slot),
    )
    work = req.fleet.copy()
    removed: dict[DecisionReason, dict[int, list[str]]] = {}
    receivers: set[str] = set()
    gone: set[str] = set()
    for reason, group in ((DecisionReason.EMPTY, empty), (DecisionReason.UNDERUTILIZED, under)):
        for f in group:
            if allowance[f.pool] <= 0 or f.name in receivers:
                continue
            out = _try_drain(work, [f], policy)
            if out is None:
                continue
            work, moves = out
            allowance[f.pool] -= 1
            gone.add(f.name)
            # A node that just took displaced pods is not drained in the same pass.
            receivers.update(node for _, node in moves)
            removed.setdefault(reason, {}).setdefault(f.pool, []).append(f.name)
    decisions: list[ScaleDecision] = []
    for reason in (DecisionReason.EMPTY, DecisionReason.UNDERUTILIZED):
        for k, names in sorted(removed.get(reason, {}).items()):
            pool = pools[k]
            decisions.append(
                ScaleDecision.make(
                    DecisionKind.SCALE_DOWN,
                    pool.cluster,
                    pool.name,
                    -len(names),
                    names,
                    reason,
                    -len(names) * pool.price_per_hour,
                    target_size=_status(req.status, pool).target_size,
                )
            )
    if req.options.replace:
        # Replacement looks at every stable node, busy ones too (Karpenter's consolidation
        # is cost-driven): four full 1-GPU nodes may cost more than one 4-GPU node. Most
        # overpaid first, so a prefix groups the wasteful nodes.
        rest = [f for f in cands if f.pods and f.name not in gone and f.name not in receivers]
        over = overpayment(pools, rest)
        rest.sort(key=lambda f: (-over[f.name], f.slot))
        rep = _plan_replacement(req, work, rest, allowance, policy)
        if rep is not None:
            decisions.extend(rep[0])
    # Final check, one placement run of every displaced pod on the fleet after the whole
    # plan (the steps above were checked one at a time); drop decisions from the end until
    # it holds. Its result gives the expected moves.
    while decisions:
        plan = ScaleDownPlan(tuple(decisions), (), ())
        after, pods = apply_scale_down(req.fleet, req.running, plan, pools)
        res = place(after, pods, policy)
        if res.placed.all():
            dest = {pods[i].name: res.node(i) or "" for i in range(len(pods))}
            node_of = {rp.pod.name: rp.node for rp in req.running}
            final = []
            for d in decisions:
                removed_here = set(d.remove_nodes)
                moves = [(p, n) for p, n in dest.items() if node_of[p] in removed_here]
                final.append(replace(d, moves=tuple(sorted(moves))))
            gone_all = sorted(n for d in final for n in d.remove_nodes)
            all_moves = sorted(dest.items())
            return ScaleDownPlan(tuple(final), tuple(gone_all), tuple(all_moves))
        decisions.pop()
    return ScaleDownPlan((), (), ())


def replacement_specs(decision: ScaleDecision, pools: Sequence[NodePool]) -> list[NodeSpec]:
    """Hypothetical nodes standing for the new nodes of a REPLACE decision."""
    if decision.kind is not DecisionKind.REPLACE:
        return []
    index = pool_index(tuple(pools))
    out: list[NodeSpec] = []
    for name, count in decision.add or ((decision.pool, decision.delta),):
        pool = pools[index[(decision.cluster, name)]]
        out += [pool.node_spec(f"+{pool.cluster}/{pool.name}/r{i}") for i in range(count)]
    return out


def apply_scale_down(
    fleet: Fleet, running: Sequence[RunningPod], plan: ScaleDownPlan, pools: Sequence[NodePool]
) -> tuple[Fleet, list[PodSpec]]:
    """The fleet after a scale-down plan (removed nodes gone with their pods, replacement
    nodes added empty) and the displaced pods, in the plan's order, to be re-placed."""
    out = fleet.copy()
    gone = [n for d in plan.decisions for n in d.remove_nodes]
    rank = {n: i for i, n in enumerate(gone)}
    displaced = sorted((rp for rp in running if rp.node in rank), key=lambda rp: rank[rp.node])
    for rp in displaced:
        out.free(rp.allocation)
    for name in gone:
        out.remove_node(name)
    for d in plan.decisions:
        for spec in replacement_specs(d, pools):
            out.add_node(spec)
    return out, [rp.pod for rp in displaced]


def _plan_replacement(
    req: ScaleDownRequest,
    work: Fleet,
    cands: list[_NodeFacts],
    allowance: list[int],
    policy: Policy,
) -> tuple[list[ScaleDecision], list[str], list[tuple[str, str]]] | None:
    """Karpenter's multi-node consolidation: the largest prefix of the candidates (in
    disruption order) whose pods fit on the remaining nodes plus new nodes (chosen by
    `plan_scale_up`) that cost less than the nodes removed, or on the remaining nodes
    alone (deletion, one SCALE_DOWN per pool). The whole group is tried first, then a
    binary search over the prefix length."""
    by_cluster: dict[str, list[_NodeFacts]] = {}
    for f in cands:
        by_cluster.setdefault(req.pools[f.pool].cluster, []).append(f)
    best: tuple[float, list[ScaleDecision], list[str], list[tuple[str, str]]] | None = None
    for cluster in sorted(by_cluster):
        group: list[_NodeFacts] = []
        left = list(allowance)
        for f in by_cluster[cluster]:
            if left[f.pool] > 0 and len(group) < req.options.max_replace_candidates:
                group.append(f)
                left[f.pool] -= 1
        # The whole group first (binary search alone misses e.g. two nodes that only pay
        # off together), then the largest prefix that works.
        found = _replace_prefix(req, work, group, cluster, policy) if group else None
        lo, hi = 1, len(group) - 1
        best_prefix = None
        while found is None and lo <= hi:
            mid = (lo + hi) // 2
            attempt = _replace_prefix(req, work, group[:mid], cluster, policy)
            if attempt is not None:
                best_prefix = attempt
                lo = mid + 1
            else:
                hi = mid - 1
            if lo > hi and best_prefix is not None:
                found = best_prefix
        if found is not None and (best is None or found[0] > best[0]):
            best = found
    if best is None:
        return None
    return best[1], best[2], best[3]


def _replace_prefix(
    req: ScaleDownRequest,
    work: Fleet,
    group: list[_NodeFacts],
    cluster: str,
    policy: Policy,
) -> tuple[float, list[ScaleDecision], list[str], list[tuple[str, str]]] | None:
    old_price = sum(req.pools[f.pool].price_per_hour for f in group)
    drained = work.copy()
    pods: list[PodSpec] = []
    for f in group:
        for rp in f.pods:
            drained.free(rp.allocation)
            pods.append(rp.pod)
        drained.set_flags(f.name, cordoned=True)
    pools_here = tuple(p for p in req.pools if p.cluster == cluster)
    plan = plan_scale_up(
        ScaleUpRequest(
            fleet=drained,
            pending=tuple(pods),
            pools=pools_here,
            status=req.status,
            now_s=req.now_s,
            policy=policy,
            cluster_limits=req.cluster_limits,
        )
    )
    if plan.unschedulable:
        return None
    if not plan.decisions:
        # Every pod fits on the remaining nodes: delete the group (busy nodes too: four
        # full 1-GPU nodes whose pods fit in free room elsewhere cost $8.70/h for nothing).
        if old_price <= req.options.min_saving_per_hour + _EPS:
            return None
        out = _try_drain(work, group, policy)
        if out is None:
            return None
        _, moves = out
        by_pool: dict[int, list[str]] = {}
        for f in group:
            by_pool.setdefault(f.pool, []).append(f.name)
        deletions = [
            ScaleDecision.make(
                DecisionKind.SCALE_DOWN,
                cluster,
                req.pools[k].name,
                -len(names),
                names,
                DecisionReason.CONSOLIDATION,
                -len(names) * req.pools[k].price_per_hour,
                target_size=_status(req.status, req.pools[k]).target_size,
                moves=[(p, n) for p, n in moves if p in {rp.pod.name for f in group
                                                         if f.name in names for rp in f.pods}],
            )
            for k, names in sorted(by_pool.items())
        ]  # fmt: skip
        return old_price, deletions, [f.name for f in group], moves
    up = plan.decisions[0]
    saving = old_price - plan.cost_per_hour_delta
    if saving <= req.options.min_saving_per_hour + _EPS:
        return None
    names = [f.name for f in group]
    new_specs = [s for s in plan.new_nodes]
    out = _try_drain(work, group, policy, new_specs)
    if out is None:
        return None
    _, moves = out
    pool = next(p for p in pools_here if p.name == up.pool)
    decision = ScaleDecision.make(
        DecisionKind.REPLACE,
        cluster,
        up.pool,
        up.delta,
        names,
        DecisionReason.CHEAPER_REPLACEMENT,
        -saving,
        target_size=_status(req.status, pool).target_size,
        moves=moves,
        add=[(d.pool, d.delta) for d in plan.decisions],
    )
    return saving, [decision], names, moves


# ---- the controller's settings, shared by the daemon and the benchmark ------------------


@dataclass(frozen=True, slots=True)
class AutoscalePolicy:
    """How an autoscaler drives the plans above: the same decision logic in the daemon
    (`fleetd.autoscaler`, from the `autoscaling` config section) and in the benchmark that
    measures it (`benchmarks.autoscale`).

    consolidation: options of every `plan_scale_down` round (empty nodes, under-utilized
    ones, replacement); replacement (the expensive search) runs at most every
    `replace_every_s` (see `consolidation_round`), deletions every round.
    scale_up_replace_nodes: consolidation on scale-up, how many stable nodes a scale-up may
    take along (`scale_up_replaceable`; 0 = off); it must save more than
    `scale_up_replace_min_saving_per_hour` after `scale_up_replace_saving_per_pod_per_hour`
    for each pod it moves (what an eviction is counted to cost).
    """

    consolidation: ConsolidationOptions = ConsolidationOptions(
        stabilization_window_s=600.0,
        empty_window_s=600.0,
        utilization_threshold=0.5,
        replace=True,
        max_replace_candidates=8,
        min_saving_per_hour=2.0,
    )
    replace_every_s: float = 7200.0
    scale_up_replace_nodes: int = 2
    scale_up_replace_min_saving_per_hour: float = 1.0
    scale_up_replace_saving_per_pod_per_hour: float = 0.25

    def __post_init__(self) -> None:
        if self.replace_every_s < 0 or not math.isfinite(self.replace_every_s):
            raise ValueError("replace_every_s must be finite and >= 0")
        if self.scale_up_replace_nodes < 0:
            raise ValueError("scale_up_replace_nodes must be >= 0")
        if self.scale_up_replace_min_saving_per_hour < 0:
            raise ValueError("scale_up_replace_min_saving_per_hour must be >= 0")
        if self.scale_up_replace_saving_per_pod_per_hour < 0:
            raise ValueError("scale_up_replace_saving_per_pod_per_hour must be >= 0")


def scale_up_replaceable(
    down: ScaleDownRequest, policy: AutoscalePolicy, busy: Collection[str] = ()
) -> tuple[ReplaceCandidate, ...]:
    """The nodes a scale-up may take along (`ScaleUpRequest.replaceable`): the first
    `policy.scale_up_replace_nodes` of `replace_candidates(down)` that are not `busy`
    (nodes already retiring under an earlier replacement)."""
    n = policy.scale_up_replace_nodes
    if n <= 0:
        return ()
    busy = set(busy)
    return tuple(c for c in replace_candidates(down, n + len(busy)) if c.node not in busy)[:n]


def consolidation_round(
    policy: AutoscalePolicy, now_s: float, last_replace_s: float | None
) -> tuple[ConsolidationOptions, float | None]:
    """The options of a consolidation round at `now_s` and the new time of the last
    replacement search: replacement only when `replace_every_s` passed since the last
    (like Karpenter's multi-node consolidation, it is the expensive search)."""
    opts = policy.consolidation
    if not opts.replace:
        return opts, last_replace_s
    if last_replace_s is not None and now_s < last_replace_s + policy.replace_every_s:
        return replace(opts, replace=False), last_replace_s
    return opts, now_s


def retirement(decision: ScaleDecision) -> ScaleDecision:
    """The removal half of a REPLACE as a SCALE_DOWN of the same nodes: what is re-checked
    (and streamed) once the replacement's new nodes are up, when the displaced pods must
    fit on the fleet as it then is."""
    return ScaleDecision.make(
        DecisionKind.SCALE_DOWN,
        decision.cluster,
        decision.pool,
        -len(decision.remove_nodes),
        decision.remove_nodes,
        decision.reason,
        decision.cost_per_hour_delta,
        target_size=0,
        moves=decision.moves,
    )


# ---- re-check before emitting -----------------------------------------------------------


class RecheckFailure(enum.Enum):
    """Why a disruptive decision is no longer valid on a fresh snapshot."""

    NODE_GONE = "node-gone"
    DO_NOT_DISRUPT = "do-not-disrupt"
    BUDGET = "budget"
    MIN_SIZE = "min-size"
    CANNOT_REPLACE_PODS = "cannot-replace-pods"
    UNKNOWN_POOL = "unknown-pool"
    # The new nodes of a consolidation on scale-up did not come up in time: the old nodes
    # it would retire stay.
    REPLACEMENT_NOT_UP = "replacement-not-up"


def recheck(decision: ScaleDecision, fresh: ScaleDownRequest) -> RecheckFailure | None:
    """Re-validate a SCALE_DOWN or REPLACE decision against a fresh snapshot (None = still
    valid). Scale-ups are always valid (they only add capacity)."""
    if decision.kind is DecisionKind.SCALE_UP:
        return None
    policy = (
        fresh.policy
        if isinstance(fresh.policy, Policy)
        else Policy.parse(fresh.policy or DEFAULT_POLICY)
    )
    facts = _facts(fresh)
    nodes: list[_NodeFacts] = []
    for name in decision.remove_nodes:
        f = facts.get(name)
        if f is None:
            return RecheckFailure.NODE_GONE
        if not f.movable:
            return RecheckFailure.DO_NOT_DISRUPT
        nodes.append(f)
    per_pool: dict[int, int] = {}
    for f in nodes:
        per_pool[f.pool] = per_pool.get(f.pool, 0) + 1
    for k, n in per_pool.items():
        pool = fresh.pools[k]
        st = _status(fresh.status, pool)
        size = max(st.target_size, st.current_size)
        if n > pool.disruption_budget.allowed(size) - st.disrupting:
            return RecheckFailure.BUDGET
        if st.target_size - n < pool.min_size:
            return RecheckFailure.MIN_SIZE
    if decision.kind is DecisionKind.REPLACE and (
        decision.cluster,
        decision.pool,
    ) not in pool_index(fresh.pools):
        return RecheckFailure.UNKNOWN_POOL
    extra = replacement_specs(decision, fresh.pools)
    if _try_drain(fresh.fleet, nodes, policy, extra) is None:
        return RecheckFailure.CANNOT_REPLACE_PODS
    return None


__all__ = [
    "AutoscalePolicy",
    "Block",
    "ConsolidationOptions",
    "DecisionKind",
    "DecisionReason",
    "Reason",
    "RecheckFailure",
    "ReplaceCandidate",
    "RunningPod",
    "ScaleDecision",
    "ScaleDownPlan",
    "ScaleDownRequest",
    "ScaleUpPlan",
    "ScaleUpRequest",
    "Unschedulable",
    "apply_scale_up",
    "capacity_matrix",
    "consolidation_round",
    "in_flight_specs",
    "node_utilization",
    "plan_scale_down",
    "plan_scale_up",
    "recheck",
    "replace_candidates",
    "retirement",
    "scale_up_replaceable",
    "with_nodes",
]
