"""The daemon's metrics with the real Kafka source: consumer lag, telemetry lag and age,
dead letters and record outcomes in one exposition that `promtool check metrics` accepts."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time

import pytest

from fleetd.v1 import fleet_pb2
from tests.integration.sources_support import (
    AWAIT_S,
    h100_report,
)
from tests.testbed.procs import async_wait_until

from .conftest import StartDaemon, promtool, scrape, start_on_kafka

pytestmark = pytest.mark.testbed


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
async def test_kafka_metrics_are_exposed_and_promtool_clean(
    start_daemon: StartDaemon, kafka_bootstrap: str, workers: int
) -> None:
    """The same through the daemon's own consumer and through worker processes
    (`sources.kafka.workers`), whose metrics the daemon forwards."""

    def records(cluster: str) -> list[tuple[bytes, bytes]]:
        # A record that is not a TelemetryRecord, then a good one of the same key: one
        # partition, in this order, so the dead letter is handled before the node shows up.
        key, good = h100_report(cluster, "n0", 1, observed_unix_ms=int(time.time() * 1000))
        return [(key, b"\xff\x00garbage"), (key, good)]

    daemon, client, topic, cluster = await start_on_kafka(
        start_daemon, kafka_bootstrap, records, workers=workers
    )

    async def node_seen() -> bool:
        snap = await client.fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest(cluster=cluster))
        return snap.clusters[0].gpus == 8 if snap.clusters else False

    await async_wait_until(f"{cluster}/n0 in fleet state", node_seen, timeout_s=AWAIT_S)
    assert daemon.state is not None
    daemon.metrics.refresh(daemon.state)
    text = await asyncio.to_thread(scrape, daemon)
    lag = re.findall(
        rf'^fleetd_kafka_consumer_lag_messages\{{partition="\d+",topic="{topic}"\}} (\S+)$',
        text,
        re.MULTILINE,
    )
    assert lag
    assert all(float(v) == 0.0 for v in lag)  # caught up
    assert re.search(rf'^fleetd_telemetry_lag_seconds\{{cluster="{cluster}"\}} ', text, re.M)
    assert re.search(
        rf'^fleetd_telemetry_age_seconds\{{cluster="{cluster}",source="kafka"\}} ', text, re.M
    )
    assert re.search(r'^fleetd_dead_letters_total\{reason="[a-z_-]+"\} 1\.0$', text, re.M)
    assert 'fleetd_telemetry_records_total{outcome="applied"} 1.0' in text
    assert f'fleetd_gpus{{cluster="{cluster}",gpu_model="H100"}} 8.0' in text
    assert "fleetd_ready 1.0" in text
    out = await asyncio.to_thread(
        subprocess.run,
        [promtool(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
