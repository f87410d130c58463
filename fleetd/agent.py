"""`fleetd agent`: reads one cluster through the Kubernetes API and publishes its telemetry.

    fleetd agent --context prod-east --bootstrap-servers kafka:9092 [--pools pools.yaml]

It runs the same list+watch code as the daemon's Kubernetes source, keeps the cluster's
picture in memory, and publishes to the telemetry topic:
- a NodeReport (with every pod bound to the node) whenever the node or one of its pods
  changes, and NodeDeleted when the node goes;
- a PendingPod for every pod the cluster's scheduler marked Unschedulable (pending work
  for fleetd's autoscaler), and PendingPodDeleted once it is bound, deleted or done;
- a NodePoolReport per node pool (grouped by the pool labels of Karpenter, GKE, EKS, AKS)
  whose shape comes from its nodes and whose price and size bounds come from `--pools`;
- every node and pool again each `--resync-interval-s`: the heartbeat that keeps nodes
  from going stale in fleetd and lets a restarted fleetd rebuild its picture;
- with every resync (and once right after the initial publication) a NodeInventory: the
  name of every node it sees and of every pool it published, so that fleetd drops nodes
  and pools deleted while the agent was down or whose deletion record was lost
  (telemetry's equivalent of a relist).

`--pools` is YAML: `{pool-name: {price_per_hour: 32.8, min_size: 0, max_size: 16}}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from aiokafka.errors import KafkaError

from fleetd.config import NAME_RE
from fleetd.sources import security
from fleetd.sources.base import Backoff
from fleetd.sources.kubernetes import (
    KubeconfigError,
    KubernetesSource,
    KubernetesSourceSettings,
    kubeconfig_contexts,
)
from fleetd.sources.memory import FleetView
from fleetd.sources.publisher import DEFAULT_TOPIC, TelemetryPublisher
from fleetd.sources.updates import (
    ClusterSynced,
    NodeHeartbeats,
    NodePoolUpdate,
    NodeRemoved,
    NodeUpdate,
    PendingPod,
    PendingPodRemoved,
    PodObserved,
    PodRemoved,
    Update,
)

log = logging.getLogger(__name__)

#: Labels that describe one machine, not its pool's shape.
_NODE_SPECIFIC_LABELS = frozenset({"kubernetes.io/hostname"})
#: Taints Kubernetes sets for node conditions: not part of a pool's shape.
_CONDITION_TAINT_PREFIX = "node.kubernetes.io/"


@dataclasses.dataclass(frozen=True)
class PoolPolicy:
    """What the Kubernetes API does not say about a pool: its price and size bounds."""

    price_per_hour: float = 0.0
    min_size: int = 0
    #: None: the pool's current size.
    max_size: int | None = None


def load_pool_policies(path: Path) -> dict[str, PoolPolicy]:
    """Read `--pools` YAML; raises ValueError naming the file and the pool."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of pool name to settings")
    policies = {}
    for name, raw in data.items():
        try:
            policy = PoolPolicy(**(raw or {}))
        except TypeError as exc:
            raise ValueError(f"{path}: pool {name}: {exc}") from exc
        if policy.price_per_hour < 0 or policy.min_size < 0:
            raise ValueError(f"{path}: pool {name}: negative price or min_size")
        if policy.max_size is not None and policy.max_size < policy.min_size:
            raise ValueError(f"{path}: pool {name}: max_size < min_size")
        policies[str(name)] = policy
    return policies


class ClusterPublisher:
    """An UpdateSink: folds the watches' updates into a FleetView and publishes what changed."""

    def __init__(
        self,
        publisher: TelemetryPublisher,
        cluster: str,
        pools: Mapping[str, PoolPolicy] | None = None,
    ) -> None:
        self.publisher = publisher
        self.cluster = cluster
        self.policies = dict(pools or {})
        self.view = FleetView()
        self._published_pools: dict[str, NodePoolUpdate] = {}
        #: namespace/name -> the cluster's pending (Unschedulable) pods.
        self.pending: dict[str, PendingPod] = {}
        self.synced = asyncio.Event()
        #: The cluster name the watches report (the context); published as `cluster`.
        self._watched = ""
        self._lock = asyncio.Lock()

    async def apply(self, updates: Sequence[Update]) -> None:
        """Fold `updates` in and publish the nodes and pools they touched."""
        dirty: set[str] = set()
        removed: set[str] = set()
        pending_changed: set[str] = set()
        for u in updates:
            if isinstance(u, NodeHeartbeats):
                continue  # (the Kafka source's; the agent is fed by watches)
            self._watched = u.cluster
            if isinstance(u, NodeUpdate):
                dirty.add(u.name)
                removed.discard(u.name)
            elif isinstance(u, NodeRemoved):
                removed.add(u.name)
                dirty.discard(u.name)
            elif isinstance(u, PodObserved | PodRemoved):
                dirty.add(u.node)
            elif isinstance(u, PendingPod):
                self.pending[u.key] = dataclasses.replace(u, cluster=self.cluster, sequence=0)
                pending_changed.add(u.key)
            elif isinstance(u, PendingPodRemoved):
                key = f"{u.namespace}/{u.name}"
                self.pending.pop(key, None)
                pending_changed.add(key)
            elif isinstance(u, ClusterSynced):
                self.synced.set()
        await self.view.apply(updates)

        async def publish() -> None:
            for name in sorted(removed):
                await self.publisher.publish_node_deleted(self.cluster, name)
            for name in sorted(dirty):
                report = self.node_report(name)
                if report is not None:
                    await self.publisher.publish_node(report)
            await self._publish_pools(force=False)
            # After the pools: a consumer then knows where the pending work could go.
            for key in sorted(pending_changed):
                await self._publish_pending(key)

        await self._publish(publish)

    async def resync(self) -> None:
        """Publish every node and pool again (the heartbeat), then the node inventory."""

        async def publish() -> None:
            for _, name in sorted(self.view.nodes):
                report = self.node_report(name)
                if report is not None:
                    await self.publisher.publish_node(report)
            await self._publish_pools(force=True)
            for key in sorted(self.pending):
                await self._publish_pending(key)
            # After the reports: a consumer reading in order has every listed node by then
            # (not required for correctness: the sequences decide, see the publisher).
            await self.publisher.publish_node_inventory(
                self.cluster, self.node_names(), self.pool_names()
            )

        await self._publish(publish)

    async def publish_inventory(self) -> None:
        """Publish the node inventory alone (after the initial publication)."""

        async def publish() -> None:
            await self.publisher.publish_node_inventory(
                self.cluster, self.node_names(), self.pool_names()
            )

        await self._publish(publish)

    def node_names(self) -> list[str]:
        """Every node the agent sees now, sorted."""
        return sorted(name for _, name in self.view.nodes)

    def pool_names(self) -> list[str]:
        """Every pool the agent published and did not delete, and every pool its nodes show
        now (one whose report is still to be published), sorted. Listing a pool only keeps
        it: the union errs on that side."""
        return sorted(self._published_pools.keys() | self.pools().keys())

    async def _publish_pending(self, key: str) -> None:
        pod = self.pending.get(key)
        if pod is not None:
            await self.publisher.publish_pending_pod(pod)
        else:
            namespace, _, name = key.partition("/")
            await self.publisher.publish_pending_pod_deleted(self.cluster, namespace, name)

    async def _publish(self, publish: Callable[[], Awaitable[None]]) -> None:
        """Run `publish` and wait for the broker's acknowledgement, retrying with backoff
        while Kafka is unreachable (reports are snapshots: publishing again is harmless,
        and each attempt reads the current picture). One publication at a time, so the
        sequence order of a node's records is the order of their content."""
        backoff = Backoff(0.2, 10.0)
        async with self._lock:
            while True:
                try:
                    await publish()
                    await self.publisher.flush()
                    return
                except KafkaError as exc:
                    delay_s = backoff.next_delay_s()
                    log.warning("agent: publishing failed (%s); retry in %.1fs", exc, delay_s)
                    await asyncio.sleep(delay_s)

    def node_report(self, name: str) -> NodeUpdate | None:
        """The node as published: under the agent's cluster name, with its pods."""
        node = self.view.node(self._watched, name)
        if node is None:
            return None
        pods = tuple(
            dataclasses.replace(p, cluster=self.cluster)
            for p in self.view.pods_on(self._watched, name)
        )
        return dataclasses.replace(node, cluster=self.cluster, pods=pods)

    def pools(self) -> dict[str, NodePoolUpdate]:
        """Node pools as their nodes show them, priced and bounded by the pool policies."""
        members: dict[str, list[NodeUpdate]] = {}
        for _, node in sorted(self.view.nodes.items()):
            if node.node_pool:
                members.setdefault(node.node_pool, []).append(node)
        pools = {}
        for pool, nodes in members.items():
            first = nodes[0]
            policy = self.policies.get(pool, PoolPolicy())
            size = len(nodes)
            pools[pool] = NodePoolUpdate(
                cluster=self.cluster,
                name=pool,
                sequence=0,
                instance_type=first.instance_type,
                allocatable=first.allocatable,
                gpu_model=first.gpu_model,
                gpu_memory_bytes=first.gpu_memory_bytes,
                price_per_hour=policy.price_per_hour,
                capacity_type=first.capacity_type,
                min_size=policy.min_size,
                max_size=max(size, policy.min_size) if policy.max_size is None else policy.max_size,
                current_size=size,
                zones=tuple(sorted({n.zone for n in nodes if n.zone})),
                labels=tuple((k, v) for k, v in first.labels if k not in _NODE_SPECIFIC_LABELS),
                taints=tuple(
                    t for t in first.taints if not t.key.startswith(_CONDITION_TAINT_PREFIX)
                ),
            )
        return pools

    async def _publish_pools(self, *, force: bool) -> None:
        current = self.pools()
        for name in sorted(self._published_pools.keys() - current.keys()):
            await self.publisher.publish_pool_deleted(self.cluster, name)
        for name, pool in sorted(current.items()):
            if force or self._published_pools.get(name) != pool:
                await self.publisher.publish_pool(pool)
        self._published_pools = current


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """Everything `fleetd agent` needs."""

    context: str
    cluster: str
    bootstrap_servers: str
    kubeconfig: str = "~/.kube/config"
    topic: str = DEFAULT_TOPIC
    resync_interval_s: float = 30.0
    pools: Mapping[str, PoolPolicy] = dataclasses.field(default_factory=dict)
    client_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


async def run_agent(settings: AgentSettings, ready: asyncio.Event | None = None) -> None:
    """Watch the cluster and publish until cancelled. `ready` is set after the first full
    publication (the initial list of nodes and pods)."""
    from aiokafka import AIOKafkaProducer

    backoff = Backoff(0.2, 10.0)
    while True:
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            **settings.client_options,
        )
        try:
            await producer.start()
            break
        except KafkaError as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            cause = await security.diagnose(settings.bootstrap_servers, settings.client_options)
            delay_s = backoff.next_delay_s()
            log.warning("agent: cannot reach Kafka (%s); retry in %.1fs", cause or exc, delay_s)
            await asyncio.sleep(delay_s)
    try:
        publisher = TelemetryPublisher(producer, settings.topic)
        sink = ClusterPublisher(publisher, settings.cluster, settings.pools)
        source = KubernetesSource(
            KubernetesSourceSettings(
                kubeconfig=settings.kubeconfig,
                contexts=(settings.context,),
                node_resync_interval_s=None,  # the agent heartbeats on its own
            ),
            sink,
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(source.run(), name="agent-watch")
            tasks.create_task(_heartbeat(sink, settings.resync_interval_s, ready))
    finally:
        await producer.stop()


async def _heartbeat(
    sink: ClusterPublisher, interval_s: float, ready: asyncio.Event | None
) -> None:
    await sink.synced.wait()
    # The first inventory right away: nodes deleted while the agent was down go now, not
    # one resync interval later.
    await sink.publish_inventory()
    log.info("agent: initial publication of cluster %s done", sink.cluster)
    if ready is not None:
        ready.set()
    while True:
        await asyncio.sleep(interval_s)
        await sink.resync()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The `fleetd agent` arguments (added to `parser` when given)."""
    parser = parser or argparse.ArgumentParser(prog="fleetd agent", description=__doc__)
    parser.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG", "~/.kube/config"),
        help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)",
    )
    parser.add_argument("--context", help="kubeconfig context (default: the current context)")
    parser.add_argument("--cluster", help="cluster name in telemetry (default: the context name)")
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092", help="Kafka host:port,...")
    parser.add_argument("--topic", default=DEFAULT_TOPIC, help="telemetry topic")
    parser.add_argument(
        "--resync-interval-s",
        type=float,
        default=30.0,
        help="republish every node and pool this often (keep it below fleetd's staleness limit)",
    )
    parser.add_argument("--pools", type=Path, help="YAML: pool -> price_per_hour, min/max_size")
    security.add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the agent from parsed arguments; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        context = args.context
        if context is None:
            from kubernetes import config as k8s_config

            _, current = k8s_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                config_file=os.path.expanduser(args.kubeconfig)
            )
            context = current["name"]
        elif context not in kubeconfig_contexts(args.kubeconfig):
            raise KubeconfigError(f"kubeconfig {args.kubeconfig}: no context {context}")
        pools = load_pool_policies(args.pools) if args.pools else {}
        kafka_security = security.from_arguments(args)
        client_options = kafka_security.client_options()
    except (KubeconfigError, ValueError, OSError) as exc:
        print(f"fleetd agent: {exc}", file=sys.stderr)
        return 2
    settings = AgentSettings(
        context=context,
        cluster=args.cluster or context,
        bootstrap_servers=args.bootstrap_servers,
        kubeconfig=args.kubeconfig,
        topic=args.topic,
        resync_interval_s=args.resync_interval_s,
        pools=pools,
        client_options=client_options,
    )
    log.info("agent: publishing to %s (%s)", args.bootstrap_servers, kafka_security.describe())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_until_signalled(settings))
    return 0


async def _until_signalled(settings: AgentSettings) -> None:
    """Run the agent; SIGTERM or SIGINT stops it cleanly (exit 0)."""
    task = asyncio.ensure_future(run_agent(settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def retire_cluster(
    bootstrap_servers: str,
    cluster: str,
    topic: str = DEFAULT_TOPIC,
    client_options: Mapping[str, Any] | None = None,
) -> None:
    """Publish that `cluster` has no node and no pool any more: an empty node inventory
    that lists its pools (none). fleetd removes every node and pool of the cluster reported
    before it, as it removes those a relist no longer shows (their reservations end).

    For a cluster taken out of the fleet for good: its agent is gone, so nothing would
    ever delete its nodes, which stay in fleet state, stale, forever. A running agent of
    the cluster simply publishes them again (its reports are newer)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        **(client_options or {}),
    )
    await producer.start()
    try:
        publisher = TelemetryPublisher(producer, topic)
        await publisher.publish_node_inventory(cluster, [], pools=[])
        await publisher.flush()
    finally:
        await producer.stop()


def build_retire_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `fleetd retire-cluster` arguments."""
    parser.add_argument("--cluster", required=True, help="cluster name in telemetry")
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092", help="Kafka host:port,...")
    parser.add_argument("--topic", default=DEFAULT_TOPIC, help="telemetry topic")
    security.add_arguments(parser)
    return parser


def retire_main(args: argparse.Namespace) -> int:
    """`fleetd retire-cluster` from parsed arguments; returns the exit code."""
    if not NAME_RE.match(args.cluster):
        # (fleetd would dead-letter the inventory: say so here instead.)
        print(
            f"fleetd retire-cluster: --cluster {args.cluster!r} is not a cluster name",
            file=sys.stderr,
        )
        return 2
    try:
        client_options = security.from_arguments(args).client_options()
    except (ValueError, OSError) as exc:
        print(f"fleetd retire-cluster: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(
            retire_cluster(args.bootstrap_servers, args.cluster, args.topic, client_options)
        )
    except KafkaError as exc:
        print(f"fleetd retire-cluster: {args.bootstrap_servers}: {exc}", file=sys.stderr)
        return 1
    print(f"published: cluster {args.cluster} has no nodes and no pools (topic {args.topic})")
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
