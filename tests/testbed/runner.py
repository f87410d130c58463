"""One run of the test bed: a temporary folder, a supervisor, and lazily started parts.

:class:`TestbedRun` starts Kafka and the Kubernetes control planes only when first asked
for, each at most once (a failed start is remembered and re-raised, not retried), and
:meth:`TestbedRun.close` stops every process. The pytest fixtures and ``python -m
tests.testbed up`` are thin layers over it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.testbed import kafka, versions
from tests.testbed.build import Artefacts, artefacts
from tests.testbed.kafka import KafkaBroker, start_kafka
from tests.testbed.kube import KubeTestbed, start_kube
from tests.testbed.procs import Supervisor, TestbedError

T = TypeVar("T")


class TestbedRun:
    """Lazily started test bed with logs and data under one temporary folder.

    ``run_dir`` holds ``logs/<component>.log`` for every process; it is deleted by
    :meth:`close` unless a start failed or ``keep`` is passed, so failures can be read.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, run_dir: Path | None = None) -> None:
        _sweep_abandoned_runs()
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix=_RUN_PREFIX))
        # Lets a later run tell a folder abandoned by a killed process from a live one.
        (self.run_dir / _OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.supervisor = Supervisor(self.run_dir / "logs")
        self._kafka: KafkaBroker | TestbedError | None = None
        self._kube: KubeTestbed | TestbedError | None = None
        self._failed = False
        self.start_times_s: dict[str, float] = {}

    def _artefacts(self, needed: set[str]) -> Artefacts:
        arts = artefacts()
        missing = [name for name in arts.missing() if name in needed]
        if missing:
            raise TestbedError(
                f"test bed not built (missing: {', '.join(missing)} in {arts.root}); "
                "run `make testbed` (a cold build takes ~15 min on 2 cores)"
            )
        return arts

    def kafka(self) -> KafkaBroker:
        """The broker, started on first call (raises TestbedError if it cannot start)."""
        if self._kafka is None:
            self._kafka = self._start(
                "kafka", {"kafka"}, lambda a: start_kafka(a, self.supervisor, self.run_dir)
            )
        if isinstance(self._kafka, TestbedError):
            raise self._kafka
        return self._kafka

    def stop_kafka(self) -> None:
        """Stop the session's broker cleanly (for outage tests); ``restart_kafka`` brings it back.

        Blocking; from async tests use ``await asyncio.to_thread(run.stop_kafka)``.
        """
        kafka.stop_kafka(self.kafka())

    def restart_kafka(self) -> KafkaBroker:
        """Restart the broker on the same address and data; return once it lists topics.

        Blocking (a few seconds); from async tests ``await asyncio.to_thread(run.restart_kafka)``.
        """
        return kafka.restart_kafka(self.kafka(), self.supervisor)

    def kube(self) -> KubeTestbed:
        """The control planes, started on first call (raises TestbedError if they cannot)."""
        if self._kube is None:
            self._kube = self._start(
                "kube",
                {"etcd", "kubernetes", "kwok"},
                lambda a: start_kube(a, self.supervisor, self.run_dir),
            )
        if isinstance(self._kube, TestbedError):
            raise self._kube
        return self._kube

    def _start(
        self, what: str, needed: set[str], start: Callable[[Artefacts], T]
    ) -> T | TestbedError:
        started_s = time.monotonic()
        try:
            result = start(self._artefacts(needed))
        except TestbedError as exc:
            self._failed = True
            return exc
        except Exception as exc:  # anything else is still a test-bed failure, with context
            self._failed = True
            return TestbedError(
                f"{what}: {type(exc).__name__}: {exc}; logs in {self.supervisor.log_dir}"
            )
        self.start_times_s[what] = time.monotonic() - started_s
        return result

    def close(self, keep: bool = False) -> None:
        """Stop every process; remove the run folder unless ``keep`` or a start failed.

        A kept folder holds a ``KEPT`` file; the sweep of later runs leaves it alone.
        """
        if isinstance(self._kube, KubeTestbed):
            self._kube.close()
        self.supervisor.stop_all()
        has_logs = any(self.supervisor.log_dir.iterdir())
        if keep or (self._failed and has_logs):  # nothing started: nothing worth keeping
            (self.run_dir / _KEEP_FILE).write_text("kept for its logs\n")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)


_RUN_PREFIX = "fleetd-testbed-"
_OWNER_FILE = "owner.pid"
_KEEP_FILE = "KEPT"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_abandoned_runs() -> None:
    """Remove run folders whose owner died without cleaning up (e.g. ``kill -9`` of pytest).

    Its servers died with it (PR_SET_PDEATHSIG); only the folder is left. Folders kept on
    purpose (a failed start, FLEETD_TESTBED_KEEP=1) carry a KEPT file and stay.
    """
    for folder in Path(tempfile.gettempdir()).glob(_RUN_PREFIX + "*"):
        try:
            owner = int((folder / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if not (folder / _KEEP_FILE).exists() and not _pid_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)


def run_until_interrupted() -> int:
    """``python -m tests.testbed up``: start everything, print how to reach it, wait for Ctrl-C."""
    # The readiness probe's refused connections are expected; do not print them.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    run = TestbedRun()
    try:
        broker = run.kafka()
        kube = run.kube()
        print(f"kafka {versions.KAFKA_VERSION}: bootstrap {broker.bootstrap}")
        print(
            f"kubernetes {versions.KUBERNETES_VERSION}: kubeconfig {kube.kubeconfig_path} "
            f"(contexts {', '.join(kube.contexts)})"
        )
        print(f"logs: {run.supervisor.log_dir}")
        print(f"started in: {', '.join(f'{k} {v:.1f} s' for k, v in run.start_times_s.items())}")
        print("Ctrl-C stops every process.", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    except TestbedError as exc:
        print(f"testbed: {exc}")
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        run.close(keep=run._failed)
    return 0
