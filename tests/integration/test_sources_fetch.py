"""`fleetd.sources.fetch` against the real broker: its polls hand over what aiokafka's
`getmany` does, record for record, and leave the consumer where `getmany` leaves it."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from fleetd.sources import fetch
from tests.integration.sources_support import create_topic, unique

pytestmark = pytest.mark.testbed


def _consumer(bootstrap: str, topic: str | None = None, **options: Any) -> AIOKafkaConsumer:
    topics = (topic,) if topic else ()
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=f"fetch-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # Small fetches: many polls, most of them not starting at a batch boundary.
        max_partition_fetch_bytes=4096,
        **options,
    )


def _seen(tp: TopicPartition, rec: Any) -> tuple[Any, ...]:
    return (tp.partition, rec.offset, rec.key, rec.value, rec.timestamp, tuple(rec.headers))


async def _read_all(consumer: AIOKafkaConsumer, use_fetch: bool, count: int) -> list[Any]:
    seen: list[Any] = []
    for _ in range(1000):
        if use_fetch:
            polled = await fetch.poll(consumer, 1000, 50)
        else:
            polled = await consumer.getmany(timeout_ms=1000, max_records=50)
        seen += [_seen(tp, rec) for tp, records in polled.items() for rec in records]
        if len(seen) >= count:
            break
    return seen


async def _produce_mixed(bootstrap: str, topic: str) -> int:
    """Records of every kind the topic can hold; returns how many a read-uncommitted
    consumer sees (the control records of transactions are not records to it)."""
    plain = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    await plain.start()
    try:
        futures = []
        for i in range(300):  # (batched by the linger: fetches start inside batches)
            key = None if i % 50 == 7 else f"node-{i % 40}".encode()
            value = None if i % 50 == 11 else f"report {i}".encode() * (1 + i % 5)
            headers = [("h", f"{i}".encode())] if i % 3 == 0 else []
            futures.append(await plain.send(topic, value=value, key=key, headers=headers))
        for f in futures:
            await f
    finally:
        await plain.stop()
    count = 300
    for n, commit in enumerate((True, False, True)):  # (transaction 1 is aborted)
        tx = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=unique("tx"))
        await tx.start()
        try:
            await tx.begin_transaction()
            for i in range(20):
                await tx.send_and_wait(topic, value=b"tx%d-%d" % (n, i), key=b"tx-%d" % (i % 3))
            if commit:
                await tx.commit_transaction()
            else:
                await tx.abort_transaction()
            count += 20
        finally:
            await tx.stop()
    return count


async def test_fetch_poll_hands_over_what_getmany_does(kafka_bootstrap: str) -> None:
    topic = unique("fetch")
    await create_topic(kafka_bootstrap, topic)
    count = await _produce_mixed(kafka_bootstrap, topic)
    results = {}
    for use_fetch in (False, True):
        consumer = _consumer(kafka_bootstrap, topic)
        await consumer.start()
        try:
            # The path the source takes with the pinned release (requirements.lock).
            assert fetch.supports(consumer)
            seen = await _read_all(consumer, use_fetch, count)
            positions = {tp.partition: await consumer.position(tp) for tp in consumer.assignment()}
        finally:
            await consumer.stop()
        results[use_fetch] = (seen, positions)
    (expected, expected_positions), (got, got_positions) = results[False], results[True]
    assert len(expected) == count
    # (The aborted transaction's records too: read uncommitted.)
    assert len([seen for seen in got if (seen[3] or b"").startswith(b"tx1-")]) == 20
    # The same records (keys, values, timestamps, headers), each partition's in offset order
    # (which partition a poll gives first depends on when each fetch arrived).
    assert sorted(got) == sorted(expected)
    for partition in range(3):
        offsets = [seen[1] for seen in got if seen[0] == partition]
        assert offsets == sorted(offsets)
    # Past the transactions' last control records, as aiokafka leaves it.
    assert got_positions == expected_positions


async def test_fetch_poll_from_inside_a_batch(kafka_bootstrap: str) -> None:
    """A consumer sought to the middle of a producer batch gets the records from there."""
    topic = unique("fetch-seek")
    await create_topic(kafka_bootstrap, topic, partitions=1)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=100)
    await producer.start()
    try:
        batch = producer.create_batch()
        for i in range(50):
            assert batch.append(key=b"k", value=b"v%d" % i, timestamp=None) is not None
        batch.close()
        await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()
    tp = TopicPartition(topic, 0)
    for use_fetch in (False, True):
        consumer = _consumer(kafka_bootstrap)
        await consumer.start()
        try:
            consumer.assign([tp])
            consumer.seek(tp, 23)
            seen = await _read_all(consumer, use_fetch, 27)
            assert [offset for _, offset, *_ in seen] == list(range(23, 50))
            assert [value for _, _, _, value, *_ in seen] == [b"v%d" % i for i in range(23, 50)]
            assert await consumer.position(tp) == 50
        finally:
            await consumer.stop()


async def test_fetch_poll_read_committed_goes_through_aiokafka(kafka_bootstrap: str) -> None:
    """Read-committed isolation (aborted transactions to leave out) is aiokafka's own path:
    the same records as `getmany`, none of an aborted transaction."""
    topic = unique("fetch-rc")
    await create_topic(kafka_bootstrap, topic)
    count = await _produce_mixed(kafka_bootstrap, topic) - 20  # (one aborted transaction)
    results = {}
    for use_fetch in (False, True):
        consumer = _consumer(kafka_bootstrap, topic, isolation_level="read_committed")
        await consumer.start()
        try:
            results[use_fetch] = await _read_all(consumer, use_fetch, count)
        finally:
            await consumer.stop()
    assert len(results[False]) == count
    assert sorted(results[True]) == sorted(results[False])
    assert not [seen for seen in results[True] if (seen[3] or b"").startswith(b"tx1-")]
