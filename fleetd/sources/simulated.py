"""The in-process simulated fleet: plays the clusters when no real source is configured.

It announces the configured clusters' pools and nodes through the same update values as
the Kafka and Kubernetes sources, heartbeats every node (so none goes stale), and plays the
clusters' side of a placement: `confirm_after_s` after a PLACED decision it reports the
workload's pods running on their nodes (confirming the reservation); when a reservation is
released or expires it reports the pods gone. With `apply_scale_decisions` it also plays the
pool manager: `provisioning_delay_s` after a scale decision, the nodes a scale-up asks for
come up (new names, never reused) and the nodes a scale-down or replacement names go
(drained: the cluster reports them deleted, and their pods with them).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

from fleetd.config import SimCluster, SimPool, SimulatedSourceConfig
from fleetd.sources import updates as up
from fleetd.state import POD_NAME_LABEL, WORKLOAD_LABEL, Decision, FleetState

SOURCE = "simulated"
log = logging.getLogger("fleetd.sources.simulated")


def node_name(cluster: str, pool: str, i: int) -> str:
    """Name of the i-th simulated node of a pool."""
    return f"{cluster}-{pool}-{i:04d}"


class SimulatedFleet:
    """Feeds fleet state with the configured simulated clusters."""

    def __init__(
        self,
        config: SimulatedSourceConfig,
        state: FleetState,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`state` is the sink; `clock` stamps observed_at_s."""
        self.config = config
        self.state = state
        self.clock = clock
        self._seq = itertools.count(1)
        #: The node indices of every simulated pool (`node_name`), in order; scale
        #: decisions add new indices and remove named nodes.
        self.live = {(c.name, p.name): list(range(p.nodes)) for c in config.clusters
                     for p in c.pools}  # fmt: skip
        self._next_index = {key: len(indices) for key, indices in self.live.items()}
        for cluster in config.clusters:
            state.expect_source(SOURCE, cluster.name)

    def _node_updates(self, cluster: SimCluster) -> list[up.NodeUpdate]:
        now = self.clock()
        out = []
        for pool in cluster.pools:
            labels = up.labels_of(
                {
                    "topology.kubernetes.io/zone": pool.zone,
                    "cloud.google.com/gke-nodepool": pool.name,
                    "nvidia.com/gpu.product": pool.gpu_model,
                    "nvidia.com/gpu.count": str(pool.gpus_per_node),
                }
                if pool.gpu_model
                else {"topology.kubernetes.io/zone": pool.zone}
            )
            for i in self.live[(cluster.name, pool.name)]:
                res = up.Resources(
                    cpu_millicores=pool.cpu_millicores,
                    memory_bytes=pool.memory_bytes,
                    gpus=pool.gpus_per_node if pool.gpu_model else 0,
                )
                out.append(
                    up.NodeUpdate(
                        cluster=cluster.name,
                        name=node_name(cluster.name, pool.name, i),
                        sequence=next(self._seq),
                        capacity=res,
                        allocatable=res,
                        labels=labels,
                        node_pool=pool.name,
                        zone=pool.zone,
                        gpu_model=pool.gpu_model,
                        gpu_memory_bytes=pool.gpu_memory_bytes,
                        observed_at_s=now,
                    )
                )
        return out

    def _pool_update(self, cluster: SimCluster, pool: SimPool) -> up.NodePoolUpdate:
        res = up.Resources(
            cpu_millicores=pool.cpu_millicores,
            memory_bytes=pool.memory_bytes,
            gpus=pool.gpus_per_node if pool.gpu_model else 0,
        )
        return up.NodePoolUpdate(
            cluster=cluster.name,
            name=pool.name,
            sequence=next(self._seq),
            instance_type=f"sim-{pool.name}",
            allocatable=res,
            gpu_model=pool.gpu_model,
            gpu_memory_bytes=pool.gpu_memory_bytes,
            price_per_hour=pool.price_per_hour,
            capacity_type=up.CapacityType(pool.capacity_type),
            min_size=pool.min_size,
            max_size=pool.max_size or pool.nodes,
            current_size=len(self.live[(cluster.name, pool.name)]),
            zones=(pool.zone,) if pool.zone else (),
        )

    async def sync(self) -> None:
        """Announce every pool and node, then mark each cluster synced."""
        for cluster in self.config.clusters:
            for pool in cluster.pools:
                await self.state.apply(self._pool_update(cluster, pool))
            nodes = self._node_updates(cluster)
            for u in nodes:
                await self.state.apply(u)
            await self.state.apply(
                up.ClusterSynced(cluster.name, SOURCE, frozenset(u.name for u in nodes))
            )
        log.info(
            "simulated fleet synced",
            extra={"clusters": len(self.config.clusters), "nodes": len(self.state.nodes)},
        )

    async def run(self) -> None:
        """Sync, then heartbeat every node and play the pods of placements (until cancelled)."""
        await self.sync()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._heartbeat(), name="simulated-heartbeat")
            tg.create_task(self._play_pods(), name="simulated-pods")
            if self.config.apply_scale_decisions:
                tg.create_task(self._play_pool_manager(), name="simulated-pool-manager")

    async def _play_pool_manager(self) -> None:
        """Carry out scale decisions after `provisioning_delay_s`: add the nodes of
        scale-ups, drain and delete the nodes scale-downs and replacements name."""
        pending: set[asyncio.Task[None]] = set()
        async for event in self.state.scale.watch(0, from_now=True):
            d = event.decision
            if event.dry_run or not (d.delta > 0 or d.remove_nodes):
                continue  # dry-run: shown, not acted on
            task = asyncio.create_task(self._resize(d.cluster, d.pool, max(d.delta, 0),
                                                    d.remove_nodes))  # fmt: skip
            pending.add(task)
            task.add_done_callback(pending.discard)

    async def _resize(
        self, cluster_name: str, pool_name: str, add: int, remove: tuple[str, ...]
    ) -> None:
        await asyncio.sleep(self.config.provisioning_delay_s)
        cluster = next(c for c in self.config.clusters if c.name == cluster_name)
        pool = next(p for p in cluster.pools if p.name == pool_name)
        key = (cluster_name, pool_name)
        live = self.live[key]
        room = max(0, (pool.max_size or pool.nodes) - len(live))
        for _ in range(min(add, room)):
            live.append(self._next_index[key])
            self._next_index[key] += 1
        # New nodes first, then the pool's new size (as a cloud's node group reports it).
        for u in self._node_updates(cluster):
            await self.state.apply(u)
        changed = {pool.name} if add else set()
        # Decisions name nodes by key, "cluster/name" (`state.node_key`).
        for name in (n.split("/", 1)[-1] for n in remove):
            for other in cluster.pools:
                indices = self.live[(cluster_name, other.name)]
                gone = [i for i in indices if node_name(cluster_name, other.name, i) == name]
                if gone:
                    indices.remove(gone[0])
                    changed.add(other.name)
                    # Deleting the node takes its pods with it (the state drops them).
                    await self.state.apply(
                        up.NodeRemoved(cluster_name, name, sequence=next(self._seq))
                    )
        for other in cluster.pools:
            if other.name in changed:
                await self.state.apply(self._pool_update(cluster, other))
        log.info(
            "simulated scale decision applied",
            extra={"pool": pool_name, "added": min(add, room), "removed": len(remove),
                   "size": len(live)},
        )  # fmt: skip

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            for cluster in self.config.clusters:
                for i, u in enumerate(self._node_updates(cluster)):
                    await self.state.apply(u)
                    if i % 256 == 255:
                        await asyncio.sleep(0)  # let RPCs in between a large fleet's heartbeats

    async def _play_pods(self) -> None:
        pending: set[asyncio.Task[None]] = set()
        async for d in self.state.watch(0, from_now=True):
            if d.kind == "place" and d.result == "placed" and not d.replayed:
                task = asyncio.create_task(self._start_pods(d))
                pending.add(task)
                task.add_done_callback(pending.discard)
            elif d.kind in ("release", "expire"):
                for p in d.placements:
                    await self.state.apply(
                        up.PodRemoved(
                            cluster=p.cluster,
                            namespace="sim",
                            name=p.pod_name,
                            uid=f"{d.workload_id}/{p.pod_name}",
                            node=p.node,
                            sequence=next(self._seq),
                        )
                    )

    async def _start_pods(self, d: Decision) -> None:
        if self.config.confirm_after_s:
            await asyncio.sleep(self.config.confirm_after_s)
        if d.workload_id not in self.state.held:
            return  # released or expired meanwhile
        for p in d.placements:
            await self.state.apply(
                up.PodObserved(
                    cluster=p.cluster,
                    namespace="sim",
                    name=p.pod_name,
                    uid=f"{d.workload_id}/{p.pod_name}",
                    node=p.node,
                    requests=up.Resources(
                        cpu_millicores=p.cpu_millicores,
                        memory_bytes=p.memory_bytes,
                        gpus=len(p.gpu_indices) if p.gpu_milli == 1000 else 0,
                    ),
                    labels=up.labels_of(
                        {WORKLOAD_LABEL: d.workload_id, POD_NAME_LABEL: p.pod_name}
                    ),
                    sequence=next(self._seq),
                )
            )
