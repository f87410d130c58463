"""Telemetry load generator: a seeded synthetic GPU fleet published to Kafka.

    python -m fleetd.loadgen --bootstrap-servers 127.0.0.1:9092 --nodes 2000 --records 100000

Tests and `benchmarks/ingest.py` use the functions directly. Everything is a function of
the seed: the same arguments give byte-identical records (except `observed_unix_ms`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from fleetd.sources import security
from fleetd.sources.codec import encode_node, node_key
from fleetd.sources.updates import (
    CapacityType,
    GpuDevice,
    NodeUpdate,
    PodObserved,
    Resources,
    Taint,
)
from fleetd.v1 import telemetry_pb2 as pb

GIB = 1024**3

#: (pool name, GPU model, GPUs per node, GPU memory GiB, CPU cores, memory GiB, instance type)
SHAPES: tuple[tuple[str, str, int, int, int, int, str], ...] = (
    ("h100", "NVIDIA-H100-80GB-HBM3", 8, 80, 208, 1872, "a3-highgpu-8g"),
    ("a100", "NVIDIA-A100-SXM4-80GB", 8, 80, 96, 1360, "a2-ultragpu-8g"),
    ("l4", "NVIDIA-L4", 4, 24, 48, 192, "g2-standard-48"),
    ("t4", "Tesla-T4", 1, 16, 16, 104, "n1-highmem-16"),
    ("cpu", "", 0, 0, 64, 256, "n2-standard-64"),
)


def synthetic_fleet(
    rng: np.random.Generator, *, clusters: int = 2, nodes_per_cluster: int = 100
) -> list[NodeUpdate]:
    """`clusters` x `nodes_per_cluster` nodes drawn from SHAPES (sequence 0, no pods)."""
    nodes = []
    shape_idx = rng.integers(0, len(SHAPES), size=clusters * nodes_per_cluster)
    for c in range(clusters):
        cluster = f"cluster-{c}"
        for i in range(nodes_per_cluster):
            pool, model, gpus, gpu_gib, cores, mem_gib, itype = SHAPES[
                int(shape_idx[c * nodes_per_cluster + i])
            ]
            res = Resources(
                cpu_millicores=cores * 1000, memory_bytes=mem_gib * GIB, gpus=gpus, pods=110
            )
            zone = f"zone-{i % 3}"
            nodes.append(
                NodeUpdate(
                    cluster=cluster,
                    name=f"{pool}-{i:05d}",
                    sequence=0,
                    capacity=res,
                    allocatable=res,
                    labels=(
                        ("cloud.google.com/gke-nodepool", pool),
                        ("node.kubernetes.io/instance-type", itype),
                        ("nvidia.com/gpu.product", model),
                        ("topology.kubernetes.io/zone", zone),
                    )
                    if gpus
                    else (
                        ("cloud.google.com/gke-nodepool", pool),
                        ("node.kubernetes.io/instance-type", itype),
                        ("topology.kubernetes.io/zone", zone),
                    ),
                    taints=(Taint("nvidia.com/gpu", "present", "NoSchedule"),) if gpus else (),
                    node_pool=pool,
                    zone=zone,
                    instance_type=itype,
                    capacity_type=CapacityType.ON_DEMAND,
                    gpu_model=model,
                    gpu_memory_bytes=gpu_gib * GIB,
                    gpus=tuple(
                        GpuDevice(index=g, model=model, memory_bytes=gpu_gib * GIB, healthy=True)
                        for g in range(gpus)
                    ),
                    pods=(),
                )
            )
    return nodes


#: Chance that a report shows one of its node's pods replaced by a new one.
POD_CHURN = 0.1


def _pod(node: NodeUpdate, slot: int, generation: int) -> PodObserved:
    return PodObserved(
        cluster=node.cluster,
        namespace="ml",
        name=f"{node.name}-g{generation}-p{slot}",
        uid=f"{node.name}-{generation}-{slot}",
        node=node.name,
        requests=Resources(
            cpu_millicores=1000, memory_bytes=4 * GIB, gpus=1 if slot < len(node.gpus) else 0
        ),
    )


def _varied(
    node: NodeUpdate, pods: tuple[PodObserved, ...], rng: np.random.Generator
) -> NodeUpdate:
    """The node with fresh GPU utilization and `pods`: what one report looks like."""
    util = rng.random(len(node.gpus)) if node.gpus else ()
    gpus = tuple(
        GpuDevice(
            index=g.index,
            model=g.model,
            memory_bytes=g.memory_bytes,
            healthy=g.healthy,
            utilization_ratio=float(util[g.index]),
        )
        for g in node.gpus
    )
    return NodeUpdate(
        cluster=node.cluster,
        name=node.name,
        sequence=0,
        capacity=node.capacity,
        allocatable=node.allocatable,
        labels=node.labels,
        taints=node.taints,
        node_pool=node.node_pool,
        zone=node.zone,
        gpus=gpus,
        pods=pods,
    )


def node_records(
    fleet: Sequence[NodeUpdate],
    n_records: int,
    rng: np.random.Generator,
    *,
    first_sequence: int = 1,
    observed_unix_ms: int | None = None,
) -> Iterator[tuple[bytes, bytes]]:
    """`n_records` (key, value) node reports cycling over `fleet` with sequences counting up
    from `first_sequence`: the last record of every node holds its highest sequence.

    Every node runs 0-3 pods; with probability POD_CHURN a report shows one of them
    replaced (pods live much longer than one report interval)."""
    ms = int(time.time() * 1000) if observed_unix_ms is None else observed_unix_ms
    pods: dict[int, tuple[PodObserved, ...]] = {}
    for i in range(n_records):
        idx = i % len(fleet)
        node = fleet[idx]
        generation = i // len(fleet)
        current = pods.get(idx)
        if current is None:
            current = tuple(_pod(node, slot, 0) for slot in range(int(rng.integers(0, 4))))
        elif current and rng.random() < POD_CHURN:
            slot = int(rng.integers(0, len(current)))
            current = (*current[:slot], _pod(node, slot, generation), *current[slot + 1 :])
        pods[idx] = current
        report = _varied(node, current, rng)
        record = encode_node(report, sequence=first_sequence + i, observed_unix_ms=ms)
        yield node_key(node.cluster, node.name), record.SerializeToString()


#: Report interval of the periodic mix (agents resync every 30 s by default).
REPORT_INTERVAL_MS = 30_000
#: What a changed report changes, with weights: a pod replaced by another, a pod started
#: (or, on a node with pods, one finished), a GPU's health flipped (an XID 79 "fallen off
#: the bus" and back), the node cordoned or uncordoned.
CHANGE_KINDS: tuple[tuple[str, float], ...] = (
    ("pod-replaced", 0.6),
    ("pod-started-or-finished", 0.25),
    ("gpu-health", 0.1),
    ("cordon", 0.05),
)


def _changed(node: NodeUpdate, kind: str, round_no: int, rng: np.random.Generator) -> NodeUpdate:
    pods = node.pods or ()
    if kind == "pod-replaced" and pods:
        slot = int(rng.integers(0, len(pods)))
        new = _pod(node, slot, round_no)
        return replace(node, pods=(*pods[:slot], new, *pods[slot + 1 :]))
    if kind in ("pod-replaced", "pod-started-or-finished"):
        if pods and (len(pods) >= 4 or rng.random() < 0.5):
            slot = int(rng.integers(0, len(pods)))
            return replace(node, pods=pods[:slot] + pods[slot + 1 :])
        return replace(node, pods=(*pods, _pod(node, len(pods), round_no)))
    if kind == "gpu-health" and node.gpus:
        g = int(rng.integers(0, len(node.gpus)))
        dev = node.gpus[g]
        flipped = replace(dev, healthy=not dev.healthy, xid_errors=() if not dev.healthy else (79,))
        return replace(node, gpus=(*node.gpus[:g], flipped, *node.gpus[g + 1 :]))
    return replace(node, unschedulable=not node.unschedulable)


def periodic_reports(
    fleet: Sequence[NodeUpdate],
    rounds: int,
    rng: np.random.Generator,
    *,
    changed_fraction: float = 0.05,
    first_sequence: int = 1,
    observed_unix_ms: int = 1_700_000_000_000,
    stats: dict[str, Any] | None = None,
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) node reports of a fleet that reports periodically, as agents do.

    Round 0 reports every node in full (0-3 pods each). In each later round every node
    reports once, in a random order; a report repeats the node's last content (a periodic
    resync: same pods, GPUs, labels; only sequence and time are new) except with
    probability `changed_fraction`, when something changed since (`CHANGE_KINDS`: pods come
    and go, a GPU turns unhealthy or recovers, a cordon). GPU utilization is not sampled
    (the `fleetd agent` reads the Kubernetes API, which has none); a DCGM-fed agent that
    reports it would make every report a change: `changed_fraction=1.0`.

    Sequences count up from `first_sequence`; round r is observed at `observed_unix_ms +
    r * REPORT_INTERVAL_MS`. If `stats` is given, it receives the counts ("unchanged",
    "changed" by kind) once the generator is exhausted.
    """
    kinds = [k for k, _ in CHANGE_KINDS]
    weights = np.asarray([w for _, w in CHANGE_KINDS])
    weights = weights / weights.sum()
    current: list[NodeUpdate] = []
    tails: list[bytes] = []
    unchanged = 0
    changed = dict.fromkeys(kinds, 0)
    seq = first_sequence
    for node in fleet:
        pods = tuple(_pod(node, slot, 0) for slot in range(int(rng.integers(0, 4))))
        report = replace(node, pods=pods)
        record = encode_node(report, sequence=seq, observed_unix_ms=observed_unix_ms)
        value = record.SerializeToString(deterministic=True)
        current.append(report)
        tails.append(value[len(_envelope(record)) :])
        seq += 1
        yield node_key(node.cluster, node.name), value
    for round_no in range(1, rounds):
        ms = observed_unix_ms + round_no * REPORT_INTERVAL_MS
        order = rng.permutation(len(fleet))
        change = rng.random(len(fleet)) < changed_fraction
        for idx in order.tolist():
            node = current[idx]
            if change[idx]:
                kind = kinds[int(rng.choice(len(kinds), p=weights))]
                changed[kind] += 1
                node = current[idx] = _changed(node, kind, round_no, rng)
                record = encode_node(node, sequence=seq, observed_unix_ms=ms)
                value = record.SerializeToString(deterministic=True)
                tails[idx] = value[len(_envelope(record)) :]
            else:
                unchanged += 1
                envelope = pb.TelemetryRecord(
                    cluster=node.cluster, sequence=seq, observed_unix_ms=ms
                )
                # The same bytes an encoder writes for the same content (fields in number
                # order, maps sorted): what a real agent's resync sends.
                value = envelope.SerializeToString() + tails[idx]
            seq += 1
            yield node_key(node.cluster, node.name), value
    if stats is not None:
        stats["records"] = len(fleet) * max(rounds, 1)
        stats["unchanged"] = unchanged
        stats["changed"] = changed


def _envelope(record: pb.TelemetryRecord) -> bytes:
    return pb.TelemetryRecord(
        cluster=record.cluster,
        sequence=record.sequence,
        observed_unix_ms=record.observed_unix_ms,
    ).SerializeToString()


def malformed_records() -> list[tuple[bytes, bytes, str]]:
    """(key, value, expected dead-letter reason) for every kind of bad record, each under
    its own key (so none supersedes another in a poll)."""

    def node_record(name: str) -> pb.TelemetryRecord:
        record = pb.TelemetryRecord(cluster="bad-cluster", sequence=1, observed_unix_ms=1)
        record.node.name = name
        return record

    no_seq = node_record("n3")
    no_seq.sequence = 0
    bad_gpu = node_record("n4")
    bad_gpu.node.gpus.add(index=0, health=pb.GPU_HEALTH_HEALTHY, utilization_ratio=7.0)
    negative = node_record("n5")
    negative.node.capacity.cpu_millicores = -5
    return [
        (b"bad-cluster/n1", b"\x08\x96\x01garbage\xff\xff", "undecodable"),
        (b"bad-cluster/n2", b"", "empty"),
        (b"bad-cluster/n3", no_seq.SerializeToString(), "no-sequence"),
        (b"bad-cluster/n4", bad_gpu.SerializeToString(), "bad-gpus"),
        (b"bad-cluster/n5", negative.SerializeToString(), "bad-resources"),
        (b"bad-cluster/elsewhere", node_record("n6").SerializeToString(), "key-mismatch"),
    ]


async def produce(
    bootstrap_servers: str,
    topic: str,
    records: Iterator[tuple[bytes, bytes]] | Sequence[tuple[bytes, bytes]],
    **client_options: Any,
) -> int:
    """Publish (key, value) records and wait for every acknowledgement; returns the count."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_batch_size=1 << 20,
        **client_options,
    )
    await producer.start()
    count = 0
    try:
        batch = []
        for key, value in records:
            batch.append(await producer.send(topic, value=value, key=key))
            count += 1
            if len(batch) >= 10_000:
                await asyncio.gather(*batch)
                batch.clear()
        await asyncio.gather(*batch)
    finally:
        await producer.stop()
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m fleetd.loadgen", description=__doc__)
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="fleet.telemetry.v1")
    parser.add_argument("--clusters", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=1000, help="nodes per cluster")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--malformed", action="store_true", help="also publish bad records")
    parser.add_argument(
        "--changed-fraction",
        type=float,
        default=None,
        help="publish the periodic mix (periodic_reports: --records / nodes rounds) with "
        "this share of changed reports instead of the cycling stream",
    )
    security.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        client_options = security.from_arguments(args).client_options()
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    fleet = synthetic_fleet(rng, clusters=args.clusters, nodes_per_cluster=args.nodes)
    if args.changed_fraction is None:
        records: list[tuple[bytes, bytes]] = list(node_records(fleet, args.records, rng))
    else:
        rounds = max(1, args.records // max(1, len(fleet)))
        records = list(periodic_reports(fleet, rounds, rng, changed_fraction=args.changed_fraction))
    if args.malformed:
        records += [(k, v) for k, v, _ in malformed_records()]
    started = time.perf_counter()
    count = asyncio.run(produce(args.bootstrap_servers, args.topic, records, **client_options))
    elapsed_s = time.perf_counter() - started
    print(json.dumps({"records": count, "seconds": round(elapsed_s, 3),
                      "records_per_s": round(count / elapsed_s)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
