"""Session fixtures for integration tests against the real test bed.

Fixtures (all session-scoped, started lazily: a test that asks for none starts nothing):

- ``kafka_bootstrap: str`` -- ``"127.0.0.1:<port>"`` of a single Kafka 4 KRaft broker.
- ``kube: KubeTestbed`` -- two independent control planes ``cluster-a`` and ``cluster-b``
  (etcd + kube-apiserver + kwok + kube-scheduler each). Use ``kube.kubeconfig_path``,
  ``kube.contexts``, ``kube.api(ctx)`` / ``kube.core_v1(ctx)``, ``kube.create_gpu_node(ctx,
  name, gpus=8, product=..., zone=..., pool=..., taints=...)``, ``kube.wait_node_ready``
  and ``kube.wait_pod``. Pods for kwok nodes must tolerate ``KWOK_TOLERATION``.
- ``testbed_run: TestbedRun`` -- the run itself (log folder, start times).

If the test bed cannot start, a test that needs it FAILS with the reason when
``FLEETD_TESTBED=required`` (``make test`` sets it), and is skipped with the reason
otherwise (a developer running a unit subset without having built the test bed).
The servers are shared by the whole session: use unique names (topics, nodes, pods).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from tests.testbed.kube import KubeTestbed
from tests.testbed.procs import TestbedError
from tests.testbed.runner import TestbedRun


def _required() -> bool:
    return os.environ.get("FLEETD_TESTBED", "").lower() == "required"


def _unavailable(exc: TestbedError) -> NoReturn:
    message = f"test bed unavailable: {exc}"
    if _required():
        pytest.fail(message, pytrace=False)
    pytest.skip(message + " (set FLEETD_TESTBED=required to make this a failure)")


@pytest.fixture(scope="session")
def testbed_run() -> Iterator[TestbedRun]:
    """The session's test-bed run; every process it started is stopped at session end."""
    run = TestbedRun()
    try:
        yield run
    finally:
        run.close(keep=os.environ.get("FLEETD_TESTBED_KEEP") == "1")


@pytest.fixture(scope="session")
def kafka_bootstrap(testbed_run: TestbedRun) -> str:
    """Bootstrap address ``127.0.0.1:<port>`` of the session's Kafka broker."""
    try:
        return testbed_run.kafka().bootstrap
    except TestbedError as exc:
        error = exc
    _unavailable(error)  # outside the except block: no chained traceback in the report


@pytest.fixture(scope="session")
def kube(testbed_run: TestbedRun) -> KubeTestbed:
    """The session's Kubernetes control planes (contexts ``cluster-a``, ``cluster-b``)."""
    try:
        return testbed_run.kube()
    except TestbedError as exc:
        error = exc
    _unavailable(error)  # outside the except block: no chained traceback in the report
