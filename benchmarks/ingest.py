"""Telemetry ingest: node updates per second from Kafka into fleet state, next to the raw
aiokafka consume rate of the same records.

    python -m benchmarks ingest [--json] [--nodes 2000] [--records 100000] [--seed 1]
                                [--bootstrap-servers HOST:PORT]

One seeded stream of node reports (`fleetd.loadgen`: 2 clusters, GPU shapes, a few pods per
report) is produced once to a fresh 3-partition topic. Then, each with its own consumer group:
- raw: an AIOKafkaConsumer polls every record (getmany) and does nothing with it;
- view: fleetd's KafkaSource decodes, validates, gates, applies into an in-memory view and
  commits offsets after each batch;
- state: the same into the daemon's FleetState (the single writer in front of the node table).
Each rate is records / (time of the last record - time the first poll returned), so consumer
group joins are not counted. Target: state rate >= half the raw rate. Without
`--bootstrap-servers` (or FLEETD_KAFKA_BOOTSTRAP) the test bed's broker is started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fleetd.loadgen import node_records, produce, synthetic_fleet
from fleetd.sources.base import UpdateSink
from fleetd.sources.kafka import KafkaSource, KafkaSourceSettings
from fleetd.sources.memory import FleetView, StateSink
from fleetd.sources.metrics import SourceMetrics

PARTITIONS = 3


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


async def raw_rate(bootstrap: str, topic: str, n_records: int) -> float:
    """Records per second of a bare aiokafka consumer polling the topic."""
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
    seen = 0
    first_at: float | None = None
    try:
        while seen < n_records:
            batch = await consumer.getmany(
                timeout_ms=200, max_records=KafkaSourceSettings.max_batch_records
            )
            if batch and first_at is None:
                first_at = time.perf_counter()
            seen += sum(len(records) for records in batch.values())
        done_at = time.perf_counter()
    finally:
        await consumer.stop()
    assert first_at is not None
    return n_records / (done_at - first_at)


async def source_rate(
    bootstrap: str, topic: str, n_records: int, sink: UpdateSink
) -> tuple[float, dict[str, int]]:
    """Records per second through fleetd's KafkaSource into `sink`, and the records by
    outcome (applied, superseded: coalesced into a newer snapshot of their node, ...)."""
    settings = KafkaSourceSettings(
        bootstrap_servers=bootstrap,
        topic=topic,
        dead_letter_topic=f"{topic}.dlq",
        group_id=f"bench-fleetd-{uuid.uuid4().hex[:8]}",
    )
    metrics = SourceMetrics()
    source = KafkaSource(settings, sink, metrics=metrics)
    task = asyncio.ensure_future(source.run())
    try:
        waiter = asyncio.ensure_future(source.wait_handled(n_records))
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # the source died: raise its error
        done_at = time.perf_counter()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert source.first_batch_at is not None
    outcomes = {
        outcome: int(metrics.telemetry_records.labels(outcome)._value.get())
        for outcome in ("applied", "superseded", "duplicate", "dead_lettered")
    }
    return n_records / (done_at - source.first_batch_at), outcomes


def _fleet_state(tmp: Path) -> Any:
    from fleetd import config as cfgmod
    from fleetd.journal import Journal
    from fleetd.state import FleetState

    cfg = cfgmod.Config(**{"sources": {"simulated": {"enabled": False}}})
    return FleetState(cfg, Journal(tmp / "journal.sqlite3"))


async def run(bootstrap: str, n_nodes: int, n_records: int, seed: int) -> dict[str, Any]:
    """Produce the stream once, then measure raw, view and state rates."""
    rng = np.random.default_rng(seed)
    fleet = synthetic_fleet(rng, clusters=2, nodes_per_cluster=n_nodes // 2)
    records = list(node_records(fleet, n_records, rng))
    topic = f"bench-ingest-{uuid.uuid4().hex[:8]}"
    await _create_topic(bootstrap, topic)
    await produce(bootstrap, topic, records)
    raw = await raw_rate(bootstrap, topic, n_records)
    view = FleetView()
    view_rate, _ = await source_rate(bootstrap, topic, n_records, view)
    with tempfile.TemporaryDirectory() as tmp:
        state = _fleet_state(Path(tmp))
        state_rate, outcomes = await source_rate(bootstrap, topic, n_records, StateSink(state))
        nodes_in_state = len(state.nodes)
        state.journal.close()
    return {
        "benchmark": "ingest",
        "nodes": n_nodes,
        "records": n_records,
        "seed": seed,
        "partitions": PARTITIONS,
        "raw_per_s": round(raw),
        "view_updates_per_s": round(view_rate),
        "updates_per_s": round(state_rate),
        "ratio": round(state_rate / raw, 3),
        "target_ratio": 0.5,
        "nodes_in_state": nodes_in_state,
        "applied_updates": outcomes["applied"],
        "superseded_records": outcomes["superseded"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks ingest [--json] ...`"""
    parser = argparse.ArgumentParser(prog="python -m benchmarks ingest", description=__doc__)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bootstrap-servers", default=os.environ.get("FLEETD_KAFKA_BOOTSTRAP", ""))
    args = parser.parse_args(argv)
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
        result = asyncio.run(run(bootstrap, args.nodes, args.records, args.seed))
    finally:
        if testbed is not None:
            testbed.close()
    print(
        f"ingest of {result['records']} node reports ({result['nodes']} nodes, "
        f"{PARTITIONS} partitions):\n"
        f"  raw aiokafka consume   {result['raw_per_s']:>10,} records/s\n"
        f"  KafkaSource -> view    {result['view_updates_per_s']:>10,} updates/s\n"
        f"  KafkaSource -> state   {result['updates_per_s']:>10,} updates/s "
        f"({result['ratio']:.2f} x raw; target >= 0.5)\n"
        f"  into state: {result['applied_updates']:,} node updates applied, "
        f"{result['superseded_records']:,} records superseded by a newer one of their node "
        "in the same poll"
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
