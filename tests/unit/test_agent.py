"""The agent's side without servers: pool policies, and what ClusterPublisher publishes for
the updates the watches deliver (decoded back with the consumer's codec)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fleetd.agent import ClusterPublisher, PoolPolicy, load_pool_policies
from fleetd.sources.codec import decode
from fleetd.sources.publisher import TelemetryPublisher
from fleetd.sources.translate import node_update, pod_update
from fleetd.sources.updates import (
    ClusterSynced,
    NodeInventoryChunk,
    NodePoolRemoved,
    NodePoolUpdate,
    NodeRemoved,
    NodeUpdate,
    PendingPod,
    PendingPodRemoved,
    Resources,
    Update,
)
from tests.unit.test_sources_translate import kube_node, kube_pod


def test_pool_policies(tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text("a3: {price_per_hour: 98.3, min_size: 1, max_size: 8}\nspot: {}\n")
    assert load_pool_policies(path) == {
        "a3": PoolPolicy(price_per_hour=98.3, min_size=1, max_size=8),
        "spot": PoolPolicy(),
    }


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        "a3: {price: 1}",
        "a3: {price_per_hour: -1}",
        "a3: {min_size: 5, max_size: 2}",
        "a3: {",
    ],
    ids=["not-a-mapping", "unknown-key", "negative-price", "max-below-min", "bad-yaml"],
)
def test_bad_pool_policies_name_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"pools\.yaml"):
        load_pool_policies(path)


class _Producer:
    def __init__(self) -> None:
        self.sent: list[Update] = []

    async def send(self, topic: str, *, value: bytes, key: bytes) -> Any:
        self.sent.append(decode(key, value))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


async def test_cluster_publisher_reports_nodes_with_pods_and_pools() -> None:
    producer = _Producer()
    sink = ClusterPublisher(
        TelemetryPublisher(producer), "edge", {"a3": PoolPolicy(price_per_hour=9.5, max_size=4)}
    )
    labels = {"cloud.google.com/gke-nodepool": "a3", "topology.kubernetes.io/zone": "z1"}
    n1 = node_update("ctx", kube_node("n1", labels=labels, rv="5"))
    n2 = node_update("ctx", kube_node("n2", labels=labels, rv="6"))
    pod = pod_update("ctx", kube_pod("p", node="n1"))
    assert pod is not None
    await sink.apply([n1, n2, pod, ClusterSynced("ctx", "kubernetes")])
    nodes = {u.name: u for u in producer.sent if isinstance(u, NodeUpdate)}
    assert set(nodes) == {"n1", "n2"}
    assert nodes["n1"].cluster == "edge"  # published under the agent's cluster name
    assert [(p.name, p.cluster, p.node) for p in nodes["n1"].pods or ()] == [("p", "edge", "n1")]
    assert nodes["n2"].pods == ()
    (pool,) = [u for u in producer.sent if isinstance(u, NodePoolUpdate)]
    assert (pool.name, pool.current_size, pool.max_size, pool.price_per_hour) == ("a3", 2, 4, 9.5)
    assert pool.zones == ("z1",)
    assert sink.synced.is_set()

    producer.sent.clear()
    await sink.apply([NodeRemoved("ctx", "n1"), NodeRemoved("ctx", "n2")])
    kinds = [type(u).__name__ for u in producer.sent]
    assert kinds == ["NodeRemoved", "NodeRemoved", "NodePoolRemoved"]
    assert isinstance(producer.sent[-1], NodePoolRemoved)

    # The heartbeat publishes everything again, with growing sequences.
    await sink.apply([n1])
    before = [u.sequence for u in producer.sent if isinstance(u, NodeUpdate)][-1]
    await sink.resync()
    after = [u.sequence for u in producer.sent if isinstance(u, NodeUpdate)][-1]
    assert after > before


async def test_cluster_publisher_reports_pending_pods_and_their_end() -> None:
    producer = _Producer()
    sink = ClusterPublisher(TelemetryPublisher(producer), "edge")
    pending = PendingPod("ctx", "ml", "train", "u1", Resources(gpus=8), priority=3, sequence=9)
    await sink.apply([pending])
    [sent] = producer.sent
    assert isinstance(sent, PendingPod)
    assert (sent.cluster, sent.key, sent.requests.gpus, sent.priority) == ("edge", "ml/train", 8, 3)
    await sink.resync()  # the heartbeat repeats it (and lists the cluster's nodes: none)
    assert [type(u) for u in producer.sent] == [PendingPod, PendingPod, NodeInventoryChunk]
    producer.sent.clear()
    await sink.apply([PendingPodRemoved("ctx", "ml", "train")])
    [gone] = producer.sent
    assert isinstance(gone, PendingPodRemoved)
    assert (gone.cluster, gone.namespace, gone.name) == ("edge", "ml", "train")


async def test_every_resync_ends_with_the_node_inventory_above_its_reports() -> None:
    """The inventory lists every node the agent sees, with a sequence above every report
    published before it and below every report of a node added after it."""
    producer = _Producer()
    sink = ClusterPublisher(TelemetryPublisher(producer), "edge")
    n1 = node_update("ctx", kube_node("n1", rv="5"))
    n2 = node_update("ctx", kube_node("n2", labels={"karpenter.sh/nodepool": "a3"}, rv="6"))
    await sink.apply([n1, n2, ClusterSynced("ctx", "kubernetes")])
    await sink.publish_inventory()  # what the agent does after the initial publication
    [first] = [u for u in producer.sent if isinstance(u, NodeInventoryChunk)]
    assert (first.cluster, first.names, first.chunk_index, first.chunk_count, first.pools) == (
        "edge",
        ("n1", "n2"),
        0,
        1,
        ("a3",),
    )
    producer.sent.clear()
    await sink.apply([NodeRemoved("ctx", "n2")])  # the pool's last node: the pool goes too
    await sink.resync()
    *reports, inventory = producer.sent
    assert isinstance(inventory, NodeInventoryChunk)
    assert (inventory.names, inventory.pools) == (("n1",), ())
    assert inventory.sequence > max(u.sequence for u in reports if isinstance(u, NodeUpdate))
    assert inventory.sequence > first.sequence
    await sink.apply([node_update("ctx", kube_node("n3", rv="7"))])
    [added] = [u for u in producer.sent if isinstance(u, NodeUpdate) and u.name == "n3"]
    assert added.sequence > inventory.sequence
