"""Joining node-inventory chunks (telemetry's relist) into whole inventories.

An agent publishes its cluster's node inventory on every resync as one or more chunk
records (`codec.encode_node_inventory`), each under its own key, so chunks of one
inventory may sit on different partitions and arrive in any order and in different polls.
`InventoryAssembler` keeps, per cluster, the chunks of the newest inventory not yet
complete, and hands out a `NodeInventory` once it holds every chunk. Chunks of an older
inventory than one being assembled or already handed out are ignored (redelivery, a
lagging partition); a newer one replaces an incomplete older one, whose removals the newer
inventory covers anyway. A chunk that never comes (lost, dead-lettered) leaves its
inventory incomplete: nothing is removed until a later inventory completes, which is the
safe side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetd.sources.codec import MAX_INVENTORY_NODES
from fleetd.sources.updates import NodeInventory, NodeInventoryChunk

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Partial:
    sequence: int
    chunk_count: int
    chunks: dict[int, tuple[str, ...]] = field(default_factory=dict)
    names: int = 0
    pools: tuple[str, ...] | None = None


class InventoryAssembler:
    """Per cluster: the chunks of the newest incomplete inventory (memory: at most
    `max_nodes` names per cluster) and the sequence of the last completed one."""

    def __init__(
        self,
        max_nodes: int = MAX_INVENTORY_NODES,
        on_abandon: Callable[[str], None] | None = None,
    ) -> None:
        self.max_nodes = max_nodes
        #: Told the cluster of every inventory given up (the daemon counts them).
        self.on_abandon = on_abandon
        self._partial: dict[str, _Partial] = {}
        self._completed: dict[str, int] = {}
        #: Chunks ignored (older than an inventory being assembled or completed) and
        #: inventories given up (inconsistent chunk counts, too many names): tests, logs.
        self.ignored_chunks = 0
        self.abandoned = 0

    def add(self, chunk: NodeInventoryChunk) -> NodeInventory | None:
        """Take one validated chunk; the whole inventory when this chunk completes it."""
        cluster, sequence = chunk.cluster, chunk.sequence
        if sequence <= self._completed.get(cluster, 0):
            self.ignored_chunks += 1
            return None
        partial = self._partial.get(cluster)
        if partial is None or sequence > partial.sequence:
            partial = self._partial[cluster] = _Partial(sequence, chunk.chunk_count)
        elif sequence < partial.sequence:
            self.ignored_chunks += 1
            return None
        elif chunk.chunk_count != partial.chunk_count:
            # One publisher never does this: the inventory cannot be trusted.
            self._abandon(cluster, f"chunks disagree on their count ({chunk.chunk_count} "
                          f"vs {partial.chunk_count})")  # fmt: skip
            return None
        if chunk.chunk_index in partial.chunks:
            return None  # (the same chunk again)
        partial.chunks[chunk.chunk_index] = chunk.names
        partial.names += len(chunk.names)
        if chunk.pools is not None:
            partial.pools = chunk.pools
        if partial.names > self.max_nodes:
            self._abandon(cluster, f"more than {self.max_nodes} node names")
            return None
        if len(partial.chunks) < partial.chunk_count:
            return None
        del self._partial[cluster]
        self._completed[cluster] = sequence
        names = frozenset(name for names in partial.chunks.values() for name in names)
        pools = None if partial.pools is None else frozenset(partial.pools)
        return NodeInventory(cluster, sequence, names, pools)

    def _abandon(self, cluster: str, why: str) -> None:
        partial = self._partial.pop(cluster)
        self.abandoned += 1
        if self.on_abandon is not None:
            self.on_abandon(cluster)
        log.warning("kafka: node inventory of %s at sequence %d ignored: %s",
                    cluster, partial.sequence, why)  # fmt: skip

    def pending(self) -> dict[str, tuple[int, int, int]]:
        """cluster -> (sequence, chunks held, chunk count) of incomplete inventories."""
        return {
            c: (p.sequence, len(p.chunks), p.chunk_count) for c, p in sorted(self._partial.items())
        }
