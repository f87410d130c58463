"""Kubernetes watches: every context of a kubeconfig is a cluster; Nodes and Pods of each
are listed and watched and fed to the fleet state as update values.

Per (cluster, kind) a watcher runs the client-go reflector loop:
1. list (paged) -> the current objects and the list's resourceVersion; objects known from
   before that are no longer listed are reported removed (they went while we were away);
2. watch from that resourceVersion (with bookmarks), advancing it with every event;
3. when a watch ends (server timeout, network error) watch again from the last
   resourceVersion, so no event is lost across a restart; on 410 Gone (the version was
   compacted away) go back to 1. Errors are retried with exponential backoff and jitter.

The `kubernetes` client is synchronous: lists run in `asyncio.to_thread`, and each watch
stream is read by a daemon thread that hands raw lines to the event loop through a queue.
Objects are decoded from JSON and validated by `fleetd.sources.translate`; an invalid
object or event is counted (`fleetd_kube_invalid_objects_total`) and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.watch.watch import iter_resp_lines

from fleetd.sources import translate
from fleetd.sources.base import Backoff, UpdateSink
from fleetd.sources.memory import StateSink
from fleetd.sources.metrics import SourceMetrics
from fleetd.sources.updates import (
    ClusterSynced,
    NodeRemoved,
    NodeUpdate,
    PendingPod,
    PendingPodRemoved,
    PodObserved,
    PodRemoved,
    Update,
)

log = logging.getLogger(__name__)

SOURCE = "kubernetes"
#: How long a stopping watch waits for its reader thread (stuck connecting, at worst).
THREAD_JOIN_TIMEOUT_S = 5.0
NODES = "nodes"
PODS = "pods"
#: Unbound pods: the ones the cluster's scheduler marked Unschedulable are pending work.
PENDING = "pending-pods"


@dataclass(frozen=True)
class KubernetesSourceSettings:
    """Everything the Kubernetes source needs; `from_config` fills it from fleetd's config."""

    kubeconfig: str = "~/.kube/config"
    #: Contexts to watch; empty = every context of the kubeconfig.
    contexts: tuple[str, ...] = ()
    #: Objects per list page.
    page_size: int = 500
    #: How long the API server keeps one watch request open before ending it.
    watch_timeout_s: int = 300
    #: Timeout of list requests (and connect timeout of watches).
    request_timeout_s: float = 30.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    #: Only pods bound to a node hold resources.
    pod_field_selector: str = "spec.nodeName!="
    #: Pods not bound yet (pending work when marked Unschedulable). A pod that gets bound
    #: leaves this selection: its watch reports it DELETED.
    pending_pod_field_selector: str = "spec.nodeName="
    #: While a cluster's node watch is healthy, re-apply every node this often. A watch
    #: reports changes only (kubelets update node status every 5 minutes or on change), so
    #: without this a quiet node would look silent to fleetd's staleness sweep. None: off
    #: (the agent, which heartbeats on its own).
    node_resync_interval_s: float | None = 30.0
    #: With `on_connection` set (the daemon), ask each API server for its version this
    #: often, failing after `probe_timeout_s`: a watch on a silently dropped connection
    #: would only notice at its read timeout (minutes). None: off.
    probe_interval_s: float | None = 5.0
    probe_timeout_s: float = 5.0


class KubeconfigError(ValueError):
    """The kubeconfig cannot be read, or a requested context is not in it."""


def kubeconfig_contexts(path: str) -> list[str]:
    """The context names of a kubeconfig, in file order."""
    expanded = os.path.expanduser(path)
    if not Path(expanded).is_file():
        raise KubeconfigError(f"kubeconfig {path}: no such file")
    try:
        contexts, _ = k8s_config.list_kube_config_contexts(config_file=expanded)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError, ValueError) as exc:
        raise KubeconfigError(f"kubeconfig {path}: {exc}") from exc
    return [c["name"] for c in contexts or []]


class _Expired(Exception):
    """410 Gone: the resourceVersion was compacted away; relist."""


class _WatchFailed(Exception):
    """The watch stream reported an error other than 410 or could not be read."""


_RETRYABLE = (ApiException, urllib3.exceptions.HTTPError, OSError, _WatchFailed)


class KubernetesSource:
    """A supervised long-lived task: `await source.run()` watches every cluster until cancelled.

    `ready` is set once every cluster has been listed (nodes and pods) at least once.
    """

    def __init__(
        self,
        settings: KubernetesSourceSettings,
        sink: UpdateSink,
        *,
        metrics: SourceMetrics | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.metrics = metrics if metrics is not None else SourceMetrics()
        self.ready = asyncio.Event()
        self.clusters: list[str] = []
        self.synced: dict[str, asyncio.Event] = {}
        self._wall_clock = wall_clock
        self._watchers: list[_Watcher] = []
        #: Overrides settings.node_resync_interval_s when set (the daemon derives it from
        #: its hot-reloadable staleness limit).
        self.resync_interval_fn: Callable[[], float | None] | None = None
        #: Told (cluster, ok, reason) when a cluster's watches stop being current (a list
        #: or watch request failed: the API server cannot be reached or refuses) and when
        #: they are current again (re-listed, or a watch resumed) (the daemon's readiness).
        self.on_connection: Callable[[str, bool, str], None] | None = None
        self._cluster_ok: dict[str, bool] = {}
        #: cluster -> why its last version probe failed (absent: it answered).
        self._probe_failed: dict[str, str] = {}

    def resolve_clusters(self) -> list[str]:
        """The clusters (contexts) this source watches; raises KubeconfigError."""
        available = kubeconfig_contexts(self.settings.kubeconfig)
        wanted = list(self.settings.contexts) or available
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise KubeconfigError(
                f"kubeconfig {self.settings.kubeconfig}: no context {', '.join(unknown)} "
                f"(has {', '.join(available) or 'none'})"
            )
        return wanted

    async def run(self) -> None:
        """Watch every cluster until cancelled."""
        self.clusters = await asyncio.to_thread(self.resolve_clusters)
        self.synced = {c: asyncio.Event() for c in self.clusters}
        async with asyncio.TaskGroup() as tasks:
            for cluster in self.clusters:
                tasks.create_task(self._run_cluster(cluster), name=f"kube-{cluster}")
            tasks.create_task(self._await_ready(), name="kube-ready")

    async def _await_ready(self) -> None:
        for event in self.synced.values():
            await event.wait()
        log.info("kube: initial sync of %d cluster(s) done", len(self.clusters))
        self.ready.set()

    async def _run_cluster(self, cluster: str) -> None:
        s = self.settings
        api = await asyncio.to_thread(_new_client, s.kubeconfig, cluster)
        core = k8s_client.CoreV1Api(api)
        nodes = _Watcher(self, cluster, NODES, core.list_node, {})
        pods = _Watcher(
            self, cluster, PODS, core.list_pod_for_all_namespaces,
            {"field_selector": s.pod_field_selector},
        )  # fmt: skip
        pending = _Watcher(
            self, cluster, PENDING, core.list_pod_for_all_namespaces,
            {"field_selector": s.pending_pod_field_selector},
        )  # fmt: skip
        self._watchers += [nodes, pods, pending]
        try:
            # Nodes first: the pods of the initial list then land on known nodes.
            await nodes.initial_list()
            await pods.initial_list()
            await pending.initial_list()
            await self.sink.apply(
                [ClusterSynced(cluster=cluster, source=SOURCE, nodes=frozenset(nodes.known))]
            )
            self.synced[cluster].set()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(nodes.run(), name=f"kube-{cluster}-nodes")
                tasks.create_task(pods.run(), name=f"kube-{cluster}-pods")
                tasks.create_task(pending.run(), name=f"kube-{cluster}-pending")
                tasks.create_task(self._resync_nodes(nodes), name=f"kube-{cluster}-resync")
                if self.on_connection is not None and s.probe_interval_s is not None:
                    tasks.create_task(self._probe(api, cluster), name=f"kube-{cluster}-probe")
        finally:
            await asyncio.to_thread(api.close)

    def _resync_interval_s(self) -> float | None:
        if self.resync_interval_fn is not None:
            return self.resync_interval_fn()
        return self.settings.node_resync_interval_s

    async def _resync_nodes(self, watcher: _Watcher) -> None:
        while True:
            interval_s = self._resync_interval_s()
            if interval_s is None:
                return
            await asyncio.sleep(interval_s)
            await self.resync(watcher)

    async def resync(self, watcher: _Watcher) -> int:
        """Re-apply every node the watcher knows, as observed now, if its watch is healthy
        (connected and current); returns how many. They carry sequence 0 ("unordered"):
        the same content as the last applied version, so no ordering question arises."""
        if not watcher.healthy or watcher.cluster in self._probe_failed:
            return 0
        now_s = self.now_s()
        updates: list[Update] = [
            dataclasses.replace(node, sequence=0, observed_at_s=now_s)
            for node in watcher.known.values()
            if isinstance(node, NodeUpdate)
        ]
        if updates:
            await self.sink.apply(updates)
        return len(updates)

    async def _probe(self, api: Any, cluster: str) -> None:
        """Ask the API server for its version every probe_interval_s (see the setting)."""
        s = self.settings
        version = k8s_client.VersionApi(api)
        while True:
            await asyncio.sleep(s.probe_interval_s or 0.0)
            try:
                await asyncio.to_thread(version.get_code, _request_timeout=s.probe_timeout_s)
            except _RETRYABLE as exc:
                self._probe_failed[cluster] = f"probe: {type(exc).__name__}: {_short(exc)}"
            else:
                self._probe_failed.pop(cluster, None)
            self._watch_health(cluster, self._probe_failed.get(cluster, ""))

    def _watch_health(self, cluster: str, reason: str = "") -> None:
        """Report a change of a cluster's watch health (all its watchers current, and its
        API server answering probes, or not)."""
        ok = cluster not in self._probe_failed and all(
            w.healthy for w in self._watchers if w.cluster == cluster
        )
        if self._cluster_ok.get(cluster) != ok:
            self._cluster_ok[cluster] = ok
            if self.on_connection is not None:
                self.on_connection(cluster, ok, reason)

    def now_s(self) -> float:
        """Wall-clock time (Unix seconds) stamped on observed nodes."""
        return self._wall_clock()

    def resource_versions(self) -> dict[tuple[str, str], str | None]:
        """(cluster, kind) -> the resourceVersion each watch resumes from (status, tests)."""
        return {(w.cluster, w.kind): w.rv for w in self._watchers}


class _Watcher:
    """List + watch of one kind in one cluster (the reflector loop)."""

    def __init__(
        self,
        source: KubernetesSource,
        cluster: str,
        kind: str,
        list_fn: Callable[..., Any],
        list_kwargs: dict[str, Any],
    ) -> None:
        self.source = source
        self.cluster = cluster
        self.kind = kind
        self.list_fn = list_fn
        self.list_kwargs = list_kwargs
        self.rv: str | None = None
        #: nodes: name -> its last NodeUpdate; pods: uid -> its last PodObserved; pending
        #: pods: namespace/name -> its last PendingPod.
        self.known: dict[str, NodeUpdate | PodObserved | PendingPod] = {}
        #: True while the last list or watch request succeeded (the picture is current).
        self.healthy = False
        s = source.settings
        self.backoff = Backoff(s.backoff_initial_s, s.backoff_max_s)

    @property
    def metrics(self) -> SourceMetrics:
        return self.source.metrics

    async def initial_list(self) -> None:
        """List until it succeeds (with backoff): the initial sync."""
        while True:
            try:
                await self._relist()
                self.backoff.reset()
                return
            except _RETRYABLE as exc:
                await self._after_error(exc)

    async def run(self) -> None:
        """Watch (and relist when needed) until cancelled."""
        while True:
            try:
                if self.rv is None:
                    await self._relist()
                await self._watch()
                self.backoff.reset()
            except _Expired:
                log.info("kube %s/%s: resourceVersion %s expired; relisting",
                         self.cluster, self.kind, self.rv)  # fmt: skip
                self.metrics.kube_watch_restarts.labels(self.cluster, self.kind, "expired").inc()
                self.rv = None
            except _RETRYABLE as exc:
                await self._after_error(exc)

    async def _after_error(self, exc: BaseException) -> None:
        self.healthy = False
        self.source._watch_health(self.cluster, f"{self.kind}: {type(exc).__name__}: {_short(exc)}")
        if isinstance(exc, ApiException) and exc.status == 410:
            self.rv = None
        delay = self.backoff.next_delay_s()
        log.warning("kube %s/%s: %s: %s; retry in %.1fs",
                    self.cluster, self.kind, type(exc).__name__, _short(exc), delay)  # fmt: skip
        self.metrics.kube_watch_restarts.labels(self.cluster, self.kind, "error").inc()
        await asyncio.sleep(delay)

    # ---------------------------------------------------------------- list

    def _list_blocking(self) -> tuple[list[Any], str]:
        s = self.source.settings
        items: list[Any] = []
        token: str | None = None
        while True:
            kwargs = dict(self.list_kwargs, limit=s.page_size)
            if token:
                kwargs["_continue"] = token
            try:
                resp = self.list_fn(
                    **kwargs, _preload_content=False, _request_timeout=s.request_timeout_s
                )
            except ApiException as exc:
                if exc.status == 410 and token:
                    # The continue token expired mid-list: list again from the start.
                    items, token = [], None
                    continue
                raise
            try:
                body = json.loads(resp.data)
            except ValueError as exc:
                raise _WatchFailed(f"list returned invalid JSON: {exc}") from exc
            if not isinstance(body, dict) or not isinstance(body.get("items"), list):
                raise _WatchFailed("list returned no items")
            meta = body.get("metadata") or {}
            items.extend(body["items"])
            token = meta.get("continue") or None
            if not token:
                rv = meta.get("resourceVersion")
                if not isinstance(rv, str) or not rv:
                    raise _WatchFailed("list returned no resourceVersion")
                return items, rv

    async def _relist(self) -> None:
        items, rv = await asyncio.to_thread(self._list_blocking)
        self.metrics.kube_relists.labels(self.cluster, self.kind).inc()
        previous = self.known
        self.known = {}
        updates: list[Update] = []
        for obj in items:
            updates += self._translate("ADDED", obj)
        # Whatever was known but is not listed any more went while we were not watching.
        for key, last in previous.items():
            if key in self.known:
                continue
            if self.kind == NODES:
                updates.append(NodeRemoved(cluster=self.cluster, name=key))
            elif isinstance(last, PodObserved):
                updates.append(_pod_gone(last))
            elif isinstance(last, PendingPod):
                updates.append(PendingPodRemoved(last.cluster, last.namespace, last.name))
        await self.source.sink.apply(updates)
        self.rv = rv
        self.healthy = True
        self.source._watch_health(self.cluster)
        log.info("kube %s/%s: listed %d at resourceVersion %s",
                 self.cluster, self.kind, len(items), rv)  # fmt: skip

    # ---------------------------------------------------------------- watch

    async def _watch(self) -> None:
        """One watch request from self.rv until the server ends it or it fails."""
        s = self.source.settings
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | str | BaseException | None] = asyncio.Queue()
        stop = threading.Event()
        response: list[Any] = []

        def put(item: bytes | str | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: we are shutting down
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def read() -> None:
            try:
                resp = self.list_fn(
                    **self.list_kwargs,
                    watch=True,
                    resource_version=self.rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=s.watch_timeout_s,
                    _preload_content=False,
                    # Read timeout past the server's own: a silently dead peer is noticed.
                    _request_timeout=(s.request_timeout_s, s.watch_timeout_s + 30),
                )
                response.append(resp)
                put(b"")  # connected: an empty line marks the stream open
                try:
                    for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                        if stop.is_set():
                            break
                        put(line)
                finally:
                    resp.release_conn()
                put(None)
            except BaseException as exc:
                put(None if stop.is_set() else exc)

        thread = threading.Thread(
            target=read, name=f"kube-watch-{self.cluster}-{self.kind}", daemon=True
        )
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                if not item:  # the stream is open: the picture is current again
                    self.healthy = True
                    self.source._watch_health(self.cluster)
                    continue
                lines = [item]
                while not queue.empty() and len(lines) < 1000:
                    nxt = queue.get_nowait()
                    if nxt is None or isinstance(nxt, BaseException):
                        await self._handle(lines)
                        if nxt is None:
                            return
                        raise nxt
                    lines.append(nxt)
                await self._handle(lines)
        finally:
            stop.set()
            if thread.is_alive():
                if response:
                    # Unblock the reader thread's socket read (urllib3 >= 2.3).
                    with contextlib.suppress(Exception):
                        response[0].shutdown()
                # Let it finish before we go: a daemon thread still logging while the
                # interpreter shuts down aborts the process.
                await asyncio.to_thread(thread.join, THREAD_JOIN_TIMEOUT_S)

    async def _handle(self, lines: Sequence[bytes | str]) -> None:
        updates: list[Update] = []
        rv = self.rv
        try:
            for line in lines:
                try:
                    event = json.loads(line)
                except ValueError:
                    self._invalid("bad-event", "watch event is not JSON")
                    continue
                if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
                    self._invalid("bad-event", "watch event without object")
                    continue
                etype, obj = event.get("type"), event["object"]
                self.metrics.kube_events.labels(self.cluster, self.kind, str(etype)[:16]).inc()
                if etype == "ERROR":
                    code = obj.get("code")
                    if code == 410:
                        raise _Expired()
                    raise _WatchFailed(f"watch error {code}: {str(obj.get('message'))[:200]}")
                new_rv = translate.resource_version(obj)
                if etype in ("ADDED", "MODIFIED", "DELETED"):
                    updates += self._translate(etype, obj)
                elif etype != "BOOKMARK":
                    self._invalid("bad-event", f"unknown event type {etype!r}")
                    continue
                if new_rv:
                    rv = new_rv
        finally:
            # Apply what came before an ERROR event too; resume after the last applied one.
            if updates:
                await self.source.sink.apply(updates)
            self.rv = rv

    # ---------------------------------------------------------------- translate

    def _invalid(self, reason: str, detail: str) -> None:
        self.metrics.kube_invalid_objects.labels(self.cluster, self.kind, reason).inc()
        log.warning("kube %s/%s: skipped invalid object: %s: %s",
                    self.cluster, self.kind, reason, detail)  # fmt: skip

    def _translate(self, etype: str, obj: Any) -> list[Update]:
        try:
            if self.kind == NODES:
                return self._translate_node(etype, obj)
            if self.kind == PENDING:
                return self._translate_pending(etype, obj)
            return self._translate_pod(etype, obj)
        except translate.InvalidObject as exc:
            self._invalid(exc.reason, exc.detail)
            return []

    def _translate_node(self, etype: str, obj: Any) -> list[Update]:
        if etype == "DELETED":
            removed = translate.node_removed(self.cluster, obj)
            if removed.name not in self.known:
                return []
            del self.known[removed.name]
            return [removed]
        node = translate.node_update(self.cluster, obj, observed_at_s=self.source.now_s())
        self.known[node.name] = node
        return [node]

    def _translate_pending(self, etype: str, obj: Any) -> list[Update]:
        if etype == "DELETED":
            update: PendingPod | PendingPodRemoved = translate.pending_pod_removed(
                self.cluster, obj
            )
        else:
            update = translate.pending_pod(self.cluster, obj)
        key = f"{update.namespace}/{update.name}"
        if isinstance(update, PendingPodRemoved):
            # Only pods reported pending need a removal (most unbound pods never were).
            return [update] if self.known.pop(key, None) is not None else []
        self.known[key] = update
        return [update]

    def _translate_pod(self, etype: str, obj: Any) -> list[Update]:
        if etype == "DELETED":
            update: PodObserved | PodRemoved | None = translate.pod_removed(self.cluster, obj)
        else:
            update = translate.pod_update(self.cluster, obj)
        if update is None:
            return []
        key = update.uid or f"{update.namespace}/{update.name}"
        if isinstance(update, PodRemoved):
            if self.known.pop(key, None) is None:
                return []
            return [update]
        previous = self.known.get(key)
        self.known[key] = update
        if isinstance(previous, PodObserved) and previous.node != update.node:
            # A pod never moves between nodes; a changed nodeName means a recreated pod.
            return [_pod_gone(previous), update]
        return [update]


def _new_client(kubeconfig: str, context: str) -> Any:
    return k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=os.path.expanduser(kubeconfig), context=context
    )


def _pod_gone(pod: PodObserved) -> PodRemoved:
    return PodRemoved(
        cluster=pod.cluster, namespace=pod.namespace, name=pod.name, uid=pod.uid, node=pod.node
    )


def _short(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return str(exc)[:200]


def settings_from_config(config: Any) -> KubernetesSourceSettings:
    """KubernetesSourceSettings from fleetd's `sources.kubernetes` config section."""
    return KubernetesSourceSettings(kubeconfig=config.kubeconfig, contexts=tuple(config.contexts))


def build(config: Any, state: Any, daemon_metrics: Any) -> Callable[[], Awaitable[None]]:
    """The daemon's hook: watches feeding `state`; returns the `run` coroutine function.

    Reads the kubeconfig now so that readiness waits for every cluster's initial list
    (raises KubeconfigError when the file or a context is missing).
    """
    source = KubernetesSource(
        settings_from_config(config),
        StateSink(state),
        metrics=SourceMetrics.for_daemon(daemon_metrics),
    )
    # Re-apply quiet nodes well inside the (hot-reloadable) staleness limit.
    source.resync_interval_fn = lambda: min(30.0, state.config.staleness.node_stale_after_s / 4)
    source.on_connection = lambda cluster, ok, why: state.source_connection(
        SOURCE, cluster, ok, why
    )
    for cluster in source.resolve_clusters():
        state.expect_source(SOURCE, cluster)
    return source.run
