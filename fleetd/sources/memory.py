"""Sinks that are not the daemon's state: a plain in-memory view, and the adapter in front
of `FleetState`.

`FleetView` folds updates into dictionaries (latest node state, pods by node, pools,
stale and synced flags). The agent keeps its picture of a cluster in one; tests and
benchmarks use it to await what a source delivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fleetd.sources.updates import (
    ClusterSynced,
    HeartbeatSlots,
    NodeHeartbeats,
    NodeInventory,
    NodePoolRemoved,
    NodePoolUpdate,
    NodeRemoved,
    NodeStale,
    NodeUpdate,
    PodObserved,
    PodRemoved,
    Update,
)

log = logging.getLogger(__name__)

#: Updates applied to the state between two yields to the event loop (~50 ms of work).
YIELD_EVERY_UPDATES = 500


class FleetView:
    """The latest state of every node, pod and pool a source reported (an UpdateSink)."""

    def __init__(self) -> None:
        self.nodes: dict[tuple[str, str], NodeUpdate] = {}
        #: (cluster, node) -> pod uid -> pod
        self.pods: dict[tuple[str, str], dict[str, PodObserved]] = {}
        self.pools: dict[tuple[str, str], NodePoolUpdate] = {}
        self.stale: set[tuple[str, str]] = set()
        self.synced: set[tuple[str, str]] = set()
        #: (cluster, node) -> (sequence, observed_at_s) of its latest unchanged report.
        self.heartbeats: dict[tuple[str, str], tuple[int, float]] = {}
        #: (source, heartbeat slot) -> (cluster, node, content token) (`HeartbeatSlots`).
        self.heartbeat_slots: dict[tuple[str, int], tuple[str, str, bytes]] = {}
        #: NodeHeartbeats entries whose slot's content matched no applied node report.
        self.refused_heartbeats = 0
        self.applied = 0
        self._changed = asyncio.Condition()

    def apply_now(self, update: Update) -> None:
        """Fold one update in."""
        self.applied += 1
        if isinstance(update, NodeUpdate):
            key = (update.cluster, update.name)
            self.nodes[key] = update
            self.heartbeats.pop(key, None)
            if update.pods is not None:
                self.pods[key] = {_pod_key(p): p for p in update.pods}
        elif isinstance(update, HeartbeatSlots):
            self.applied -= 1  # (bookkeeping, no report)
            for slot, name, token in zip(
                update.slots, update.names, update.content_tokens, strict=True
            ):
                self.heartbeat_slots[(update.source, slot)] = (update.cluster, name, token)
        elif isinstance(update, NodeHeartbeats):
            self.applied -= 1  # counted per entry
            nodes, beats, bound = self.nodes, self.heartbeats, self.heartbeat_slots
            for slot, seq, observed_s in zip(
                update.slots.tolist(),
                update.sequences.tolist(),
                update.observed_at_s.tolist(),
                strict=True,
            ):
                cluster, name, token = bound.get((update.source, slot), ("", "", b""))
                known = nodes.get((cluster, name))
                if known is None or not token or known.content_token != token:
                    self.refused_heartbeats += 1
                    continue
                beats[(cluster, name)] = (seq, observed_s)
                self.applied += 1
        elif isinstance(update, NodeRemoved):
            key = (update.cluster, update.name)
            self.nodes.pop(key, None)
            self.heartbeats.pop(key, None)
            self.pods.pop(key, None)
            self.stale.discard(key)
        elif isinstance(update, NodeInventory):
            # As the state does: unlisted nodes whose latest report is older are gone.
            for key in [
                k
                for k in self.nodes
                if k[0] == update.cluster
                and k[1] not in update.names
                and (self.sequence(*k) or 0) < update.sequence
            ]:
                self.nodes.pop(key, None)
                self.heartbeats.pop(key, None)
                self.pods.pop(key, None)
                self.stale.discard(key)
            if update.pools is not None:
                for key in [
                    k
                    for k, pool in self.pools.items()
                    if k[0] == update.cluster
                    and k[1] not in update.pools
                    and pool.sequence < update.sequence
                ]:
                    del self.pools[key]
        elif isinstance(update, NodeStale):
            key = (update.cluster, update.name)
            if update.stale and key in self.nodes:  # (as the state: known nodes only)
                self.stale.add(key)
            else:
                self.stale.discard(key)
        elif isinstance(update, PodObserved):
            self.pods.setdefault((update.cluster, update.node), {})[_pod_key(update)] = update
        elif isinstance(update, PodRemoved):
            on_node = self.pods.get((update.cluster, update.node))
            if on_node is not None:
                on_node.pop(update.uid or f"{update.namespace}/{update.name}", None)
        elif isinstance(update, NodePoolUpdate):
            self.pools[(update.cluster, update.name)] = update
        elif isinstance(update, NodePoolRemoved):
            self.pools.pop((update.cluster, update.name), None)
        elif isinstance(update, ClusterSynced):
            self.synced.add((update.source, update.cluster))

    async def apply(self, updates: Sequence[Update]) -> None:
        """Fold `updates` in, in order, and wake every `wait_for`."""
        for update in updates:
            self.apply_now(update)
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Wait until `predicate()` holds after some apply (TimeoutError after `timeout_s`)."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)

    def node(self, cluster: str, name: str) -> NodeUpdate | None:
        """The latest report of a node with new content, if it is known."""
        return self.nodes.get((cluster, name))

    def sequence(self, cluster: str, name: str) -> int | None:
        """The sequence of a node's latest report (a heartbeat's when newer), if known."""
        node = self.nodes.get((cluster, name))
        if node is None:
            return None
        beat = self.heartbeats.get((cluster, name))
        return max(node.sequence, beat[0]) if beat is not None else node.sequence

    def pods_on(self, cluster: str, node: str) -> tuple[PodObserved, ...]:
        """The pods on a node, sorted by namespace and name."""
        pods = self.pods.get((cluster, node), {}).values()
        return tuple(sorted(pods, key=lambda p: (p.namespace, p.name, p.uid)))


def _pod_key(p: PodObserved) -> str:
    return p.uid or f"{p.namespace}/{p.name}"


class StateSink:
    """Adapts the daemon's `FleetState` (one update at a time, synchronous on the loop) to
    the batch `UpdateSink` the sources feed."""

    def __init__(self, state: Any, on_rejected: Callable[[str], None] | None = None) -> None:
        self.state = state
        self.on_rejected = on_rejected

    async def apply(self, updates: Sequence[Update]) -> None:
        """Apply `updates` in order; one the state refuses (ValueError) is logged and skipped.

        Every update is one complete mutation of the single writer; between batches of
        YIELD_EVERY_UPDATES the event loop serves other work (Place calls), so catching up
        on a telemetry backlog does not stall the API.
        """
        apply_now = self.state.apply_now
        for i, update in enumerate(updates):
            if i and i % YIELD_EVERY_UPDATES == 0:
                await asyncio.sleep(0)
            try:
                apply_now(update)
            except ValueError as exc:
                log.warning("state refused an update: %s", exc)
                if self.on_rejected is not None:
                    self.on_rejected(type(update).__name__)
