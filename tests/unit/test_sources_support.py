"""Publisher sequences, backoff, the in-memory view, the state adapter, the load generator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fleetd.loadgen import malformed_records, node_records, synthetic_fleet
from fleetd.sources.base import Backoff
from fleetd.sources.codec import InvalidTelemetry, decode
from fleetd.sources.memory import FleetView, StateSink
from fleetd.sources.publisher import SequenceClock, TelemetryPublisher
from fleetd.sources.updates import (
    ClusterSynced,
    NodeRemoved,
    NodeStale,
    NodeUpdate,
    PodObserved,
    PodRemoved,
    Resources,
)


def test_sequences_grow_even_when_the_clock_goes_back() -> None:
    times = iter([100.0, 100.0, 99.0, 200.0])
    clock = SequenceClock(lambda: next(times))
    seqs = [clock.next() for _ in range(4)]
    # 100 s = 100_000_000 µs; equal or earlier clock readings still give last + 1.
    assert seqs == [100_000_000, 100_000_001, 100_000_002, 200_000_000]


def test_a_restarted_publisher_continues_above_the_old_one() -> None:
    before = SequenceClock(lambda: 50.0)
    last = [before.next() for _ in range(1000)][-1]
    after = SequenceClock(lambda: 51.0)  # restarted one second later
    assert after.next() > last


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    async def send(self, topic: str, *, value: bytes, key: bytes) -> Any:
        import asyncio

        self.sent.append((topic, key, value))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


async def test_publisher_keys_and_sequences() -> None:
    producer = _Producer()
    publisher = TelemetryPublisher(producer, "t", wall_clock=lambda: 10.0)
    node = NodeUpdate(
        cluster="c", name="n", sequence=0, capacity=Resources(), allocatable=Resources()
    )
    await publisher.publish_node(node)
    await publisher.publish_node_deleted("c", "n")
    await publisher.flush()
    (t1, k1, v1), (_t2, k2, v2) = producer.sent
    assert (t1, k1, k2) == ("t", b"c/n", b"c/n")
    first, second = decode(k1, v1), decode(k2, v2)
    assert isinstance(first, NodeUpdate)
    assert isinstance(second, NodeRemoved)
    assert second.sequence == first.sequence + 1
    assert first.observed_at_s == 10.0


@pytest.mark.parametrize("seed", [0, 1])
def test_backoff_grows_with_jitter_and_resets(seed: int) -> None:
    backoff = Backoff(initial_s=1.0, max_s=8.0, seed=seed)
    delays = [backoff.next_delay_s() for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    backoff.reset()
    assert backoff.next_delay_s() <= 1.0


def _node(name: str, pods: tuple[PodObserved, ...] | None = None) -> NodeUpdate:
    return NodeUpdate(
        cluster="c", name=name, sequence=1, capacity=Resources(), allocatable=Resources(), pods=pods
    )


def _pod(name: str, node: str = "n1") -> PodObserved:
    return PodObserved(
        cluster="c", namespace="ml", name=name, uid=f"u-{name}", node=node, requests=Resources()
    )


async def test_fleet_view_folds_updates() -> None:
    view = FleetView()
    await view.apply([_node("n1"), _pod("a"), _pod("b"), NodeStale("c", "n1", True)])
    assert [p.name for p in view.pods_on("c", "n1")] == ["a", "b"]
    assert ("c", "n1") in view.stale
    await view.apply([PodRemoved("c", "ml", "a", "u-a", "n1"), NodeStale("c", "n1", False)])
    assert [p.name for p in view.pods_on("c", "n1")] == ["b"]
    assert not view.stale
    # A node report with pods replaces the node's pod set (Kafka reports carry all of them).
    await view.apply([_node("n1", pods=(_pod("z"),)), ClusterSynced("c", "kafka")])
    assert [p.name for p in view.pods_on("c", "n1")] == ["z"]
    assert view.synced == {("kafka", "c")}
    await view.apply([NodeRemoved("c", "n1")])
    assert view.nodes == {}
    assert view.pods_on("c", "n1") == ()


class _State:
    def __init__(self) -> None:
        self.applied: list[Any] = []

    def apply_now(self, update: Any) -> bool:
        if isinstance(update, NodeUpdate) and update.name == "refused":
            raise ValueError("negative allocatable resources")
        self.applied.append(update)
        return True


async def test_state_sink_skips_what_the_state_refuses() -> None:
    state = _State()
    rejected: list[str] = []
    sink = StateSink(state, rejected.append)
    await sink.apply([_node("n1"), _node("refused"), _node("n2")])
    assert [u.name for u in state.applied] == ["n1", "n2"]
    assert rejected == ["NodeUpdate"]


def test_malformed_records_fail_for_the_stated_reason() -> None:
    for key, value, reason in malformed_records():
        with pytest.raises(InvalidTelemetry) as err:
            decode(key, value)
        assert err.value.reason == reason


def test_load_generator_is_deterministic_and_valid() -> None:
    def run() -> list[tuple[bytes, bytes]]:
        rng = np.random.default_rng(7)
        fleet = synthetic_fleet(rng, clusters=2, nodes_per_cluster=10)
        return list(node_records(fleet, 50, rng, observed_unix_ms=1))

    records = run()
    assert records == run()
    decoded = [decode(k, v) for k, v in records]
    assert [u.sequence for u in decoded] == list(range(1, 51))
    assert {u.cluster for u in decoded} == {"cluster-0", "cluster-1"}
