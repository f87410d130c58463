"""The daemon's autoscaling loop: queued workloads -> the core's scale-up plan -> the stream.

Every `autoscaling.scale_up_after_s` (when something is queued) it runs
`scheduling.autoscale.plan_scale_up` on the live fleet, the queued workloads and the node
pools the sources reported, and publishes each new decision on `NodePools.WatchScaleDecisions` (decision ids
are content-derived, so a decision recomputed on the same state is not published twice).
Decisions are advice to whatever manages the pools; the daemon counts the nodes it asked
for as in flight (target size) until the pool reports them, so it does not ask twice. The
simulated fleet can play the pool manager (`sources.simulated.apply_scale_decisions`).

With `autoscaling.scale_down` it also plans scale-down and consolidation, with the same
decision logic the autoscale benchmark measures (`scheduling.autoscale.AutoscalePolicy`
from the config: `autoscale_policy`): deletions every round, the replacement search at
most every `replace_every_s`, and consolidation on scale-up: a scale-up may take along
the pods of a few stable nodes (`scale_up_replaceable`); those nodes are retired (a
SCALE_DOWN, reason cheaper-replacement) once the pools of the new nodes report them up,
after a re-check, or kept when they are not up within `scale_up_replace_timeout_s`.
Every disruptive decision is re-checked (`scheduling.autoscale.recheck`) against a fresh
snapshot of fleet state taken when it is about to be emitted, after the decisions emitted
before it: their nodes take no displaced pods and count against their pool's disruption
budget until they are gone (Karpenter validates a consolidation command the same way
before executing it).

With `autoscaling.dry_run` every decision is still computed and streamed, marked
`dry_run`, but the daemon neither counts it as in flight nor as disrupting, and pool
managers (the simulated one included) ignore it. A consolidation on scale-up's retirement
is then streamed at once (its new nodes will never come up), re-checked with them
simulated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from fleetd.config import AutoscalingConfig, Config
from fleetd.metrics import Metrics
from fleetd.sources import updates as up
from fleetd.state import FleetState
from scheduling import GPU_MILLI, Allocation, PodSpec
from scheduling.autoscale import (
    AutoscalePolicy,
    ConsolidationOptions,
    DecisionKind,
    DecisionReason,
    RecheckFailure,
    RunningPod,
    ScaleDecision,
    ScaleDownRequest,
    ScaleUpRequest,
    consolidation_round,
    plan_scale_down,
    plan_scale_up,
    recheck,
    retirement,
    scale_up_replaceable,
)
from scheduling.fleet import Taint
from scheduling.pools import CapacityType, NodePool, PoolStatus
from scheduling.workload import LabelOp, LabelRequirement, Toleration

log = logging.getLogger("fleetd.autoscaler")
#: Pods with this label set to "true" are never moved by consolidation (Karpenter's).
DO_NOT_DISRUPT_LABEL = "karpenter.sh/do-not-disrupt"


def pending_pod_spec(p: up.PendingPod) -> PodSpec | None:
    """The core's PodSpec of a cluster's pending pod, limited to its cluster and named
    `namespace/name` (None when its requests cannot be expressed: logged)."""
    try:
        return PodSpec(
            name=p.key,
            cpu_millicores=p.requests.cpu_millicores,
            memory_bytes=p.requests.memory_bytes,
            num_gpu=p.requests.gpus,
            node_selector=p.node_selector,
            affinity=tuple(
                LabelRequirement(r.key, LabelOp(r.operator), r.values) for r in p.affinity
            ),
            tolerations=tuple(
                Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
                for t in p.tolerations
            ),
            priority=p.priority,
            clusters=(p.cluster,),
        )
    except ValueError as exc:
        log.warning(
            "pending pod cannot be planned for",
            extra={"cluster": p.cluster, "pod": p.key, "error": str(exc)},
        )
        return None


def node_pool(u: up.NodePoolUpdate) -> NodePool | None:
    """The core's NodePool of a reported pool (None when it cannot make nodes)."""
    try:
        capacity = CapacityType(u.capacity_type.value)
    except ValueError:
        capacity = CapacityType.ON_DEMAND
    gpus = u.allocatable.gpus
    try:
        return NodePool(
            name=u.name,
            cluster=u.cluster,
            cpu_millicores=u.allocatable.cpu_millicores,
            memory_bytes=u.allocatable.memory_bytes,
            price_per_hour=u.price_per_hour,
            gpu_count=gpus,
            gpu_model=u.gpu_model if gpus else "",
            gpu_memory_mib=u.gpu_memory_bytes // 2**20,
            zone=u.zones[0] if u.zones else "",
            capacity_type=capacity,
            min_size=min(u.min_size, u.max_size),
            max_size=max(u.max_size, u.current_size),
            # The pool's nodes carry its labels and taints: pods' selectors and
            # tolerations (pending pods from the clusters) are planned against them.
            labels=dict(u.labels),
            taints=tuple(Taint(t.key, t.value, t.effect) for t in u.taints),
        )
    except ValueError as exc:
        log.warning("node pool cannot be autoscaled", extra={"pool": u.name, "error": str(exc)})
        return None


def autoscale_policy(cfg: AutoscalingConfig) -> AutoscalePolicy:
    """The core's controller settings from the `autoscaling` config section (the defaults
    are the autoscale benchmark's `AutoscalePolicy()`)."""
    return AutoscalePolicy(
        consolidation=ConsolidationOptions(
            stabilization_window_s=cfg.scale_down_after_s,
            empty_window_s=cfg.scale_down_empty_after_s,
            utilization_threshold=cfg.scale_down_utilization,
            replace=True,
            max_replace_candidates=cfg.replace_max_nodes,
            min_saving_per_hour=cfg.replace_min_saving_per_hour,
        ),
        replace_every_s=cfg.replace_every_s,
        scale_up_replace_nodes=cfg.scale_up_replace_nodes if cfg.scale_down else 0,
        scale_up_replace_min_saving_per_hour=cfg.scale_up_replace_min_saving_per_hour,
        scale_up_replace_saving_per_pod_per_hour=cfg.scale_up_replace_saving_per_pod_per_hour,
    )


@dataclass(frozen=True, slots=True)
class Retirement:
    """The old nodes of a consolidation on scale-up, waiting for its new nodes.

    decision: the plan's REPLACE; up_when: pool key -> the size at which the pool holds the
    new nodes (the target the scale-up set); since_s: when it was planned."""

    decision: ScaleDecision
    up_when: tuple[tuple[tuple[str, str], int], ...]
    since_s: float


class Autoscaler:
    """Plans scale-ups for queued workloads and streams them (runs on the state's loop)."""

    def __init__(
        self,
        state: FleetState,
        config: Callable[[], Config],
        clock: Callable[[], float],
        metrics: Metrics | None = None,
    ) -> None:
        """`config` returns the live (hot-reloaded) configuration."""
        self.metrics = metrics
        self.state = state
        self.config = config
        self.clock = clock
        #: Pool key -> the size fleetd asked for (until the pool reports at least that).
        self.targets: dict[tuple[str, str], int] = {}
        #: Node -> pool key of nodes a streamed (not dry-run) scale-down or replacement
        #: removes, until they are gone: they count against the pool's disruption budget,
        #: take no displaced pods and are not advised again.
        self.disrupting: dict[str, tuple[str, str]] = {}
        #: Why disruptive decisions were dropped by the re-check (reason -> count).
        self.recheck_failures: dict[RecheckFailure, int] = {}
        #: Consolidations on scale-up whose new nodes are not up yet (their old nodes are
        #: neither offered again nor drained by another decision meanwhile).
        self.retiring: list[Retirement] = []
        #: When the last replacement search ran (`consolidation_round`).
        self.last_replace_s: float | None = None
        #: When scale-down / consolidation last ran (`tick`).
        self.last_down_s: float | None = None
        self.published: set[str] = set()
        self._last_inputs: object = None

    def policy(self) -> AutoscalePolicy:
        """The live config's controller settings."""
        return autoscale_policy(self.config().autoscaling)

    def retiring_nodes(self) -> set[str]:
        """Nodes waiting to be retired by a consolidation on scale-up."""
        return {n for r in self.retiring for n in r.decision.remove_nodes}

    def _pools(self) -> list[NodePool]:
        """The pools to plan with: none of a cluster whose sync is lost (its sizes and nodes
        are not known to be current: no nodes are asked for there and none are removed)."""
        lost = self.state.lost_clusters
        return [
            p
            for p in (node_pool(u) for u in self.state.pools.values() if u.cluster not in lost)
            if p is not None
        ]

    def _publish(self, decision: ScaleDecision, from_size: int | None, dry_run: bool) -> None:
        self.published.add(decision.id)
        self.state.publish_scale(decision, from_size=from_size, dry_run=dry_run)
        if self.metrics is not None:
            self.metrics.scale_decisions.labels(
                decision.kind.value, "true" if dry_run else "false"
            ).inc()
        log.info(
            "scale decision",
            extra={"id": decision.id, "kind": decision.kind.value, "cluster": decision.cluster,
                   "pool": decision.pool, "delta": decision.delta,
                   "remove": len(decision.remove_nodes), "unblocks": len(decision.unblocks),
                   "cost_per_hour_delta": decision.cost_per_hour_delta, "dry_run": dry_run},
        )  # fmt: skip

    def _record_cost(self, decisions: list[ScaleDecision], dry_run: bool) -> None:
        if decisions and self.metrics is not None:
            self.metrics.scale_cost.labels("true" if dry_run else "false").set(
                sum(d.cost_per_hour_delta for d in decisions)
            )

    def step(self) -> list[ScaleDecision]:
        """One planning round; returns the decisions it published."""
        state = self.state
        dry_run = self.config().autoscaling.dry_run
        # Reported pending pods go like silent nodes (see FleetState.expire_pending_pods).
        state.expire_pending_pods(self.config().staleness.node_stale_after_s)
        if not (state.queue or state.pending_pods) or not state.pools or not state.ready:
            return []
        pools = self._pools()
        status = {}
        for p in pools:
            current = state.pools[p.key].current_size
            target = max(current, self.targets.get(p.key, 0))
            if target == current:
                self.targets.pop(p.key, None)
            status[p.key] = PoolStatus(current_size=current, target_size=target)
        # Workloads their team's quota holds back wait for the team, not for capacity.
        queued = sorted(
            (q for q in state.queue.values() if not state.quota_blocked(q.request)),
            key=lambda q: (-q.priority, q.seq),
        )
        # Same queue, same pools, same fleet structure: the same plan (already published).
        inputs = (
            tuple(sorted(q.request.workload_id for q in queued)),
            state.pending_version,
            tuple(sorted((k, u.current_size, u.max_size) for k, u in state.pools.items())),
            len(state.nodes),
            tuple(sorted(self.targets.items())),
            tuple(sorted(state.lost_clusters)),
            dry_run,
        )
        if inputs == self._last_inputs:
            return []
        self._last_inputs = inputs
        items = [state.workload_item(q.request) for q in queued]
        # The core names a pod by its pod name and a gang by its name: map back to workloads.
        workload_of = {
            item.name: q.request.workload_id for item, q in zip(items, queued, strict=True)
        }
        # The clusters' unschedulable pods are pending work too (named namespace/name).
        for pending_pod in state.pending_pod_list():
            if pending_pod.cluster in state.lost_clusters:
                continue  # its cluster's view is not current: it may be bound by now
            spec = pending_pod_spec(pending_pod)
            if spec is not None:
                items.append(spec)
        # Highest priority first (stable: queued workloads before pods of equal priority).
        items.sort(key=lambda item: -item.priority)
        pending = tuple(items)
        policy = self.policy()
        # Consolidation on scale-up: stable nodes whose pods the new nodes may take along
        # (not those already being removed or retired).
        replaceable = (
            scale_up_replaceable(
                self.down_request(), policy, self.retiring_nodes() | set(self.disrupting)
            )
            if policy.scale_up_replace_nodes
            else ()
        )
        plan = plan_scale_up(
            ScaleUpRequest(
                fleet=state.fleet,
                pending=pending,
                pools=tuple(pools),
                status=status,
                now_s=self.clock(),
                policy=state.policy,
                replaceable=replaceable,
                replace_min_saving_per_hour=policy.scale_up_replace_min_saving_per_hour,
                replace_saving_per_moved_pod_per_hour=policy.scale_up_replace_saving_per_pod_per_hour,
            )
        )
        out = []
        for decision in plan.decisions:
            if decision.id in self.published:
                continue
            decision = replace(
                decision,
                unblocks=tuple(sorted({workload_of.get(n, n) for n in decision.unblocks})),
            )
            key = (decision.cluster, decision.pool)
            if not dry_run:  # a dry-run decision is not in flight: nobody acts on it
                self.targets[key] = status[key].target_size + decision.delta
            self._publish(decision, status[key].target_size, dry_run)
            out.append(decision)
        if plan.replace is not None and plan.replace.id not in self.published:
            out += self._plan_retirement(plan.replace, plan.decisions, status, dry_run)
        self._record_cost(out, dry_run)
        return out

    def _plan_retirement(
        self,
        decision: ScaleDecision,
        ups: Sequence[ScaleDecision],
        status: dict[tuple[str, str], PoolStatus],
        dry_run: bool,
    ) -> list[ScaleDecision]:
        """Hold a consolidation on scale-up's old nodes until its new nodes are up; in
        dry-run mode (nothing comes up) re-check it with the new nodes simulated and stream
        its retirement at once."""
        self.published.add(decision.id)
        if dry_run:
            failure = recheck(decision, self.down_request())
            if failure is not None:
                self._dropped(decision, failure)
                return []
            return self._emit_retirement(decision, dry_run=True)
        up_when = tuple(
            sorted(
                ((d.cluster, d.pool), status[(d.cluster, d.pool)].target_size + d.delta)
                for d in ups
                if d.cluster == decision.cluster
            )
        )
        self.retiring.append(Retirement(decision, up_when, self.clock()))
        return []

    def step_retire(self) -> list[ScaleDecision]:
        """Retire the old nodes of consolidations on scale-up whose new nodes are up (each
        re-checked on a fresh snapshot as a SCALE_DOWN: their pods must fit on the fleet
        as it is now); drop those whose new nodes are not up in time."""
        state = self.state
        timeout_s = self.config().autoscaling.scale_up_replace_timeout_s
        out: list[ScaleDecision] = []
        waiting: list[Retirement] = []
        for r in self.retiring:
            pools = state.pools
            up = all(k in pools and pools[k].current_size >= size for k, size in r.up_when)
            if not up:
                if self.clock() - r.since_s > timeout_s:
                    self._dropped(r.decision, RecheckFailure.REPLACEMENT_NOT_UP)
                else:
                    waiting.append(r)
                continue
            if r.decision.cluster in state.lost_clusters:
                waiting.append(r)  # its cluster's view is not current: decide later
                continue
            failure = recheck(retirement(r.decision), self.down_request())
            if failure is not None:
                self._dropped(r.decision, failure)
                continue
            out += self._emit_retirement(r.decision, dry_run=False)
        self.retiring = waiting
        self._record_cost(out, False)
        return out

    def _emit_retirement(self, decision: ScaleDecision, *, dry_run: bool) -> list[ScaleDecision]:
        """Stream the removal of a consolidation's old nodes: one SCALE_DOWN per pool."""
        by_pool: dict[tuple[str, str], list[str]] = {}
        for node in decision.remove_nodes:
            key = self._pool_of_node(node, (decision.cluster, decision.pool))
            by_pool.setdefault(key, []).append(node)
        prices = {p.key: p.price_per_hour for p in self._pools()}
        out = []
        for key, nodes in sorted(by_pool.items()):
            pool = self.state.pools.get(key)
            target = max(pool.current_size if pool else 0, self.targets.get(key, 0))
            part = ScaleDecision.make(
                DecisionKind.SCALE_DOWN,
                key[0],
                key[1],
                -len(nodes),
                nodes,
                DecisionReason.CHEAPER_REPLACEMENT,
                -len(nodes) * prices.get(key, 0.0),
                target_size=target,
            )
            self._publish(part, target, dry_run)
            if not dry_run:
                for node in nodes:
                    self.disrupting[node] = key
            out.append(part)
        return out

    def _dropped(self, decision: ScaleDecision, failure: RecheckFailure) -> None:
        self.recheck_failures[failure] = self.recheck_failures.get(failure, 0) + 1
        if self.metrics is not None:
            self.metrics.scale_recheck_failures.labels(failure.value).inc()
        log.info(
            "scale decision dropped by re-check",
            extra={"id": decision.id, "reason": failure.value},
        )

    def down_request(self, options: ConsolidationOptions | None = None) -> ScaleDownRequest:
        """A scale-down request on the current state: running pods, pool sizes, nodes
        being removed (counted as `disrupting` and cordoned in a copy of the fleet), with
        the config's consolidation options (or `options`).

        Running pods are what reservations and observed pods hold; re-placement is simulated
        with their resources (a reservation's model and selector constraints are not kept).
        """
        state = self.state
        cfg = self.config().autoscaling
        # Nodes of earlier decisions that are gone (or whose pool is) are done disrupting.
        live = set(state.fleet.node_names())
        self.disrupting = {n: k for n, k in self.disrupting.items() if n in live}
        fleet = state.fleet
        if self.disrupting:
            fleet = fleet.copy()
            for name in self.disrupting:
                fleet.set_flags(name, cordoned=True)
        busy: dict[tuple[str, str], int] = {}
        for key in self.disrupting.values():
            busy[key] = busy.get(key, 0) + 1
        pools = self._pools()
        status = {
            p.key: PoolStatus(
                current_size=state.pools[p.key].current_size,
                target_size=max(state.pools[p.key].current_size, self.targets.get(p.key, 0)),
                disrupting=busy.get(p.key, 0),
            )
            for p in pools
        }
        return ScaleDownRequest(
            fleet=fleet,
            running=running_pods(state),
            pools=tuple(pools),
            status=status,
            node_since_s=dict(state.node_since),
            now_s=self.clock(),
            policy=state.policy,
            options=options if options is not None else autoscale_policy(cfg).consolidation,
        )

    def step_down(self) -> list[ScaleDecision]:
        """One scale-down / consolidation round (advice); returns the decisions it published."""
        state = self.state
        if not state.pools or not state.ready:
            return []
        options, self.last_replace_s = consolidation_round(
            self.policy(), self.clock(), self.last_replace_s
        )
        plan = plan_scale_down(self.down_request(options))
        return self.emit_down(plan.decisions)

    def emit_down(self, decisions: Sequence[ScaleDecision]) -> list[ScaleDecision]:
        """Stream disruptive decisions, each re-checked first against a fresh snapshot of
        the state that counts the decisions streamed before it; the ones no longer valid
        are dropped (counted by reason)."""
        dry_run = self.config().autoscaling.dry_run
        out = []
        # Decisions accepted in this round, for the re-check of the next ones (dry-run too).
        accepted: dict[str, tuple[str, str]] = {}
        kept = dict(self.disrupting)
        for decision in decisions:
            if decision.id in self.published:
                continue
            retiring = self.retiring_nodes()
            if any(
                n in self.disrupting or n in accepted or n in retiring
                for n in decision.remove_nodes
            ):
                continue  # already being removed, or retired once a scale-up's nodes are up
            self.disrupting = {**kept, **accepted}
            fresh = self.down_request()
            failure = recheck(decision, fresh)
            if failure is not None:
                self._dropped(decision, failure)
                continue
            key = (decision.cluster, decision.pool)
            for node in decision.remove_nodes:
                accepted[node] = self._pool_of_node(node, key)
            status = fresh.status.get(key)
            self._publish(decision, status.target_size if status else None, dry_run)
            out.append(decision)
        # Only decisions someone may act on hold their nodes as disrupting.
        self.disrupting = kept if dry_run else {**kept, **accepted}
        self._record_cost(out, dry_run)
        return out

    def _pool_of_node(self, node: str, default: tuple[str, str]) -> tuple[str, str]:
        """The pool key of a fleet node (a REPLACE removes nodes of other pools too)."""
        fleet = self.state.fleet
        try:
            slot = fleet.slot(node)
        except KeyError:
            return default
        return (
            fleet.clusters.names[int(fleet.cluster_id[slot])],
            fleet.pools.names[int(fleet.pool_id[slot])],
        )

    def tick(self) -> list[ScaleDecision]:
        """One wake-up: plan scale-ups (skipped on unchanged inputs), and with `scale_down`
        retirements and scale-down / consolidation when `interval_s` has passed since they
        last ran. Returns the decisions published."""
        cfg = self.config().autoscaling
        if not cfg.enabled:
            return []
        out = self.step()
        now = self.clock()
        if cfg.scale_down and (
            self.last_down_s is None or now >= self.last_down_s + cfg.interval_s
        ):
            self.last_down_s = now
            out += self.step_retire()
            out += self.step_down()
        return out

    async def run(self) -> None:
        """`tick` every `autoscaling.scale_up_after_s` (at most `interval_s`) while enabled,
        until cancelled: pending work gets capacity about that soon, as in the benchmark
        (Karpenter's batch window), while consolidation keeps the `interval_s` scan."""
        while True:
            cfg = self.config().autoscaling
            await asyncio.sleep(min(cfg.scale_up_after_s, cfg.interval_s))
            self.tick()


def _spec(name: str, alloc: Allocation) -> PodSpec:
    """A PodSpec holding exactly `alloc` (for re-placement simulations)."""
    n = len(alloc.gpu_indices)
    if n and alloc.gpu_milli_per_gpu >= GPU_MILLI:
        return PodSpec(name, alloc.cpu_millicores, alloc.memory_bytes, num_gpu=n)
    if n:
        return PodSpec(
            name, alloc.cpu_millicores, alloc.memory_bytes, gpu_milli=alloc.gpu_milli_per_gpu
        )
    return PodSpec(name, alloc.cpu_millicores, alloc.memory_bytes)


def running_pods(state: FleetState) -> tuple[RunningPod, ...]:
    """What runs on the fleet: reservation pods (a gang's pods are never moved) and the
    observed pods fleetd did not place (`karpenter.sh/do-not-disrupt: "true"` honoured)."""
    out = []
    for wid, held in state.held.items():
        gang = wid if len(held.record.pods) > 1 else ""
        for rp, alloc in zip(held.record.pods, held.slots, strict=True):
            if alloc is not None:
                out.append(RunningPod(_spec(f"{wid}/{rp.pod_name}", alloc), alloc.node,
                                      alloc.gpu_indices, gang=gang))  # fmt: skip
    for (_, uid), pod in state.pods.items():
        if pod.slot is not None and pod.reservation is None:
            dnd = pod.labels.get(DO_NOT_DISRUPT_LABEL) == "true"
            out.append(RunningPod(_spec(uid, pod.slot), pod.slot.node, pod.slot.gpu_indices,
                                  do_not_disrupt=dnd))  # fmt: skip
    return tuple(out)
