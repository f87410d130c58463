"""Pinned versions of every test-bed component (the cache is keyed by these).

Changing a version here makes the next ``make testbed`` build that component again into
a new cache folder ``~/.cache/fleetd-testbed/<component>-<version>/``; old folders stay
until removed by hand.
"""

from __future__ import annotations

#: Apache Kafka broker (Maven ``org.apache.kafka:kafka_2.13``); KRaft, Java 17.
KAFKA_VERSION = "4.4.0"
#: log4j2 behind Kafka's SLF4J 1.7.36 (binding ``log4j-slf4j-impl``, not the SLF4J 2 one).
LOG4J_VERSION = "2.26.1"
#: ``k8s.io/kubernetes`` tag for kube-apiserver and kube-scheduler.
KUBERNETES_VERSION = "v1.37.2"
#: etcd server (``go.etcd.io/etcd/server/v3``); Kubernetes 1.34+ wants >= 3.5.24.
ETCD_VERSION = "v3.6.16"
#: kwok (``sigs.k8s.io/kwok``): fakes kubelets for nodes and pods.
KWOK_VERSION = "v0.8.0"
#: Stock gRPC clients the tests drive fleetd's server with (reflection, health checking).
GRPCURL_VERSION = "v1.9.3"
GRPC_HEALTH_PROBE_VERSION = "v0.4.62"
#: Debian bookworm's ``prometheus`` package, for its ``promtool check metrics`` (fetched with
#: ``apt-get download``, unpacked without root). A Debian point release that replaces this
#: version makes the download fail with a message naming this constant: bump it then.
PROMETHEUS_DEB_VERSION = "2.42.0+ds-5+deb12u1"


def staging_version(kubernetes_version: str) -> str:
    """The tag of the ``k8s.io/*`` staging modules that ship with a Kubernetes release.

    >>> staging_version("v1.37.2")
    'v0.37.2'
    """
    major, minor, patch = kubernetes_version.lstrip("v").split(".")
    if major != "1":
        raise ValueError(f"unexpected Kubernetes version {kubernetes_version!r}")
    return f"v0.{minor}.{patch}"
