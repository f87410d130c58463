"""gRPC servicers of fleetd.v1 (grpc.aio): validate, call the state owner, convert the reply.

Errors at the edge: validation -> INVALID_ARGUMENT naming the field; unknown cluster, pool or
workload -> NOT_FOUND; a workload id reused for another request -> ALREADY_EXISTS; before
the initial sync -> UNAVAILABLE; an expired deadline -> DEADLINE_EXCEEDED. Anything
unexpected is logged and answered INTERNAL; it never takes the server down.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from fleetd.api import validation, workloads
from fleetd.api.validation import InvalidArgument
from fleetd.config import Config
from fleetd.engine import GPU_MILLI, fragmented_milli
from fleetd.journal import ReservedPod
from fleetd.metrics import Metrics
from fleetd.state import (
    Conflict,
    Decision,
    Explanation,
    FleetState,
    NotFound,
    NotReady,
    OutOfRange,
    QueueFull,
    ScaleEvent,
)
from fleetd.v1 import (
    fleet_pb2,
    fleet_pb2_grpc,
    nodepools_pb2,
    nodepools_pb2_grpc,
    placement_pb2,
    placement_pb2_grpc,
    types_pb2,
)

log = logging.getLogger("fleetd.api")

RESULTS = {
    "placed": types_pb2.DECISION_RESULT_PLACED,
    "queued": types_pb2.DECISION_RESULT_QUEUED,
    "unschedulable": types_pb2.DECISION_RESULT_UNSCHEDULABLE,
}
STATES = {
    "pending": types_pb2.RESERVATION_STATE_PENDING,
    "confirmed": types_pb2.RESERVATION_STATE_CONFIRMED,
    "released": types_pb2.RESERVATION_STATE_RELEASED,
    "expired": types_pb2.RESERVATION_STATE_EXPIRED,
}
KINDS = {
    "place": types_pb2.Decision.KIND_PLACE,
    "release": types_pb2.Decision.KIND_RELEASE,
    "expire": types_pb2.Decision.KIND_EXPIRE,
    "confirm": types_pb2.Decision.KIND_CONFIRM,
}


class PermissionDenied(Exception):
    """The client may not act for the workload's team (`teams.clients`)."""


STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
]

R = TypeVar("R")


def timestamp(seconds: float) -> Timestamp:
    """A protobuf Timestamp of Unix seconds."""
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def pod_placement(p: ReservedPod) -> types_pb2.PodPlacement:
    """Convert a reserved pod to its protobuf."""
    return types_pb2.PodPlacement(
        pod_name=p.pod_name,
        cluster=p.cluster,
        node=p.node,
        gpu_indices=list(p.gpu_indices),
        gpu_milli=p.gpu_milli,
        pool=p.pool,
    )


def explanation(e: Explanation | None) -> types_pb2.Explanation | None:
    """Convert an explanation to its protobuf (None stays None)."""
    if e is None:
        return None
    return types_pb2.Explanation(
        nodes_total=e.nodes_total,
        nodes_feasible=e.nodes_feasible,
        reasons=[types_pb2.Reason(code=c, nodes=n, message=m) for c, n, m in e.reasons],
        summary=e.summary,
    )


def decision_pb(d: Decision) -> types_pb2.Decision:
    """Convert a decision to its protobuf."""
    return types_pb2.Decision(
        seq=d.seq,
        time=timestamp(d.time_s),
        kind=KINDS.get(d.kind, types_pb2.Decision.KIND_UNSPECIFIED),
        workload_id=d.workload_id,
        team=d.team,
        result=RESULTS.get(d.result, types_pb2.DECISION_RESULT_UNSPECIFIED),
        placements=[pod_placement(p) for p in d.placements],
        explanation=explanation(d.explanation),
        reservation_state=STATES.get(d.reservation_state, types_pb2.RESERVATION_STATE_UNSPECIFIED),
    )


class Edge:
    """Shared plumbing: status mapping, deadlines, latency metrics."""

    def __init__(
        self,
        state: FleetState,
        config: Callable[[], Config],
        metrics: Metrics,
        stopping: asyncio.Event,
    ) -> None:
        self.state = state
        self.config = config
        self.metrics = metrics
        #: Set on shutdown: open streams end so that the drain does not wait for them.
        self.stopping = stopping

    async def unary(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[], R | Awaitable[R]],
    ) -> R:
        """Run a handler (synchronous, or a coroutine for Place) with the shutdown and
        deadline checks, the error-to-status mapping and the latency metric."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if self.stopping.is_set():
                code = grpc.StatusCode.UNAVAILABLE
                await context.abort(code, "fleetd is shutting down; retry on another replica")
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                await context.abort(code, "deadline expired before the request was handled")
            try:
                result = handler()
                if inspect.isawaitable(result):
                    return await result
                return result
            except tuple(exc for exc, _ in STATUS_OF) as exc:
                code = next(c for e, c in STATUS_OF if isinstance(exc, e))
                await context.abort(code, str(exc))
            except Exception:
                log.exception("internal error in %s", method)
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, "internal error (logged by the server)")
            raise AssertionError("unreachable: abort raises")
        finally:
            self.metrics.rpc_duration.labels(method, code.name).observe(time.perf_counter() - start)

    def authorize(self, context: grpc.aio.ServicerContext, team: str) -> None:
        """PermissionDenied unless the client (its mutual-TLS certificate's common name)
        may act for `team` (`teams.clients`; no check when it is empty)."""
        teams = self.config().teams
        if not teams.clients:
            return
        client = _client(context)
        if not teams.may_act_for(client, team):
            log.warning("client %r refused for team %r", client, team)
            raise PermissionDenied(
                f"client {client!r} may not act for team {team!r} (teams.clients)"
            )

    def visible_teams(self, context: grpc.aio.ServicerContext, team: str) -> frozenset[str] | None:
        """The teams whose workloads the client may list: `team` alone when given (the client
        must be allowed to act for it), else those `teams.clients` gives it (None: every
        team; no check when `teams.clients` is empty)."""
        if team:
            self.authorize(context, team)
            return frozenset((team,))
        clients = self.config().teams.clients
        if not clients:
            return None
        allowed = clients.get(_client(context), ())
        return None if "*" in allowed else frozenset(allowed)


def _client(context: grpc.aio.ServicerContext) -> str:
    """The client's name: its mutual-TLS certificate's common name ("" without one)."""
    names = context.auth_context().get("x509_common_name") or [b""]
    return str(names[0].decode(errors="replace"))


def _rpc(
    method: str, team_of: Callable[[Any, Any], str | None] | None = None
) -> Callable[[Any], Any]:
    """Decorate a servicer method whose body returns a zero-argument handler.

    The handler runs on the loop: validation, then one state-owner call (Place awaits its
    batch, see `FleetState.submit`). With `team_of(servicer, request)`, the request acts for
    that team, and the client must be allowed to (`Edge.authorize`) before anything else;
    None (no team given, no such workload) leaves the answer to the handler
    (INVALID_ARGUMENT, NOT_FOUND).
    """

    def wrap(fn: Callable[..., Callable[[], R]]) -> Callable[..., Awaitable[R]]:
        @functools.wraps(fn)
        async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
            edge: Edge = self.edge
            handler = fn(self, request)
            if team_of is not None:
                inner = handler

                def handler() -> R:
                    team = team_of(self, request)
                    if team is not None:
                        edge.authorize(context, team)
                    return inner()

            return await edge.unary(method, context, handler)

        return call

    return wrap


def _workload_team(servicer: Any, request: Any) -> str | None:
    """The team a Place or Explain names (None when it names none: invalid)."""
    return str(request.workload.team) or None


def _held_team(servicer: Any, request: Any) -> str | None:
    """The team of the reservation or queued workload a Release names (None: neither)."""
    state = servicer.edge.state
    held = state.held.get(request.workload_id)
    if held is not None:
        return str(held.record.team)
    queued = state.queue.get(request.workload_id)
    return str(queued.request.team) if queued is not None else None


LISTED_STATES = {
    placement_pb2.WORKLOAD_STATE_UNSPECIFIED: (
        workloads.PENDING,
        workloads.CONFIRMED,
        workloads.QUEUED,
    ),
    placement_pb2.WORKLOAD_STATE_PENDING: (workloads.PENDING,),
    placement_pb2.WORKLOAD_STATE_CONFIRMED: (workloads.CONFIRMED,),
    placement_pb2.WORKLOAD_STATE_QUEUED: (workloads.QUEUED,),
}
WORKLOAD_STATES = {
    workloads.PENDING: placement_pb2.WORKLOAD_STATE_PENDING,
    workloads.CONFIRMED: placement_pb2.WORKLOAD_STATE_CONFIRMED,
    workloads.QUEUED: placement_pb2.WORKLOAD_STATE_QUEUED,
}


def workload_status_pb(w: workloads.WorkloadStatus) -> placement_pb2.WorkloadStatus:
    """Convert a listed workload to its protobuf."""
    return placement_pb2.WorkloadStatus(
        workload_id=w.workload_id,
        team=w.team,
        state=WORKLOAD_STATES[w.state],
        priority=w.priority,
        effective_priority=w.effective_priority,
        since=timestamp(w.since_s),
        expires_at=timestamp(w.expires_at_s) if w.expires_at_s else None,
        pods=w.pods,
        gpu_milli=w.gpu_milli,
        placements=[pod_placement(p) for p in w.placements],
        queue_position=w.queue_position,
        explanation=explanation(w.explanation) if w.explanation is not None else None,
        explained_at=timestamp(w.explained_at_s) if w.explanation is not None else None,
        decision_seq=w.decision_seq,
    )


class PlacementServicer(placement_pb2_grpc.PlacementServicer):
    """fleetd.v1.Placement."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    @_rpc("Place", _workload_team)
    def Place(
        self, request: placement_pb2.PlaceRequest
    ) -> Callable[[], Awaitable[placement_pb2.PlaceResponse]]:
        async def handle() -> placement_pb2.PlaceResponse:
            cfg = self.edge.config()
            req = validation.place_request(request, cfg.limits, cfg.reservations.max_ttl_s)
            # Concurrent Place calls are placed together, one core call per turn of the loop.
            d = await self.edge.state.submit(req)
            return placement_pb2.PlaceResponse(
                result=RESULTS[d.result],
                workload_id=d.workload_id,
                placements=[pod_placement(p) for p in d.placements],
                explanation=explanation(d.explanation),
                reservation_state=STATES.get(
                    d.reservation_state, types_pb2.RESERVATION_STATE_UNSPECIFIED
                ),
                expires_at=timestamp(d.expires_at_s) if d.expires_at_s else None,
                decision_seq=d.seq,
                replayed=d.replayed,
            )

        return handle

    @_rpc("Release", _held_team)
    def Release(
        self, request: placement_pb2.ReleaseRequest
    ) -> Callable[[], placement_pb2.ReleaseResponse]:
        def handle() -> placement_pb2.ReleaseResponse:
            if not request.workload_id:
                raise InvalidArgument("workload_id", "is required")
            held = self.edge.state.held.get(request.workload_id)
            previous = held.record.state if held is not None else ""
            d = self.edge.state.release(request.workload_id)
            return placement_pb2.ReleaseResponse(
                workload_id=d.workload_id,
                previous_state=STATES.get(previous, types_pb2.RESERVATION_STATE_UNSPECIFIED),
                pods_released=len(d.placements),
                decision_seq=d.seq,
            )

        return handle

    @_rpc("Explain", _workload_team)
    def Explain(
        self, request: placement_pb2.ExplainRequest
    ) -> Callable[[], placement_pb2.ExplainResponse]:
        def handle() -> placement_pb2.ExplainResponse:
            if not request.HasField("workload"):
                raise InvalidArgument("workload", "is required")
            req = validation.workload_request(request.workload, self.edge.config().limits)
            d, fits = self.edge.state.explain(req)
            return placement_pb2.ExplainResponse(
                fits=fits,
                result=RESULTS[d.result],
                placements=[pod_placement(p) for p in d.placements],
                explanation=explanation(d.explanation),
            )

        return handle

    async def ListWorkloads(
        self, request: placement_pb2.ListWorkloadsRequest, context: grpc.aio.ServicerContext
    ) -> placement_pb2.ListWorkloadsResponse:
        """A page of held and queued workloads (`fleetd.api.workloads`)."""
        edge = self.edge

        def handle() -> placement_pb2.ListWorkloadsResponse:
            if request.team:
                validation.check_name(request.team, "team", validation.NAME_RE, "team name")
            states = LISTED_STATES.get(request.state)
            if states is None:
                raise InvalidArgument("state", f"unknown WorkloadState {request.state}")
            teams = edge.visible_teams(context, request.team)
            page, last = workloads.list_workloads(
                edge.state,
                edge.config(),
                teams=teams,
                states=states,
                size=workloads.page_size(request.page_size),
                after=workloads.decode_token(request.page_token) if request.page_token else "",
            )
            return placement_pb2.ListWorkloadsResponse(
                workloads=[workload_status_pb(w) for w in page],
                next_page_token=workloads.encode_token(last) if last else "",
            )

        return await edge.unary("ListWorkloads", context, handle)

    async def WatchDecisions(
        self, request: placement_pb2.WatchDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[types_pb2.Decision]:
        """Stream decisions; resumable from a seq."""
        try:
            async for d in self.edge.state.watch(request.after_seq, request.from_now):
                yield decision_pb(d)
        except OutOfRange as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))


class NodePoolsServicer(nodepools_pb2_grpc.NodePoolsServicer):
    """fleetd.v1.NodePools."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    @_rpc("ListNodePools")
    def ListNodePools(
        self, request: nodepools_pb2.ListNodePoolsRequest
    ) -> Callable[[], nodepools_pb2.ListNodePoolsResponse]:
        def handle() -> nodepools_pb2.ListNodePoolsResponse:
            return nodepools_pb2.ListNodePoolsResponse(
                pools=node_pools(self.edge.state, request.cluster)
            )

        return handle

    async def WatchScaleDecisions(
        self, request: nodepools_pb2.WatchScaleDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[nodepools_pb2.ScaleDecision]:
        """Scale decisions as the autoscaler publishes them; resumable from a seq."""
        try:
            async for event in self.edge.state.scale.watch(request.after_seq, request.from_now):
                yield scale_decision_pb(event)
        except OutOfRange as exc:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))


SCALE_KINDS = {
    "scale-up": nodepools_pb2.ScaleDecision.KIND_SCALE_UP,
    "scale-down": nodepools_pb2.ScaleDecision.KIND_SCALE_DOWN,
    "replace": nodepools_pb2.ScaleDecision.KIND_REPLACE,
}


def scale_decision_pb(event: ScaleEvent) -> nodepools_pb2.ScaleDecision:
    """Convert a streamed scale decision to its protobuf."""
    d = event.decision
    return nodepools_pb2.ScaleDecision(
        seq=event.seq,
        time=timestamp(event.time_s),
        cluster=d.cluster,
        pool=d.pool,
        kind=SCALE_KINDS.get(d.kind.value, nodepools_pb2.ScaleDecision.KIND_UNSPECIFIED),
        from_size=event.from_size,
        to_size=event.to_size,
        nodes=[n.split("/", 1)[-1] for n in d.remove_nodes],
        workload_ids=list(d.unblocks),
        reason=d.reason.value,
        price_per_hour_delta=d.cost_per_hour_delta,
        id=d.id,
        dry_run=event.dry_run,
    )


def known_clusters(state: FleetState) -> set[str]:
    """Clusters with nodes, pools or pending pods in fleet state."""
    known = {i.cluster for i in state.nodes.values()} | {c for c, _ in state.pools}
    return known | state.pending_pods.keys()


def node_pools(state: FleetState, cluster: str) -> list[nodepools_pb2.NodePool]:
    """Every pool known from pool updates or node labels, optionally of one cluster."""
    if cluster and cluster not in known_clusters(state):
        raise NotFound(f"cluster {cluster!r} is not known to fleetd")
    ready: dict[tuple[str, str], int] = {}
    for info in state.nodes.values():
        if info.pool and not info.stale:
            ready[(info.cluster, info.pool)] = ready.get((info.cluster, info.pool), 0) + 1
    keys = sorted(set(state.pools) | set(ready))
    out = []
    for key in keys:
        if cluster and key[0] != cluster:
            continue
        p = state.pools.get(key)
        pool = nodepools_pb2.NodePool(cluster=key[0], name=key[1], nodes_ready=ready.get(key, 0))
        if p is not None:
            pool.gpu_model = p.gpu_model
            pool.gpus_per_node = p.allocatable.gpus
            pool.cpu_millicores = p.allocatable.cpu_millicores
            pool.memory_bytes = p.allocatable.memory_bytes
            pool.price_per_hour = p.price_per_hour
            pool.capacity_type = p.capacity_type.value
            pool.min_size, pool.max_size, pool.current_size = p.min_size, p.max_size, p.current_size
        out.append(pool)
    return out


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    """fleetd.v1.Fleet."""

    def __init__(self, edge: Edge, config_loaded_at_s: Callable[[], float]) -> None:
        self.edge = edge
        self.config_loaded_at_s = config_loaded_at_s

    @_rpc("GetSnapshot")
    def GetSnapshot(
        self, request: fleet_pb2.GetSnapshotRequest
    ) -> Callable[[], fleet_pb2.Snapshot]:
        def handle() -> fleet_pb2.Snapshot:
            return snapshot(self.edge.state, request.cluster, request.include_nodes)

        return handle

    @_rpc("GetStatus")
    def GetStatus(self, request: fleet_pb2.GetStatusRequest) -> Callable[[], fleet_pb2.Status]:
        def handle() -> fleet_pb2.Status:
            state = self.edge.state
            now = state.clock()
            return fleet_pb2.Status(
                ready=state.ready,
                # A cluster that lost its sync while others are synced is not "not ready":
                # its SourceStatus says why (synced false, reason "sync lost ...").
                not_ready_reason="" if state.ready else state.not_ready_reason(),
                sources=[
                    fleet_pb2.SourceStatus(
                        source=src,
                        cluster=cl,
                        synced=synced,
                        last_update_age_s=age,
                        last_update=timestamp(now - age) if age >= 0 else None,
                        reason=state.source_reason(src, cl),
                    )
                    for src, cl, synced, age, _ in state.source_status()
                ],
                config_version=self.edge.config().version(),
                config_loaded_at=timestamp(self.config_loaded_at_s()),
                nodes_stale=state.nodes_stale(),
                version="0.1.0",
                uptime_s=now - state.started_s,
            )

        return handle


def snapshot(state: FleetState, cluster: str, include_nodes: bool) -> fleet_pb2.Snapshot:
    """The Fleet.GetSnapshot reply, computed from the node table."""
    known = known_clusters(state)
    if cluster and cluster not in known:
        raise NotFound(f"cluster {cluster!r} is not known to fleetd")
    f = state.fleet
    snap = fleet_pb2.Snapshot(time=timestamp(state.clock()))
    clusters: dict[str, fleet_pb2.Cluster] = {}
    caps: dict[tuple[str, str], fleet_pb2.Capacity] = {}
    # Aggregates are vectorized over the core's columns (10^4 nodes in a few ms).
    slots = np.flatnonzero(f.live_mask())
    if cluster:
        slots = slots[f.cluster_id[slots] == f.clusters.get(cluster)]
    cluster_ids = f.cluster_id[slots].astype(np.int64)
    model_ids = f.gpu_model_id[slots].astype(np.int64)
    exists = np.arange(f.max_gpus)[None, :] < f.gpu_count[slots, None]
    alloc_all = np.where(exists, GPU_MILLI - f.gpu_free_milli[slots].astype(np.int64), 0)
    gpu_alloc = alloc_all.sum(axis=1)
    frag_all, free_all = fragmented_milli(f, slots, state.typical)
    n_models = len(f.gpu_models) + 1
    keys, group_of = np.unique(cluster_ids * n_models + model_ids + 1, return_inverse=True)

    def per_group(values: Any) -> list[int]:
        # Integer sums: memory in bytes over 10^4 nodes exceeds float64's exact range.
        sums = np.zeros(keys.size, np.int64)
        np.add.at(sums, group_of, np.asarray(values).astype(np.int64))
        return [int(v) for v in sums.tolist()]

    columns = {
        "nodes": per_group(np.ones(slots.size)),
        "gpus": per_group(f.gpu_count[slots]),
        "gpu_alloc": per_group(gpu_alloc),
        "cpu": per_group(f.cpu_allocatable_millicores[slots]),
        "cpu_alloc": per_group(f.cpu_allocated_millicores[slots]),
        "mem": per_group(f.memory_allocatable_bytes[slots]),
        "mem_alloc": per_group(f.memory_allocated_bytes[slots]),
        "frag": per_group(frag_all),
        "schedulable": per_group(f.flags[slots] == 0),
    }
    for g, key in enumerate(keys.tolist()):
        cname = f.clusters.names[key // n_models]
        mid = key % n_models - 1
        model = f.gpu_models.names[mid] if mid >= 0 else ""
        caps[(cname, model)] = fleet_pb2.Capacity(
            cluster=cname,
            gpu_model=model,
            nodes=columns["nodes"][g],
            gpus=columns["gpus"][g],
            gpu_milli_allocated=columns["gpu_alloc"][g],
            cpu_millicores=columns["cpu"][g],
            cpu_millicores_allocated=columns["cpu_alloc"][g],
            memory_bytes=columns["mem"][g],
            memory_bytes_allocated=columns["mem_alloc"][g],
            gpu_milli_fragmented=columns["frag"][g],
        )
        c = clusters.setdefault(cname, fleet_pb2.Cluster(name=cname))
        c.nodes += columns["nodes"][g]
        c.nodes_schedulable += columns["schedulable"][g]
        c.gpus += columns["gpus"][g]
        c.gpu_milli_allocated += columns["gpu_alloc"][g]
    stranded_total, free_total = float(frag_all.sum()), float(free_all.sum())
    if include_nodes:
        order = sorted(range(slots.size), key=lambda i: f.names[int(slots[i])] or "")
        for i in order:
            row = int(slots[i])
            info = state.nodes[f.names[row] or ""]
            n_gpu = int(f.gpu_count[row])
            condition = (
                "stale" if info.stale else "cordoned" if info.cordoned else
                "not-ready" if not info.ready else ""
            )  # fmt: skip
            snap.nodes.append(
                fleet_pb2.Node(
                    cluster=info.cluster,
                    name=info.name,
                    pool=info.pool,
                    gpu_model=info.gpu_model,
                    gpus=n_gpu,
                    gpu_milli_allocated=alloc_all[i, :n_gpu].tolist(),
                    cpu_millicores=int(f.cpu_allocatable_millicores[row]),
                    cpu_millicores_allocated=int(f.cpu_allocated_millicores[row]),
                    memory_bytes=int(f.memory_allocatable_bytes[row]),
                    memory_bytes_allocated=int(f.memory_allocated_bytes[row]),
                    schedulable=int(f.flags[row]) == 0,
                    condition=condition,
                    zone=info.zone,
                )
            )
    # A cluster scaled to zero (only pools) or known only by its pending pods is listed too.
    for cname in known if not cluster else {cluster}:
        c = clusters.setdefault(cname, fleet_pb2.Cluster(name=cname))
        c.pods_pending = len(state.pending_pods.get(cname, ()))
    snap.clusters.extend(clusters[k] for k in sorted(clusters))
    snap.capacity.extend(caps[k] for k in sorted(caps))
    snap.pools.extend(node_pools(state, cluster))
    snap.fragmentation_ratio = stranded_total / free_total if free_total else 0.0
    pending, confirmed, queued = state.counts()
    snap.reservations_pending = pending
    snap.reservations_confirmed = confirmed
    snap.workloads_queued = queued
    snap.scale_decisions.extend(scale_decision_pb(e) for e in list(state.scale.history)[-20:])
    snap.teams.extend(
        fleet_pb2.TeamUsage(
            team=team,
            gpu_model=model,
            gpu_milli_held=held,
            has_quota=quota is not None,
            gpu_milli_quota=quota or 0,
        )
        for team, model, held, quota in state.team_usage()
    )
    return snap
