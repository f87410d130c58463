"""Telemetry records <-> update values: round trips and every rejection reason."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetd.sources.codec import (
    InvalidTelemetry,
    decode,
    encode_node,
    encode_node_deleted,
    encode_pool,
    encode_pool_deleted,
    node_key,
    pool_key,
    record_key,
)
from fleetd.sources.updates import (
    CapacityType,
    GpuDevice,
    NodePoolRemoved,
    NodePoolUpdate,
    NodeRemoved,
    NodeUpdate,
    PodObserved,
    Resources,
    SequenceGate,
    Taint,
)
from fleetd.v1 import telemetry_pb2 as pb

GIB = 1024**3


def gpu_node(name: str = "n1", *, gpus: int = 8, model: str = "H100", pods: int = 1) -> NodeUpdate:
    """A NodeUpdate as the Kafka path produces it (pods reported with the node)."""
    res = Resources(cpu_millicores=96_000, memory_bytes=768 * GIB, gpus=gpus, pods=110)
    return NodeUpdate(
        cluster="c1",
        name=name,
        sequence=5,
        capacity=res,
        allocatable=res,
        labels=(("cloud.google.com/gke-nodepool", "a3"), ("topology.kubernetes.io/zone", "z1")),
        taints=(Taint("nvidia.com/gpu", "present", "NoSchedule"),),
        node_pool="a3",
        zone="z1",
        capacity_type=CapacityType.ON_DEMAND,
        gpu_model=model if gpus else "",
        gpu_memory_bytes=80 * GIB if gpus else 0,
        gpus=tuple(
            GpuDevice(index=i, model=model, memory_bytes=80 * GIB, healthy=True, uuid=f"GPU-{i}")
            for i in range(gpus)
        ),
        pods=tuple(
            PodObserved(
                cluster="c1",
                namespace="ml",
                name=f"p{i}",
                uid=f"u{i}",
                node=name,
                requests=Resources(cpu_millicores=1000, gpus=1),
                sequence=5,
            )
            for i in range(pods)
        ),
        observed_at_s=1.5,
    )


def roundtrip(update: NodeUpdate) -> NodeUpdate:
    record = encode_node(update, sequence=update.sequence, observed_unix_ms=1500)
    decoded = decode(record_key(record), record.SerializeToString())
    assert isinstance(decoded, NodeUpdate)
    return decoded


def test_node_roundtrip() -> None:
    node = gpu_node()
    assert roundtrip(node) == node


def test_keys() -> None:
    assert node_key("c1", "n1") == b"c1/n1"
    assert pool_key("c1", "a3") == b"c1/pool/a3"


def test_deletions_and_pools_roundtrip() -> None:
    pool = NodePoolUpdate(
        cluster="c1", name="a3", sequence=9, instance_type="a3-highgpu-8g",
        allocatable=Resources(cpu_millicores=200_000, gpus=8), gpu_model="H100",
        gpu_memory_bytes=80 * GIB, price_per_hour=98.32, capacity_type=CapacityType.SPOT,
        min_size=0, max_size=16, current_size=3, zones=("z1", "z2"),
        taints=(Taint("nvidia.com/gpu", "", "NoSchedule"),),
    )  # fmt: skip
    for record, expected in [
        (encode_pool(pool, sequence=9, observed_unix_ms=1), pool),
        (encode_node_deleted("c1", "n1", sequence=3, observed_unix_ms=1), NodeRemoved("c1", "n1", 3)),
        (encode_pool_deleted("c1", "a3", sequence=4, observed_unix_ms=1), NodePoolRemoved("c1", "a3", 4)),
    ]:  # fmt: skip
        assert decode(record_key(record), record.SerializeToString()) == expected


def test_application_xids_keep_a_gpu_healthy_others_do_not() -> None:
    record = encode_node(gpu_node(gpus=2, pods=0), sequence=1, observed_unix_ms=1)
    record.node.gpus[0].xid_errors.append(13)  # graphics engine exception: the app's fault
    record.node.gpus[1].xid_errors.append(79)  # fallen off the bus
    decoded = decode(None, record.SerializeToString())
    assert isinstance(decoded, NodeUpdate)
    assert [g.healthy for g in decoded.gpus] == [True, False]
    assert decoded.gpus[1].xid_errors == (79,)


def _record() -> pb.TelemetryRecord:
    return encode_node(gpu_node(gpus=2), sequence=5, observed_unix_ms=1)


def _mutated(mutate: str) -> tuple[bytes | None, bytes]:
    r = _record()
    key: bytes | None = record_key(r)
    if mutate == "cluster":
        r.cluster = ""
    elif mutate == "sequence":
        r.sequence = 0
    elif mutate == "payload":
        r.ClearField("node")
    elif mutate == "name":
        r.node.name = "bad name!"
        key = None
    elif mutate == "cpu":
        r.node.capacity.cpu_millicores = -1
    elif mutate == "dup-gpu":
        r.node.gpus[1].index = 0
    elif mutate == "utilization":
        r.node.gpus[0].utilization_ratio = 1.5
    elif mutate == "health":
        r.node.gpus[0].health = pb.GPU_HEALTH_UNSPECIFIED
    elif mutate == "taint":
        r.node.taints[0].effect = "Maybe"
    elif mutate == "mig":
        r.node.allocatable.mig_devices["huge"] = 1
    elif mutate == "pod":
        r.node.pods[0].name = ""
    elif mutate == "key":
        key = b"c1/other-node"
    return key, r.SerializeToString()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        ("cluster", "bad-name"),
        ("sequence", "no-sequence"),
        ("payload", "no-payload"),
        ("name", "bad-name"),
        ("cpu", "bad-resources"),
        ("dup-gpu", "bad-gpus"),
        ("utilization", "bad-gpus"),
        ("health", "bad-gpus"),
        ("taint", "bad-taint"),
        ("mig", "bad-mig-profile"),
        ("pod", "bad-pods"),
        ("key", "key-mismatch"),
    ],
)
def test_invalid_records_are_rejected_with_a_reason(mutate: str, reason: str) -> None:
    key, value = _mutated(mutate)
    with pytest.raises(InvalidTelemetry) as err:
        decode(key, value)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    ("value", "reason"),
    [(b"", "empty"), (None, "empty"), (b"\xff\xff\xff", "undecodable"), (b"{json: 1}", "undecodable")],
    ids=["empty", "none", "garbage", "json"],
)  # fmt: skip
def test_undecodable(value: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidTelemetry) as err:
        decode(b"k", value)
    assert err.value.reason == reason


def test_pool_bounds_are_validated() -> None:
    record = encode_pool_deleted("c", "p", sequence=1, observed_unix_ms=1)
    record.node_pool.name = "p"
    record.node_pool.min_size = 5
    record.node_pool.max_size = 2
    with pytest.raises(InvalidTelemetry, match="min_size"):
        decode(None, record.SerializeToString())
    record.node_pool.max_size = 9
    record.node_pool.price_per_hour = float("nan")
    with pytest.raises(InvalidTelemetry, match="price"):
        decode(None, record.SerializeToString())


@settings(max_examples=40, deadline=None)
@given(
    gpus=st.integers(0, 16),
    pods=st.integers(0, 5),
    sequence=st.integers(1, 2**63),
    cordoned=st.booleans(),
    labels=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=4),
)
def test_roundtrip_property(
    gpus: int, pods: int, sequence: int, cordoned: bool, labels: dict[str, str]
) -> None:
    node = dataclasses.replace(
        gpu_node(gpus=gpus, pods=pods),
        sequence=sequence,
        unschedulable=cordoned,
        labels=tuple(sorted(labels.items())),
        node_pool="a3",
        zone="z1",
        capacity_type=CapacityType.UNSPECIFIED,
    )
    node = dataclasses.replace(
        node, pods=tuple(dataclasses.replace(p, sequence=sequence) for p in node.pods or ())
    )
    assert roundtrip(node) == node


def test_sequence_gate_makes_redelivery_harmless() -> None:
    gate = SequenceGate()
    a5, a6 = gpu_node("a"), dataclasses.replace(gpu_node("a"), sequence=6)
    b5 = gpu_node("b")
    assert gate.filter([a5, b5, a6]) == [a5, b5, a6]
    # Redelivery of everything: nothing passes twice; an older record after a newer one neither.
    assert gate.filter([a5, b5, a6]) == []
    removed = NodeRemoved("c1", "a", 7)
    assert gate.filter([removed, a6]) == [removed]
    assert gate.last("c1", "node", "a") == 7
