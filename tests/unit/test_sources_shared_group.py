"""Several Kafka sources feeding one state, each holding a share of the partitions (the
worker processes of `sources.kafka.workers`): what one remembers of a partition that went to
another must not be taken for what the state has when the partition comes back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from aiokafka import TopicPartition

from fleetd.config import Config
from fleetd.journal import Journal
from fleetd.sources.kafka import KafkaSource, KafkaSourceSettings
from fleetd.sources.memory import StateSink
from fleetd.state import FleetState
from tests.unit.test_sources_codec import gpu_node
from tests.unit.test_sources_kafka import Consumer, Producer, Rec
from tests.unit.test_sources_unchanged import _rec, _value

TP = TopicPartition("t", 0)


class _GroupConsumer(Consumer):
    """What `KafkaSource._assigned` asks of the consumer: the topic's partitions, seeks."""

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        pass


def _assign(source: KafkaSource, *partitions: int) -> None:
    source._assigned(_GroupConsumer(), {TopicPartition("t", p) for p in partitions})


async def _poll(source: KafkaSource, rec: Rec) -> None:
    await source.process({TP: [rec]}, Consumer(), Producer())


async def _partition_moves_and_returns(tmp_path: Path, shared_group: bool) -> int:
    """Node a's records on partition 0: read by A (content X), then by B (X changes to Y, a
    cordon, and back to X), then by A again (X repeated). The state's last sequence of a."""
    cfg = Config(**{"sources": {"simulated": {"enabled": False}}})  # type: ignore[arg-type]
    state = FleetState(cfg, Journal(tmp_path / "j.sqlite3"), clock=lambda: 1_000_000.0)
    settings = KafkaSourceSettings(topic="t", shared_group=shared_group)
    a = KafkaSource(settings, StateSink(state), slot_space="kafka/w0")
    b = KafkaSource(settings, StateSink(state), slot_space="kafka/w1")
    x = gpu_node("a")
    y = dataclasses.replace(x, unschedulable=True)  # (cordoned)
    _assign(a, 0, 1)
    _assign(b)
    await _poll(a, _rec("a", _value(x, 1), 0))
    _assign(a, 1)  # partition 0 to B
    _assign(b, 0)
    await _poll(b, _rec("a", _value(y, 2), 1))
    await _poll(b, _rec("a", _value(x, 3), 2))
    _assign(b)  # and back to A
    _assign(a, 0, 1)
    await _poll(a, _rec("a", _value(x, 4), 3))
    last = state.gate.last("c1", "node", "a")
    assert last is not None
    return last


async def test_a_partition_that_comes_back_is_read_afresh(tmp_path: Path) -> None:
    assert await _partition_moves_and_returns(tmp_path, shared_group=True) == 4


async def test_what_one_consumer_alone_may_keep_would_go_stale_in_a_shared_group(
    tmp_path: Path,
) -> None:
    # (Why the above forgets: kept, A's memory of X takes the record for a repeat of the
    # content A once sent; the state holds B's binding of that content and refuses A's
    # heartbeat, so the node is not refreshed and would turn stale.)
    assert await _partition_moves_and_returns(tmp_path, shared_group=False) == 3
