"""The shipped alerting rules (config/alerts.yaml): promtool accepts them, each alert fires
on the series that should fire it (and not before its `for`, nor on healthy series), as
`promtool test rules` evaluates them, and every fleetd metric they use is one the daemon
exports."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import StartDaemon, promtool, scrape, start_on_kafka

pytestmark = pytest.mark.testbed

RULES = Path(__file__).resolve().parents[3] / "config" / "alerts.yaml"

#: (alert, input series {series: values}, [(eval time, [(labels, summary)])]): promtool's
#: expanding notation, `a+bxn` = a, a+b, ... n+1 samples a minute apart.
CASES: list[tuple[str, dict[str, str], list[tuple[str, list[tuple[dict[str, str], str]]]]]] = [
    (
        "FleetdDown",
        {'up{job="fleetd", instance="a"}': "1 0x6"},
        [("2m", []), ("4m", [({"instance": "a", "job": "fleetd"}, "fleetd a is down")])],
    ),
    (
        "FleetdNotReady",
        {'fleetd_ready{instance="a"}': "1 0x10"},
        [("5m", []), ("7m", [({"instance": "a"}, "fleetd a not ready for 5 minutes")])],
    ),
    (
        "FleetdClusterNotSynced",
        {
            'fleetd_source_synced{source="kafka", cluster="east"}': "0x10",
            'fleetd_source_synced{source="kafka", cluster="west"}': "1x10",
        },
        [
            ("4m", []),
            (
                "6m",
                [
                    (
                        {"source": "kafka", "cluster": "east"},
                        "kafka source not synced for cluster east",
                    )
                ],
            ),
        ],
    ),
    (
        "FleetdClusterTelemetryOld",
        {
            'fleetd_telemetry_age_seconds{source="kafka", cluster="east"}': "0+60x20",
            'fleetd_telemetry_age_seconds{source="kafka", cluster="west"}': "5x20",
        },
        [
            ("10m", []),  # (above 300 s from 6m on: 5 minutes pending)
            (
                "12m",
                [
                    (
                        {"source": "kafka", "cluster": "east"},
                        "no telemetry from east (kafka) for 12m 0s",
                    )
                ],
            ),
        ],
    ),
    (
        "FleetdKafkaConsumerBehind",
        {
            'fleetd_kafka_consumer_lag_messages{instance="a", topic="t", partition="0"}': "60000x20",
            'fleetd_kafka_consumer_lag_messages{instance="a", topic="t", partition="1"}': "50000x20",
            'fleetd_kafka_consumer_lag_messages{instance="b", topic="t", partition="0"}': "90000x20",
        },
        [
            ("9m", []),
            (
                "11m",
                [
                    (
                        {"instance": "a", "topic": "t"},
                        "fleetd is 110000 telemetry records behind on t",
                    )
                ],
            ),
        ],
    ),
    (
        "FleetdDeadLetters",
        {'fleetd_dead_letters_total{instance="a", reason="bad-name"}': "0 0 0 1x30"},
        [
            ("2m", []),
            (
                "4m",
                [({"instance": "a", "reason": "bad-name"}, "telemetry dead-lettered (bad-name)")],
            ),
            ("25m", []),  # (none in the last 15 minutes)
        ],
    ),
    (
        "FleetdConfigReloadRejected",
        {
            'fleetd_config_reloads_total{instance="a", result="ok"}': "0+1x30",
            'fleetd_config_reloads_total{instance="a", result="error"}': "0 0 1x30",
        },
        [
            ("1m", []),
            ("3m", [({"instance": "a", "result": "error"}, "fleetd rejected a config reload")]),
            ("25m", []),
        ],
    ),
    (
        "FleetdRpcErrors",
        {
            'fleetd_rpc_duration_seconds_count{instance="a", method="Place", code="INTERNAL"}': (
                "0+1x20"
            ),
            'fleetd_rpc_duration_seconds_count{instance="a", method="Place", code="OK"}': (
                "0+100x20"
            ),
            'fleetd_rpc_duration_seconds_count{instance="a", method="Explain", code="UNAVAILABLE"}': (
                "0+100x20"
            ),
        },
        [
            ("5m", []),
            (
                "7m",
                [
                    (
                        {"instance": "a", "method": "Place"},
                        "fleetd Place fails with INTERNAL/UNKNOWN",
                    )
                ],
            ),
        ],
    ),
    (
        "FleetdPlaceSlow",
        {
            # a: 90 % of the calls between 50 and 250 ms (p99 ~248 ms); b: all below 50 ms.
            'fleetd_rpc_duration_seconds_bucket{instance="a", method="Place", code="OK", le="0.05"}': (
                "0+10x30"
            ),
            'fleetd_rpc_duration_seconds_bucket{instance="a", method="Place", code="OK", le="0.25"}': (
                "0+100x30"
            ),
            'fleetd_rpc_duration_seconds_bucket{instance="a", method="Place", code="OK", le="+Inf"}': (
                "0+100x30"
            ),
            'fleetd_rpc_duration_seconds_bucket{instance="b", method="Place", code="OK", le="0.05"}': (
                "0+100x30"
            ),
            'fleetd_rpc_duration_seconds_bucket{instance="b", method="Place", code="OK", le="0.25"}': (
                "0+100x30"
            ),
            'fleetd_rpc_duration_seconds_bucket{instance="b", method="Place", code="OK", le="+Inf"}': (
                "0+100x30"
            ),
        },
        [("9m", []), ("12m", [({"instance": "a"}, "Place p99 above 100 ms on a")])],
    ),
    (
        "FleetdWorkloadsQueued",
        {
            # a: one workload waits from minute 0 on (60 s more each minute); b: a busy queue
            # whose oldest never waits 10 minutes; c: a team held back by its own quota; d: a
            # daemon from before the cause label (a rolling upgrade).
            'fleetd_queue_oldest_seconds{instance="a", cause="capacity"}': "0+60x40",
            'fleetd_queue_oldest_seconds{instance="b", cause="capacity"}': (
                "0+60x9 0+60x9 0+60x9 0+60x9"
            ),
            'fleetd_queue_oldest_seconds{instance="c", cause="quota"}': "0+60x40",
            'fleetd_queue_oldest_seconds{instance="d"}': "0+60x40",
        },
        [
            ("34m", []),  # (over 1,800 s from minute 31, pending for 5 minutes)
            (
                "37m",
                [
                    ({"instance": i}, "a workload has waited in the queue for over 30 minutes")
                    for i in ("a", "d")
                ],
            ),
        ],
    ),
    (
        "FleetdNodeInventoriesAbandoned",
        {'fleetd_inventories_abandoned_total{instance="a", cluster="east"}': "0 0 1x80"},
        [
            ("1m", []),
            ("3m", [({"instance": "a", "cluster": "east"}, "node inventories of east given up")]),
            ("75m", []),
        ],
    ),
]


def _rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, check=False)


def test_the_rules_are_valid_and_each_alert_fires_when_it_should(tmp_path: Path) -> None:
    check = _promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    rules = _rules()
    assert sorted(rules) == sorted(alert for alert, _, _ in CASES)  # every alert has a case
    tests = []
    for alert, series, evals in CASES:
        rule = rules[alert]
        alert_tests = []
        for at, firing in evals:
            expected = [
                {
                    "exp_labels": {**labels, **rule["labels"]},
                    # (The description is static text; the summary's template is checked.)
                    "exp_annotations": {
                        "summary": summary,
                        "description": rule["annotations"]["description"],
                    },
                }
                for labels, summary in firing
            ]
            alert_tests.append({"eval_time": at, "alertname": alert, "exp_alerts": expected})
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": alert_tests,
            }
        )
    spec = tmp_path / "alerts_test.yaml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests})
    )
    out = _promtool("test", "rules", str(spec))
    assert out.returncode == 0, out.stdout + out.stderr


async def test_every_metric_the_rules_use_is_exported(
    start_daemon: StartDaemon, kafka_bootstrap: str
) -> None:
    # (A daemon with a Kafka source: the source registers metrics of its own.)
    daemon, _, _, _ = await start_on_kafka(start_daemon, kafka_bootstrap)
    text = await asyncio.to_thread(scrape, daemon)
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    used = {
        name
        for rule in _rules().values()
        for name in re.findall(r"\b(fleetd_[a-z_]+)\b", rule["expr"])
    }
    assert len(used) >= 10  # (the pattern finds them)
    for name in sorted(used):
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert name in families or families.get(base) == "histogram", name
