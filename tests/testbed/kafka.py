"""A single-node Apache Kafka 4 broker (KRaft, combined broker + controller) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.testbed.build import Artefacts
from tests.testbed.procs import (
    Process,
    Supervisor,
    TestbedError,
    free_ports,
    retry_on_port_clash,
    wait_until,
)

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


@dataclass
class KafkaBroker:
    """A running broker: ``bootstrap`` is ``"127.0.0.1:<port>"`` for any Kafka client.

    ``process`` is the current broker process (replaced by :func:`restart_kafka`);
    ``argv`` its command line, reused on restart (same ports, same data).
    """

    bootstrap: str
    process: Process
    data_dir: Path
    argv: list[str]


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


def _server_properties(port: int, controller_port: int, data_dir: Path) -> str:
    listeners = f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}"
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
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
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
    port, controller_port = free_ports(2)
    kdir = run_dir / "kafka"
    if kdir.exists():  # a previous attempt lost a port: the storage names the old one
        shutil.rmtree(kdir)
    data_dir = kdir / "data"
    data_dir.mkdir(parents=True)
    props = kdir / "server.properties"
    props.write_text(_server_properties(port, controller_port, data_dir))
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
    broker = KafkaBroker(f"127.0.0.1:{port}", sup.start("kafka", argv), data_dir, argv)
    _wait_ready(broker)
    return broker
