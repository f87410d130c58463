"""`fleetd demo`: start the daemon and drive it through its real gRPC API.

The daemon runs as a subprocess (`fleetd serve`) on the simulated fleet of the shipped config
(scaled by --scale) or, with `--trace PATH`, on the openb GPU node list next to the trace
(Weng et al., ATC'23). Pods arrive in order and are never deleted, as in the FGD paper's
experiments, until the workload (about 120% of the fleet's GPUs for the synthetic one) has
arrived. The demo prints a progress bar and a summary (GPU allocation %, decisions per
second, Place p50/p99 latency, reasons for unscheduled pods) and writes a PNG chart of GPU
allocation over arrived GPU demand.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleetd import config as cfgmod
from fleetd.v1 import fleet_pb2, fleet_pb2_grpc, placement_pb2, placement_pb2_grpc, types_pb2

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class DemoPod:
    """One pod of the workload (openb units: gpu_milli per GPU)."""

    name: str
    cpu_millicores: int
    memory_bytes: int
    num_gpu: int
    gpu_milli: int
    gpu_models: tuple[str, ...] = ()

    @property
    def gpu_demand_milli(self) -> int:
        """GPU demand in thousandths of a GPU."""
        return self.num_gpu * self.gpu_milli

    def spec(self) -> types_pb2.PodSpec:
        """The PodSpec: a share below 1000 of one GPU is gpu_milli, otherwise whole GPUs."""
        spec = types_pb2.PodSpec(
            cpu_millicores=self.cpu_millicores,
            memory_bytes=self.memory_bytes,
            gpu_models=list(self.gpu_models),
        )
        if self.num_gpu == 1 and 0 < self.gpu_milli < 1000:
            spec.gpu_milli = self.gpu_milli
        else:
            spec.gpu_count = self.num_gpu
        return spec


def shared_dir() -> Path:
    """<repo>/../shared, or FLEETD_SHARED_DIR."""
    env = os.environ.get("FLEETD_SHARED_DIR")
    return Path(env) if env else cfgmod.REPO.parent / "shared"


def read_trace(path: Path) -> list[DemoPod]:
    """Pods of an openb pod list (`name, cpu_milli, memory_mib, num_gpu, gpu_milli[, gpu_spec...]`)."""
    pods = []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "creation_time" in rows[0]:
        rows.sort(key=lambda r: (int(r["creation_time"] or 0), r["name"]))
    for r in rows:
        spec = (r.get("gpu_spec") or "").strip()
        pods.append(
            DemoPod(
                name=r["name"],
                cpu_millicores=int(r["cpu_milli"]),
                memory_bytes=int(r["memory_mib"]) * MIB,
                num_gpu=int(r["num_gpu"]),
                gpu_milli=int(r["gpu_milli"]) if int(r["num_gpu"]) else 0,
                gpu_models=tuple(m for m in spec.split("|") if m),
            )
        )
    return pods


def tuned_arrivals(
    pods: list[DemoPod], base: dict[str, Any], ratio: float, seed: int
) -> list[DemoPod]:
    """FGD's arrival order: shuffled, then tuned to `ratio` x the fleet's GPUs (the core's
    `scheduling.replay.trace.arrival_order`); redrawn pods get a suffixed workload id."""
    from scheduling.replay.trace import arrival_order

    pods = sorted(pods, key=lambda p: p.name)  # the artifact sorts by name before shuffling
    capacity = sum(
        p["gpus_per_node"] * p["nodes"] * 1000
        for c in base["sources"]["simulated"]["clusters"]
        for p in c["pools"]
        if p["gpu_model"]
    )
    rows = arrival_order(
        np.asarray([p.gpu_demand_milli for p in pods], dtype=np.int64),
        np.asarray([p.gpu_milli for p in pods], dtype=np.int32),
        capacity,
        ratio,
        np.random.default_rng(seed),
    )
    seen: collections.Counter[int] = collections.Counter()
    out = []
    for row in rows.tolist():
        pod = pods[row]
        if seen[row]:
            pod = DemoPod(f"{pod.name}-r{seen[row]}", pod.cpu_millicores, pod.memory_bytes,
                          pod.num_gpu, pod.gpu_milli, pod.gpu_models)  # fmt: skip
        seen[row] += 1
        out.append(pod)
    return out


def openb_fleet(node_list: Path) -> list[dict[str, Any]]:
    """Simulated clusters from an openb node list: one pool per node shape."""
    shapes: collections.Counter[tuple[int, int, int, str]] = collections.Counter()
    with node_list.open(newline="") as f:
        for r in csv.DictReader(f):
            shapes[(int(r["cpu_milli"]), int(r["memory_mib"]), int(r["gpu"]), r["model"])] += 1
    pools = []
    for i, ((cpu, mem, gpu, model), count) in enumerate(sorted(shapes.items())):
        pools.append(
            {
                "name": f"{(model or 'cpu').lower()}-{gpu}g-{i}",
                "gpu_model": model,
                "gpus_per_node": gpu if model else 0,
                "cpu_millicores": cpu,
                "memory_bytes": mem * MIB,
                "nodes": count,
                "max_size": count,
            }
        )
    return [{"name": "openb", "pools": pools}]


def synthetic(seed: int, fleet: list[dict[str, Any]], target_ratio: float = 1.2) -> list[DemoPod]:
    """A seeded openb-like workload of about `target_ratio` x the fleet's GPUs.

    Mix (after the openb default trace's shape): most pods 1 whole GPU, a share take 2-8,
    a quarter take a fraction of one GPU, a few are CPU-only, some pin a GPU model.
    """
    rng = np.random.default_rng(seed)
    models = sorted({p["gpu_model"] for c in fleet for p in c["pools"] if p["gpu_model"]})
    total_milli = sum(
        p["gpus_per_node"] * p["nodes"] * 1000 for c in fleet for p in c["pools"] if p["gpu_model"]
    )
    pods: list[DemoPod] = []
    demand = 0
    while demand < target_ratio * total_milli:
        kind = rng.random()
        if kind < 0.05:
            num_gpu, milli = 0, 0
        elif kind < 0.30:
            num_gpu, milli = 1, int(rng.choice([100, 200, 250, 300, 500, 600, 750]))
        elif kind < 0.85:
            num_gpu, milli = 1, 1000
        else:
            num_gpu, milli = int(rng.choice([2, 4, 8], p=[0.5, 0.3, 0.2])), 1000
        pinned = tuple([str(rng.choice(models))]) if models and rng.random() < 0.1 else ()
        cpu = int(rng.choice([1000, 2000, 4000, 8000, 12000])) * max(1, num_gpu)
        mem = int(rng.choice([4, 8, 16, 32])) * GIB * max(1, num_gpu)
        pods.append(DemoPod(f"demo-{len(pods):05d}", cpu, mem, num_gpu, milli, pinned))
        demand += num_gpu * milli
    return pods


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for the daemon subprocess)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_printed_decile = [-1]  # the last 10% step printed when stderr is not a terminal


def progress(done: int, total: int, start: float, width: int = 40) -> None:
    """A one-line progress bar on stderr (every 10% only when stderr is not a terminal)."""
    frac = done / total if total else 1.0
    if not sys.stderr.isatty():
        decile = int(frac * 10)
        if decile <= _printed_decile[0]:
            return
        _printed_decile[0] = decile
        sys.stderr.write(f"{done}/{total} pods ({100 * frac:.0f}%)\n")
        return
    bar = "#" * int(frac * width)
    rate = done / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(f"\r[{bar:<{width}}] {done}/{total} pods  {rate:7.0f}/s")
    sys.stderr.flush()


async def wait_serving(channel: grpc.aio.Channel, timeout_s: float = 60.0) -> None:
    """Wait for grpc.health.v1 SERVING (the daemon is ready once its sources synced)."""
    stub = health_pb2_grpc.HealthStub(channel)
    await asyncio.wait_for(channel.channel_ready(), timeout_s)
    async for resp in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s):
        if resp.status == health_pb2.HealthCheckResponse.SERVING:
            return


async def drive(
    args: argparse.Namespace, pods: list[DemoPod], port: int, total_gpu_milli: int
) -> dict[str, Any]:
    """Place every pod over gRPC with `args.concurrency` clients; collect the results."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await wait_serving(channel)
        placement = placement_pb2_grpc.PlacementStub(channel)
        fleet = fleet_pb2_grpc.FleetStub(channel)
        latencies_s: list[float] = []
        results: collections.Counter[str] = collections.Counter()
        reasons: collections.Counter[str] = collections.Counter()
        curve: list[tuple[float, float]] = [(0.0, 0.0)]
        arrived_milli = 0
        next_index = 0
        done = 0
        start = time.perf_counter()
        lock = asyncio.Lock()
        sample_every = max(1, len(pods) // 100)

        async def sample() -> None:
            snap = await fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
            alloc = sum(c.gpu_milli_allocated for c in snap.capacity)
            curve.append((100.0 * arrived_milli / total_gpu_milli, 100.0 * alloc / total_gpu_milli))

        async def worker() -> None:
            nonlocal next_index, done, arrived_milli
            while True:
                async with lock:
                    if next_index >= len(pods):
                        return
                    pod = pods[next_index]
                    next_index += 1
                wl = types_pb2.Workload(workload_id=pod.name, team="demo", pod=pod.spec())
                t0 = time.perf_counter()
                resp = await placement.Place(placement_pb2.PlaceRequest(workload=wl), timeout=30)
                latencies_s.append(time.perf_counter() - t0)
                result = types_pb2.DecisionResult.Name(resp.result).removeprefix("DECISION_RESULT_")
                results[result] += 1
                if resp.result != types_pb2.DECISION_RESULT_PLACED and resp.explanation.reasons:
                    # The pod's main reason: the one that rejected the most nodes.
                    reasons[resp.explanation.reasons[0].code] += 1
                done += 1
                arrived_milli += pod.gpu_demand_milli
                if done % sample_every == 0:
                    await sample()
                    progress(done, len(pods), start)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed_s = time.perf_counter() - start
        await sample()
        progress(done, len(pods), start)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        snap = await fleet.GetSnapshot(fleet_pb2.GetSnapshotRequest())
    lat_ms = np.asarray(latencies_s) * 1000
    return {
        "pods": len(pods),
        "elapsed_s": elapsed_s,
        "decisions_per_s": len(pods) / elapsed_s if elapsed_s else 0.0,
        "place_p50_ms": float(np.percentile(lat_ms, 50)) if lat_ms.size else 0.0,
        "place_p99_ms": float(np.percentile(lat_ms, 99)) if lat_ms.size else 0.0,
        "results": dict(results),
        "reasons": dict(reasons.most_common()),
        "gpu_allocation_pct": 100.0
        * sum(c.gpu_milli_allocated for c in snap.capacity)
        / total_gpu_milli,
        "fragmentation_ratio": snap.fragmentation_ratio,
        "curve": curve,
    }


def published_curves(workload: str) -> dict[str, tuple[list[float], list[float]]]:
    """The FGD artifact's published allocation curves of `workload`, mean over seeds.

    From `<shared>/traces/fgd-published/analysis_allo_discrete.csv` (hkust-adsl/
    kubernetes-scheduler-simulator, Apache-2.0): GPU allocation % at each arrived %.
    Empty when the file or the workload is not there.
    """
    path = shared_dir() / "traces" / "fgd-published" / "analysis_allo_discrete.csv"
    if not path.exists():
        return {}
    rows: dict[str, list[list[float]]] = collections.defaultdict(list)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        xs = [float(h) for h in header[5:]]
        for r in reader:
            if r[0] == workload and r[1] in ("06-FGD", "05-BestFit", "04-GpuPacking"):
                rows[r[1]].append([float(v) if v else float("nan") for v in r[5:]])
    return {
        policy: (xs, np.nanmean(np.asarray(runs), axis=0).tolist()) for policy, runs in rows.items()
    }


def chart(
    curve: list[tuple[float, float]],
    path: Path,
    title: str,
    published: dict[str, tuple[list[float], list[float]]] | None = None,
) -> None:
    """Write the allocation-over-arrivals PNG (with the published curves when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    xs, ys = zip(*curve, strict=True)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(xs, ys, label="fleetd (GPU allocated)", linewidth=2)
    for policy, (pxs, pys) in sorted((published or {}).items()):
        # Only the arrivals this run reached: the artifact inflates the trace to 130%.
        upto = [(x, y) for x, y in zip(pxs, pys, strict=True) if x <= max(xs)]
        if upto:
            ax.plot(*zip(*upto, strict=True), linestyle="--", linewidth=1,
                    label=f"FGD artifact {policy[3:]} (published, mean of 10 seeds)")  # fmt: skip
    ax.plot([0, 100], [0, 100], linestyle=":", color="grey", label="arrived = allocated")
    ax.set_xlabel("arrived GPU demand (% of fleet GPUs)")
    ax.set_ylabel("GPU allocation (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    base = cfgmod.load(args.config).model_dump(mode="json")
    if args.trace is not None:
        trace = args.trace
        if not trace.exists():
            print(f"fleetd demo: no such trace: {trace}", file=sys.stderr)
            return 2
        node_list = trace.parent / "openb_node_list_gpu_node.csv"
        if not node_list.exists():
            node_list = shared_dir() / "traces" / "openb" / "openb_node_list_gpu_node.csv"
        base["sources"]["simulated"]["clusters"] = openb_fleet(node_list)
        pods = read_trace(trace)
        if args.tune > 0:
            pods = tuned_arrivals(pods, base, args.tune, args.seed)
        title = f"fleetd on {trace.name} ({base['scheduling']['policy']}, seed {args.seed})"
    else:
        for cluster in base["sources"]["simulated"]["clusters"]:
            for pool in cluster["pools"]:
                pool["nodes"] *= args.scale
                pool["max_size"] = max(pool["max_size"], pool["nodes"])
        pods = synthetic(args.seed, base["sources"]["simulated"]["clusters"])
        title = f"fleetd, synthetic workload seed {args.seed} ({base['scheduling']['policy']})"
    if args.pods:
        pods = pods[: args.pods]
    total_gpu_milli = sum(
        p["gpus_per_node"] * p["nodes"] * 1000
        for c in base["sources"]["simulated"]["clusters"]
        for p in c["pools"]
        if p["gpu_model"]
    )
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fleetd-demo-") as tmp:
        base["server"]["grpc_listen"] = f"127.0.0.1:{port}"
        base["server"]["metrics_listen"] = "127.0.0.1:0"
        base["journal"]["path"] = str(Path(tmp) / "journal.sqlite3")
        base["logging"]["level"] = "WARNING"
        cfg_path = Path(tmp) / "fleetd.yaml"
        cfg_path.write_text(yaml.safe_dump(base))
        nodes = sum(
            p["nodes"] for c in base["sources"]["simulated"]["clusters"] for p in c["pools"]
        )
        print(
            f"fleetd demo: {len(pods)} pods onto {nodes} nodes / {total_gpu_milli // 1000} GPUs "
            f"(policy {base['scheduling']['policy']}), {args.concurrency} gRPC clients"
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetd.cli", "serve", "--config", str(cfg_path)],
            stderr=open(Path(tmp) / "daemon.log", "w"),  # noqa: SIM115
        )
        try:
            summary = asyncio.run(drive(args, pods, port, total_gpu_milli))
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            print(f"fleetd demo: failed talking to the daemon: {exc}", file=sys.stderr)
            print((Path(tmp) / "daemon.log").read_text()[-3000:], file=sys.stderr)
            return 1
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
            if proc.poll() is None:
                proc.kill()
    published = published_curves(args.trace.stem) if args.trace is not None else {}
    chart(summary["curve"], args.chart, title, published)
    results = summary["results"]
    print("\nsummary")
    print(
        f"  GPU allocation        {summary['gpu_allocation_pct']:.1f}% of {total_gpu_milli // 1000} GPUs"
    )
    print(f"  fragmentation ratio   {summary['fragmentation_ratio']:.3f}")
    print(
        f"  decisions             {summary['pods']} in {summary['elapsed_s']:.2f}s = {summary['decisions_per_s']:.0f}/s"
    )
    print(
        f"  Place latency         p50 {summary['place_p50_ms']:.2f} ms, p99 {summary['place_p99_ms']:.2f} ms (client side, over gRPC)"
    )
    print(
        "  results               "
        + ", ".join(f"{k.lower()} {v}" for k, v in sorted(results.items()))
    )
    if summary["reasons"]:
        print("  unscheduled pods, by main reason (the reason rejecting the most nodes):")
        for code, count in summary["reasons"].items():
            print(f"    {code:<24} {count}")
    print(f"  chart                 {args.chart}")
    return 0
