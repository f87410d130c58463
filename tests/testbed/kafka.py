"""A single-node Apache Kafka 4 broker (KRaft, combined broker + controller) on 127.0.0.1.

Four client listeners: PLAINTEXT (``bootstrap``), and in ``secure``: SASL_SSL (TLS with a
self-signed CA made at start, PEM files in the run folder, and SASL with SCRAM-SHA-256,
SCRAM-SHA-512 (credentials stored by ``kafka-storage format --add-scram``, KIP-900) and
PLAIN, for one user whose password is drawn at start), SSL with required client
certificates (mutual TLS; a client certificate issued by the same CA is made at start) and
SASL_PLAINTEXT (the same user and mechanisms, no TLS).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.testbed.build import Artefacts
from tests.testbed.procs import (
    Process,
    Supervisor,
    TestbedError,
    free_ports,
    retry_on_port_clash,
    wait_until,
)
from tests.testbed.tls import self_signed_serving_cert

#: Bounded waits; a broker on a warm machine is up in ~10 s.
KAFKA_READY_TIMEOUT_S = 90.0

_LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = INFO
"""


#: The SASL user of the SASL_SSL listener.
SASL_USERNAME = "fleetd"


@dataclass(frozen=True)
class SecureListener:
    """The secured listeners: SASL_SSL at ``bootstrap``, with the CA file that verifies the
    broker's certificate (for 127.0.0.1 and localhost) and the one user it knows
    (SCRAM-SHA-256/512 and PLAIN); SSL with required client certificates at
    ``mtls_bootstrap`` (``client_cert_file`` and ``client_key_file`` pass); SASL_PLAINTEXT
    at ``sasl_plaintext_bootstrap`` (same user)."""

    bootstrap: str
    ca_file: Path
    username: str
    password: str
    mtls_bootstrap: str
    client_cert_file: Path
    client_key_file: Path
    sasl_plaintext_bootstrap: str


@dataclass
class KafkaBroker:
    """A running broker: ``bootstrap`` is ``"127.0.0.1:<port>"`` for any Kafka client.

    ``process`` is the current broker process (replaced by :func:`restart_kafka`);
    ``argv`` its command line, reused on restart (same ports, same data).
    ``secure`` is the SASL_SSL listener.
    """

    bootstrap: str
    process: Process
    data_dir: Path
    argv: list[str]
    secure: SecureListener


def stop_kafka(broker: KafkaBroker, *, timeout_s: float = 60.0) -> None:
    """Stop the broker cleanly (SIGTERM, as an operator would); SIGKILL after ``timeout_s``.

    Clients see the broker go away; its data stays for :func:`restart_kafka`.
    """
    popen = broker.process.popen
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)


def restart_kafka(broker: KafkaBroker, sup: Supervisor) -> KafkaBroker:
    """Stop the broker if it runs, start it again on the same ports and data, await readiness.

    Blocking; from async code use ``await asyncio.to_thread(restart_kafka, ...)`` (or
    ``TestbedRun.restart_kafka``). Returns the same, updated, ``broker``.
    """
    stop_kafka(broker)
    broker.process = sup.start("kafka", broker.argv)
    _wait_ready(broker)
    return broker


def _wait_ready(broker: KafkaBroker) -> None:
    wait_until(
        f"kafka at {broker.bootstrap} (an admin client listing topics)",
        lambda: admin_lists_topics(broker.bootstrap),
        timeout_s=KAFKA_READY_TIMEOUT_S,
        watch=[broker.process],
        interval_s=0.5,
    )


@dataclass(frozen=True)
class _TlsFiles:
    #: The broker's self-signed certificate, which is its own CA: clients trust it, and the
    #: mutual-TLS listener trusts the client certificates it issued (``ssl.truststore``).
    ca_file: Path
    #: PKCS#8 key and certificate in one PEM file, Kafka's ``ssl.keystore.type=PEM``; the
    #: key is not encrypted because the test bed's JDK has no PBES2.
    keystore: Path
    client_cert_file: Path
    client_key_file: Path


def _make_tls(directory: Path) -> _TlsFiles:
    """A self-signed certificate for 127.0.0.1/localhost that is its own CA (as the kube
    test bed's) and a client certificate it issued; key files are readable by their owner
    only."""
    from cryptography.hazmat.primitives import serialization

    from tests.testbed.tls import client_cert

    def key_pem(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    key, cert = self_signed_serving_cert("fleetd-testbed-kafka")
    ckey, ccert = client_cert(key, cert, "fleetd-testbed-client")
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    files = _TlsFiles(
        directory / "ca.pem",
        directory / "broker-keystore.pem",
        directory / "client.pem",
        directory / "client-key.pem",
    )
    files.ca_file.write_bytes(cert_pem)
    files.keystore.write_bytes(key_pem(key) + cert_pem)
    files.client_cert_file.write_bytes(ccert.public_bytes(serialization.Encoding.PEM))
    files.client_key_file.write_bytes(key_pem(ckey))
    files.keystore.chmod(0o600)
    files.client_key_file.chmod(0o600)
    return files


def _server_properties(
    port: int,
    controller_port: int,
    data_dir: Path,
    *,
    secure_port: int,
    mtls_port: int,
    sasl_plaintext_port: int,
    tls: _TlsFiles,
    sasl_password: str,
) -> str:
    listeners = (
        f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port},"
        f"SASL_SSL://127.0.0.1:{secure_port},SSL://127.0.0.1:{mtls_port},"
        f"SASL_PLAINTEXT://127.0.0.1:{sasl_plaintext_port}"
    )
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    plain = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_{SASL_USERNAME}="{sasl_password}";'
    )
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        # With controller.quorum.bootstrap.servers the storage is formatted --standalone
        # (dynamic quorum); controller.quorum.voters would need a format without it.
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "listeners": listeners,
        "advertised.listeners": listeners,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": (
            "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL,"
            "SASL_PLAINTEXT:SASL_PLAINTEXT"
        ),
        # Per-listener settings (`listener.name.<listener>.<mechanism>.` and
        # `listener.name.<listener>.ssl.`, lower case); inter-broker traffic stays PLAINTEXT.
        "sasl.enabled.mechanisms": "SCRAM-SHA-256,SCRAM-SHA-512,PLAIN",
        **{
            f"listener.name.{listener}.{mechanism}.sasl.jaas.config": jaas
            for listener in ("sasl_ssl", "sasl_plaintext")
            for mechanism, jaas in (
                ("scram-sha-256", scram),
                ("scram-sha-512", scram),
                ("plain", plain),
            )
        },
        "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
        "listener.name.sasl_ssl.ssl.keystore.location": str(tls.keystore),
        # SSL: mutual TLS, only clients with a certificate issued by the test bed's CA.
        "listener.name.ssl.ssl.keystore.type": "PEM",
        "listener.name.ssl.ssl.keystore.location": str(tls.keystore),
        "listener.name.ssl.ssl.truststore.type": "PEM",
        "listener.name.ssl.ssl.truststore.location": str(tls.ca_file),
        "listener.name.ssl.ssl.client.auth": "required",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        # One broker: every internal topic with a single replica.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Consumers join at once instead of after the default 3 s.
        "group.initial.rebalance.delay.ms": "0",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


async def _list_topics(bootstrap: str) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


def admin_lists_topics(bootstrap: str) -> bool:
    """True when an aiokafka admin client can connect and list topics (real readiness).

    Runs its own event loop in a worker thread, so it is safe to call from inside a
    running loop (e.g. a fixture set up for an async test).
    """
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _list_topics(bootstrap)).result(timeout=30)
    return True


def start_kafka(arts: Artefacts, sup: Supervisor, run_dir: Path) -> KafkaBroker:
    """Format storage and start the broker; return once an admin client lists topics.

    Raises TestbedError naming ``kafka`` and its log path on any failure.
    """
    java = shutil.which("java")
    if java is None:
        raise TestbedError("kafka: `java` (17+) is not on PATH")
    return retry_on_port_clash(lambda: _start_kafka_once(arts, sup, run_dir, java))


def _start_kafka_once(arts: Artefacts, sup: Supervisor, run_dir: Path, java: str) -> KafkaBroker:
    port, controller_port, secure_port, mtls_port, sasl_plaintext_port = free_ports(5)
    kdir = run_dir / "kafka"
    if kdir.exists():  # a previous attempt lost a port: the storage names the old one
        shutil.rmtree(kdir)
    data_dir = kdir / "data"
    data_dir.mkdir(parents=True)
    sasl_password = secrets.token_urlsafe(16)
    tls = _make_tls(kdir / "tls")
    props = kdir / "server.properties"
    props.write_text(
        _server_properties(
            port,
            controller_port,
            data_dir,
            secure_port=secure_port,
            mtls_port=mtls_port,
            sasl_plaintext_port=sasl_plaintext_port,
            tls=tls,
            sasl_password=sasl_password,
        )
    )
    props.chmod(0o600)
    log4j = kdir / "log4j2.properties"
    log4j.write_text(_LOG4J2)
    classpath = f"{arts.kafka_libs}/*"
    jvm = [
        java,
        "-Xms128m",
        "-Xmx512m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        classpath,
    ]
    format_log = sup.log_dir / "kafka-format.log"
    try:
        cluster_id = (
            subprocess.run(
                [*jvm, "kafka.tools.StorageTool", "random-uuid"],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        with format_log.open("w") as f:
            subprocess.run(
                [
                    *jvm,
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    "-t",
                    cluster_id,
                    "--add-scram",
                    f"SCRAM-SHA-256=[name={SASL_USERNAME},password={sasl_password}]",
                    "--add-scram",
                    f"SCRAM-SHA-512=[name={SASL_USERNAME},password={sasl_password}]",
                    "-c",
                    str(props),
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=120,
            )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, IndexError) as exc:
        raise TestbedError(
            f"kafka: formatting the storage failed ({exc}); log: {format_log}"
        ) from exc
    argv = [*jvm, "kafka.Kafka", str(props)]
    secure = SecureListener(
        bootstrap=f"127.0.0.1:{secure_port}",
        ca_file=tls.ca_file,
        username=SASL_USERNAME,
        password=sasl_password,
        mtls_bootstrap=f"127.0.0.1:{mtls_port}",
        client_cert_file=tls.client_cert_file,
        client_key_file=tls.client_key_file,
        sasl_plaintext_bootstrap=f"127.0.0.1:{sasl_plaintext_port}",
    )
    broker = KafkaBroker(f"127.0.0.1:{port}", sup.start("kafka", argv), data_dir, argv, secure)
    _wait_ready(broker)
    return broker
