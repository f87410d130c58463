"""Processes of the test bed: each in its own process group, all killed at the end.

Every server is started by :class:`Supervisor.start` with its output in a log file of the
run's temporary folder. :meth:`Supervisor.stop_all` signals whole process groups (SIGTERM,
then SIGKILL after a grace period), so children of children go too. It runs at fixture
teardown, and again from ``atexit`` and on SIGTERM as a safety net (Ctrl-C raises
KeyboardInterrupt, so teardown and ``atexit`` both run). Each child also asks the kernel
to SIGKILL it if the process that started it dies (``PR_SET_PDEATHSIG``), which covers a
``kill -9`` of pytest itself. That signal fires when the *thread* that forked the child
exits, so every child is forked by one long-lived spawner thread: starting a server from
``asyncio.to_thread`` or any short-lived thread is safe.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

_PR_SET_PDEATHSIG = 1
_STOP_GRACE_S = 5.0
_LOG_TAIL_LINES = 30

T = TypeVar("T")


class TestbedError(RuntimeError):
    """A test-bed component failed to start or to become ready (names it and its log)."""

    __test__ = False  # not a pytest test class, despite the name


class PortInUseError(TestbedError):
    """A server exited because a port picked by :func:`free_ports` was taken meanwhile."""


_PORT_ATTEMPTS = 3


def retry_on_port_clash(start: Callable[[], T]) -> T:
    """Call ``start`` (which picks fresh ports each call) again if a port clash killed it.

    Ports are picked free and bound a moment later by the server; another test bed or an
    outgoing connection may take one in between. That is rare, so three attempts suffice.
    """
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        try:
            return start()
        except PortInUseError:
            if attempt == _PORT_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback TCP ports that are free right now.

    All sockets are held open until every port is picked, so the ports are distinct; the
    kernel hands out ephemeral ports round-robin, so reuse before our servers bind is rare.
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Process:
    """One running server: its name (for error messages), Popen handle and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_wave: int = 1

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def check_alive(self) -> None:
        """Raise TestbedError (with the log's tail) if the process has exited.

        PortInUseError when its log says a port was taken (see :func:`retry_on_port_clash`).
        """
        code = self.popen.poll()
        if code is not None:
            tail = log_tail(self.log_path)
            error = PortInUseError if "address already in use" in tail.lower() else TestbedError
            raise error(
                f"{self.name} exited with code {code}; log: {self.log_path}\n"
                f"--- last lines ---\n{tail}"
            )


@dataclass
class Supervisor:
    """Starts processes and guarantees they are all stopped (process groups, then SIGKILL).

    Safe to use from any thread (children are forked by a spawner thread that lives as
    long as the interpreter).
    """

    log_dir: Path
    processes: list[Process] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop_all)
        _install_sigterm_handler()
        _SUPERVISORS.append(self)

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        stop_wave: int = 1,
    ) -> Process:
        """Start ``argv`` in a new session (own process group), output to ``<log_dir>/<name>.log``.

        ``stop_wave``: processes with a higher wave are stopped first (clients before servers).
        """
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            log.write(("$ " + " ".join(argv) + "\n").encode())
            log.flush()
            try:
                popen = _SPAWNER.submit(
                    subprocess.Popen,
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                ).result()
            except OSError as exc:
                raise TestbedError(f"{name}: cannot start {argv[0]}: {exc}") from exc
        proc = Process(name, popen, log_path, stop_wave)
        with self._lock:
            self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every process group: SIGTERM, wait up to 5 s, then SIGKILL. Idempotent.

        Processes go in waves by ``stop_wave`` (highest first), so that e.g. kube-apiserver
        can still reach etcd while it shuts down instead of hanging until the SIGKILL.
        """
        with self._lock:
            procs, self.processes = list(self.processes), []
        for wave in sorted({p.stop_wave for p in procs}, reverse=True):
            _stop_group([p for p in reversed(procs) if p.stop_wave == wave])


def _stop_group(procs: list[Process]) -> None:
    for proc in procs:
        _signal_group(proc.popen, signal.SIGTERM)
    deadline_s = time.monotonic() + _STOP_GRACE_S
    for proc in procs:
        remaining_s = max(0.0, deadline_s - time.monotonic())
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(remaining_s)
        # SIGKILL the group even if the leader exited: a grandchild may linger.
        _signal_group(proc.popen, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5.0)


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The child called setsid(), so its pid is its process-group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


_SUPERVISORS: list[Supervisor] = []
# Its one worker thread idles until interpreter exit, so PR_SET_PDEATHSIG (tied to the
# forking thread) fires only when the whole process goes.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="testbed-spawner")
_HANDLER_INSTALLED = False


def _install_sigterm_handler() -> None:
    """On SIGTERM (CI timeout, kill), stop the servers, then die as SIGTERM would."""
    global _HANDLER_INSTALLED
    if _HANDLER_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: FrameType | None) -> None:
        for sup in _SUPERVISORS:
            sup.stop_all()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)
    _HANDLER_INSTALLED = True


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout_s: float,
    watch: list[Process] | None = None,
    interval_s: float = 0.2,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe`` until it returns a value other than None/False, or fail after ``timeout_s``.

    ``probe`` may raise; its last error is reported. Every process in ``watch`` is checked
    on each round, so a server that crashed fails fast with its log instead of timing out.
    On timeout the message has ``describe()`` (the state reached) if given, else the tail
    of the last watched process's log.
    """
    deadline_s = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        for proc in watch or []:
            proc.check_alive()
        try:
            result = probe()
        except Exception as exc:  # the probe's failure is the expected "not yet"
            last_error = exc
        else:
            if result is not None and result is not False:
                return result
        if time.monotonic() >= deadline_s:
            logs = "".join(f"\n  {p.name}: {p.log_path}" for p in watch or [])
            if describe is not None:
                try:
                    state = describe()
                except Exception as exc:  # describing is best effort
                    state = f"(cannot describe: {exc!r})"
                raise TestbedError(
                    f"timed out after {timeout_s:.0f} s waiting for {what}; state: {state}"
                    f" (last error: {last_error!r}); logs:{logs}"
                )
            tail = (
                f"\n--- last lines of {watch[-1].log_path} ---\n{log_tail(watch[-1].log_path)}"
                if watch
                else ""
            )
            raise TestbedError(
                f"timed out after {timeout_s:.0f} s waiting for {what}"
                f" (last error: {last_error!r}); logs:{logs}{tail}"
            )
        time.sleep(interval_s)


async def async_wait_until(
    what: str,
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout_s: float,
    interval_s: float = 0.1,
) -> T:
    """Await ``probe()`` until it returns a value other than None/False, at most ``timeout_s``.

    For conditions that offer no event to await (e.g. a topic deletion finishing in the
    Kafka controller). Raises TestbedError naming ``what`` on timeout.
    """
    loop = asyncio.get_running_loop()
    deadline_s = loop.time() + timeout_s
    while True:
        result = await probe()
        if result is not None and result is not False:
            return result
        if loop.time() >= deadline_s:
            raise TestbedError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval_s)
