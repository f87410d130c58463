"""Telemetry records (fleetd.v1.TelemetryRecord, protobuf) <-> update values.

`decode` is the Kafka edge: it parses and validates one record and raises
`InvalidTelemetry` (reason: a short metric label) for anything fleetd must not apply;
the consumer sends such records to the dead-letter topic. `encode_*` is what the
publisher (`fleetd.sources.publisher`) and the load generator use.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from google.protobuf.message import DecodeError
from numpy.typing import NDArray

from fleetd.sources.translate import (
    LABEL_INSTANCE_TYPES,
    LABEL_REGIONS,
    LABEL_ZONES,
    TAINT_EFFECTS,
    capacity_type_of,
    first_label,
    node_pool_of,
)
from fleetd.sources.updates import (
    CapacityType,
    GpuDevice,
    NodeInventoryChunk,
    NodePoolRemoved,
    NodePoolUpdate,
    NodeRemoved,
    NodeRequirement,
    NodeUpdate,
    PendingPod,
    PendingPodRemoved,
    PodObserved,
    PodToleration,
    Resources,
    Taint,
    Update,
    new_gpu_device,
    new_node_update,
    new_pod_observed,
)
from fleetd.v1 import telemetry_pb2 as pb

#: Upper bounds that catch garbage without limiting any real machine.
MAX_GPUS_PER_NODE = 64
MAX_PODS_PER_NODE = 4096
MAX_NAME_CHARS = 253
MAX_VALUE = 2**62
#: Node inventories: names per cluster (the largest Kubernetes clusters run ~65,000 nodes),
#: chunks per inventory (at INVENTORY_CHUNK_BYTES, 200,000 names of the longest legal
#: length take 100), and how many bytes of names the publisher puts in one chunk: a chunk
#: record stays below half of Kafka's default 1 MB max message size (broker
#: `message.max.bytes`, producer `max.request.size`), whatever the names.
MAX_INVENTORY_NODES = 200_000
MAX_INVENTORY_CHUNKS = 128
INVENTORY_CHUNK_BYTES = 512 * 1024

#: XIDs that point at the application, not the GPU: the NVIDIA device plugin ignores them
#: when it marks devices unhealthy (k8s-device-plugin, internal/rm/health.go).
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})

_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_MIG_PROFILE_RE = re.compile(r"^[0-9]+g\.[0-9]+gb$")

_CAPACITY_TO_PB = {
    CapacityType.UNSPECIFIED: pb.CAPACITY_TYPE_UNSPECIFIED,
    CapacityType.ON_DEMAND: pb.CAPACITY_TYPE_ON_DEMAND,
    CapacityType.SPOT: pb.CAPACITY_TYPE_SPOT,
    CapacityType.RESERVED: pb.CAPACITY_TYPE_RESERVED,
}
_CAPACITY_FROM_PB = {v: k for k, v in _CAPACITY_TO_PB.items()}


class InvalidTelemetry(ValueError):
    """A record fleetd will not apply. `reason` is a short, stable metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def node_key(cluster: str, node: str) -> bytes:
    """The Kafka key of a node's records: every update of one node on one partition."""
    return f"{cluster}/{node}".encode()


def pool_key(cluster: str, pool: str) -> bytes:
    """The Kafka key of a node pool's records."""
    return f"{cluster}/pool/{pool}".encode()


def inventory_key(cluster: str, chunk_index: int) -> bytes:
    """The Kafka key of a node inventory's chunk (one key per chunk: the consumer keeps the
    newest record of each key in a poll, and every chunk of an inventory is needed)."""
    return f"{cluster}/inventory/{chunk_index}".encode()


# ---------------------------------------------------------------------------- encode


def _resources_pb(r: Resources, out: pb.Resources) -> None:
    out.cpu_millicores = r.cpu_millicores
    out.memory_bytes = r.memory_bytes
    out.gpus = r.gpus
    out.pods = r.pods
    out.ephemeral_storage_bytes = r.ephemeral_storage_bytes
    for profile, n in r.mig_devices:
        out.mig_devices[profile] = n


def _taints_pb(taints: tuple[Taint, ...], out: object) -> None:
    for t in taints:
        out.add(key=t.key, value=t.value, effect=t.effect)  # type: ignore[attr-defined]


def encode_node(update: NodeUpdate, *, sequence: int, observed_unix_ms: int) -> pb.TelemetryRecord:
    """A NodeUpdate (with its pods, if any) as a TelemetryRecord."""
    record = pb.TelemetryRecord(
        cluster=update.cluster, sequence=sequence, observed_unix_ms=observed_unix_ms
    )
    node = record.node
    node.name = update.name
    _resources_pb(update.capacity, node.capacity)
    _resources_pb(update.allocatable, node.allocatable)
    node.labels.update(dict(update.labels))
    _taints_pb(update.taints, node.taints)
    node.unschedulable = update.unschedulable
    node.ready = update.ready
    node.node_pool = update.node_pool
    node.zone = update.zone
    for g in update.gpus:
        node.gpus.add(
            index=g.index,
            uuid=g.uuid,
            model=g.model,
            memory_bytes=g.memory_bytes,
            health=pb.GPU_HEALTH_HEALTHY if g.healthy else pb.GPU_HEALTH_UNHEALTHY,
            xid_errors=list(g.xid_errors),
            utilization_ratio=g.utilization_ratio,
            mig_profile=g.mig_profile,
        )
    for p in update.pods or ():
        pod = node.pods.add(namespace=p.namespace, name=p.name, uid=p.uid, phase=p.phase)
        _resources_pb(p.requests, pod.requests)
        pod.labels.update(dict(p.labels))
    return record


def encode_node_deleted(
    cluster: str, name: str, *, sequence: int, observed_unix_ms: int
) -> pb.TelemetryRecord:
    """A node deletion as a TelemetryRecord."""
    record = pb.TelemetryRecord(
        cluster=cluster, sequence=sequence, observed_unix_ms=observed_unix_ms
    )
    record.node_deleted.name = name
    return record


def encode_pool(
    update: NodePoolUpdate, *, sequence: int, observed_unix_ms: int
) -> pb.TelemetryRecord:
    """A NodePoolUpdate as a TelemetryRecord."""
    record = pb.TelemetryRecord(
        cluster=update.cluster, sequence=sequence, observed_unix_ms=observed_unix_ms
    )
    pool = record.node_pool
    pool.name = update.name
    pool.shape.instance_type = update.instance_type
    _resources_pb(update.allocatable, pool.shape.allocatable)
    pool.shape.gpu_model = update.gpu_model
    pool.shape.gpu_memory_bytes = update.gpu_memory_bytes
    pool.shape.labels.update(dict(update.labels))
    _taints_pb(update.taints, pool.shape.taints)
    pool.price_per_hour = update.price_per_hour
    pool.capacity_type = _CAPACITY_TO_PB[update.capacity_type]
    pool.min_size = update.min_size
    pool.max_size = update.max_size
    pool.current_size = update.current_size
    pool.zones.extend(update.zones)
    return record


def encode_pool_deleted(
    cluster: str, name: str, *, sequence: int, observed_unix_ms: int
) -> pb.TelemetryRecord:
    """A node-pool deletion as a TelemetryRecord."""
    record = pb.TelemetryRecord(
        cluster=cluster, sequence=sequence, observed_unix_ms=observed_unix_ms
    )
    record.node_pool_deleted.name = name
    return record


def _name_size(name: str) -> int:
    """Bytes one `node_names` entry takes in a NodeInventory (tag, length, text)."""
    n = len(name.encode())
    return 1 + len(_varint_bytes(n)) + n


def encode_node_inventory(
    cluster: str,
    names: list[str] | tuple[str, ...],
    *,
    sequence: int,
    observed_unix_ms: int,
    chunk_bytes: int = INVENTORY_CHUNK_BYTES,
    pools: list[str] | tuple[str, ...] | None = None,
) -> list[pb.TelemetryRecord]:
    """A cluster's node inventory (every node name, taken at `sequence`) as its chunk
    records: names sorted, at most `chunk_bytes` of names per chunk, every chunk with the
    same sequence (publish each under `record_key`). An empty cluster is one empty chunk.
    `pools` (the cluster's node pools, when listed) go in chunk 0, within its budget."""
    pool_names = sorted(set(pools or ()))
    chunks: list[list[str]] = [[]]
    size = sum(map(_name_size, pool_names))
    for name in sorted(set(names)):
        n = _name_size(name)
        if size and size + n > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += n
    records = []
    for i, chunk in enumerate(chunks):
        record = pb.TelemetryRecord(
            cluster=cluster, sequence=sequence, observed_unix_ms=observed_unix_ms
        )
        inventory = record.node_inventory
        inventory.node_names.extend(chunk)
        inventory.chunk_index = i
        inventory.chunk_count = len(chunks)
        if i == 0 and pools is not None:
            inventory.node_pool_names.extend(pool_names)
            inventory.lists_node_pools = True
        records.append(record)
    return records


def record_key(record: pb.TelemetryRecord) -> bytes:
    """The Kafka key a record must be published under."""
    kind = record.WhichOneof("payload")
    if kind == "node":
        return node_key(record.cluster, record.node.name)
    if kind == "node_deleted":
        return node_key(record.cluster, record.node_deleted.name)
    if kind == "node_pool":
        return pool_key(record.cluster, record.node_pool.name)
    if kind == "node_pool_deleted":
        return pool_key(record.cluster, record.node_pool_deleted.name)
    if kind == "pending_pod":
        return pending_key(record.cluster, record.pending_pod.namespace, record.pending_pod.name)
    if kind == "pending_pod_deleted":
        gone = record.pending_pod_deleted
        return pending_key(record.cluster, gone.namespace, gone.name)
    if kind == "node_inventory":
        return inventory_key(record.cluster, record.node_inventory.chunk_index)
    raise InvalidTelemetry("no-payload", "record has no payload")


# ---------------------------------------------------------------------------- decode


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise InvalidTelemetry("bad-name", f"{what} {value[:80]!r} is not a valid name")
    return value


def _check_count(value: int, what: str) -> int:
    if value < 0 or value > MAX_VALUE:
        raise InvalidTelemetry("bad-resources", f"{what} = {value} is out of range")
    return value


_EMPTY_RESOURCES = Resources()
#: (cpu, memory, gpus, pods, storage) -> the Resources value without MIG devices.
_RESOURCES: dict[tuple[int, int, int, int, int], Resources] = {}


def _resources(r: pb.Resources, what: str) -> Resources:
    # Hot path (every node and pod of every record): read each field once, format error
    # text only on error.
    cpu, memory, gpus = r.cpu_millicores, r.memory_bytes, r.gpus
    pods, storage = r.pods, r.ephemeral_storage_bytes
    # (The OR of the values is negative if one is, and above MAX_VALUE if one is: the
    # field-by-field check runs only then, to name the field or find all in range.)
    any_bits = cpu | memory | gpus | pods | storage
    if any_bits < 0 or any_bits > MAX_VALUE:
        for field_name, value in (
            ("cpu_millicores", cpu),
            ("memory_bytes", memory),
            ("gpus", gpus),
            ("pods", pods),
            ("ephemeral_storage_bytes", storage),
        ):
            if value < 0 or value > MAX_VALUE:
                raise InvalidTelemetry(
                    "bad-resources", f"{what}.{field_name} = {value} is out of range"
                )
    if not r.mig_devices:
        if not any_bits:
            return _EMPTY_RESOURCES
        # Requests and shapes repeat across pods and nodes: share one frozen value each.
        key = (cpu, memory, gpus, pods, storage)
        known = _RESOURCES.get(key)
        if known is None:
            if len(_RESOURCES) >= _CACHE_LIMIT:
                _RESOURCES.clear()
            known = _RESOURCES[key] = Resources(cpu, memory, gpus, (), pods, storage)
        return known
    mig: tuple[tuple[str, int], ...] = ()
    if r.mig_devices:
        items = []
        for profile, n in sorted(r.mig_devices.items()):
            if not _MIG_PROFILE_RE.match(profile):
                raise InvalidTelemetry("bad-mig-profile", f"{what}.mig_devices[{profile[:40]!r}]")
            if _check_count(n, f"{what}.mig_devices[{profile}]"):
                items.append((profile, n))
        mig = tuple(items)
    if not (cpu or memory or gpus or pods or storage or mig):
        return _EMPTY_RESOURCES
    return Resources(cpu, memory, gpus, mig, pods, storage)


def _taints(items: object, what: str) -> tuple[Taint, ...]:
    taints = []
    for t in items:  # type: ignore[attr-defined]
        if not t.key or t.effect not in TAINT_EFFECTS:
            raise InvalidTelemetry("bad-taint", f"{what}: {t.key!r} effect {t.effect!r}")
        taints.append(Taint(key=t.key, value=t.value, effect=t.effect))
    return tuple(taints)


def _node(
    record: pb.TelemetryRecord,
    cluster: str,
    sequence: int,
    observed_s: float,
    content_token: bytes = b"",
) -> NodeUpdate:
    return _node_of(record.node, cluster, sequence, observed_s, content_token, None)


def _node_of(
    n: pb.NodeReport,
    cluster: str,
    sequence: int,
    observed_s: float,
    content_token: bytes,
    previous: NodeUpdate | None,
) -> NodeUpdate:
    """A reported node, validated (InvalidTelemetry). With `previous`, `n` has no GPUs and
    no pods (fields before them only) and the update takes `previous`'s."""
    name = _check_name(n.name, "node.name")
    labels = dict(n.labels)
    if len(n.gpus) > MAX_GPUS_PER_NODE:
        raise InvalidTelemetry("bad-gpus", f"node {name}: {len(n.gpus)} GPUs")
    if len(n.pods) > MAX_PODS_PER_NODE:
        raise InvalidTelemetry("bad-pods", f"node {name}: {len(n.pods)} pods")
    if previous is None:
        gpus = tuple(_gpu_devices(n.gpus, name))
        pods = tuple(_pods(n, cluster, name, sequence))
        # A node's GPUs are one model in practice; the first device speaks for the node.
        gpu_model = gpus[0].model if gpus else ""
        gpu_memory_bytes = gpus[0].memory_bytes if gpus else 0
    else:
        gpus, pods = previous.gpus, previous.pods  # type: ignore[assignment]
        gpu_model, gpu_memory_bytes = previous.gpu_model, previous.gpu_memory_bytes
    return new_node_update(
        cluster,
        name,
        sequence,
        _resources(n.capacity, "node.capacity"),
        _resources(n.allocatable, "node.allocatable"),
        tuple(sorted(labels.items())),
        _taints(n.taints, "node.taints"),
        n.unschedulable,
        n.ready,
        n.node_pool or node_pool_of(labels),
        n.zone or first_label(labels, LABEL_ZONES),
        first_label(labels, LABEL_REGIONS),
        first_label(labels, LABEL_INSTANCE_TYPES),
        capacity_type_of(labels),
        gpu_model,
        gpu_memory_bytes,
        gpus,
        pods,
        observed_s,
        content_token,
    )


def _gpu_devices(items: Sequence[pb.Gpu], name: str) -> list[GpuDevice]:
    """A node's reported GPUs, validated (InvalidTelemetry), sorted by index."""
    seen: set[int] = set()
    gpus = [_gpu_device(g, name, seen) for g in items]
    if any(gpus[i].index > gpus[i + 1].index for i in range(len(gpus) - 1)):
        gpus.sort(key=lambda d: d.index)
    return gpus


_HEALTHY = pb.GPU_HEALTH_HEALTHY
_HEALTH_UNSPECIFIED = pb.GPU_HEALTH_UNSPECIFIED


def _gpu_device(g: pb.Gpu, name: str, seen: set[int]) -> GpuDevice:
    """One reported GPU of node `name`, validated (InvalidTelemetry); `seen` holds the
    indices of the node's GPUs before it, and gets its own."""
    index, health, utilization = g.index, g.health, g.utilization_ratio
    memory_bytes, xids = g.memory_bytes, tuple(g.xid_errors)
    if index in seen or index >= MAX_GPUS_PER_NODE:
        raise InvalidTelemetry("bad-gpus", f"node {name}: GPU index {index}")
    seen.add(index)
    if not 0.0 <= utilization <= 1.0:  # NaN fails this too
        raise InvalidTelemetry("bad-gpus", f"node {name}: GPU {index} utilization")
    if health == _HEALTH_UNSPECIFIED:
        raise InvalidTelemetry("bad-gpus", f"node {name}: GPU {index} health unspecified")
    if memory_bytes < 0 or memory_bytes > MAX_VALUE:
        raise InvalidTelemetry("bad-resources", f"node {name}: GPU {index} memory_bytes")
    healthy = health == _HEALTHY and (not xids or all(x in APPLICATION_XIDS for x in xids))
    return new_gpu_device(
        index, g.model, memory_bytes, healthy, g.uuid, xids, utilization, g.mig_profile
    )


def _pods(n: pb.NodeReport, cluster: str, name: str, sequence: int) -> list[PodObserved]:
    if len(n.pods) > MAX_PODS_PER_NODE:
        raise InvalidTelemetry("bad-pods", f"node {name}: {len(n.pods)} pods")
    return [_pod(p, cluster, name, sequence) for p in n.pods]


def _pod(p: pb.Pod, cluster: str, node: str, sequence: int) -> PodObserved:
    """One reported pod of `node`, validated (InvalidTelemetry)."""
    pod_name, namespace = p.name, p.namespace
    if not pod_name or not namespace:
        raise InvalidTelemetry("bad-pods", f"node {node}: pod without name or namespace")
    labels = p.labels
    return new_pod_observed(
        cluster,
        namespace,
        pod_name,
        p.uid,
        node,
        _resources(p.requests, "pod.requests"),
        p.phase or "Running",
        tuple(sorted(labels.items())) if labels else (),
        sequence,
    )


def _pool(record: pb.TelemetryRecord, cluster: str, sequence: int) -> NodePoolUpdate:
    p = record.node_pool
    name = _check_name(p.name, "node_pool.name")
    if not math.isfinite(p.price_per_hour) or p.price_per_hour < 0:
        raise InvalidTelemetry("bad-pool", f"pool {name}: price_per_hour {p.price_per_hour}")
    if p.min_size > p.max_size:
        raise InvalidTelemetry("bad-pool", f"pool {name}: min_size {p.min_size} > max_size")
    if p.capacity_type not in _CAPACITY_FROM_PB:
        raise InvalidTelemetry("bad-pool", f"pool {name}: capacity_type {p.capacity_type}")
    return NodePoolUpdate(
        cluster=cluster,
        name=name,
        sequence=sequence,
        instance_type=p.shape.instance_type,
        allocatable=_resources(p.shape.allocatable, "node_pool.shape.allocatable"),
        gpu_model=p.shape.gpu_model,
        gpu_memory_bytes=_check_count(p.shape.gpu_memory_bytes, "shape.gpu_memory_bytes"),
        price_per_hour=p.price_per_hour,
        capacity_type=_CAPACITY_FROM_PB[p.capacity_type],
        min_size=p.min_size,
        max_size=p.max_size,
        current_size=p.current_size,
        zones=tuple(p.zones),
        labels=tuple(sorted(p.shape.labels.items())),
        taints=_taints(p.shape.taints, "node_pool.shape.taints"),
    )


#: Names and keys already validated, so that the per-record checks of `parse` are dict
#: lookups (a fleet has few clusters and a bounded set of nodes and pools).
_VALID_CLUSTERS: set[str] = set()
_KEYS: dict[tuple[str, str, str], bytes] = {}
_CACHE_LIMIT = 200_000


def _expected_key(record: pb.TelemetryRecord, kind: str) -> bytes:
    payload = getattr(record, kind)
    cache_key = (kind, record.cluster, payload.name)
    key = _KEYS.get(cache_key)
    if key is None:
        key = record_key(record)
        if len(_KEYS) < _CACHE_LIMIT:
            _KEYS[cache_key] = key
    return key


def parse(value: bytes | None) -> pb.TelemetryRecord:
    """The cheap half of `decode`: the value parses as a TelemetryRecord with a payload,
    a valid cluster name and a sequence. Raises InvalidTelemetry.

    The consumer parses every record of a poll this far (so undecodable ones always reach
    the dead-letter topic) and converts (`to_update`) only the newest of each key: the
    older ones' content would be replaced anyway.
    """
    if not value:
        raise InvalidTelemetry("empty", "record has no value")
    record = pb.TelemetryRecord()
    try:
        record.ParseFromString(value)
    except DecodeError as exc:
        raise InvalidTelemetry("undecodable", f"not a TelemetryRecord: {exc}") from exc
    if record.WhichOneof("payload") is None:
        raise InvalidTelemetry("no-payload", "record has no payload")
    cluster = record.cluster
    if cluster not in _VALID_CLUSTERS:
        _check_name(cluster, "cluster")
        if len(_VALID_CLUSTERS) < _CACHE_LIMIT:
            _VALID_CLUSTERS.add(cluster)
    if record.sequence == 0:
        raise InvalidTelemetry("no-sequence", "sequence must be > 0")
    return record


def to_update(
    key: bytes | None, record: pb.TelemetryRecord, *, content_token: bytes = b""
) -> Update:
    """A parsed record's payload as an update value, validated, including that it was
    published under the key its content implies. Raises InvalidTelemetry.

    `content_token` is passed on to a NodeUpdate (see `node_content_tail`)."""
    cluster, sequence = record.cluster, record.sequence
    kind = record.WhichOneof("payload")
    assert kind is not None  # parse() checked
    if kind in _PENDING_KINDS:
        return _pending_update(key, record, kind)
    if kind == "node_inventory":
        return _inventory_chunk(key, record)
    if key is not None:
        expected = _expected_key(record, kind)
        if key != expected:
            raise InvalidTelemetry("key-mismatch", f"key {key[:120]!r} != {expected!r}")
    if kind == "node":
        return _node(record, cluster, sequence, record.observed_unix_ms / 1000.0, content_token)
    if kind == "node_deleted":
        name = _check_name(record.node_deleted.name, "node_deleted.name")
        return NodeRemoved(cluster=cluster, name=name, sequence=sequence)
    if kind == "node_pool":
        return _pool(record, cluster, sequence)
    name = _check_name(record.node_pool_deleted.name, "node_pool_deleted.name")
    return NodePoolRemoved(cluster=cluster, name=name, sequence=sequence)


def decode(key: bytes | None, value: bytes | None) -> Update:
    """One Kafka record of the telemetry topic as an update value.

    Raises InvalidTelemetry when the value is not a TelemetryRecord, misses a required
    field, holds an impossible value, or does not match its key.
    """
    return to_update(key, parse(value))


# ---------------------------------------------------------------------------- unchanged reports
#
# Agents report every node periodically and most reports repeat the node's last one. A
# TelemetryRecord is serialized as its envelope (cluster, sequence, observed_unix_ms: fields
# 1-3) followed by the payload (field 10 for a NodeReport), so a repeated report ends with the
# same bytes as the last one. Protobuf parses a concatenation of two messages as their merge
# (Protocol Buffers encoding guide, "Last One Wins" and merging of embedded messages): if a
# record is `envelope + tail`, `envelope` parses alone as a record without a payload and
# `tail` is exactly one `node` field, then the record's node is the one in `tail`, byte for
# byte. Its content was validated when `tail` was first seen in full; what is new (cluster,
# sequence) is checked on the envelope alone, a few dozen bytes.

#: TelemetryRecord.node: field 10, wire type 2 (length-delimited).
_NODE_FIELD_TAG = (10 << 3) | 2


def node_content_tail(value: bytes, record: pb.TelemetryRecord) -> bytes | None:
    """The suffix of `value` (the parsed `record`, a node report) that is exactly its `node`
    field (tag, length and bytes), when the rest is the record's envelope as fleetd's
    publisher writes it; None otherwise (such records are always decoded in full)."""
    envelope = _envelope_bytes(record.cluster, record.sequence, record.observed_unix_ms)
    if not value.startswith(envelope):
        return None
    tail = value[len(envelope) :]
    if len(tail) < 2 or tail[0] != _NODE_FIELD_TAG:
        return None
    length, shift, i = 0, 0, 1
    while i < len(tail) and i <= 10:
        byte = tail[i]
        length |= (byte & 0x7F) << shift
        shift += 7
        i += 1
        if not byte & 0x80:
            return tail if i + length == len(tail) else None
    return None


#: cluster -> `envelope_head(cluster)`.
_HEADS: dict[str, bytes] = {}


def _envelope_bytes(cluster: str, sequence: int, observed_unix_ms: int) -> bytes:
    """What protobuf serializes for a TelemetryRecord with these three fields only (fields
    in number order, defaults omitted), without making one."""
    head = _HEADS.get(cluster)
    if head is None:
        head = envelope_head(cluster)
        if len(_HEADS) < _CACHE_LIMIT:
            _HEADS[cluster] = head
    if not sequence:
        head = head[:-1]  # (a zero sequence is omitted, its tag too)
    else:
        head += _varint_bytes(sequence)
    if observed_unix_ms:
        # int64: a negative time is its 64-bit two's complement, a 10-byte varint.
        head += b"\x18" + _varint_bytes(observed_unix_ms & 0xFFFF_FFFF_FFFF_FFFF)
    return head


def unchanged_envelope(value: bytes, tail: bytes) -> pb.TelemetryRecord | None:
    """When `value` ends with `tail` (a `node_content_tail`) and the bytes before it parse as
    a record without a payload, that envelope (cluster, sequence, observed_unix_ms): `value`
    is then the node report of `tail` with this envelope. None otherwise (decode in full).

    The caller still checks the envelope: its cluster must be the one `tail` was published
    with, and its sequence above 0 (and above the last applied one)."""
    cut = len(value) - len(tail)
    if cut <= 0 or not value.endswith(tail):
        return None
    envelope = pb.TelemetryRecord()
    try:
        envelope.ParseFromString(value[:cut])
    except DecodeError:
        return None
    if envelope.WhichOneof("payload") is not None:
        return None
    return envelope


def envelope_head(cluster: str) -> bytes:
    """The bytes a canonical record of `cluster` starts with, up to its sequence's value:
    the cluster field and the sequence field's tag (see `decode_envelope_rests`)."""
    return pb.TelemetryRecord(cluster=cluster).SerializeToString() + bytes([(2 << 3) | 0])


def _varint_values(payload: NDArray[np.uint8]) -> NDArray[np.int64]:
    """Values of varints laid out one per row, least significant group first (k, length),
    at most 9 bytes (63 bits: no overflow). Column by column: small temporaries (an int64
    copy of a whole poll's matrix is large enough to cost page faults on every poll)."""
    out = np.zeros(len(payload), np.int64)
    for k in range(payload.shape[1]):
        out |= (payload[:, k] & 0x7F).astype(np.int64) << (7 * k)
    return out


def decode_envelope_rests(
    rests: list[bytes],
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.bool_]]:
    """Decode many envelope rests at once: each is what follows `envelope_head(cluster)` in a
    canonical record up to its node field, i.e. varint(sequence) optionally followed by the
    observed_unix_ms field (tag 0x18, varint), and nothing else.

    Returns (sequences, observed_unix_ms, ok), each (len(rests),). ok is False for anything
    else (a zero sequence, a varint of more than 9 bytes, i.e. above 2^63 - 1 or a negative
    time, other fields, trailing bytes): the caller decodes such records in full and
    dead-letters what is bad. This runs for most telemetry records, so it is vectorized:
    rests are grouped by length and by where their varints end (in a poll nearly all share
    one layout: sequences and times of one magnitude), and each group is decoded as a byte
    matrix.
    """
    n = len(rests)
    seq = np.zeros(n, np.int64)
    ms = np.zeros(n, np.int64)
    ok = np.zeros(n, np.bool_)
    if n == 0:
        return seq, ms, ok
    lens = np.fromiter(map(len, rests), np.int64, n)
    if lens.min() == lens.max():
        # The usual poll: one length (sequences and times of one magnitude), no sorting.
        length = int(lens[0])
        joined = np.frombuffer(b"".join(rests), np.uint8)
        _decode_layouts(joined.reshape(n, length), np.arange(n), seq, ms, ok)
        return seq, ms, ok
    order = np.argsort(lens, kind="stable")
    sorted_lens = lens[order]
    joined = np.frombuffer(b"".join([rests[i] for i in order.tolist()]), np.uint8)
    bounds = np.flatnonzero(np.diff(sorted_lens)) + 1
    offset = 0
    for group in np.split(np.arange(n), bounds):
        length = int(sorted_lens[group[0]])
        size = length * len(group)
        matrix = joined[offset : offset + size].reshape(len(group), length)
        offset += size
        _decode_layouts(matrix, order[group], seq, ms, ok)
    return seq, ms, ok


def _decode_layouts(
    matrix: NDArray[np.uint8],
    rows: NDArray[np.int64],
    seq: NDArray[np.int64],
    ms: NDArray[np.int64],
    ok: NDArray[np.bool_],
) -> None:
    """`decode_envelope_rests` for rests of one length (the rows of `matrix`, at `rows` of
    the output), by layout: rows whose continuation bits sit alike decode as one."""
    length = matrix.shape[1]
    if not 1 <= length <= 19:
        return
    cont = matrix >= 0x80
    if (cont == cont[0]).all():
        # One layout (the usual case).
        layouts: list[tuple[int, NDArray[np.bool_] | None]] = [
            (int(cont[0].astype(np.int64) @ (1 << np.arange(length, dtype=np.int64))), None)
        ]
    else:
        layout = cont.astype(np.int64) @ (1 << np.arange(length, dtype=np.int64))
        layouts = [(bits, layout == bits) for bits in np.unique(layout).tolist()]
    for bits, members in layouts:
        flags = [(bits >> k) & 1 for k in range(length)]
        if 0 not in flags:
            continue  # (the sequence's varint does not end: not an envelope)
        end1 = flags.index(0)  # last byte of the sequence
        if end1 > 8:
            continue
        sub = matrix if members is None else matrix[members]
        good = np.ones(len(sub), np.bool_)
        values = _varint_values(sub[:, : end1 + 1])
        times = np.zeros(len(sub), np.int64)
        if end1 + 1 < length:
            # tag 0x18 (never has its continuation bit), then one varint to the end
            end2 = length - 1
            if (
                end1 + 2 > end2
                or flags[end2]
                or not all(flags[end1 + 2 : end2])
                or end2 - (end1 + 2) > 8
            ):
                continue
            good &= sub[:, end1 + 1] == 0x18
            times = _varint_values(sub[:, end1 + 2 :])
        good &= values > 0
        idx = rows if members is None else rows[members]
        seq[idx] = values
        ms[idx] = times
        ok[idx] = good


# ---------------------------------------------------------------------------- changed pods only
#
# Most changed reports differ from the node's last one only in its pods (pods come and go).
# A canonical NodeReport ends with its pods (field 11, the highest number), so such a report
# shares every byte before its first pod with the last one. If `node[:spec_len]` of the last
# report parses alone without pods and the new report's bytes after the same prefix are
# nothing but pod fields, the new report is the last one's node with the new pods (merge
# semantics again): only the pods need converting and validating.

#: NodeReport.pods: field 11, wire type 2.
_PODS_FIELD_TAG = (11 << 3) | 2


def _varint_at(data: bytes, i: int, max_bytes: int = 10) -> tuple[int, int]:
    """(value, index after it) of the varint at data[i], of at most `max_bytes` bytes;
    (-1, i) if it is not one."""
    value, shift, start = 0, 0, i
    while i < len(data) and i - start < max_bytes:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        shift += 7
        i += 1
        if not byte & 0x80:
            return value, i
    return -1, start


def _length_at(data: bytes, i: int, end: int) -> tuple[int, int]:
    """(length, index after it) of a length-delimited field's length at data[i] (i < end);
    (-1, i) if it is not one. One and two bytes (a field of up to 16 KiB: a pod, a GPU, a
    node) without `_varint_at`'s loop."""
    length = data[i]
    if length < 0x80:
        return length, i + 1
    if i + 1 < end and data[i + 1] < 0x80:
        return (length & 0x7F) | (data[i + 1] << 7), i + 2
    return _varint_at(data, i)


def node_offset_in_tail(tail: bytes) -> int:
    """Where the NodeReport bytes begin inside a `node_content_tail` (after its tag and its
    length varint, whose size follows from the tail's length)."""
    size = 1
    while len(tail) - 1 - size >= 1 << (7 * size):
        size += 1
    return 1 + size


def pods_start(node: bytes, record: pb.TelemetryRecord) -> int:
    """Where the pods begin in `node` (the parsed `record`'s NodeReport bytes), when the
    bytes before parse alone as a NodeReport without pods and the rest is only pods; -1
    otherwise (then every change of the node is converted in full)."""
    size = 0
    for p in record.node.pods:
        n = p.ByteSize()
        size += 1 + len(_varint_bytes(n)) + n
    start = len(node) - size
    if start < 0 or pod_fields(node, start) is None:
        return -1
    try:
        head = pb.NodeReport.FromString(node[:start])
    except DecodeError:
        return -1
    return -1 if head.pods else start


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def pod_fields(node: bytes, start: int) -> list[bytes] | None:
    """The payloads (serialized Pods) of the `pods` fields that make up node[start:], when
    that is all there is; None otherwise. `node` may also be a whole record: the pods then
    end where it ends."""
    return fields_of(node, start, len(node), _PODS_FIELD_TAG)


def fields_of(data: bytes, start: int, end: int, tag: int) -> list[bytes] | None:
    """The payloads of the length-delimited fields with key byte `tag` that make up
    data[start:end], when that is all there is; None otherwise."""
    fields = []
    i = start
    while i < end:
        if data[i] != tag or i + 1 >= end:
            return None
        length, after = _length_at(data, i + 1, end)
        if length < 0:
            return None
        i = after + length
        if i > end:
            return None
        fields.append(data[after:i])
    return fields


#: NodeReport.gpus: field 10, wire type 2.
_GPUS_FIELD_TAG = (10 << 3) | 2


def gpus_start(spec: bytes, record: pb.TelemetryRecord) -> int:
    """Where the GPUs begin in `spec` (the parsed `record`'s NodeReport bytes before its
    pods, `pods_start`), when the bytes before parse alone as a NodeReport without GPUs and
    the rest is only GPUs; -1 otherwise (then a change of the node's GPUs or of the rest is
    converted in full)."""
    size = 0
    for g in record.node.gpus:
        n = g.ByteSize()
        size += 1 + len(_varint_bytes(n)) + n
    start = len(spec) - size
    if start < 0 or fields_of(spec, start, len(spec), _GPUS_FIELD_TAG) is None:
        return -1
    try:
        head = pb.NodeReport.FromString(spec[:start])
    except DecodeError:
        return -1
    return -1 if head.gpus or head.pods else start


def gpu_fields(data: bytes, start: int, end: int) -> list[bytes] | None:
    """The payloads (serialized Gpus) of the `gpus` fields that make up data[start:end],
    when that is all there is; None otherwise."""
    return fields_of(data, start, end, _GPUS_FIELD_TAG)


def gpus_from_fields(
    fields: list[bytes], known: dict[bytes, GpuDevice], name: str
) -> tuple[tuple[GpuDevice, ...], bool]:
    """The GPUs of a report of node `name` whose `gpus` fields are `fields` (`gpu_fields`),
    validated as `decode` validates them (InvalidTelemetry, same reasons), and whether they
    are in the order of `fields` (not sorted by index here). A GPU whose bytes are in
    `known` (the node's GPUs of a report already converted, by their bytes) is that value
    again: only the others are parsed, and only the index check applies to it."""
    new: dict[int, pb.Gpu] = {}
    for i, raw in enumerate(fields):
        if raw not in known:
            try:
                new[i] = pb.Gpu.FromString(raw)
            except DecodeError as exc:
                # (Before any check: decoding the whole record fails first too.)
                raise InvalidTelemetry("undecodable", f"not a TelemetryRecord: {exc}") from exc
    if len(fields) > MAX_GPUS_PER_NODE:
        raise InvalidTelemetry("bad-gpus", f"node {name}: {len(fields)} GPUs")
    if not new:
        gpus = [known[raw] for raw in fields]
        seen = {d.index for d in gpus}
        if len(seen) < len(gpus):
            gpus = _gpu_devices_known(gpus, name)
    else:
        gpus = []
        seen = set()
        for i, raw in enumerate(fields):
            g = new.get(i)
            if g is None:
                device = known[raw]
                if device.index in seen:
                    raise InvalidTelemetry("bad-gpus", f"node {name}: GPU index {device.index}")
                seen.add(device.index)
                gpus.append(device)
            else:
                gpus.append(_gpu_device(g, name, seen))
    if any(gpus[i].index > gpus[i + 1].index for i in range(len(gpus) - 1)):
        gpus.sort(key=lambda d: d.index)
        return tuple(gpus), False
    return tuple(gpus), True


def _gpu_devices_known(gpus: list[GpuDevice], name: str) -> list[GpuDevice]:
    """The index check of `_gpu_devices` over devices already validated otherwise."""
    seen: set[int] = set()
    for device in gpus:
        if device.index in seen:
            raise InvalidTelemetry("bad-gpus", f"node {name}: GPU index {device.index}")
        seen.add(device.index)
    return gpus


#: What may follow `envelope_head` in a canonical node report before its node field's tag:
#: a varint (the sequence) of at most 9 bytes, optionally tag 0x18 and another (the time).
_ENVELOPE_REST = re.compile(
    rb"[\x80-\xff]{0,8}[\x00-\x7f](?:\x18[\x80-\xff]{0,8}[\x00-\x7f])?(?=\x52)", re.DOTALL
)


def node_field_at(value: bytes, start: int) -> tuple[int, int]:
    """For `value[start:]` shaped as `varint(sequence) [0x18 varint(observed_unix_ms)]`
    followed by one `node` field that runs to the end (what follows `envelope_head` in a
    canonical node report): (where the node field's tag is, where its NodeReport bytes
    begin); (-1, -1) for anything else. The shape only: `decode_envelope_rests` of
    `value[start:tag]` reads the sequence and time, and refuses what `node_after_envelope`
    would (a zero sequence). A regular expression finds the varints' ends in C: reading
    them byte by byte in Python costs ~2 µs a record."""
    match = _ENVELOPE_REST.match(value, start)
    if match is None:
        return -1, -1
    tag = match.end()
    end = len(value)
    if tag + 1 >= end:
        return -1, -1
    length, after = _length_at(value, tag + 1, end)
    if length < 0 or after + length != end:
        return -1, -1
    return tag, after


def node_after_envelope(value: bytes, start: int) -> tuple[int, int, int, int]:
    """For `value[start:]` laid out as `varint(sequence) [0x18 varint(observed_unix_ms)]`
    followed by one `node` field that runs to the end (what follows `envelope_head` in a
    canonical node report): (sequence, observed_unix_ms, where the node field's tag is,
    where its NodeReport bytes begin). (0, 0, -1, -1) for anything else; the envelope is
    accepted exactly as `decode_envelope_rests` accepts it (sequence above 0, varints of
    at most 9 bytes). The reading byte by byte, for one record: the source finds the shape
    with `node_field_at` and decodes the values in bulk; tests check the two agree."""
    end = len(value)
    sequence, i = _varint_at(value, start, 9)
    if sequence <= 0 or i >= end:
        return 0, 0, -1, -1
    ms = 0
    if value[i] == 0x18:
        ms, i = _varint_at(value, i + 1, 9)
        if ms < 0:
            return 0, 0, -1, -1
    tag = i
    if tag + 1 >= end or value[tag] != _NODE_FIELD_TAG:
        return 0, 0, -1, -1
    length, after = _varint_at(value, tag + 1)
    if length < 0 or after + length != end:
        return 0, 0, -1, -1
    return sequence, ms, tag, after


def pods_from_fields(
    fields: list[bytes],
    known: dict[bytes, PodObserved],
    cluster: str,
    node: str,
    sequence: int,
) -> tuple[PodObserved, ...]:
    """The pods of a report of `node` whose `pods` fields are `fields` (`pod_fields`),
    validated as `decode` validates them (InvalidTelemetry, same reasons). A pod whose bytes
    are in `known` (the node's pods of a report already converted, by their bytes) is that
    value again, its `sequence` the earlier report's: only the others are parsed."""
    pods: list[PodObserved | pb.Pod] = []
    new: list[int] = []
    find = known.get
    for raw in fields:
        pod: PodObserved | pb.Pod | None = find(raw)
        if pod is None:
            try:
                pod = pb.Pod.FromString(raw)
            except DecodeError as exc:
                # (Before any check: decoding the whole record fails first too.)
                raise InvalidTelemetry("undecodable", f"not a TelemetryRecord: {exc}") from exc
            new.append(len(pods))
        pods.append(pod)
    if len(fields) > MAX_PODS_PER_NODE:
        raise InvalidTelemetry("bad-pods", f"node {node}: {len(fields)} pods")
    for i in new:
        pods[i] = _pod(pods[i], cluster, node, sequence)  # type: ignore[arg-type]
    return tuple(pods)  # type: ignore[arg-type]


def with_pods(
    previous: NodeUpdate,
    pods: tuple[PodObserved, ...],
    sequence: int,
    observed_s: float,
    content_token: bytes,
) -> NodeUpdate:
    """`previous` (a node's last applied update) with new pods, sequence, time and token:
    the update of a report that differs from it in its pods only (the caller checked the
    bytes). Every other field is `previous`'s own object."""
    p = previous
    return _rebuilt(
        p, sequence, observed_s, content_token, p.gpu_model, p.gpu_memory_bytes, p.gpus, pods
    )


def with_gpus(
    previous: NodeUpdate,
    gpus: tuple[GpuDevice, ...],
    sequence: int,
    observed_s: float,
    content_token: bytes,
) -> NodeUpdate:
    """`previous` (a node's last applied update) with other GPUs (`gpus_from_fields`) and a
    new sequence, time and token: the update of a report that differs from it in its GPUs
    only (the caller checked the bytes)."""
    # A node's GPUs are one model in practice; the first device speaks for the node.
    model, memory = (gpus[0].model, gpus[0].memory_bytes) if gpus else ("", 0)
    return _rebuilt(
        previous, sequence, observed_s, content_token, model, memory, gpus, previous.pods
    )


def _rebuilt(
    p: NodeUpdate,
    sequence: int,
    observed_s: float,
    content_token: bytes,
    gpu_model: str,
    gpu_memory_bytes: int,
    gpus: tuple[GpuDevice, ...],
    pods: tuple[PodObserved, ...] | None,
) -> NodeUpdate:
    """`p` with these fields new, the others its own objects (positional: a changed report
    runs this, and `dataclasses.replace` costs several times as much)."""
    return new_node_update(
        p.cluster,
        p.name,
        sequence,
        p.capacity,
        p.allocatable,
        p.labels,
        p.taints,
        p.unschedulable,
        p.ready,
        p.node_pool,
        p.zone,
        p.region,
        p.instance_type,
        p.capacity_type,
        gpu_model,
        gpu_memory_bytes,
        gpus,
        pods,
        observed_s,
        content_token,
    )


def with_spec(
    key: bytes | None,
    previous: NodeUpdate,
    report: pb.NodeReport,
    sequence: int,
    observed_unix_ms: int,
    content_token: bytes,
) -> NodeUpdate:
    """`previous` (a node's last applied update) with everything but its GPUs and pods
    from `report` (parsed from a report's node bytes before its GPUs: without GPUs and
    pods), and a new sequence, time and token: the update of a report whose GPUs and pods
    are byte for byte `previous`'s (the caller checked the bytes). Validated as `decode`
    validates a record (InvalidTelemetry, same reasons: the key, the name, resources...)."""
    cluster = previous.cluster
    if key is not None:
        # (`to_update`'s check, with its cache.)
        cache_key = ("node", cluster, report.name)
        expected = _KEYS.get(cache_key)
        if expected is None:
            expected = node_key(cluster, report.name)
            if len(_KEYS) < _CACHE_LIMIT:
                _KEYS[cache_key] = expected
        if key != expected:
            raise InvalidTelemetry("key-mismatch", f"key {key[:120]!r} != {expected!r}")
    return _node_of(report, cluster, sequence, observed_unix_ms / 1000.0, content_token, previous)


# ---------------------------------------------------------------------------- pending pods

_PENDING_KINDS = frozenset({"pending_pod", "pending_pod_deleted"})
_AFFINITY_OPERATORS = frozenset({"In", "NotIn", "Exists", "DoesNotExist"})


def pending_key(cluster: str, namespace: str, name: str) -> bytes:
    """The Kafka key of a pending pod's records."""
    return f"{cluster}/pending/{namespace}/{name}".encode()


def encode_pending_pod(
    pod: PendingPod, *, sequence: int, observed_unix_ms: int
) -> pb.TelemetryRecord:
    """A PendingPod as a TelemetryRecord."""
    record = pb.TelemetryRecord(
        cluster=pod.cluster, sequence=sequence, observed_unix_ms=observed_unix_ms
    )
    out = record.pending_pod
    out.namespace, out.name, out.uid, out.priority = pod.namespace, pod.name, pod.uid, pod.priority
    _resources_pb(pod.requests, out.requests)
    out.node_selector.update(dict(pod.node_selector))
    for r in pod.affinity:
        out.affinity.add(key=r.key, operator=r.operator, values=list(r.values))
    for t in pod.tolerations:
        out.tolerations.add(key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    return record


def encode_pending_pod_deleted(
    cluster: str, namespace: str, name: str, *, sequence: int, observed_unix_ms: int
) -> pb.TelemetryRecord:
    """The end of a pending pod (bound, deleted, terminated) as a TelemetryRecord."""
    record = pb.TelemetryRecord(
        cluster=cluster, sequence=sequence, observed_unix_ms=observed_unix_ms
    )
    record.pending_pod_deleted.namespace = namespace
    record.pending_pod_deleted.name = name
    return record


def _pending_update(
    key: bytes | None, record: pb.TelemetryRecord, kind: str
) -> PendingPod | PendingPodRemoved:
    cluster, sequence = record.cluster, record.sequence
    payload = record.pending_pod if kind == "pending_pod" else record.pending_pod_deleted
    namespace = _check_name(payload.namespace, f"{kind}.namespace")
    name = _check_name(payload.name, f"{kind}.name")
    if key is not None and key != (expected := pending_key(cluster, namespace, name)):
        raise InvalidTelemetry("key-mismatch", f"key {key[:120]!r} != {expected!r}")
    if kind == "pending_pod_deleted":
        return PendingPodRemoved(cluster, namespace, name, sequence=sequence)
    p = record.pending_pod
    affinity = []
    for r in p.affinity:
        values = tuple(sorted(set(r.values)))
        if not r.key or r.operator not in _AFFINITY_OPERATORS:
            raise InvalidTelemetry("bad-pending-pod", f"affinity {r.key!r} {r.operator!r}")
        if (r.operator in ("In", "NotIn")) != bool(values):
            raise InvalidTelemetry("bad-pending-pod", f"affinity {r.key!r}: {r.operator} values")
        affinity.append(NodeRequirement(r.key, r.operator, values))
    tolerations = []
    for t in p.tolerations:
        op = t.operator or "Equal"
        if op not in ("Equal", "Exists") or (t.effect and t.effect not in TAINT_EFFECTS):
            raise InvalidTelemetry("bad-pending-pod", f"toleration {t.key!r} {op!r} {t.effect!r}")
        if (op == "Equal" and not t.key) or (op == "Exists" and t.value):
            raise InvalidTelemetry("bad-pending-pod", f"toleration {t.key!r}: {op} {t.value!r}")
        tolerations.append(PodToleration(t.key, op, t.value, t.effect))
    return PendingPod(
        cluster=cluster,
        namespace=namespace,
        name=name,
        uid=p.uid,
        requests=_resources(p.requests, "pending_pod.requests"),
        node_selector=tuple(sorted(p.node_selector.items())),
        affinity=tuple(affinity),
        tolerations=tuple(tolerations),
        priority=p.priority,
        sequence=sequence,
    )


# ---------------------------------------------------------------------------- node inventories


def _inventory_chunk(key: bytes | None, record: pb.TelemetryRecord) -> NodeInventoryChunk:
    """A NodeInventory record as a chunk value, validated (InvalidTelemetry)."""
    inventory = record.node_inventory
    index, count = inventory.chunk_index, inventory.chunk_count
    if not 1 <= count <= MAX_INVENTORY_CHUNKS or index >= count:
        raise InvalidTelemetry(
            "bad-inventory",
            f"chunk {index} of {count} (1..{MAX_INVENTORY_CHUNKS} chunks, index below count)",
        )
    if key is not None and key != (expected := inventory_key(record.cluster, index)):
        raise InvalidTelemetry("key-mismatch", f"key {key[:120]!r} != {expected!r}")
    names = tuple(inventory.node_names)
    if len(names) > MAX_INVENTORY_NODES:
        raise InvalidTelemetry(
            "bad-inventory", f"{len(names)} node names (at most {MAX_INVENTORY_NODES})"
        )
    for name in names:
        _check_name(name, "node_inventory.node_names[]")
    if len(set(names)) != len(names):
        raise InvalidTelemetry("bad-inventory", "a node name is listed twice")
    pools: tuple[str, ...] | None = None
    if inventory.lists_node_pools or inventory.node_pool_names:
        if index != 0 or not inventory.lists_node_pools:
            raise InvalidTelemetry(
                "bad-inventory", "node pools are listed in chunk 0, with lists_node_pools"
            )
        pools = tuple(inventory.node_pool_names)
        if len(pools) > MAX_INVENTORY_NODES:
            raise InvalidTelemetry("bad-inventory", f"{len(pools)} node pool names")
        for name in pools:
            _check_name(name, "node_inventory.node_pool_names[]")
        if len(set(pools)) != len(pools):
            raise InvalidTelemetry("bad-inventory", "a node pool is listed twice")
    return NodeInventoryChunk(record.cluster, record.sequence, index, count, names, pools)
