"""Pure checks of the test bed's builders (no servers): node manifests, go.mod parsing."""

from __future__ import annotations

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
