"""Packing quality on the Alibaba openb traces, side by side with the published FGD results.

    python -m benchmarks openb --trace default --policy fgd,fgd-plus --seeds 42-51 [--json] [--dump DIR]

Reproduces the FGD artifact's experiment (Weng et al., USENIX ATC'23;
hkust-adsl/kubernetes-scheduler-simulator): the 1,213 GPU nodes, the trace's pods shuffled and
tuned to 1.3 x the cluster's GPU capacity, arrivals only, a pod that fits nowhere skipped; the
GPU allocation % at each arrived % is computed exactly as the artifact's analysis scripts do.
The table prints fleetd's policies (means over the seeds) next to the published means of
Random, DotProd, GpuClustering, GpuPacking, BestFit and FGD.

`--trace` takes a trace name (default, cpu050, gpushare40, gpuspec10, multigpu20), `all`, or
the path to a pod-list CSV of the same format. `--dump DIR` writes every decision of every
seed as CSV (see `write_dump`) so that anyone can check feasibility and recompute the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.traces import (
    TRACE_NAMES,
    VARIANTS,
    LoadedNodes,
    LoadedPods,
    TraceError,
    derive_variant,
    gpu_node_list_path,
    load_nodes,
    load_pods,
    load_published,
    resolve_pod_list,
)
from scheduling.fragmentation import fleet_model_gpus
from scheduling.replay.policies import RANDOM_NODE_ORDER, fleet_typical_pods, make_policy
from scheduling.replay.recorder import alloc_curve
from scheduling.replay.simulator import (
    ReplayResult,
    build_fleet,
    fleet_model_ids,
    replay,
)
from scheduling.replay.trace import arrival_order
from scheduling.scoring import scorer_names

REPORT_POINTS = (90, 100, 110, 120, 130)
PUBLISHED_POLICIES = ("Random", "DotProd", "GpuClustering", "GpuPacking", "BestFit", "FGD")
TUNE_RATIO = 1.3


def parse_seeds(text: str) -> list[int]:
    """`42-51` or `42,43,50` (or a mix) -> sorted unique seeds."""
    seeds: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                if int(hi) < int(lo):
                    raise ValueError
                seeds.update(range(int(lo), int(hi) + 1))
            else:
                seeds.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad seed list {text!r}: use e.g. 42-51 or 42,43"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds given")
    return sorted(seeds)


def parse_policies(text: str) -> list[str]:
    """Comma-separated policies; each a scorer name or weighted terms joined by "+"
    (e.g. "fgd-cpu,best-fit,gpu-packing:1+best-fit:1"), optionally suffixed "@random" or
    "@index" to force the node order that breaks ties (default: the artifact's random order
    for "fgd", the trace's order otherwise)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    known = set(scorer_names())
    unknown = [
        p
        for p in names
        if p.partition("@")[2] not in ("", "random", "index")
        or any(t.partition(":")[0].strip() not in known for t in p.partition("@")[0].split("+"))
    ]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(unknown) or '(none)'}; known scorers: {', '.join(sorted(known))}"
        )
    return names


@dataclass(frozen=True)
class SeedRun:
    """One replay of one seed with one policy."""

    seed: int
    result: ReplayResult
    curve: dict[int, float]
    seconds: float


def run_seed(
    nodes: LoadedNodes, pods: LoadedPods, policy: str, seed: int, ratio: float = TUNE_RATIO
) -> SeedRun:
    """Replay one seed: tune and shuffle with numpy's PCG64(seed), then place with `policy`.

    As in the artifact, the same random stream first orders the pods, then draws the random
    node order that breaks FGD's ties (the artifact's random node-name prefixes).
    """
    rng = np.random.default_rng(seed)
    p = pods.trace
    order = arrival_order(p.gpu_request_milli, p.gpu_milli, nodes.trace.total_gpu_milli, ratio, rng)
    node_order = rng.permutation(nodes.trace.n_nodes).astype(np.int64)
    # "NAME@random" / "NAME@index" force the tie-break node order (default: random for fgd).
    name, _, forced = policy.partition("@")
    random_order = forced == "random" if forced else name in RANDOM_NODE_ORDER
    slot_node = node_order if random_order else np.arange(nodes.trace.n_nodes, dtype=np.int64)
    fleet = build_fleet(nodes.trace, nodes.names, slot_node)
    model_ids = fleet_model_ids(fleet, nodes.trace.models)
    typical = fleet_typical_pods(p, model_ids, len(fleet.gpu_models), fleet_model_gpus(fleet))
    chosen = make_policy(name, typical)
    start = time.perf_counter()
    result = replay(fleet, slot_node, p, pods.specs, order, chosen)
    seconds = time.perf_counter() - start
    total_gpus = int(nodes.trace.num_gpus.sum())
    curve = alloc_curve(result.arrived_gpu_milli, result.used_gpu_milli, total_gpus)
    return SeedRun(seed=seed, result=result, curve=curve, seconds=seconds)


def mean_curve(
    curves: Sequence[dict[int, float]], points: Sequence[int] = REPORT_POINTS
) -> dict[str, float]:
    """Mean allocation % per point over runs, as {"90": ...} (points missing in a run skipped)."""
    out: dict[str, float] = {}
    for k in points:
        values = [c[k] for c in curves if k in c]
        if values:
            out[str(k)] = round(float(np.mean(values)), 2)
    return out


def write_dump(
    directory: Path, trace: str, policy: str, run: SeedRun, nodes: LoadedNodes, pods: LoadedPods
) -> Path:
    """Write every decision of one run as CSV and return its path.

    Columns: arrival (0-based arrival order), pod_name (a redrawn pod gets "-tuned-<i>" as in
    the artifact), pod_row (the pod's 1-based data row in the pod-list CSV), cpu_milli,
    memory_mib, num_gpu, gpu_milli (per GPU), node_sn (empty when skipped), gpu_indices and
    gpu_milli_taken (";"-separated, same order), arrived_gpu_milli, used_gpu_milli.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{trace}-{policy}-seed{run.seed}.csv"
    p = pods.trace
    result = run.result
    n_trace = p.n_pods
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "arrival", "pod_name", "pod_row", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli",
                "node_sn", "gpu_indices", "gpu_milli_taken", "arrived_gpu_milli", "used_gpu_milli",
            ]
        )  # fmt: skip
        tuned = 0
        for i, row in enumerate(result.order.tolist()):
            name = pods.names[row]
            if i >= n_trace:
                name = f"{name}-tuned-{tuned}"
                tuned += 1
            node = int(result.node[i])
            take = result.gpu_take_milli[i]
            indices = np.flatnonzero(take)
            writer.writerow(
                [
                    i, name, int(pods.source_rows[row]) + 1, int(p.cpu_milli[row]),
                    int(p.memory_bytes[row]) >> 20, int(p.num_gpu[row]), int(p.gpu_milli[row]),
                    nodes.names[node] if node >= 0 else "",
                    ";".join(str(g) for g in indices.tolist()),
                    ";".join(str(int(take[g])) for g in indices.tolist()),
                    int(result.arrived_gpu_milli[i]), int(result.used_gpu_milli[i]),
                ]
            )  # fmt: skip
    return path


def format_table(
    trace: str,
    seeds: Sequence[int],
    ours: dict[str, dict[str, float]],
    published: dict[str, dict[str, float]],
) -> str:
    """A text table: one row per policy, one column per arrived % point."""
    header = f"{'policy':<26}" + "".join(f"{k:>8}%" for k in REPORT_POINTS)
    lines = [f"openb {trace}: GPU allocation % at arrived % (mean of {len(seeds)} seeds)", header]
    for name, values in ours.items():
        lines.append(
            f"{'fleetd ' + name:<26}"
            + "".join(f"{values.get(str(k), float('nan')):>9.2f}" for k in REPORT_POINTS)
        )
    for name, values in published.items():
        lines.append(
            f"{'published ' + name:<26}"
            + "".join(f"{values.get(str(k), float('nan')):>9.2f}" for k in REPORT_POINTS)
        )
    return "\n".join(lines)


def run_trace(
    trace: str, policies: Sequence[str], seeds: Sequence[int], dump: Path | None, nodes: LoadedNodes
) -> dict[str, object]:
    """Replay one trace with every policy and seed; print its table; return its figures."""
    if trace.startswith("variant:"):
        kind = trace.split(":", 1)[1]
        base = load_pods(resolve_pod_list("default")[1], nodes.trace.models)
        workload, pods = f"variant-{kind}", derive_variant(base, kind, nodes.trace)
    else:
        workload, path = resolve_pod_list(trace)
        pods = load_pods(path, nodes.trace.models)
    ours: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for policy in policies:
        runs = []
        for seed in seeds:
            run = run_seed(nodes, pods, policy, seed)
            runs.append(run)
            if dump is not None:
                write_dump(dump, workload, policy, run, nodes, pods)
        ours[policy] = mean_curve([r.curve for r in runs])
        seconds[policy] = round(float(np.mean([r.seconds for r in runs])), 2)
    published_curves = load_published(workload)
    published: dict[str, dict[str, float]] = {}
    if published_curves is not None:
        for name in PUBLISHED_POLICIES:
            if name in published_curves.curves:
                published[name] = mean_curve(list(published_curves.curves[name].values()))
    print(format_table(workload, seeds, ours, published))
    print("seconds per seed: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print()
    return {
        "trace": workload,
        "alloc_pct": ours,
        "fgd_alloc_pct": published.get("FGD", {}),
        "published_alloc_pct": published,
        "seconds_per_seed": seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m benchmarks openb`."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks openb",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--trace",
        default="default",
        help=(
            "trace name, 'all', a pod-list CSV path, 'variant:STEP[+STEP...]' (e.g. "
            "variant:gpuspec33+gpucpu150, see benchmarks.traces.VARIANT_STEPS) or 'variants' "
            "(default: default)"
        ),
    )
    parser.add_argument(
        "--policy",
        type=parse_policies,
        default=parse_policies("fgd-plus,fgd-cpu,fgd"),
        help="comma-separated fleetd policies (default: fgd-plus,fgd-cpu,fgd; the JSON line reports the first)",
    )
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=parse_seeds("42-51"),
        help="seeds, e.g. 42-51 (default) or 42,43",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument(
        "--dump", type=Path, default=None, help="write every decision of every seed as CSV into DIR"
    )
    parser.add_argument(
        "--nodes",
        type=Path,
        default=None,
        help="node-list CSV (default: the 1,213 openb GPU nodes)",
    )
    args = parser.parse_args(argv)
    if args.trace == "all":
        traces = list(TRACE_NAMES)
    elif args.trace == "variants":
        traces = [f"variant:{kind}" for kind in VARIANTS]
    else:
        traces = [args.trace]
    try:
        nodes = load_nodes(args.nodes or gpu_node_list_path())
        results = [run_trace(t, args.policy, args.seeds, args.dump, nodes) for t in traces]
    except TraceError as error:
        print(f"openb: {error}", file=sys.stderr)
        return 2
    if args.json:
        first = args.policy[0]
        if len(results) == 1:
            only = results[0]
            ours = only["alloc_pct"]
            assert isinstance(ours, dict)
            line: dict[str, object] = {
                "trace": only["trace"],
                "policy": first,
                "seeds": args.seeds,
                "alloc_pct": ours[first],
                "fgd_alloc_pct": only["fgd_alloc_pct"],
                "policies": ours,
                "seconds_per_seed": only["seconds_per_seed"],
            }
        else:
            line = {
                "trace": "all",
                "policy": first,
                "seeds": args.seeds,
                "alloc_pct": _mean_over([r["alloc_pct"] for r in results], first),
                "fgd_alloc_pct": _mean_over([{"FGD": r["fgd_alloc_pct"]} for r in results], "FGD"),
                "by_trace": {
                    str(r["trace"]): {
                        "alloc_pct": r["alloc_pct"],
                        "fgd_alloc_pct": r["fgd_alloc_pct"],
                        "published_alloc_pct": r["published_alloc_pct"],
                    }
                    for r in results
                },
            }
        print(json.dumps(line))
    return 0


def _mean_over(per_trace: Sequence[object], policy: str) -> dict[str, float]:
    """Mean over traces of one policy's {"90": ...} figures."""
    out: dict[str, float] = {}
    for k in REPORT_POINTS:
        values = []
        for figures in per_trace:
            assert isinstance(figures, dict)
            point = figures.get(policy, {}).get(str(k))
            if point is not None:
                values.append(point)
        if values:
            out[str(k)] = round(float(np.mean(values)), 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
