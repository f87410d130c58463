"""The supervisor: owns every long-lived task, readiness, reload and shutdown.

One `Daemon` runs the gRPC server (grpc.aio, with grpc.health.v1 and reflection), the
metrics endpoint, the sources, and the periodic sweeps (expiry, staleness, metrics refresh,
config file watch). If any supervised task dies, the daemon logs it, counts it and shuts
down with a failure exit code instead of limping on. SIGTERM/SIGINT drain in-flight RPCs
for at most `server.shutdown_grace_s` and exit 0; SIGHUP reloads the config file.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import hashlib
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from fleetd import config as cfgmod
from fleetd.api.parsing import ParseRequests
from fleetd.api.servicers import Edge, FleetServicer, NodePoolsServicer, PlacementServicer
from fleetd.api.tls import MetricsTls, TlsFilesError, server_credentials
from fleetd.autoscaler import Autoscaler
from fleetd.config import Config, ConfigError
from fleetd.journal import Journal
from fleetd.metrics import Metrics
from fleetd.sources.simulated import SimulatedFleet
from fleetd.state import FleetState
from fleetd.v1 import (
    fleet_pb2,
    fleet_pb2_grpc,
    nodepools_pb2,
    nodepools_pb2_grpc,
    placement_pb2,
    placement_pb2_grpc,
)

log = logging.getLogger("fleetd.daemon")

SERVICE_NAMES = (
    placement_pb2.DESCRIPTOR.services_by_name["Placement"].full_name,
    nodepools_pb2.DESCRIPTOR.services_by_name["NodePools"].full_name,
    fleet_pb2.DESCRIPTOR.services_by_name["Fleet"].full_name,
)
#: grpc.health.v1 service name of one cluster ("cluster/cluster-a"): SERVING while synced.
CLUSTER_HEALTH_PREFIX = "cluster/"
_RESERVED_LOG_ATTRS = set(vars(logging.makeLogRecord({})))
#: Fleet gauges are recomputed this often: a few ms at 10^4 nodes on the loop, so not every
#: second (Prometheus scrapes every 15-60 s).
METRICS_REFRESH_S = 5.0
#: How often sources that reported a lost connection are checked against sync_lost_after_s.
SOURCE_CHECK_S = 1.0
#: How often the metrics endpoint's TLS files are checked for a rotation.
TLS_CHECK_S = 2.0


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as JSON."""
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED_LOG_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(cfg: cfgmod.LoggingConfig) -> None:
    """Route every log record to stderr in JSON (or plain text)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if cfg.json_format
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level)


class TaskDied(RuntimeError):
    """A supervised task ended: the daemon stops rather than limp on."""


class Daemon:
    """fleetd's supervisor. `await start()`, then `await wait()`; `stop()` is idempotent."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Build (nothing runs until `start`). `clock` returns Unix seconds."""
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.config_loaded_at_s = clock()
        self.metrics = Metrics()
        self.journal: Journal | None = None
        self.state: FleetState | None = None
        self.server: grpc.aio.Server | None = None
        self.health = HealthServicer()
        self.grpc_port = 0
        self.metrics_port = 0
        self.stopping = asyncio.Event()
        self.stopped = asyncio.Event()
        self.exit_code = 0
        self._tasks: dict[asyncio.Task[None], str] = {}
        self._file_digest = self._digest()
        self._stop_task: asyncio.Task[None] | None = None
        self.reloads = {"ok": 0, "error": 0}
        self._background: set[asyncio.Future[None]] = set()
        self._reload_changed = asyncio.Condition()
        self._started = False
        self.autoscaler: Autoscaler | None = None
        #: Names of tasks that ignored cancellation at shutdown (serve() then exits hard).
        self.stuck_tasks: list[str] = []

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the journal, restore state, bind the servers, start every supervised task."""
        cfg = self.config
        self._started = True
        self.journal = Journal(cfg.journal.path, cfg.journal.synchronous)
        self.state = state = FleetState(cfg, self.journal, self.clock, self.metrics.state_hooks())
        log.info(
            "journal restored",
            extra={"path": self.journal.path, "reservations": len(state.held), "seq": state.seq},
        )
        sources: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if cfg.sources.simulated.enabled:
            sim = SimulatedFleet(cfg.sources.simulated, state, self.clock)
            sources.append(("source-simulated", sim.run))
        sources += self._external_sources()

        server = grpc.aio.server(
            interceptors=[ParseRequests(self._malformed_request)],
            options=[
                ("grpc.max_receive_message_length", cfg.server.max_receive_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        edge = Edge(state, lambda: self.config, self.metrics, self.stopping)
        placement_pb2_grpc.add_PlacementServicer_to_server(PlacementServicer(edge), server)
        nodepools_pb2_grpc.add_NodePoolsServicer_to_server(NodePoolsServicer(edge), server)
        fleet_pb2_grpc.add_FleetServicer_to_server(
            FleetServicer(edge, lambda: self.config_loaded_at_s), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
        await self._set_health(False)
        tls = cfg.server.tls
        if tls.enabled:
            self.grpc_port = server.add_secure_port(cfg.server.grpc_listen, server_credentials(tls))
        else:
            if not _loopback(cfg.server.grpc_listen):
                log.warning(
                    "gRPC without TLS on a non-loopback address: whoever reaches it may place "
                    "and release (server.tls)",
                    extra={"grpc_listen": cfg.server.grpc_listen},
                )
            self.grpc_port = server.add_insecure_port(cfg.server.grpc_listen)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC on {cfg.server.grpc_listen}")
        await server.start()
        self.server = server
        metrics_tls = MetricsTls(cfg.server.tls) if cfg.server.tls.metrics else None
        self.metrics_port = self.metrics.serve(cfg.server.metrics_listen, metrics_tls)
        log.info(
            "fleetd serving",
            extra={"grpc_port": self.grpc_port, "metrics_port": self.metrics_port,
                   "config_version": cfg.version()},
        )  # fmt: skip
        for name, run in sources:
            self._spawn(name, run())
        self._spawn("readiness", self._readiness())
        self._spawn(
            "expiry",
            self._every(lambda: self.config.reservations.expiry_interval_s, state.expire_due),
        )
        self._spawn(
            "staleness",
            self._every(lambda: self.config.staleness.check_interval_s, state.mark_stale),
        )
        # Sources report connection changes as they happen; this turns "down for longer
        # than sync_lost_after_s" into lost sync (readiness drops).
        self._spawn("source-sync", self._every(lambda: SOURCE_CHECK_S, state.check_sources))
        if metrics_tls is not None:
            # (gRPC checks its files at every handshake; the metrics server cannot ask.)
            self._spawn("metrics-tls", self._every(lambda: TLS_CHECK_S, metrics_tls.refresh))
        self._spawn(
            "metrics-refresh",
            self._every(lambda: METRICS_REFRESH_S, lambda: self.metrics.refresh(state)),
        )
        self.autoscaler = Autoscaler(state, lambda: self.config, self.clock, self.metrics)
        self._spawn("autoscaler", self.autoscaler.run())
        if self.config_path is not None:
            self._spawn(
                "config-watch", self._every(lambda: self.config.reload_poll_s, self._poll_config)
            )

    def _malformed_request(self, method: str, seconds: float) -> None:
        """Count a request body that did not parse (answered INVALID_ARGUMENT)."""
        service, _, name = method.lstrip("/").rpartition("/")
        label = name if service in SERVICE_NAMES else method
        self.metrics.rpc_duration.labels(label, "INVALID_ARGUMENT").observe(seconds)

    def _external_sources(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        """Kafka and Kubernetes sources, when enabled (fleetd/sources/kafka.py, kubernetes.py)."""
        cfg = self.config.sources
        assert self.state is not None
        out: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if cfg.kafka.enabled:
            from fleetd.sources import kafka  # type: ignore[attr-defined,unused-ignore]

            out.append(("source-kafka", kafka.build(cfg.kafka, self.state, self.metrics)))
        if cfg.kubernetes.enabled:
            from fleetd.sources import kubernetes  # type: ignore[attr-defined,unused-ignore]

            out.append(
                ("source-kubernetes", kubernetes.build(cfg.kubernetes, self.state, self.metrics))
            )
        return out

    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks[task] = name
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        name = self._tasks.pop(task, task.get_name())
        if self.stopping.is_set() or task.cancelled():
            return
        exc = task.exception()
        # A long-lived task ending at all is a failure: nothing is meant to finish on its own.
        log.error("supervised task died; shutting down", extra={"task": name}, exc_info=exc)
        self.metrics.task_failures.labels(name).inc()
        self.exit_code = 1
        self.request_stop()

    async def _every(self, interval_s: Callable[[], float], fn: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval_s())
            fn()

    async def _readiness(self) -> None:
        """Keep grpc.health.v1 equal to readiness. Service "" and every fleetd service:
        SERVING once every source finished its initial sync, while at least one has not lost
        its sync since; NOT_SERVING before the initial sync and when every source lost it.
        Service "cluster/<name>": SERVING while that cluster's sources are synced (a lost
        cluster only leaves placement, see `FleetState.lost_clusters`)."""
        state = self.state
        assert state is not None
        serving = False  # start() set NOT_SERVING
        frozen = False
        clusters: dict[str, bool] = {}
        while True:
            state.readiness_changed.clear()
            ready, now_clusters = state.health()
            if ready != serving:
                serving = ready
                await self._set_health(serving)
                self.metrics.ready.set(1 if serving else 0)
                if serving:
                    log.info("ready: every source synced once, not every sync lost")
                    if not frozen:
                        frozen = True
                        freeze_startup_heap()
                else:
                    log.warning("not ready", extra={"reason": state.not_ready_reason()})
            for cluster, synced in now_clusters:
                if clusters.get(cluster) != synced:
                    clusters[cluster] = synced
                    await self.health.set(CLUSTER_HEALTH_PREFIX + cluster, _status(synced))
                    if not synced and serving:
                        log.warning(
                            "cluster excluded from placement: its sync is lost",
                            extra={"cluster": cluster, "reason": state.not_ready_reason()},
                        )
            await state.readiness_changed.wait()

    async def _set_health(self, ready: bool) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, _status(ready))

    def request_stop(self) -> None:
        """Begin a graceful shutdown (signal handlers and failures call this)."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self.stop())

    async def stop(self) -> None:
        """Drain in-flight RPCs (bounded by shutdown_grace_s), stop every task, close. Idempotent."""
        if self.stopping.is_set():
            await self.stopped.wait()
            return
        self.stopping.set()
        log.info("shutting down", extra={"grace_s": self.config.server.shutdown_grace_s})
        if self._started:
            with contextlib.suppress(Exception):
                await self.health.enter_graceful_shutdown()
        if self.state is not None:
            self.state.close_watchers()
        if self.server is not None:
            await self.server.stop(self.config.server.shutdown_grace_s)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a task that ignores cancellation is logged, not waited for forever.
            _, pending = await asyncio.wait(tasks, timeout=self.config.server.shutdown_grace_s)
            self.stuck_tasks = sorted(t.get_name() for t in pending)
            if self.stuck_tasks:
                log.error("tasks did not stop when cancelled", extra={"tasks": self.stuck_tasks})
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error(
                    "task failed during shutdown",
                    extra={"task": task.get_name()},
                    exc_info=task.exception(),
                )
        self.metrics.close()
        if self.journal is not None:
            self.journal.close()
        log.info("stopped", extra={"exit_code": self.exit_code})
        self.stopped.set()

    async def wait(self) -> int:
        """Wait until stopped; returns the exit code (0 clean, 1 when a task died)."""
        await self.stopped.wait()
        return self.exit_code

    # -- config reload ------------------------------------------------------------------------

    def _digest(self) -> str:
        if self.config_path is None:
            return ""
        try:
            return hashlib.sha256(self.config_path.read_bytes()).hexdigest()
        except OSError:
            return ""

    def _poll_config(self) -> None:
        digest = self._digest()
        if digest and digest != self._file_digest:
            self._file_digest = digest
            self.reload()

    async def reloads_reached(self, ok: int = 0, error: int = 0) -> None:
        """Wait until at least `ok` successful and `error` rejected reloads happened."""
        async with self._reload_changed:
            await self._reload_changed.wait_for(
                lambda: self.reloads["ok"] >= ok and self.reloads["error"] >= error
            )

    def _count_reload(self, result: str) -> None:
        self.reloads[result] += 1
        self.metrics.config_reloads.labels(result).inc()

        async def notify() -> None:
            async with self._reload_changed:
                self._reload_changed.notify_all()

        task = asyncio.ensure_future(notify())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def reload(self) -> bool:
        """Reload the config file: apply reloadable sections, or keep the old config on error."""
        if self.config_path is None:
            log.warning("reload requested but fleetd runs on embedded defaults (no --config)")
            return False
        try:
            new = cfgmod.load(self.config_path)
            merged = cfgmod.merge_reloadable(self.config, new)
        except ConfigError as exc:
            self._count_reload("error")
            log.error(
                "config reload rejected; keeping the running config", extra={"error": str(exc)}
            )
            return False
        restart = cfgmod.restart_only_changes(self.config, new)
        if restart:
            log.warning("config sections changed that need a restart", extra={"sections": restart})
        self.config = merged
        if self.state is not None:
            self.state.set_config(merged)
        self.config_loaded_at_s = self.clock()
        self._count_reload("ok")
        log.info("config reloaded", extra={"config_version": merged.version()})
        return True


async def serve(config: Config, config_path: Path | None) -> int:
    """Run the daemon until SIGTERM/SIGINT (exit 0) or a task failure (exit 1)."""
    daemon = Daemon(config, config_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    try:
        await daemon.start()
    except TlsFilesError as exc:
        log.error("startup failed: %s", exc)
        await daemon.stop()
        return 1
    except Exception:
        log.exception("startup failed")
        await daemon.stop()
        return 1
    code = await daemon.wait()
    if daemon.stuck_tasks:
        # asyncio.run would wait for them forever: exit now, within the bounded shutdown.
        logging.shutdown()
        os._exit(code)
    return code


def _loopback(host_port: str) -> bool:
    """Whether a listen address `host:port` is on the loopback interface only."""
    host = host_port.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # (a name: whatever it resolves to)


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )


def freeze_startup_heap() -> None:
    """Move every object alive now into the collector's permanent generation (`gc.freeze`).

    Called once, when the daemon first turns ready: the initial sync has just built the fleet
    state (some hundred thousand long-lived objects at 10^4 nodes) and the config, the
    servers and the modules are loaded. Left in the tracked generations, each full
    collection, which the telemetry stream's allocations trigger every few seconds, walks
    all of it although none of it is garbage (measured with `python -m benchmarks ingest`:
    ~0.2 s of collector time per 100,000 records, a quarter of the ingest cost). Frozen
    objects are still freed by reference counting when dropped; only cycles among them
    would outlive their use, and the state holds no such garbage. A collection first, so
    that garbage of the sync itself is not frozen.
    """
    gc.collect()
    gc.freeze()
