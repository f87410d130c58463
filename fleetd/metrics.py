"""Prometheus metrics of the daemon, served on /metrics (default 127.0.0.1:9464).

Names follow the Prometheus conventions (base units in the name, `_total` for counters,
`_seconds`, `_bytes`) so `promtool check metrics` is clean. Each daemon owns its registry
(tests run several). Fleet gauges are refreshed from fleet state on the event loop by
`refresh()` (the HTTP server thread only reads metric values, never fleet state).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    start_http_server,
)
from prometheus_client.exposition import ThreadingWSGIServer

from fleetd.engine import GPU_MILLI, fragmented_milli
from fleetd.state import StateMetrics
from scheduling.fleet import FLAG_CORDONED, FLAG_STALE, FLAG_UNHEALTHY

if TYPE_CHECKING:
    from fleetd.api.tls import MetricsTls
    from fleetd.state import FleetState

#: How long one read or write of a /metrics connection over TLS may wait, the handshake's
#: included (Prometheus's default scrape timeout is 10 s).
TLS_REQUEST_TIMEOUT_S = 30.0
#: How long one /metrics connection over TLS may last in all, from its accept: reads time
#: out one at a time (`TLS_REQUEST_TIMEOUT_S`), so without it a client that sends a byte
#: now and then would keep its thread, and one of the `TLS_MAX_CONNECTIONS`, for ever.
TLS_CONNECTION_DEADLINE_S = 60.0
#: Connections served at once over TLS (a thread each); more are closed at once, so that
#: a flood of connections that never finish their handshake cannot take threads without
#: bound (the daemon's other threads share the process).
TLS_MAX_CONNECTIONS = 32

log = logging.getLogger(__name__)

# Queue wait buckets: a second to a day.
QUEUE_WAIT_BUCKETS_S = (
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
)  # fmt: skip

# Decision latency buckets: sub-millisecond to a second.
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


class Metrics:
    """Every metric of one daemon, in its own registry."""

    def __init__(self) -> None:
        """Create the metrics in a fresh registry."""
        r = self.registry = CollectorRegistry()
        self.rpc_duration = Histogram(
            "fleetd_rpc_duration_seconds",
            "Latency of gRPC requests, by method and status code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.decisions = Counter(
            "fleetd_decisions_total",
            "Decisions by kind (place, release, expire, confirm) and result.",
            ["kind", "result"],
            registry=r,
        )
        self.gpus = Gauge(
            "fleetd_gpus", "GPUs in fleet state.", ["cluster", "gpu_model"], registry=r
        )
        self.gpus_allocated = Gauge(
            "fleetd_gpus_allocated",
            "Allocated GPUs (fractional shares summed), by cluster and model.",
            ["cluster", "gpu_model"],
            registry=r,
        )
        self.cpu_cores = Gauge(
            "fleetd_cpu_cores", "Allocatable CPU cores.", ["cluster", "gpu_model"], registry=r
        )
        self.cpu_cores_allocated = Gauge(
            "fleetd_cpu_cores_allocated",
            "Allocated CPU cores.",
            ["cluster", "gpu_model"],
            registry=r,
        )
        self.memory_bytes = Gauge(
            "fleetd_memory_bytes", "Allocatable memory.", ["cluster", "gpu_model"], registry=r
        )
        self.memory_bytes_allocated = Gauge(
            "fleetd_memory_allocated_bytes",
            "Allocated memory.",
            ["cluster", "gpu_model"],
            registry=r,
        )
        self.fragmentation = Gauge(
            "fleetd_gpu_fragmentation_ratio",
            "Fragmented free GPU share / all free GPU share (FGD's measure against the target "
            "workload when one is known).",
            ["cluster"],
            registry=r,
        )
        self.nodes = Gauge(
            "fleetd_nodes", "Nodes by cluster and condition.", ["cluster", "condition"], registry=r
        )
        self.reservations = Gauge(
            "fleetd_reservations", "Held reservations by state.", ["state"], registry=r
        )
        self.queued = Gauge(
            "fleetd_workloads_queued", "Workloads waiting for capacity.", registry=r
        )
        self.queue_wait = Histogram(
            "fleetd_queue_wait_seconds",
            "How long workloads waited in the queue, by team (teams the config names; the "
            "rest as 'other') and how the wait ended: placed, or released by the client.",
            ["team", "outcome"],
            buckets=QUEUE_WAIT_BUCKETS_S,
            registry=r,
        )
        self.queue_oldest = Gauge(
            "fleetd_queue_oldest_seconds",
            "The longest time a queued workload has waited for what holds it now (0 when "
            "none), by cause: 'quota' (its team's quota held it back at its last try, "
            "teams.quotas) or 'capacity' (no room for it in the fleet); a workload whose cause "
            "changed counts from the change.",
            ["cause"],
            registry=r,
        )
        self.team_gpus_held = Gauge(
            "fleetd_team_gpus_held",
            "GPUs (fractional shares summed) a team's held reservations hold, pending or "
            "confirmed: what its quota (teams.quotas) caps. Teams the config does not name "
            "(priorities, quotas, clients) are summed as team 'other'.",
            ["team"],
            registry=r,
        )
        self.team_gpu_quota = Gauge(
            "fleetd_team_gpu_quota",
            "A team's GPU quota over every model (teams.quotas.<team>.gpus); absent = no cap.",
            ["team"],
            registry=r,
        )
        self.team_model_gpus_held = Gauge(
            "fleetd_team_model_gpus_held",
            "GPUs of one model a team's held reservations hold.",
            ["team", "gpu_model"],
            registry=r,
        )
        self.team_model_gpu_quota = Gauge(
            "fleetd_team_model_gpu_quota",
            "A team's GPU quota for one model (teams.quotas.<team>.gpus_by_model).",
            ["team", "gpu_model"],
            registry=r,
        )
        self.pods_pending = Gauge(
            "fleetd_cluster_pods_pending",
            "Pods a cluster's own scheduler reported unschedulable (a Kubernetes watch or "
            "PendingPod telemetry): the pending work the autoscaler plans capacity for.",
            ["cluster"],
            registry=r,
        )
        self.telemetry_lag = Gauge(
            "fleetd_telemetry_lag_seconds",
            "Receive time minus the cluster's observation time of the last update.",
            ["cluster"],
            registry=r,
        )
        self.telemetry_age = Gauge(
            "fleetd_telemetry_age_seconds",
            "Seconds since the last update from a source for a cluster.",
            ["source", "cluster"],
            registry=r,
        )
        self.kafka_consumer_lag = Gauge(
            "fleetd_kafka_consumer_lag_messages",
            "Messages between the committed offset and the end of each partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.dead_letters = Counter(
            "fleetd_dead_letters_total",
            "Telemetry records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.updates_ignored = Counter(
            "fleetd_updates_ignored_total",
            "Source updates dropped (stale sequence, invalid), by reason.",
            ["reason"],
            registry=r,
        )
        self.inventory_removed = Counter(
            "fleetd_inventory_removed_nodes_total",
            "Nodes removed because their cluster's node inventory (an agent's resync) no "
            "longer listed them: deleted while the agent was down, or their deletion lost.",
            ["cluster"],
            registry=r,
        )
        self.config_reloads = Counter(
            "fleetd_config_reloads_total",
            "Config reloads by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.scale_decisions = Counter(
            "fleetd_scale_decisions_total",
            "Scale decisions streamed, by kind (scale-up, scale-down, replace) and dry_run.",
            ["kind", "dry_run"],
            registry=r,
        )
        self.scale_cost = Gauge(
            "fleetd_scale_planned_cost_per_hour",
            "Expected change of the fleet's price per hour of the decisions the last planning "
            "round streamed (scale-up or scale-down round), by dry_run.",
            ["dry_run"],
            registry=r,
        )
        self.scale_recheck_failures = Counter(
            "fleetd_scale_recheck_failures_total",
            "Disruptive scale decisions dropped by the re-check on a fresh snapshot, by reason.",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge(
            "fleetd_ready",
            "1 while every source is synced (initial sync done, none has lost its sync).",
            registry=r,
        )
        self.source_synced = Gauge(
            "fleetd_source_synced",
            "1 while a source is synced for a cluster, 0 before its initial sync or after it "
            "lost its sync (GetStatus says why).",
            ["source", "cluster"],
            registry=r,
        )
        self.task_failures = Counter(
            "fleetd_task_failures_total",
            "Supervised tasks that died, by task.",
            ["task"],
            registry=r,
        )
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def state_hooks(self) -> StateMetrics:
        """The callbacks the state owner records decisions and telemetry through."""
        # The lag is reported with every applied node change: it is kept in a dict that the
        # cluster's gauge child reads when scraped (`set_function`), one store per change
        # instead of `labels(cluster).set(lag_s)` (a lookup and a lock, ~1 us).
        lags: dict[str, float] = {}

        def telemetry_lag(cluster: str, lag_s: float) -> None:
            if cluster not in lags:
                self.telemetry_lag.labels(cluster).set_function(lambda: lags[cluster])
            lags[cluster] = lag_s

        # Ignored updates are counted one call each (a redelivered poll's stale repeats:
        # thousands): the counter's children are kept (never removed) rather than looked
        # up with `labels` every time.
        ignored: dict[str, Any] = {}

        def update_ignored(reason: str) -> None:
            child = ignored.get(reason)
            if child is None:
                child = ignored[reason] = self.updates_ignored.labels(reason)
            child.inc()

        return StateMetrics(
            decision=lambda kind, result: self.decisions.labels(kind, result or "none").inc(),
            telemetry_lag=telemetry_lag,
            update_ignored=update_ignored,
            inventory_removed=lambda cluster, n: self.inventory_removed.labels(cluster).inc(n),
            queue_wait=lambda team, outcome, s: self.queue_wait.labels(team, outcome).observe(s),
        )

    def refresh(self, state: FleetState) -> None:
        """Recompute the fleet gauges from state (call on the event loop)."""
        # Vectorized over the core's columns: a scrape-rate refresh at 10^4 nodes must not
        # hold the event loop (Place latency) for long.
        f = state.fleet
        slots = np.flatnonzero(f.live_mask())
        for gauge in (self.gpus, self.gpus_allocated, self.cpu_cores, self.cpu_cores_allocated,
                      self.memory_bytes, self.memory_bytes_allocated, self.nodes, self.fragmentation,
                      self.pods_pending, self.team_gpus_held, self.team_gpu_quota,
                      self.team_model_gpus_held, self.team_model_gpu_quota):  # fmt: skip
            gauge.clear()
        if slots.size:
            cluster_ids = f.cluster_id[slots].astype(np.int64)
            model_ids = f.gpu_model_id[slots].astype(np.int64)
            n_models = len(f.gpu_models) + 1
            groups, group_of = np.unique(
                cluster_ids * n_models + model_ids + 1, return_inverse=True
            )
            exists = np.arange(f.max_gpus)[None, :] < f.gpu_count[slots, None]
            alloc = np.where(exists, GPU_MILLI - f.gpu_free_milli[slots].astype(np.int64), 0)
            frag_nodes, free_nodes = fragmented_milli(f, slots, state.typical)

            def per_group(values: Any) -> Any:
                return np.bincount(
                    group_of, weights=np.asarray(values, dtype=np.float64), minlength=groups.size
                )

            sums = {
                "gpus": per_group(f.gpu_count[slots]),
                "gpus_alloc": per_group(alloc.sum(axis=1)) / GPU_MILLI,
                "cpu": per_group(f.cpu_allocatable_millicores[slots]) / 1000,
                "cpu_alloc": per_group(f.cpu_allocated_millicores[slots]) / 1000,
                "mem": per_group(f.memory_allocatable_bytes[slots]),
                "mem_alloc": per_group(f.memory_allocated_bytes[slots]),
            }
            for g, key in enumerate(groups.tolist()):
                cluster = f.clusters.names[key // n_models]
                mid = key % n_models - 1
                model = f.gpu_models.names[mid] if mid >= 0 else "none"
                self.gpus.labels(cluster, model).set(sums["gpus"][g])
                self.gpus_allocated.labels(cluster, model).set(sums["gpus_alloc"][g])
                self.cpu_cores.labels(cluster, model).set(sums["cpu"][g])
                self.cpu_cores_allocated.labels(cluster, model).set(sums["cpu_alloc"][g])
                self.memory_bytes.labels(cluster, model).set(sums["mem"][g])
                self.memory_bytes_allocated.labels(cluster, model).set(sums["mem_alloc"][g])
            cl_frag = np.bincount(cluster_ids, weights=frag_nodes)
            cl_free = np.bincount(cluster_ids, weights=free_nodes)
            flags = f.flags[slots].astype(np.int64)
            condition = np.select(
                [flags & FLAG_STALE != 0, flags & FLAG_CORDONED != 0, flags & FLAG_UNHEALTHY != 0],
                [0, 1, 2],
                default=3,
            )
            names = ("stale", "cordoned", "not_ready", "schedulable")
            counts = np.bincount(cluster_ids * 4 + condition)
            for cid in np.unique(cluster_ids).tolist():
                cluster = f.clusters.names[cid]
                free = float(cl_free[cid])
                self.fragmentation.labels(cluster).set(float(cl_frag[cid]) / free if free else 0.0)
                for c, name in enumerate(names):
                    k = cid * 4 + c
                    if k < counts.size and counts[k]:
                        self.nodes.labels(cluster, name).set(int(counts[k]))
        for cluster, pods in state.pending_pods.items():
            self.pods_pending.labels(cluster).set(len(pods))
        # Teams the config does not name are summed as "other" (team names come from
        # clients: label values must stay bounded); a team with a quota is always named.
        held: dict[tuple[str, str], float] = {}
        for team, model, held_milli, quota_milli in state.team_usage():
            label = state.config.teams.metric_label(team)
            held[(label, model)] = held.get((label, model), 0.0) + held_milli / GPU_MILLI
            if quota_milli is not None and model:
                self.team_model_gpu_quota.labels(team, model).set(quota_milli / GPU_MILLI)
            elif quota_milli is not None:
                self.team_gpu_quota.labels(team).set(quota_milli / GPU_MILLI)
        for (label, model), gpus in held.items():
            if model:
                self.team_model_gpus_held.labels(label, model).set(gpus)
            else:
                self.team_gpus_held.labels(label).set(gpus)
        pending, confirmed, queued = state.counts()
        self.reservations.labels("pending").set(pending)
        self.reservations.labels("confirmed").set(confirmed)
        self.queued.set(queued)
        for cause, waited_s in state.oldest_queued_s().items():
            self.queue_oldest.labels(cause).set(waited_s)
        self.ready.set(1 if state.ready else 0)
        for source, cluster, synced, age_s, _ in state.source_status():
            self.source_synced.labels(source, cluster).set(1 if synced else 0)
            if age_s >= 0:
                self.telemetry_age.labels(source, cluster).set(age_s)

    def serve(self, listen: str, tls: MetricsTls | None = None) -> int:
        """Serve /metrics on `listen` (host:port; port 0 = ephemeral), over TLS with `tls`
        (a client certificate required when it has a client CA); returns the bound port."""
        host, _, port = listen.rpartition(":")
        if tls is None:
            server, thread = start_http_server(
                int(port), addr=host.strip("[]"), registry=self.registry
            )
        else:
            server, thread = _serve_tls(host.strip("[]"), int(port), self.registry, tls)
        self._http, self._thread = server, thread
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP server (idempotent)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _TlsMetricsServer(ThreadingWSGIServer):
    """prometheus_client's threaded WSGI server, with each accepted connection wrapped in
    the TLS context current at its accept (`MetricsTls.context`, replaced on rotation),
    and its handshake done in the connection's own thread, so a slow or refused client
    holds up no other scrape."""

    tls: MetricsTls
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            log.warning("metrics TLS: %d connections open already; closing one from %s",
                        TLS_MAX_CONNECTIONS, client_address)  # fmt: skip
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client gone, or cut at its deadline, in the middle of a request: not worth
        # socketserver's traceback on stderr. Anything else is a bug: logged as one.
        if isinstance(sys.exc_info()[1], OSError):  # (ssl.SSLError is one)
            log.debug("metrics TLS: connection from %s failed", client_address, exc_info=True)
        else:
            log.warning("metrics TLS: serving %s failed", client_address, exc_info=True)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        context = self.tls.context
        assert context is not None  # (set by `check` before the server starts)
        sock.settimeout(TLS_REQUEST_TIMEOUT_S)
        try:
            wrapped = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        # (Ended before `shutdown_request` closes the socket: see `_Deadline`.)
        deadline = _Deadline(request, client_address)
        try:
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                # (A client without a certificate of the CA, plain HTTP, a port scan.)
                log.debug("metrics TLS: handshake with %s failed: %s", client_address, exc)
                return
            super().finish_request(request, client_address)
        finally:
            deadline.end()


class _Deadline:
    """Ends a connection `TLS_CONNECTION_DEADLINE_S` after it began, unless it ended first:
    its socket shut down under the TLS layer, so the thread reading it sees the end of the
    stream. Ended (`end`) while the socket is still open, under a lock the shutdown takes
    too, so a late timer never shuts down a socket that was closed meanwhile (whose file
    descriptor another connection may have by then)."""

    def __init__(self, sock: Any, client_address: Any) -> None:
        self._sock, self._client_address = sock, client_address
        self._lock = threading.Lock()
        self._ended = False
        self._timer = threading.Timer(TLS_CONNECTION_DEADLINE_S, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        with self._lock:
            if self._ended:
                return
            log.warning("metrics TLS: connection from %s open for %.0f s; closing it",
                        self._client_address, TLS_CONNECTION_DEADLINE_S)  # fmt: skip
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def end(self) -> None:
        """The connection is done (its socket not closed yet): no cut from now on."""
        self._timer.cancel()
        with self._lock:
            self._ended = True


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per request."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve_tls(
    host: str, port: int, registry: CollectorRegistry, tls: MetricsTls
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` over TLS on host:port from a daemon thread (TlsFilesError when a
    file of `tls` cannot be used)."""
    tls.check()
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_TlsMetricsServer):
        address_family = family

    Server.tls = tls
    Server.slots = threading.BoundedSemaphore(TLS_MAX_CONNECTIONS)
    server = make_server(
        str(address[0]), port, make_wsgi_app(registry), Server, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics-tls", daemon=True)
    thread.start()
    return server, thread
