"""`python -m benchmarks rpc [--json]`: Place latency at 10,000 nodes next to a no-op RPC.

Starts `fleetd serve` as a subprocess on a simulated fleet of `--nodes` 8-GPU nodes (two
clusters), waits for readiness, then one client alternates `Placement.Place` (a 1-GPU pod,
a fresh workload id each time) with `grpc.health.v1.Health/Check` (the no-op unary RPC on
the same server), sequentially so each latency is one request's service time over gRPC.
Target: Place p99 <= 3x the no-op's p99. The last line is JSON with place_p50_ms,
place_p99_ms, noop_p50_ms, noop_p99_ms, ratio_p99, nodes, calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetd import config as cfgmod
from fleetd.demo import free_port, wait_serving
from fleetd.v1 import placement_pb2, placement_pb2_grpc, types_pb2


def fleet_config(
    nodes: int, tmp: Path, port: int, policy: str = "", quota_gpus: float = 0.0
) -> dict[str, object]:
    """Embedded defaults with a simulated fleet of `nodes` A100/H100 nodes in two clusters;
    `quota_gpus` > 0: the benchmark's team gets that quota in total and per model (so every
    Place takes the quota's checks, without being held back)."""
    cfg = cfgmod.Config().model_dump(mode="json")
    half = nodes // 2
    cfg["sources"]["simulated"].update(
        heartbeat_s=3600.0,  # no heartbeat storm during the measurement
        confirm_after_s=3600.0,  # reservations stay pending: no pod traffic either
        clusters=[
            {
                "name": "bench-a",
                "pools": [{"name": "a100", "gpu_model": "A100-80GB", "nodes": half}],
            },
            {
                "name": "bench-b",
                "pools": [{"name": "h100", "gpu_model": "H100-80GB", "nodes": nodes - half}],
            },
        ],
    )
    cfg["server"].update(grpc_listen=f"127.0.0.1:{port}", metrics_listen="127.0.0.1:0")
    cfg["journal"]["path"] = str(tmp / "journal.sqlite3")
    cfg["logging"]["level"] = "WARNING"
    if policy:
        cfg["scheduling"]["policy"] = policy
    if quota_gpus > 0:
        by_model = {"A100-80GB": quota_gpus, "H100-80GB": quota_gpus}
        cfg["teams"]["quotas"] = {"bench": {"gpus": quota_gpus, "gpus_by_model": by_model}}
    return cfg


async def measure(port: int, calls: int, warmup: int) -> tuple[list[float], list[float]]:
    """Alternate Place and Health/Check; returns their latencies in seconds."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_serving(channel, timeout_s=300)
        place = placement_pb2_grpc.PlacementStub(channel).Place
        check = health_pb2_grpc.HealthStub(channel).Check
        noop_req = health_pb2.HealthCheckRequest(service="")
        place_s: list[float] = []
        noop_s: list[float] = []
        for i in range(warmup + calls):
            pod = types_pb2.PodSpec(cpu_millicores=2000, memory_bytes=8 << 30, gpu_count=1)
            req = placement_pb2.PlaceRequest(
                workload=types_pb2.Workload(workload_id=f"bench-{i}", team="bench", pod=pod)
            )
            t0 = time.perf_counter()
            resp = await place(req)
            t1 = time.perf_counter()
            await check(noop_req)
            t2 = time.perf_counter()
            if resp.result != types_pb2.DECISION_RESULT_PLACED:
                raise RuntimeError(f"Place {i} was not placed: {resp.explanation.summary}")
            if i >= warmup:
                place_s.append(t1 - t0)
                noop_s.append(t2 - t1)
        return place_s, noop_s


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints a table and (with --json) a JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks rpc", description=__doc__)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--policy", default="", help="scheduling.policy (default: the config's)")
    parser.add_argument(
        "--quota-gpus",
        type=float,
        default=0.0,
        help="give the team a GPU quota this large (total and per model): the quota's cost",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fleetd-bench-rpc-") as tmp:
        cfg_path = Path(tmp) / "fleetd.yaml"
        cfg = fleet_config(args.nodes, Path(tmp), port, args.policy, args.quota_gpus)
        cfg_path.write_text(yaml.safe_dump(cfg))
        log = open(Path(tmp) / "daemon.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetd.cli", "serve", "--config", str(cfg_path)], stderr=log
        )
        try:
            place_s, noop_s = asyncio.run(measure(port, args.calls, args.warmup))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    place_ms = np.asarray(place_s) * 1000
    noop_ms = np.asarray(noop_s) * 1000
    result = {
        "benchmark": "rpc",
        "nodes": args.nodes,
        "calls": args.calls,
        "policy": args.policy or cfgmod.Config().scheduling.policy,
        "quota_gpus": args.quota_gpus,
        "place_p50_ms": round(float(np.percentile(place_ms, 50)), 3),
        "place_p99_ms": round(float(np.percentile(place_ms, 99)), 3),
        "noop_p50_ms": round(float(np.percentile(noop_ms, 50)), 3),
        "noop_p99_ms": round(float(np.percentile(noop_ms, 99)), 3),
    }
    result["ratio_p99"] = round(result["place_p99_ms"] / result["noop_p99_ms"], 2)  # type: ignore[operator]
    print(
        f"{'rpc':<12}{'p50 ms':>10}{'p99 ms':>10}   ({args.nodes} nodes, {args.calls} calls each)"
    )
    print(f"{'Place':<12}{result['place_p50_ms']:>10}{result['place_p99_ms']:>10}")
    print(f"{'no-op':<12}{result['noop_p50_ms']:>10}{result['noop_p99_ms']:>10}")
    print(f"Place p99 / no-op p99 = {result['ratio_p99']} (target <= 3)")
    if args.json:
        print(json.dumps(result))
    return 0
