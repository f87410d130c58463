"""The reflector loop of the Kubernetes source against a scripted API (no server).

The real API servers are exercised in tests/integration/test_sources_kubernetes.py; here
the rare paths are forced deterministically: 410 Gone in the stream and as an HTTP status,
malformed events, bookmarks, and what is reported after a relist.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from fleetd.sources.kubernetes import KubernetesSource, KubernetesSourceSettings, _Watcher
from fleetd.sources.memory import FleetView
from fleetd.sources.metrics import SourceMetrics
from fleetd.sources.updates import NodeRemoved, NodeUpdate, PodObserved, PodRemoved
from tests.unit.test_sources_translate import kube_node, kube_pod


class EndOfScript(Exception):
    """The scripted API has nothing more to say: ends the watcher's loop in a test."""


class _ListResponse:
    def __init__(self, body: dict[str, Any]) -> None:
        self.data = json.dumps(body).encode()


class _WatchResponse:
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def stream(self, amt: object = None, decode_content: object = None) -> Iterator[bytes]:
        yield from self.lines

    def release_conn(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class ScriptedApi:
    """Plays `list_node`: lists return `objects`; each watch call plays the next script."""

    def __init__(self, objects: list[dict[str, Any]], rv: str, watches: list[Any]) -> None:
        self.objects = objects
        self.rv = rv
        self.watches = watches
        self.watch_calls: list[str | None] = []
        self.list_calls = 0

    def list_node(self, **kwargs: Any) -> Any:
        if kwargs.get("watch"):
            self.watch_calls.append(kwargs.get("resource_version"))
            if not self.watches:
                raise EndOfScript()
            step = self.watches.pop(0)
            if isinstance(step, BaseException):
                raise step
            if callable(step):
                step = step()
            return _WatchResponse(
                [e if isinstance(e, bytes) else json.dumps(e).encode() + b"\n" for e in step]
            )
        self.list_calls += 1
        return _ListResponse({"metadata": {"resourceVersion": self.rv}, "items": self.objects})


def _watcher(api: ScriptedApi, kind: str = "nodes") -> tuple[_Watcher, FleetView, SourceMetrics]:
    view = FleetView()
    metrics = SourceMetrics()
    source = KubernetesSource(
        KubernetesSourceSettings(backoff_initial_s=0.001, backoff_max_s=0.001),
        view,
        metrics=metrics,
        wall_clock=lambda: 100.0,
    )
    return _Watcher(source, "c", kind, api.list_node, {}), view, metrics


def _event(etype: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": etype, "object": obj}


async def test_410_in_the_stream_relists_and_reports_what_went_meanwhile() -> None:
    api = ScriptedApi([kube_node("n1", rv="3"), kube_node("n2", rv="4")], "4", [])
    watcher, view, metrics = _watcher(api)

    def broken_watch() -> list[Any]:
        # While this watch breaks, n2 is deleted and n3 created: the relist must show both.
        api.objects = [kube_node("n1", rv="5"), kube_node("n3", rv="9")]
        api.rv = "10"
        return [
            _event("MODIFIED", kube_node("n1", rv="5", unschedulable=True)),
            _event("ERROR", {"kind": "Status", "code": 410, "message": "too old"}),
        ]

    api.watches = [broken_watch]
    await watcher.initial_list()
    with pytest.raises(EndOfScript):
        await watcher.run()
    assert sorted(name for _, name in view.nodes) == ["n1", "n3"]
    assert api.watch_calls == ["4", "10"]
    assert metrics.kube_watch_restarts.labels("c", "nodes", "expired")._value.get() == 1
    assert metrics.kube_relists.labels("c", "nodes")._value.get() == 2
    assert watcher.known.keys() == {"n1", "n3"}


async def test_http_410_on_watch_relists() -> None:
    api = ScriptedApi([kube_node("n1", rv="3")], "3", [ApiException(status=410, reason="Gone")])
    watcher, view, _metrics = _watcher(api)
    await watcher.initial_list()
    api.objects = []
    api.rv = "8"
    with pytest.raises(EndOfScript):
        await watcher.run()
    assert view.nodes == {}
    assert api.list_calls == 2
    assert api.watch_calls == ["3", "8"]


async def test_resume_from_the_last_event_and_bookmark() -> None:
    api = ScriptedApi(
        [],
        "1",
        [
            [_event("ADDED", kube_node("n1", rv="2")), _event("BOOKMARK", {"metadata": {"resourceVersion": "7"}})],
            [_event("MODIFIED", kube_node("n1", rv="8", unschedulable=True))],
            [_event("DELETED", kube_node("n1", rv="9"))],
        ],
    )  # fmt: skip
    watcher, view, _ = _watcher(api)
    await watcher.initial_list()
    with pytest.raises(EndOfScript):
        await watcher.run()
    # Every watch after a normal end resumes where the last one stopped: nothing missed.
    assert api.watch_calls == ["1", "7", "8", "9"]
    assert api.list_calls == 1
    assert view.nodes == {}


async def test_malformed_events_and_objects_are_counted_and_skipped() -> None:
    bad_node = kube_node("n2", rv="4")
    bad_node["status"]["capacity"]["nvidia.com/gpu"] = "lots"
    api = ScriptedApi(
        [],
        "1",
        [[b"{not json\n", _event("ADDED", kube_node("n1", rv="3")), {"type": "ADDED"},
          _event("ADDED", bad_node), _event("SIDEWAYS", kube_node("n3", rv="5")),
          _event("MODIFIED", kube_node("n1", rv="6", unschedulable=True))]],
    )  # fmt: skip
    watcher, view, metrics = _watcher(api)
    await watcher.initial_list()
    with pytest.raises(EndOfScript):
        await watcher.run()
    node = view.node("c", "n1")
    assert isinstance(node, NodeUpdate)
    assert node.unschedulable
    assert node.sequence == 6
    assert node.observed_at_s == 100.0
    assert set(view.nodes) == {("c", "n1")}
    invalid = metrics.kube_invalid_objects
    assert invalid.labels("c", "nodes", "bad-event")._value.get() == 3
    assert invalid.labels("c", "nodes", "bad-quantity")._value.get() == 1
    assert api.watch_calls == ["1", "6"]


async def test_pods_come_and_go() -> None:
    api = ScriptedApi(
        [kube_pod("p1", rv="2")],
        "2",
        [[_event("MODIFIED", kube_pod("p1", phase="Succeeded", rv="3")),
          _event("ADDED", {**kube_pod("p2", rv="4"), "metadata": {**kube_pod("p2")["metadata"], "uid": "u-2"}}),
          _event("DELETED", kube_pod("never-seen", rv="5") | {"metadata": {"name": "x", "namespace": "ml", "uid": "u-9"}}),
          _event("DELETED", {**kube_pod("p2", rv="6"), "metadata": {**kube_pod("p2")["metadata"], "uid": "u-2"}})]],
    )  # fmt: skip
    watcher, view, _ = _watcher(api, kind="pods")
    log: list[Any] = []
    original = view.apply

    async def recording(updates: Any) -> None:
        log.extend(updates)
        await original(updates)

    view.apply = recording  # type: ignore[method-assign]
    await watcher.initial_list()
    with pytest.raises(EndOfScript):
        await watcher.run()
    kinds = [(type(u).__name__, u.name) for u in log]
    assert kinds == [
        ("PodObserved", "p1"),
        ("PodRemoved", "p1"),  # Succeeded: holds nothing any more
        ("PodObserved", "p2"),
        ("PodRemoved", "p2"),  # the unknown pod's deletion reports nothing
    ]
    assert isinstance(log[0], PodObserved)
    assert isinstance(log[1], PodRemoved)
    assert view.pods_on("c", "gpu-1") == ()


async def test_relist_reports_removed_nodes() -> None:
    api = ScriptedApi([kube_node("n1", rv="2"), kube_node("n2", rv="3")], "3", [])
    watcher, view, _ = _watcher(api)
    await watcher.initial_list()
    api.objects = [kube_node("n2", rv="3")]
    log: list[Any] = []
    original = view.apply

    async def recording(updates: Any) -> None:
        log.extend(updates)
        await original(updates)

    view.apply = recording  # type: ignore[method-assign]
    await watcher._relist()
    assert NodeRemoved(cluster="c", name="n1") in log
    assert set(view.nodes) == {("c", "n2")}


async def test_quiet_nodes_are_reapplied_only_while_the_watch_is_healthy() -> None:
    api = ScriptedApi([kube_node("n1", rv="3"), kube_node("n2", rv="4")], "4", [])
    watcher, view, _ = _watcher(api)
    source = watcher.source
    log: list[Any] = []
    original = view.apply

    async def recording(updates: Any) -> None:
        log.extend(updates)
        await original(updates)

    view.apply = recording  # type: ignore[method-assign]
    await watcher.initial_list()
    log.clear()
    assert await source.resync(watcher) == 2
    # Same content, observed now, "unordered" (sequence 0): a state gate admits it.
    assert [(u.name, u.sequence, u.observed_at_s) for u in log] == [
        ("n1", 0, 100.0),
        ("n2", 0, 100.0),
    ]
    await watcher._after_error(ApiException(status=500, reason="boom"))
    assert await source.resync(watcher) == 0  # API server unreachable: let nodes go stale
