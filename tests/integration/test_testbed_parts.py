"""Checks of the test bed's parts without its servers: node manifests, go.mod parsing,
process supervision (with tiny Python servers)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from tests.testbed.build import staging_modules
from tests.testbed.gpu_nodes import (
    GPU_RESOURCE,
    KWOK_ANNOTATION,
    KWOK_TAINT,
    NODEPOOL_LABEL,
    ZONE_LABEL,
    gpu_node_manifest,
)
from tests.testbed.procs import (
    PortInUseError,
    Supervisor,
    free_ports,
    retry_on_port_clash,
    wait_until,
)
from tests.testbed.versions import staging_version


def test_gpu_node_manifest_shape() -> None:
    node = gpu_node_manifest("n1", gpus=8, zone="us-east-1b", pool="h100")
    labels = node["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.count"] == "8"
    assert labels["nvidia.com/gpu.memory"] == "81559"
    assert labels[ZONE_LABEL] == "us-east-1b"
    assert labels["topology.kubernetes.io/region"] == "us-east-1"
    assert labels[NODEPOOL_LABEL] == "h100"
    assert node["metadata"]["annotations"][KWOK_ANNOTATION] == "fake"
    assert node["spec"]["taints"] == [KWOK_TAINT]
    capacity, allocatable = node["status"]["capacity"], node["status"]["allocatable"]
    # 8 GPUs -> 192 cores, 2 TiB; allocatable keeps back 1 % CPU, 2 % memory + 100 MiB.
    assert capacity == {
        "cpu": "192000m",
        "memory": str(2 * 1024**4),
        "pods": "110",
        "ephemeral-storage": str(500 * 1024**3),
        GPU_RESOURCE: "8",
    }
    assert allocatable["cpu"] == "190080m"
    assert allocatable["memory"] == str(2 * 1024**4 - 2 * 1024**4 // 50 - 100 * 1024**2)
    assert allocatable[GPU_RESOURCE] == "8"


def test_gpu_node_manifest_extra_taints_and_labels_win() -> None:
    gpu_taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    node = gpu_node_manifest(
        "n2", gpus=1, product="NVIDIA-L4", taints=[gpu_taint], labels={"type": "custom"}
    )
    assert node["spec"]["taints"] == [KWOK_TAINT, gpu_taint]
    assert node["metadata"]["labels"]["type"] == "custom"


def test_cpu_only_node_has_no_gpu_labels() -> None:
    node = gpu_node_manifest("cpu", gpus=0)
    assert GPU_RESOURCE not in node["status"]["capacity"]
    assert not any(k.startswith("nvidia.com/") for k in node["metadata"]["labels"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"product": "NVIDIA-Unknown"}, "unknown GPU product", id="unknown-product"),
        pytest.param({"gpus": -1}, "gpus must be", id="negative-gpus"),
        pytest.param({"cpu_millicores": 50}, "capacity too small", id="tiny-cpu"),
    ],
)
def test_gpu_node_manifest_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gpu_node_manifest("bad", **kwargs)  # type: ignore[arg-type]


def test_staging_modules_come_from_replace_directives() -> None:
    go_mod = """module k8s.io/kubernetes
require (
\tk8s.io/api v0.0.0
\tk8s.io/utils v0.0.0-20260626114624-be93311217bd
)
replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/cri-streaming => ./staging/src/k8s.io/cri-streaming
)
"""
    assert staging_modules(go_mod) == ["k8s.io/api", "k8s.io/cri-streaming"]
    assert staging_version("v1.37.2") == "v0.37.2"


_SERVE = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen()\n"
    "print('listening', flush=True); time.sleep(600)\n"
)


def _listening(log: Path) -> bool:
    # Not a connect probe: the port held by the test itself would answer it.
    return "listening" in log.read_text().splitlines()[1:]  # line 0 is the command


def test_port_clash_is_retried_on_fresh_ports(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    offered = [taken.getsockname()[1]]  # the first attempt gets a port someone holds
    attempts: list[int] = []

    def start() -> int:
        port = offered.pop() if offered else free_ports(1)[0]
        attempts.append(port)
        proc = sup.start("toy-server", [sys.executable, "-c", _SERVE, str(port)])
        wait_until("toy server", lambda: _listening(proc.log_path), timeout_s=20, watch=[proc])
        return port

    try:
        port = retry_on_port_clash(start)
        assert attempts == [taken.getsockname()[1], port]
    finally:
        taken.close()
        sup.stop_all()
    assert all(not p.alive() for p in sup.processes)


def test_port_clash_gives_up_after_three_attempts(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    calls = 0

    def start() -> None:
        nonlocal calls
        calls += 1
        proc = sup.start("toy-server", [sys.executable, "-c", _SERVE, str(port)])
        wait_until("toy server", lambda: None, timeout_s=20, watch=[proc])

    try:
        with pytest.raises(PortInUseError, match="toy-server exited"):
            retry_on_port_clash(start)
    finally:
        taken.close()
        sup.stop_all()
    assert calls == 3


def test_stop_all_kills_the_whole_process_group(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "logs")
    pid_file = tmp_path / "grandchild.pid"
    # A shell that ignores SIGTERM and leaves a grandchild behind: both must go.
    script = f"trap '' TERM; sleep 600 & echo $! > {pid_file}; wait"
    proc = sup.start("stubborn", ["bash", "-c", script])
    grandchild = wait_until(
        "grandchild pid", lambda: pid_file.read_text().strip() or None, timeout_s=10
    )
    sup.stop_all()
    assert proc.popen.poll() is not None
    assert (
        not Path(f"/proc/{grandchild}").exists()
        or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    )
