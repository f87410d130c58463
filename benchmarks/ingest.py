"""Telemetry ingest: node reports per second from Kafka into fleet state, next to the raw
aiokafka consume rate of the same records.

    python -m benchmarks ingest [--json] [--nodes 10000] [--rounds 20] [--changed-fraction 0.05]
                                [--repeats 3] [--ladder 2000,10000,40000] [--seed 1]
                                [--workers N] [--bootstrap-servers HOST:PORT]

The message mix (`fleetd.loadgen.periodic_reports`) is what agents send: a synthetic GPU
fleet (2 clusters, H100/A100/L4/T4/CPU shapes, 0-3 pods per node) reports every node once per
round (a 30 s resync). Round 0 is every node in full; in each later round a report repeats
its node's last content (a heartbeat) except with probability `--changed-fraction`, when
pods came or went, a GPU's health flipped or the node was (un)cordoned. The records are
produced once to a fresh 3-partition topic. Then, per repeat and side by side, each with its
own consumer group and the same fetch sizes:
- raw: an AIOKafkaConsumer polls every record (getmany) and does nothing with it (and,
  for comparison only, `raw_batches_per_s`: the same consumer polling as fleetd's source
  does, taking aiokafka's fetched batches without a ConsumerRecord a record,
  `fleetd.sources.fetch`);
- view: fleetd's KafkaSource validates, gates, applies into an in-memory view and commits;
- state: the same into the daemon's FleetState (the single writer in front of the node
  table), which is checked afterwards to hold every node at its last produced sequence.
The fleetd consumers first read an initial sync (every node in full, timed apart); then the
heap is frozen as the daemon does when it first turns ready (`freeze_startup_heap`). Every
run starts from the same heap: collected, nothing of earlier runs alive, what was there
before frozen (the raw consumer's too), so no run's collections walk another's objects.
A rate is records / (time of the last record - time the first poll returned), so consumer
group joins are not counted; `updates_per_s` counts the records that were validated and
are reflected in state (new content applied, or a heartbeat's sequence and freshness; not
the few superseded within a poll or dropped as duplicates). Target: `ratio` (the median of
the per-repeat state/raw ratios) >= 0.5. `daemon_cpu_us_per_record` is the CPU the
daemon's process spends a steady record into state (with `--workers N`, `sources.kafka.
workers`, the decoding runs in N worker processes and this is what is left to the daemon:
receiving and applying; their initial sync and the measured rounds then come from one run
of the workers, retargeted from the one topic to the other). Without `--bootstrap-servers`
(or FLEETD_KAFKA_BOOTSTRAP) the test bed's broker is started.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fleetd.daemon import freeze_startup_heap
from fleetd.loadgen import periodic_reports, produce, synthetic_fleet
from fleetd.sources import fetch
from fleetd.sources.base import UpdateSink
from fleetd.sources.kafka import KafkaSource, KafkaSourceSettings
from fleetd.sources.kafka_workers import KafkaWorkers
from fleetd.sources.memory import FleetView, StateSink
from fleetd.sources.metrics import SourceMetrics

PARTITIONS = 3
OUTCOMES = ("applied", "unchanged", "superseded", "duplicate", "dead_lettered")


async def _create_topic(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
    finally:
        await admin.close()


async def raw_rate(bootstrap: str, topic: str, n_records: int, take_batches: bool = False) -> float:
    """Records per second of a bare aiokafka consumer polling the topic (with `getmany`, or
    with `take_batches` as fleetd's source polls: `fleetd.sources.fetch.poll`)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"bench-raw-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # The same fetch sizes as fleetd's consumer: the same messages, delivered alike.
        max_partition_fetch_bytes=KafkaSourceSettings.max_partition_fetch_bytes,
    )
    await consumer.start()
    # The heap as fleetd's consumer has it (`freeze_startup_heap` after its initial sync):
    # what was there before (the benchmark's own data) is frozen, so each consumer's
    # collections scan only what it allocates itself.
    freeze_startup_heap()
    seen = 0
    first_at: float | None = None
    try:
        while seen < n_records:
            if take_batches:
                batch = await fetch.poll(consumer, 200, KafkaSourceSettings.max_batch_records)
            else:
                batch = await consumer.getmany(
                    timeout_ms=200, max_records=KafkaSourceSettings.max_batch_records
                )
            if batch and first_at is None:
                first_at = time.perf_counter()
            seen += sum(len(records) for records in batch.values())
        done_at = time.perf_counter()
    finally:
        gc.unfreeze()
        await consumer.stop()
    assert first_at is not None
    return n_records / (done_at - first_at)


async def source_run(source: KafkaSource, n_records: int) -> tuple[float, dict[str, int]]:
    """Run `source` until it handled `n_records` more records; the seconds from its first
    poll, and its records by outcome so far."""
    start_count = source.records_handled
    source.first_batch_at = None
    task = asyncio.ensure_future(source.run())
    try:
        waiter = asyncio.ensure_future(source.wait_handled(start_count + n_records))
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # the source died: raise its error
        done_at = time.perf_counter()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert source.first_batch_at is not None
    return done_at - source.first_batch_at, _outcomes(source.metrics)


def _outcomes(metrics: SourceMetrics) -> dict[str, int]:
    return {
        outcome: int(metrics.telemetry_records.labels(outcome)._value.get()) for outcome in OUTCOMES
    }


async def workers_warm_then_measure(
    settings: KafkaSourceSettings,
    topic: str,
    n_warm: int,
    n_records: int,
    sink: UpdateSink,
    workers: int,
) -> tuple[float, float, dict[str, int], float]:
    """`warm_then_measure` with the records decoded in `workers` processes (`KafkaWorkers`):
    the same workers first read the initial sync, then the steady state."""
    source = KafkaWorkers(settings, sink, workers=workers, metrics=SourceMetrics())
    task = asyncio.ensure_future(source.run())
    try:
        waiter = asyncio.ensure_future(source.wait_handled(n_warm))
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # (the workers died: raise their error)
        assert source.first_batch_at is not None
        warm_s = time.perf_counter() - source.first_batch_at
        await source.ready.wait()  # (each worker froze its heap then; the daemon here:)
        freeze_startup_heap()
        before = _outcomes(source.metrics)
        ends = await _end_offsets(settings.bootstrap_servers, topic)
        assert sum(ends.values()) == n_records
        source.first_batch_at = None
        cpu_start = time.process_time()
        await source.retarget(topic)
        # (Done when every partition is applied to its end: a count of records handled
        # would also count those a worker reads again after taking a partition over.)
        waiter = asyncio.ensure_future(source.wait_applied(topic, ends))
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert source.first_batch_at is not None
        steady_s = time.perf_counter() - source.first_batch_at
        cpu_s = time.process_time() - cpu_start
        after = _outcomes(source.metrics)
    finally:
        gc.unfreeze()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    outcomes = {k: after[k] - before[k] for k in OUTCOMES}
    # (Read again, a record counts twice in the workers' outcomes: at most once here.)
    reflected = outcomes["applied"] + outcomes["unchanged"]
    if reflected > n_records:
        outcomes["duplicate"] += reflected - n_records
        outcomes["unchanged"] -= reflected - n_records
    return warm_s, steady_s, outcomes, cpu_s


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Partition -> end offset of one of the benchmark's topics."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    finally:
        await consumer.stop()
    return {tp.partition: offset for tp, offset in ends.items()}


async def warm_then_measure(
    bootstrap: str,
    warm_topic: str,
    topic: str,
    n_warm: int,
    n_records: int,
    sink: UpdateSink,
    workers: int = 0,
) -> tuple[float, float, dict[str, int], float]:
    """One KafkaSource into `sink` (or `workers` of them, in processes): first the initial
    sync (every node in full, `warm_topic`), then the steady state (`topic`), each timed
    from its first poll. Returns (initial sync seconds, steady-state seconds, steady-state
    records by outcome, this process's CPU seconds in the steady state)."""
    settings = KafkaSourceSettings(
        bootstrap_servers=bootstrap,
        topic=warm_topic,
        dead_letter_topic=f"{topic}.dlq",
        group_id=f"bench-fleetd-{uuid.uuid4().hex[:8]}",
    )
    if workers:
        return await workers_warm_then_measure(settings, topic, n_warm, n_records, sink, workers)
    source = KafkaSource(settings, sink, metrics=SourceMetrics())
    warm_s, before = await source_run(source, n_warm)
    # What the daemon does when it first turns ready (after the initial sync).
    freeze_startup_heap()
    try:
        source.settings = dataclasses.replace(settings, topic=topic)
        cpu_start = time.process_time()
        steady_s, after = await source_run(source, n_records)
        cpu_s = time.process_time() - cpu_start
    finally:
        gc.unfreeze()  # the next repeat starts from a heap like a fresh daemon's
    return warm_s, steady_s, {k: after[k] - before[k] for k in OUTCOMES}, cpu_s


def fleet_state(tmp: Path) -> Any:
    """The daemon's FleetState with no source of its own (the benchmarks feed it), its
    journal in `tmp`, reporting to Prometheus metrics as the daemon's does (telemetry lag,
    ignored updates: a gauge or counter update per applied change)."""
    from fleetd import config as cfgmod
    from fleetd.journal import Journal
    from fleetd.metrics import Metrics
    from fleetd.state import FleetState

    cfg = cfgmod.Config(**{"sources": {"simulated": {"enabled": False}}})
    return FleetState(cfg, Journal(tmp / "journal.sqlite3"), metrics=Metrics().state_hooks())


async def _state_run(
    bootstrap: str,
    warm_topic: str,
    topic: str,
    n_warm: int,
    n_records: int,
    expected: dict[tuple[str, str], int],
    workers: int = 0,
) -> tuple[float, float, dict[str, int], bool, float]:
    """`warm_then_measure` into a fresh FleetState (gone when this returns), and whether it
    ends with every node at its last produced sequence."""
    with tempfile.TemporaryDirectory() as tmp:
        state = fleet_state(Path(tmp))
        warm_s, state_s, outcomes, cpu_s = await warm_then_measure(
            bootstrap, warm_topic, topic, n_warm, n_records, StateSink(state), workers
        )
        gate = state.gate  # (every heartbeat written back: once, not per node)
        verified = len(state.nodes) == len(expected) and all(
            gate.last(cluster, "node", name) == seq for (cluster, name), seq in expected.items()
        )
        state.journal.close()
    return warm_s, state_s, outcomes, verified, cpu_s


def _last_sequences(
    records: Sequence[tuple[bytes, bytes]], first_sequence: int
) -> dict[tuple[str, str], int]:
    """(cluster, node) -> its last sequence (the records are numbered in order)."""
    last: dict[tuple[str, str], int] = {}
    for i, (key, _) in enumerate(records):
        cluster, name = key.decode().split("/", 1)
        last[(cluster, name)] = first_sequence + i
    return last


async def measure(
    bootstrap: str,
    n_nodes: int,
    rounds: int,
    changed_fraction: float,
    repeats: int,
    seed: int,
    workers: int = 0,
) -> dict[str, Any]:
    """Produce one mix, then measure raw, view and state `repeats` times, side by side."""
    rng = np.random.default_rng(seed)
    fleet = synthetic_fleet(rng, clusters=2, nodes_per_cluster=n_nodes // 2)
    mix: dict[str, Any] = {}
    records = list(
        periodic_reports(fleet, rounds + 1, rng, changed_fraction=changed_fraction, stats=mix)
    )
    n_warm = len(fleet)
    expected = _last_sequences(records, 1)
    warm_topic = f"bench-ingest-{uuid.uuid4().hex[:8]}-sync"
    topic = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    for name in (warm_topic, topic):
        await _create_topic(bootstrap, name)
    await produce(bootstrap, warm_topic, records[:n_warm])
    await produce(bootstrap, topic, records[n_warm:])
    n_records = len(records) - n_warm
    del records
    runs = []
    for _ in range(repeats):
        # Each run starts from a heap holding nothing of the runs before (measured: the
        # previous repeat's fleet state, still referenced, cost the raw consumer ~0.4-0.8 s
        # of full collections in every repeat but the first, i.e. a slower baseline).
        gc.collect()
        raw = await raw_rate(bootstrap, topic, n_records)
        gc.collect()
        raw_batches = await raw_rate(bootstrap, topic, n_records, take_batches=True)
        gc.collect()
        _, view_s, _, _ = await warm_then_measure(
            bootstrap, warm_topic, topic, n_warm, n_records, FleetView(), workers
        )
        gc.collect()
        warm_s, state_s, outcomes, verified, cpu_s = await _state_run(
            bootstrap, warm_topic, topic, n_warm, n_records, expected, workers
        )
        reflected = outcomes["applied"] + outcomes["unchanged"]
        runs.append(
            {
                "raw_per_s": raw,
                "raw_batches_per_s": raw_batches,
                "view_records_per_s": n_records / view_s,
                "records_per_s": n_records / state_s,
                "updates_per_s": reflected / state_s,
                "ratio": reflected / state_s / raw,
                "initial_sync_s": warm_s,
                "daemon_cpu_us_per_record": cpu_s / n_records * 1e6,
                "outcomes": outcomes,
                "verified": verified,
            }
        )

    def median(name: str) -> float:
        return float(statistics.median(r[name] for r in runs))

    last = runs[-1]["outcomes"]
    return {
        "nodes": n_nodes,
        "rounds": rounds,
        "records": n_records,
        "changed_fraction": changed_fraction,
        "mix_unchanged": mix["unchanged"],
        "mix_changed": mix["changed"],
        "raw_per_s": round(median("raw_per_s")),
        "raw_batches_per_s": round(median("raw_batches_per_s")),
        "view_records_per_s": round(median("view_records_per_s")),
        "records_per_s": round(median("records_per_s")),
        "updates_per_s": round(median("updates_per_s")),
        "ratio": round(median("ratio"), 3),
        "ratios": [round(r["ratio"], 3) for r in runs],
        "initial_sync_s": round(median("initial_sync_s"), 2),
        "daemon_cpu_us_per_record": round(median("daemon_cpu_us_per_record"), 2),
        "applied_updates": last["applied"],
        "unchanged_records": last["unchanged"],
        "superseded_records": last["superseded"],
        "duplicate_records": last["duplicate"],
        "verified": all(r["verified"] for r in runs),
    }


async def run(
    bootstrap: str,
    sizes: Sequence[int],
    rounds: int,
    changed_fraction: float,
    repeats: int,
    seed: int,
    workers: int = 0,
) -> dict[str, Any]:
    """The JSON result: the first size's figures at top level, every size under `ladder`."""
    ladder = [
        await measure(bootstrap, n, rounds, changed_fraction, repeats, seed, workers) for n in sizes
    ]
    load1, _, _ = os.getloadavg()
    return {
        "benchmark": "ingest",
        **ladder[0],
        "seed": seed,
        "repeats": repeats,
        "partitions": PARTITIONS,
        "workers": workers,
        "target_ratio": 0.5,
        "load_avg_1m": round(load1, 2),
        "ladder": ladder if len(ladder) > 1 else [],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks ingest [--json] ...`"""
    parser = argparse.ArgumentParser(prog="python -m benchmarks ingest", description=__doc__)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument(
        "--rounds", type=int, default=20, help="measured reports per node (after the sync)"
    )
    parser.add_argument("--changed-fraction", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ladder", default="", help="comma-separated fleet sizes instead of --nodes"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="fleetd decodes in this many worker processes (sources.kafka.workers; 0 = in "
        "its own process)",
    )
    parser.add_argument("--bootstrap-servers", default=os.environ.get("FLEETD_KAFKA_BOOTSTRAP", ""))
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.ladder.split(",") if n.strip()] or [args.nodes]
    if min(sizes) < 2 or args.rounds < 1 or args.repeats < 1:
        parser.error("--nodes/--ladder >= 2, --rounds >= 1 and --repeats >= 1")
    if not 0.0 <= args.changed_fraction <= 1.0:
        parser.error("--changed-fraction must be within 0..1")
    testbed = None
    bootstrap = args.bootstrap_servers
    if not bootstrap:
        from tests.testbed.procs import TestbedError
        from tests.testbed.runner import TestbedRun

        testbed = TestbedRun()
        try:
            bootstrap = testbed.kafka().bootstrap
        except TestbedError as exc:
            testbed.close()
            print(f"ingest: no Kafka broker: {exc}", file=sys.stderr)
            return 2
    try:
        result = asyncio.run(
            run(
                bootstrap,
                sizes,
                args.rounds,
                args.changed_fraction,
                args.repeats,
                args.seed,
                args.workers,
            )
        )
    finally:
        if testbed is not None:
            testbed.close()
    for r in result["ladder"] or [result]:
        print(
            f"ingest of {r['records']:,} node reports ({r['nodes']:,} nodes x {r['rounds']} "
            f"rounds, {r['mix_unchanged']:,} unchanged, changed {r['mix_changed']}; "
            f"{PARTITIONS} partitions; medians of {args.repeats}):\n"
            f"  raw aiokafka consume   {r['raw_per_s']:>10,} records/s\n"
            f"  same, fleetd's polls   {r['raw_batches_per_s']:>10,} records/s "
            "(aiokafka's batches, no ConsumerRecord each)\n"
            f"  KafkaSource -> view    {r['view_records_per_s']:>10,} records/s\n"
            f"  KafkaSource -> state   {r['updates_per_s']:>10,} updates/s "
            f"({r['ratio']:.2f} x raw, per repeat {r['ratios']}; target >= 0.5)\n"
            f"  into state: {r['applied_updates']:,} with new content, "
            f"{r['unchanged_records']:,} unchanged, {r['superseded_records']:,} superseded, "
            f"{r['duplicate_records']:,} duplicates; every node at its last sequence: "
            f"{r['verified']}\n"
            f"  initial sync before (every node in full, not in the rates): "
            f"{r['initial_sync_s']} s\n"
            f"  the daemon process's CPU a record into state: {r['daemon_cpu_us_per_record']} us"
            + (f" (decoding in {args.workers} worker processes)" if args.workers else "")
        )
    print(f"load average (1 min) {result['load_avg_1m']}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
