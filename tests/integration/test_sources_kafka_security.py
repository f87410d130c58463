"""Kafka over TLS and SASL against the test bed's secured listeners (self-signed CA made at
start): SASL_SSL (SCRAM-SHA-256/512 and PLAIN), SSL with required client certificates
(mutual TLS) and SASL_PLAINTEXT. The daemon ingests over each; wrong credentials, an
untrusted broker certificate or a missing client certificate give a clear error and
readiness stays false, without a crash."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from fleetd import config
from fleetd.daemon import Daemon
from fleetd.loadgen import produce
from fleetd.sources.kafka import KafkaSource, settings_from_config
from fleetd.sources.memory import FleetView
from fleetd.sources.security import KafkaSecurity
from fleetd.v1 import fleet_pb2, fleet_pb2_grpc
from tests.integration.sources_support import (
    AWAIT_S,
    Start,
    create_topic,
    h100_report,
    kafka_section,
    running,
    unique,
)
from tests.integration.test_sources_daemon import _nodes, _until, start
from tests.testbed.kafka import SecureListener
from tests.testbed.procs import TestbedError, async_wait_until
from tests.testbed.runner import TestbedRun

pytestmark = pytest.mark.testbed
__all__ = ["start"]  # the daemon fixture, shared with test_sources_daemon


@pytest.fixture(scope="session")
def kafka_secure(testbed_run: TestbedRun) -> SecureListener:
    """The session broker's SASL_SSL listener (fails, not skips, when the bed cannot start
    under FLEETD_TESTBED=required: the kafka_bootstrap fixture's rules)."""
    from tests.integration.conftest import _unavailable

    try:
        return testbed_run.kafka().secure
    except TestbedError as exc:
        error = exc
    _unavailable(error)


def _security(secure: SecureListener, password_file: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "protocol": "SASL_SSL",
        "ssl_ca_file": str(secure.ca_file),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": secure.username,
        "sasl_password_file": str(password_file),
        **overrides,
    }


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
async def test_daemon_ingests_over_sasl_ssl(
    start: Start,
    kafka_bootstrap: str,
    kafka_secure: SecureListener,
    tmp_path: Path,
    mechanism: str,
) -> None:
    topic = unique("secure-telemetry")
    await create_topic(kafka_bootstrap, topic)
    # The agent side publishes over the same listener (its own mechanism: PLAIN).
    publisher = KafkaSecurity(
        protocol="SASL_SSL",
        ssl_ca_file=str(kafka_secure.ca_file),
        sasl_mechanism="PLAIN",
        sasl_username=kafka_secure.username,
        sasl_password=kafka_secure.password,
    )
    await produce(
        kafka_secure.bootstrap,
        topic,
        [h100_report("edge-s", f"n{i}", 1 + i) for i in range(3)],
        **publisher.client_options(),
    )
    password_file = tmp_path / "sasl-password"
    password_file.write_text(kafka_secure.password + "\n")
    _, client = await start(
        sources={
            "kafka": kafka_section(
                kafka_secure.bootstrap,
                topic,
                ["edge-s"],
                security=_security(kafka_secure, password_file, sasl_mechanism=mechanism),
            )
        }
    )

    async def arrived() -> bool:
        return set(await _nodes(client, "edge-s")) == {"n0", "n1", "n2"}

    await _until("three nodes reported over SASL_SSL", arrived)


def _other_listener(secure: SecureListener, name: str) -> tuple[str, KafkaSecurity]:
    """(bootstrap, publisher security) of the mutual-TLS or the SASL_PLAINTEXT listener."""
    if name == "mtls":
        return secure.mtls_bootstrap, KafkaSecurity(
            protocol="SSL",
            ssl_ca_file=str(secure.ca_file),
            ssl_cert_file=str(secure.client_cert_file),
            ssl_key_file=str(secure.client_key_file),
        )
    return secure.sasl_plaintext_bootstrap, KafkaSecurity(
        protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username=secure.username,
        sasl_password=secure.password,
    )


@pytest.mark.parametrize("listener", ["mtls", "sasl_plaintext"])
async def test_daemon_ingests_over_mutual_tls_and_sasl_plaintext(
    start: Start,
    kafka_bootstrap: str,
    kafka_secure: SecureListener,
    tmp_path: Path,
    listener: str,
) -> None:
    topic = unique(f"{listener}-telemetry")
    await create_topic(kafka_bootstrap, topic)
    bootstrap, publisher = _other_listener(kafka_secure, listener)
    await produce(
        bootstrap,
        topic,
        [h100_report("edge-m", f"n{i}", 1 + i) for i in range(3)],
        **publisher.client_options(),
    )
    password_file = tmp_path / "sasl-password"
    password_file.write_text(kafka_secure.password + "\n")
    if listener == "mtls":  # the daemon's config names the same files
        security: dict[str, Any] = {
            "protocol": "SSL",
            "ssl_ca_file": publisher.ssl_ca_file,
            "ssl_cert_file": publisher.ssl_cert_file,
            "ssl_key_file": publisher.ssl_key_file,
        }
    else:
        security = {
            "protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": kafka_secure.username,
            "sasl_password_file": str(password_file),
        }
    _, client = await start(
        sources={"kafka": kafka_section(bootstrap, topic, ["edge-m"], security=security)}
    )

    async def arrived() -> bool:
        return set(await _nodes(client, "edge-m")) == {"n0", "n1", "n2"}

    await _until(f"three nodes reported over {listener}", arrived)


async def _refused(section: config.KafkaSourceConfig) -> str:
    """Run a source the broker refuses until it failed to connect twice (it keeps retrying,
    with backoff, instead of dying; never ready); its last connect error."""
    source = KafkaSource(settings_from_config(section), FleetView())
    async with running(source.run) as task:
        await asyncio.wait_for(source.wait_connect_failures(2), AWAIT_S)
        assert not source.ready.is_set()
        assert not task.done()
        return source.last_connect_error


async def test_mutual_tls_without_a_client_certificate_is_refused(
    kafka_secure: SecureListener,
) -> None:
    section = config.KafkaSourceConfig(
        enabled=True,
        bootstrap_servers=kafka_secure.mtls_bootstrap,
        topic=unique("mtls-telemetry"),
        group_id=unique("fleetd"),
        clusters=["edge-m"],
        security=config.KafkaSecurity(protocol="SSL", ssl_ca_file=str(kafka_secure.ca_file)),
    )
    error = await _refused(section)
    # The broker's TLS alert (Java sends bad_certificate for a missing one).
    assert "SSLError" in error
    assert "CERTIFICATE" in error


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({"password": "wrong"}, "Authentication failed", id="wrong-password"),
        pytest.param({"username": "nobody"}, "Authentication failed", id="unknown-user"),
        pytest.param({"ssl_ca_file": ""}, "CERTIFICATE_VERIFY_FAILED", id="untrusted-cert"),
    ],
)
async def test_bad_credentials_are_a_clear_error_and_never_ready(
    kafka_secure: SecureListener, tmp_path: Path, overrides: dict[str, str], expected: str
) -> None:
    password_file = tmp_path / "sasl-password"
    password_file.write_text(overrides.pop("password", kafka_secure.password))
    security = _security(kafka_secure, password_file, sasl_mechanism="SCRAM-SHA-256")
    if "username" in overrides:
        security["sasl_username"] = overrides.pop("username")
    security.update(overrides)
    section = config.KafkaSourceConfig(
        enabled=True,
        bootstrap_servers=kafka_secure.bootstrap,
        topic=unique("secure-telemetry"),
        group_id=unique("fleetd"),
        clusters=["edge-s"],
        security=config.KafkaSecurity(**security),
    )
    error = await _refused(section)
    assert expected in error
    assert kafka_secure.password not in error


async def test_a_missing_password_file_is_retried_not_fatal(tmp_path: Path) -> None:
    section = config.KafkaSourceConfig(
        enabled=True,
        bootstrap_servers="127.0.0.1:1",
        security=config.KafkaSecurity(
            protocol="SASL_PLAINTEXT",
            sasl_username="fleetd",
            sasl_password_file=str(tmp_path / "not-yet-mounted"),
        ),
    )
    source = KafkaSource(settings_from_config(section), FleetView())
    async with running(source.run) as task:
        await asyncio.wait_for(source.wait_connect_failures(1), AWAIT_S)
        assert "not-yet-mounted" in source.last_connect_error
        assert not task.done()


async def test_daemon_with_a_wrong_password_serves_not_ready_with_the_reason(
    kafka_secure: SecureListener, tmp_path: Path
) -> None:
    password_file = tmp_path / "sasl-password"
    password_file.write_text("not-the-password")
    data = {
        "server": {"grpc_listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
        "journal": {"path": str(tmp_path / "journal.sqlite3")},
        "logging": {"level": "WARNING"},
        "sources": {
            "simulated": {"enabled": False},
            "kafka": {
                "enabled": True,
                "bootstrap_servers": kafka_secure.bootstrap,
                "topic": unique("secure-telemetry"),
                "group_id": unique("fleetd"),
                "clusters": ["edge-s"],
                "security": _security(kafka_secure, password_file),
            },
        },
    }
    path = tmp_path / "fleetd.yaml"
    path.write_text(yaml.safe_dump(data))
    daemon = Daemon(config.load(path), path)
    await daemon.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{daemon.grpc_port}")
    try:
        fleet = fleet_pb2_grpc.FleetStub(channel)

        async def explained() -> bool:
            status = await fleet.GetStatus(fleet_pb2.GetStatusRequest())
            return "Authentication failed" in status.not_ready_reason

        await async_wait_until(
            "GetStatus names the SASL failure", explained, timeout_s=AWAIT_S, interval_s=0.1
        )
        status = await fleet.GetStatus(fleet_pb2.GetStatusRequest())
        assert not status.ready
        assert kafka_secure.password not in status.not_ready_reason
        assert "not-the-password" not in status.not_ready_reason
    finally:
        await channel.close()
        await daemon.stop()


def test_loadgen_command_publishes_over_sasl_ssl(
    kafka_secure: SecureListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command-line flags the agent shares (`security.add_arguments`), password from
    the environment; what was published is read back over the same listener."""
    from fleetd import loadgen

    topic = unique("secure-loadgen")
    monkeypatch.setenv("FLEETD_KAFKA_SASL_PASSWORD", kafka_secure.password)
    argv = ["--bootstrap-servers", kafka_secure.bootstrap, "--topic", topic,
            "--clusters", "1", "--nodes", "5", "--records", "10",
            "--security-protocol", "SASL_SSL", "--ssl-ca-file", str(kafka_secure.ca_file),
            "--sasl-mechanism", "SCRAM-SHA-256", "--sasl-username", kafka_secure.username]  # fmt: skip
    assert loadgen.main(argv) == 0
    security = KafkaSecurity(
        protocol="SASL_SSL",
        ssl_ca_file=str(kafka_secure.ca_file),
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=kafka_secure.username,
        sasl_password=kafka_secure.password,
    )

    async def read_back() -> int:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_secure.bootstrap,
            group_id=unique("read"),
            auto_offset_reset="earliest",
            **security.client_options(),
        )
        await consumer.start()
        seen = 0
        try:
            async with asyncio.timeout(AWAIT_S):
                while seen < 10:
                    batch = await consumer.getmany(timeout_ms=500)
                    seen += sum(len(r) for r in batch.values())
        finally:
            await consumer.stop()
        return seen

    assert asyncio.run(read_back()) == 10
