"""Prometheus metrics of the telemetry sources.

In the daemon they live in its registry (`for_daemon`), sharing the daemon's own
dead-letter and consumer-lag metrics; tests and tools get a private registry. Names follow
Prometheus conventions (base units, `_total` counters) so `promtool check metrics` is clean.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge


class SourceMetrics:
    """Counters and gauges the Kafka and Kubernetes sources record."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        dead_letters: Counter | None = None,
        consumer_lag: Gauge | None = None,
    ) -> None:
        """Create the metrics in `registry` (a fresh one when None); `dead_letters` and
        `consumer_lag` reuse metrics that already exist there."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.dead_letters = dead_letters or Counter(
            "fleetd_dead_letters",
            "Telemetry records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.consumer_lag = consumer_lag or Gauge(
            "fleetd_kafka_consumer_lag_messages",
            "Messages between the committed offset and the end of each partition.",
            ["topic", "partition"],
            registry=r,
        )
        self.telemetry_records = Counter(
            "fleetd_telemetry_records",
            "Telemetry records consumed from Kafka, by outcome: applied (new content), "
            "unchanged (the node's last applied content again: sequence and freshness "
            "applied), duplicate (sequence already applied), superseded (a newer record of "
            "its key came in the same poll), dead_lettered.",
            ["outcome"],
            registry=r,
        )
        self.inventories_abandoned = Counter(
            "fleetd_inventories_abandoned",
            "Node inventories given up before they completed (their chunks disagree on the "
            "chunk count, or they list too many names), by cluster: that cluster's unlisted "
            "nodes are not removed until a later inventory completes.",
            ["cluster"],
            registry=r,
        )
        self.kube_events = Counter(
            "fleetd_kube_watch_events",
            "Watch events received from Kubernetes API servers, by cluster, kind and type.",
            ["cluster", "kind", "type"],
            registry=r,
        )
        self.kube_invalid_objects = Counter(
            "fleetd_kube_invalid_objects",
            "Kubernetes objects skipped because they failed validation, by reason.",
            ["cluster", "kind", "reason"],
            registry=r,
        )
        self.kube_watch_restarts = Counter(
            "fleetd_kube_watch_restarts",
            "Watch restarts, by cause (expired: relist after 410 Gone; error: reconnect).",
            ["cluster", "kind", "cause"],
            registry=r,
        )
        self.kube_relists = Counter(
            "fleetd_kube_relists",
            "Full lists of a resource kind (initial sync and after 410 Gone).",
            ["cluster", "kind"],
            registry=r,
        )

    @classmethod
    def for_daemon(cls, daemon_metrics: Any) -> SourceMetrics:
        """The sources' metrics inside the daemon's registry (one set per daemon)."""
        existing = getattr(daemon_metrics, "_source_metrics", None)
        if isinstance(existing, SourceMetrics):
            return existing
        made = cls(
            daemon_metrics.registry,
            dead_letters=daemon_metrics.dead_letters,
            consumer_lag=daemon_metrics.kafka_consumer_lag,
        )
        daemon_metrics._source_metrics = made
        return made
