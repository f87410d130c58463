"""The in-process simulated fleet: plays the clusters when no real source is configured.

It announces the configured clusters' pools and nodes through the same update values as
the Kafka and Kubernetes sources, heartbeats every node (so none goes stale), and plays the
clusters' side of a placement: `confirm_after_s` after a PLACED decision it reports the
workload's pods running on their nodes (confirming the reservation); when a reservation is
released or expires it reports the pods gone.
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
        #: Current size of every simulated pool (grows when scale decisions are applied).
        self.sizes = {(c.name, p.name): p.nodes for c in config.clusters for p in c.pools}
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
            for i in range(self.sizes[(cluster.name, pool.name)]):
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
            current_size=self.sizes[(cluster.name, pool.name)],
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
        """Bring up the nodes of scale-up decisions after `provisioning_delay_s`."""
        pending: set[asyncio.Task[None]] = set()
        async for event in self.state.scale.watch(0, from_now=True):
            if event.decision.delta > 0 and not event.dry_run:  # dry-run: shown, not acted on
                task = asyncio.create_task(self._grow(event.decision.cluster, event.decision.pool,
                                                      event.decision.delta))  # fmt: skip
                pending.add(task)
                task.add_done_callback(pending.discard)

    async def _grow(self, cluster_name: str, pool_name: str, delta: int) -> None:
        await asyncio.sleep(self.config.provisioning_delay_s)
        cluster = next(c for c in self.config.clusters if c.name == cluster_name)
        pool = next(p for p in cluster.pools if p.name == pool_name)
        key = (cluster_name, pool_name)
        limit = pool.max_size or pool.nodes
        self.sizes[key] = min(limit, self.sizes[key] + delta)
        # New nodes first, then the pool's new size (as a cloud's node group reports it).
        for u in self._node_updates(cluster):
            await self.state.apply(u)
        await self.state.apply(self._pool_update(cluster, pool))
        log.info("simulated scale-up", extra={"pool": pool_name, "size": self.sizes[key]})

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
