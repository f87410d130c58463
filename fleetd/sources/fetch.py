"""A consumer poll without a Python object per record: aiokafka's fetched batches handed over
as the record objects its C batch reader makes.

aiokafka's `getmany` passes every record through a generator (`PartitionRecords.
_unpack_records`) that builds a `ConsumerRecord` dataclass of eleven fields. Measured on the
ingest benchmark, that is about half of the ~2.6 µs of CPU the consumer spends a record: as
much as fleetd's whole check of whether a report repeats its node. `poll` returns the
batches' own records instead (`DefaultRecord`: offset, timestamp, key, value and headers,
made in C as the batch is iterated; no topic or partition, which the poll's keys carry) and
does everything else `getmany` does: the same waiting, the same buffered fetches drained in
the same order, a fetch whose partition was revoked, paused or sought elsewhere dropped,
batch CRCs checked, control batches skipped, a fetch that starts inside a batch cut at the
fetch offset, the consumed position moved past what was returned, the fetcher woken for the
next fetch of each drained partition.

It reads aiokafka's internals (the fetcher's buffered `FetchResult`s), so it is used only with
the aiokafka release it was written for (`SUPPORTED_AIOKAFKA`; `supports`): with any other,
the source polls with `getmany` as before, slower but the same. A fetch it does not take
apart itself (read committed isolation, with its aborted transactions; deserializers; one
aiokafka already began) goes through aiokafka's own path (`getall`, up to `max_records`).

A poll drains whole partitions until it holds `max_records` records or more: a fetch is at
most `max_partition_fetch_bytes` per partition, so a poll is at most that much beyond it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

import aiokafka
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.consumer.fetcher import READ_COMMITTED, FetchResult
from aiokafka.errors import ConsumerStoppedError, CorruptRecordException
from aiokafka.record.default_records import DefaultRecordBatch  # (C, or its pure-Python twin)

#: The aiokafka releases whose fetcher internals `poll` was written against and tested with
#: (also how many turns of the event loop its fetcher takes to send a request,
#: `kafka.FETCH_REQUEST_TURNS`). Bumping aiokafka means reading its fetcher again.
SUPPORTED_AIOKAFKA = frozenset({"0.14.0"})


def supports(consumer: AIOKafkaConsumer) -> bool:
    """Whether `poll` may read this consumer's fetched batches (else use `getmany`)."""
    fetcher = getattr(consumer, "_fetcher", None)
    return aiokafka.__version__ in SUPPORTED_AIOKAFKA and all(
        hasattr(fetcher, name)
        for name in ("_records", "_subscriptions", "_notify", "_create_fetch_waiter")
    )


async def poll(
    consumer: AIOKafkaConsumer, timeout_ms: int, max_records: int
) -> dict[TopicPartition, list[Any]]:
    """`consumer.getmany(timeout_ms=..., max_records=...)` (whole partitions, see the module
    docstring), with each partition's records as aiokafka's record objects. Call only when
    `supports(consumer)`."""
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        drained = take(consumer, max_records)
        remaining_ms = (deadline - time.monotonic()) * 1000
        if drained or remaining_ms <= 0 or not await wait(consumer, remaining_ms):
            return drained


async def wait(consumer: AIOKafkaConsumer, timeout_ms: float) -> bool:
    """Until the consumer holds fetched records (or a fetch error) for `take`, or
    `timeout_ms` passed; whether it does. Fetching goes on in aiokafka's own task."""
    if consumer._closed:
        raise ConsumerStoppedError()
    fetcher = consumer._fetcher
    with consumer._subscription.fetch_context():
        # (Records fetched before a rebalance ends may belong to another member after it.)
        if fetcher._subscriptions.reassignment_in_progress:
            await fetcher._subscriptions.wait_for_assignment()
        if fetcher._records:
            return True
        waiter = fetcher._create_fetch_waiter()
        done, pending = await asyncio.wait([waiter], timeout=max(0.0, timeout_ms) / 1000)
        for fut in pending:
            fut.cancel()
        if not done or fetcher._closed:
            return False
        waiter.result()  # (raises what the fetcher failed with, e.g. authorization)
        return bool(fetcher._records)


def take(consumer: AIOKafkaConsumer, max_records: int) -> dict[TopicPartition, list[Any]]:
    """The records the consumer holds now, by partition: aiokafka's `Fetcher.
    fetched_records` without its wait, draining each buffered fetch with `_drain`. Raises a
    fetch's error (once, as `getmany` does) when it is the first thing buffered."""
    if consumer._closed:
        raise ConsumerStoppedError()
    consumer._coordinator.check_errors()  # (the group's errors, as getmany raises them)
    fetcher = consumer._fetcher
    if fetcher._subscriptions.reassignment_in_progress:
        return {}  # (`wait` waits for the assignment)
    drained: dict[TopicPartition, list[Any]] = {}
    taken = 0
    with consumer._subscription.fetch_context():
        for tp in list(fetcher._records):
            result = fetcher._records[tp]
            if type(result) is FetchResult:
                try:
                    records = _drain(tp, result, max_records - taken)
                finally:
                    if not result.has_more():
                        # Drained (or failed): the fetcher may fetch this partition again.
                        del fetcher._records[tp]
                        fetcher._notify(fetcher._wait_consume_future)
                if records:
                    drained[tp] = records
                    taken += len(records)
                    if taken >= max_records:
                        break
            elif drained:
                break  # (the error is raised by the next take)
            else:
                del fetcher._records[tp]
                fetcher._notify(fetcher._wait_consume_future)
                result.check_raise()
    return drained


def _drain(tp: TopicPartition, result: Any, room: int) -> list[Any]:
    """Every record of one buffered fetch, as its batches' record objects; the consumer's
    position moves past them."""
    if not result.check_assignment(tp) or not result.has_more():
        return []  # (revoked, paused or sought elsewhere since the fetch: dropped)
    part = result._partition_records
    if (
        part._isolation_level == READ_COMMITTED
        or part._key_deserializer is not None
        or part._value_deserializer is not None
        or inspect.getgeneratorstate(part._records_iterator) != inspect.GEN_CREATED
    ):
        records: list[Any] = result.getall(room)  # (aiokafka's own path)
        return records
    batches = part._records
    next_offset = part.next_fetch_offset
    out: list[Any] = []
    while batches.has_next():
        batch = batches.next_batch()
        if part._check_crcs and not batch.validate_crc():
            # As aiokafka does: raised, and the fetch dropped with the position where it was
            # (nothing of this fetch was returned), so it is fetched again from there.
            result._partition_records = None
            raise CorruptRecordException(f"Invalid CRC - {tp}")
        if getattr(batch, "is_control_batch", False):  # (a transaction's marker)
            next_offset = batch.next_offset
            continue
        if type(batch) is DefaultRecordBatch and batch.base_offset >= next_offset:
            out.extend(batch)  # (the whole batch, iterated in C)
        else:
            # A fetch starts at the batch that holds the fetch offset: skip the records
            # before it (and legacy message sets' inner offsets).
            out.extend(record for record in batch if record.offset >= next_offset)
        next_offset = batch.next_offset
    part.next_fetch_offset = next_offset
    result._update_position()
    result._partition_records = None
    return out
