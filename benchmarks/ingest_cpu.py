"""CPU time of fleetd's ingest work alone: `KafkaSource` polls into `FleetState` with
in-process stand-ins for the two aiokafka clients (no broker, no network, no aiokafka).

    python -m benchmarks ingest_cpu [--json] [--nodes 10000] [--rounds 10]
                                    [--changed-fraction 0.05] [--repeats 3] [--profile N]
                                    [--source-only]

The same message mix as `python -m benchmarks ingest` (`fleetd.loadgen.periodic_reports`,
seed 1): an initial sync (every node in full), then `--rounds` rounds of reports, cut into
polls the way the real consumer gets them (3 partitions by key, ~2,000 records per
partition and fetch; each poll's record objects made fresh before it, as aiokafka does, so
the caches hold what they would). It measures what `ingest` cannot separate from aiokafka's own
polling: the process CPU time of `KafkaSource._apply_poll` (decode, gate, apply into the
state) over the steady rounds, after the heap freeze the daemon does once ready. With
`--profile N` it prints cProfile's top N functions of one extra run; with `--source-only`
the source's updates go to a sink that only keeps them (the source's share alone). No
target: this is the tool to see where fleetd's share of `ingest` goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import json
import pstats
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import TopicPartition

from benchmarks.ingest import fleet_state
from fleetd.daemon import freeze_startup_heap
from fleetd.loadgen import periodic_reports, synthetic_fleet
from fleetd.sources.kafka import KafkaSource, KafkaSourceSettings
from fleetd.sources.memory import StateSink
from fleetd.sources.metrics import SourceMetrics

PARTITIONS = 3
#: Records per partition and fetch: aiokafka's 1 MiB fetches of ~500-byte reports.
FETCH_RECORDS = 2000


@dataclasses.dataclass(slots=True)
class _Record:
    """What the source reads of an aiokafka ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


class _Consumer:
    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        pass

    def highwater(self, tp: TopicPartition) -> int:
        return 0

    def assignment(self) -> set[TopicPartition]:
        return set()


class _Producer:
    async def send(self, topic: str, *, value: bytes, key: bytes | None, headers: Any) -> Any:
        raise AssertionError("the benchmark's records are all valid")


def polls(
    records: Sequence[tuple[bytes, bytes]], fetch_records: int = FETCH_RECORDS
) -> list[dict[TopicPartition, list[Any]]]:
    """The records as consumer polls: partitioned by key, each poll one fetch per partition
    (`fetch_records` each)."""
    by_partition: list[list[_Record]] = [[] for _ in range(PARTITIONS)]
    for key, value in records:
        p = zlib.crc32(key) % PARTITIONS
        by_partition[p].append(_Record("t", p, len(by_partition[p]), key, value))
    out = []
    for start in range(0, max(len(r) for r in by_partition), fetch_records):
        poll = {
            TopicPartition("t", p): recs[start : start + fetch_records]
            for p, recs in enumerate(by_partition)
            if recs[start : start + fetch_records]
        }
        out.append(poll)
    return out


class _KeepingSink:
    """`--source-only`: holds every batch it is given until the run ends, so that neither
    applying nor freeing the updates (the state's part, when it replaces them) is timed."""

    def __init__(self) -> None:
        self.batches: list[Sequence[Any]] = []

    async def apply(self, updates: Sequence[Any]) -> None:
        self.batches.append(updates)


def _fresh(poll: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[Any]]:
    """Copies of a poll's records with new key and value objects."""
    return {
        tp: [
            _Record(
                r.topic, r.partition, r.offset, bytes(bytearray(r.key)), bytes(bytearray(r.value))
            )
            for r in records
        ]
        for tp, records in poll.items()
    }


async def _one_run(
    warm: list[dict[TopicPartition, list[Any]]],
    steady: list[dict[TopicPartition, list[Any]]],
    profiler: cProfile.Profile | None,
    source_only: bool = False,
) -> tuple[float, float]:
    """(CPU seconds of the steady polls, wall seconds of them)."""
    with tempfile.TemporaryDirectory() as tmp:
        state = fleet_state(Path(tmp))
        sink: Any = _KeepingSink() if source_only else StateSink(state)
        source = KafkaSource(KafkaSourceSettings(), sink, metrics=SourceMetrics())
        consumer, producer = _Consumer(), _Producer()
        for poll in warm:
            await source._apply_poll(poll, consumer, producer)
        freeze_startup_heap()
        cpu = wall = 0.0
        try:
            for poll in steady:
                # Fresh record objects, as aiokafka makes them for each poll (in the cache,
                # keys not hashed yet): only fleetd's work is timed.
                fresh = _fresh(poll)
                if profiler is not None:
                    profiler.enable()
                cpu0, wall0 = time.process_time(), time.perf_counter()
                await source._apply_poll(fresh, consumer, producer)
                cpu += time.process_time() - cpu0
                wall += time.perf_counter() - wall0
                if profiler is not None:
                    profiler.disable()
                del fresh
        finally:
            gc.unfreeze()
        state.journal.close()
    return cpu, wall


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks ingest_cpu [--json] ...`"""
    parser = argparse.ArgumentParser(prog="python -m benchmarks ingest_cpu", description=__doc__)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--changed-fraction", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N")
    parser.add_argument(
        "--source-only",
        action="store_true",
        help="the source's work alone: its updates go to a sink that keeps them, not the state",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--fetch-records", type=int, default=FETCH_RECORDS, help="records per partition and poll"
    )
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.rounds < 1 or args.repeats < 1:
        parser.error("--nodes >= 2, --rounds >= 1 and --repeats >= 1")
    rng = np.random.default_rng(args.seed)
    fleet = synthetic_fleet(rng, clusters=2, nodes_per_cluster=args.nodes // 2)
    records = list(
        periodic_reports(fleet, args.rounds + 1, rng, changed_fraction=args.changed_fraction)
    )
    warm = polls(records[: len(fleet)])
    steady = polls(records[len(fleet) :], args.fetch_records)
    n_steady = len(records) - len(fleet)
    del records
    runs = [
        asyncio.run(_one_run(warm, steady, None, args.source_only)) for _ in range(args.repeats)
    ]
    if args.profile:
        profiler = cProfile.Profile()
        asyncio.run(_one_run(warm, steady, profiler, args.source_only))
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    cpu_s = statistics.median(c for c, _ in runs)
    result = {
        "benchmark": "ingest_cpu",
        "nodes": args.nodes,
        "records": n_steady,
        "polls": len(steady),
        "changed_fraction": args.changed_fraction,
        "source_only": args.source_only,
        "process_cpu_s": round(cpu_s, 3),
        "process_cpu_s_runs": [round(c, 3) for c, _ in runs],
        "cpu_us_per_record": round(cpu_s / n_steady * 1e6, 2),
    }
    print(
        f"ingest CPU of {n_steady:,} steady records ({args.nodes:,} nodes, {len(steady)} polls): "
        f"{cpu_s:.3f} s (runs {result['process_cpu_s_runs']}), "
        f"{result['cpu_us_per_record']} us a record"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
