"""Loading the Alibaba openb traces (cluster-trace-gpu-v2023) from the shared directory.

All file I/O for the openb replay lives here, outside the pure core: CSV rows become numpy
arrays (`scheduling.replay.trace.NodeTrace` / `PodTrace`) that the core replays.

The traces are read at run time from `<repo>/../shared/traces` (override the shared directory
with the environment variable FLEETD_SHARED_DIR); they are never copied into the repository.
Bad input (a missing file, a missing column, a non-integer field) raises `TraceError` with the
file name and line number, never a bare crash.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduling.replay.simulator import pod_specs
from scheduling.replay.trace import NodeTrace, PodTrace
from scheduling.workload import PodSpec

TRACE_NAMES = ("default", "cpu050", "gpushare40", "gpuspec10", "multigpu20")
"""The openb pod lists shipped in ../shared/traces/openb (the FGD artifact used 17 such workloads)."""

MEBIBYTE = 1024 * 1024

NODE_COLUMNS = ("sn", "cpu_milli", "memory_mib", "gpu", "model")
POD_COLUMNS = ("name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli")
"""Required pod-list columns; `gpu_spec` and the time columns are optional (the multigpu files lack them)."""


class TraceError(ValueError):
    """A trace file is missing or malformed; the message names the file and line."""


def repo_root() -> Path:
    """The repository (worktree) root: the parent of the `benchmarks` package."""
    return Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The shared data directory: $FLEETD_SHARED_DIR, else `<repo>/../shared`."""
    env = os.environ.get("FLEETD_SHARED_DIR")
    return Path(env) if env else repo_root().parent / "shared"


def openb_dir() -> Path:
    """Directory holding the openb node and pod lists."""
    return shared_dir() / "traces" / "openb"


def published_results_path() -> Path:
    """The FGD artifact's published per-seed allocation curves (analysis_allo_discrete.csv)."""
    return shared_dir() / "traces" / "fgd-published" / "analysis_allo_discrete.csv"


def gpu_node_list_path() -> Path:
    """The 1,213 GPU nodes the FGD artifact simulates."""
    return openb_dir() / "openb_node_list_gpu_node.csv"


def resolve_pod_list(trace: str) -> tuple[str, Path]:
    """Map a trace name (`default`, ...) or a path to a pod-list CSV to (workload name, path)."""
    if trace in TRACE_NAMES:
        return trace, openb_dir() / f"openb_pod_list_{trace}.csv"
    path = Path(trace)
    if not path.is_file():
        known = ", ".join(TRACE_NAMES)
        raise TraceError(f"{trace}: not a known trace ({known}) nor a pod-list CSV file")
    name = path.stem.removeprefix("openb_pod_list_")
    return name, path


def _read_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [column for column in required if column not in header]
            if missing:
                raise TraceError(
                    f"{path}: missing column(s) {', '.join(missing)}; header is {header}"
                )
            return list(reader)
    except OSError as error:
        raise TraceError(f"{path}: cannot read: {error.strerror or error}") from error
    except csv.Error as error:
        raise TraceError(f"{path}: not a valid CSV file: {error}") from error


def _int_field(path: Path, line: int, row: dict[str, str], column: str) -> int:
    raw = row.get(column)
    try:
        value = int(float(raw)) if raw not in (None, "") else None
    except ValueError:
        value = None
    if value is None or value < 0:
        raise TraceError(
            f"{path}:{line}: column {column!r} must be a non-negative integer, got {raw!r}"
        )
    return value


@dataclass(frozen=True)
class LoadedNodes:
    """A node list: the core's arrays plus the names the dump needs."""

    trace: NodeTrace
    names: list[str]


@dataclass(frozen=True)
class LoadedPods:
    """A pod list: the core's arrays plus the names and spec strings, rows in name order."""

    trace: PodTrace
    names: list[str]
    source_rows: np.ndarray
    """(n_pods,) int64: the 0-based data row of each pod in the CSV file (rows are sorted by name)."""
    specs: list[PodSpec]
    """One engine PodSpec per pod row."""


def load_nodes(path: Path) -> LoadedNodes:
    """Read a node list (`sn, cpu_milli, memory_mib, gpu, model`); GPU models are interned sorted."""
    rows = _read_rows(path, NODE_COLUMNS)
    if not rows:
        raise TraceError(f"{path}: no nodes")
    names, cpu, mem, gpus, models = [], [], [], [], []
    for line, row in enumerate(rows, start=2):
        names.append(row["sn"])
        cpu.append(_int_field(path, line, row, "cpu_milli"))
        mem.append(_int_field(path, line, row, "memory_mib"))
        gpus.append(_int_field(path, line, row, "gpu"))
        models.append((row.get("model") or "").strip())
    vocabulary = sorted({m for m in models if m})
    index = {m: i for i, m in enumerate(vocabulary)}
    model_id = np.array([index.get(m, -1) for m in models], dtype=np.int32)
    trace = NodeTrace(
        cpu_milli=np.array(cpu, dtype=np.int64),
        memory_bytes=np.array(mem, dtype=np.int64) * MEBIBYTE,
        num_gpus=np.array(gpus, dtype=np.int32),
        model_id=model_id,
        models=tuple(vocabulary),
    )
    return LoadedNodes(trace=trace, names=names)


def load_pods(path: Path, models: tuple[str, ...]) -> LoadedPods:
    """Read a pod list and convert it the way the FGD artifact's pod_csv_to_yaml.py does.

    `gpu_milli` above 1000 is clamped to 1000; pods with `num_gpu == 0` request no GPU (any
    `gpu_milli` is ignored) and carry no model constraint; `gpu_spec` ("V100M16|V100M32") lists
    the GPU models a GPU pod accepts. `models` is the node list's model vocabulary: a spec
    naming only models absent from the fleet makes the pod unplaceable, as in the artifact.
    Rows are returned sorted by pod name (the artifact sorts by name before shuffling).
    """
    rows = _read_rows(path, POD_COLUMNS)
    if not rows:
        raise TraceError(f"{path}: no pods")
    names, cpu, mem, num_gpu, gpu_milli, specs = [], [], [], [], [], []
    for line, row in enumerate(rows, start=2):
        names.append(row["name"])
        cpu.append(_int_field(path, line, row, "cpu_milli"))
        mem.append(_int_field(path, line, row, "memory_mib"))
        n = _int_field(path, line, row, "num_gpu")
        milli = _int_field(path, line, row, "gpu_milli")
        if n > 0 and milli == 0:
            raise TraceError(f"{path}:{line}: num_gpu={n} but gpu_milli=0")
        milli = min(milli, 1000) if n > 0 else 0
        if n > 1 and milli < 1000:
            raise TraceError(
                f"{path}:{line}: a multi-GPU pod must take whole GPUs, got gpu_milli={milli}"
            )
        num_gpu.append(n)
        gpu_milli.append(milli)
        spec = (row.get("gpu_spec") or "").strip() if n > 0 else ""
        specs.append("|".join(part for part in spec.split("|") if part))
    order = sorted(range(len(names)), key=names.__getitem__)
    if len(set(names)) != len(names):
        raise TraceError(f"{path}: pod names are not unique")
    spec_vocabulary = sorted(set(specs))
    spec_index = {s: i for i, s in enumerate(spec_vocabulary)}
    model_index = {m: i for i, m in enumerate(models)}
    spec_allowed = np.zeros((len(spec_vocabulary), len(models)), dtype=bool)
    for i, spec in enumerate(spec_vocabulary):
        if not spec:
            spec_allowed[i, :] = True
            continue
        for part in spec.split("|"):
            if part in model_index:
                spec_allowed[i, model_index[part]] = True
    idx = np.array(order, dtype=np.int64)
    trace = PodTrace(
        cpu_milli=np.array(cpu, dtype=np.int64)[idx],
        memory_bytes=np.array(mem, dtype=np.int64)[idx] * MEBIBYTE,
        num_gpu=np.array(num_gpu, dtype=np.int32)[idx],
        gpu_milli=np.array(gpu_milli, dtype=np.int32)[idx],
        spec_id=np.array([spec_index[s] for s in specs], dtype=np.int32)[idx],
        spec_allowed=spec_allowed,
        specs=tuple(spec_vocabulary),
    )
    sorted_names = [names[i] for i in order]
    return LoadedPods(
        trace=trace, names=sorted_names, source_rows=idx, specs=pod_specs(trace, sorted_names)
    )


@dataclass(frozen=True)
class PublishedCurves:
    """The published per-seed curves of one workload: policy -> seed -> alloc % per arrived %."""

    total_gpus: int
    curves: dict[str, dict[int, dict[int, float]]]


def load_published(workload: str, path: Path | None = None) -> PublishedCurves | None:
    """The FGD artifact's published allocation curves for `workload` (e.g. `default`), or None."""
    path = path or published_results_path()
    if not path.is_file():
        return None
    rows = _read_rows(path, ("workload", "sc_policy", "tune", "seed", "total_gpus"))
    key = f"openb_pod_list_{workload}"
    curves: dict[str, dict[int, dict[int, float]]] = {}
    total_gpus = 0
    for line, row in enumerate(rows, start=2):
        if row["workload"] != key:
            continue
        policy = row["sc_policy"].split("-", 1)[-1]
        seed = _int_field(path, line, row, "seed")
        total_gpus = _int_field(path, line, row, "total_gpus")
        points = {}
        for column, value in row.items():
            if column.isdigit() and value not in ("", None):
                points[int(column)] = float(value)
        curves.setdefault(policy, {})[seed] = points
    if not curves:
        return None
    return PublishedCurves(total_gpus=total_gpus, curves=curves)


VARIANTS = (
    "cpu250",
    "multigpu50",
    "gpushare100",
    "gpuspec33",
    "gpuspec60",
    "pin10-T4",
    "pin3-P100",
    "pair40",
    "gpucpu200",
    "gpucpu50",
    "gpuspec33+gpucpu150",
    "gpuspec20+multigpu30+cpu200",
)
"""The variants `--trace variants` replays: synthetic workloads derived from the default trace,
to check that a policy is not tuned to the five shipped traces (the artifact's 17 workloads
vary the same knobs; these are fleetd's own derivations, not the artifact's files). A variant
is one or more steps joined by "+", applied in order (see `derive_variant`)."""

VARIANT_STEPS = {
    "cpuN": "N % as many CPU-only pods (N >= 100; clones of the trace's CPU-only pods)",
    "multigpuN": "N/10 x as many multi-GPU pods (N >= 10; clones)",
    "gpushareN": "N % of the single whole-GPU pods become a share drawn from the trace's shares",
    "gpuspecN": "N % of the GPU pods require one GPU model, drawn by the fleet's GPUs per model",
    "pinN-MODEL": "N % of the GPU pods require MODEL",
    "pairN": "N % of the GPU pods accept two models, drawn by the fleet's GPUs per model",
    "gpucpuN": "every GPU pod's CPU request x N/100",
}
"""Variant steps (N an integer). Deterministic: step i draws from numpy's PCG64 seeded i."""


def _parse_step(step: str) -> tuple[str, int, str]:
    """("gpuspec", 33, "") for "gpuspec33", ("pin", 10, "T4") for "pin10-T4"."""
    head, _, model = step.partition("-")
    for prefix in ("multigpu", "gpushare", "gpuspec", "gpucpu", "pair", "pin", "cpu"):
        if head.startswith(prefix) and head[len(prefix) :].isdigit():
            if bool(model) != (prefix == "pin"):
                break
            return prefix, int(head[len(prefix) :]), model
    steps = "; ".join(f"{k}: {v}" for k, v in VARIANT_STEPS.items())
    raise TraceError(f"unknown variant step {step!r}; steps: {steps}")


def _require(
    specs: list[str],
    spec_id: np.ndarray,
    chosen: np.ndarray,
    wanted: list[str],
    models: tuple[str, ...],
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Give the pods `chosen` the spec strings `wanted`; returns specs, spec ids, spec_allowed."""
    new_specs = sorted(set(specs) | set(wanted))
    old_to_new = np.array([new_specs.index(s) for s in specs], dtype=np.int32)
    spec_id = old_to_new[spec_id]
    spec_id[chosen] = np.array([new_specs.index(w) for w in wanted], dtype=np.int32)
    allowed = np.zeros((len(new_specs), len(models)), dtype=bool)
    for i, s in enumerate(new_specs):
        parts = [x for x in s.split("|") if x]
        allowed[i] = True if not parts else [m in parts for m in models]
    return new_specs, spec_id, allowed


def derive_variant(pods: LoadedPods, kind: str, nodes: NodeTrace) -> LoadedPods:
    """The `kind` variant of a pod list (steps of `VARIANT_STEPS` joined by "+", applied in
    order); dump rows point at the source rows."""
    steps = [_parse_step(step) for step in kind.split("+")]
    for i, (name, n, model) in enumerate(steps):
        pods = _derive_step(pods, name, n, model, nodes, np.random.default_rng(i))
    return pods


def _derive_step(
    pods: LoadedPods, kind: str, n: int, model: str, nodes: NodeTrace, rng: np.random.Generator
) -> LoadedPods:
    p = pods.trace
    rows = np.arange(p.n_pods)
    num_gpu, gpu_milli, spec_id = p.num_gpu.copy(), p.gpu_milli.copy(), p.spec_id.copy()
    cpu_milli = p.cpu_milli.copy()
    specs, spec_allowed = list(p.specs), p.spec_allowed
    gpu_nodes = nodes.model_id >= 0
    per_model = np.bincount(
        nodes.model_id[gpu_nodes], weights=nodes.num_gpus[gpu_nodes], minlength=len(nodes.models)
    )
    present = np.flatnonzero(per_model > 0)
    by_gpus = per_model[present] / per_model[present].sum()
    if kind in ("cpu", "multigpu"):
        if (kind == "cpu" and n < 100) or (kind == "multigpu" and n < 10):
            raise TraceError(f"variant step {kind}{n}: only adds pods (cpu >= 100, multigpu >= 10)")
        pool = np.flatnonzero(p.num_gpu == 0) if kind == "cpu" else np.flatnonzero(p.num_gpu > 1)
        extra = round((n / 100 - 1 if kind == "cpu" else n / 10 - 1) * float(pool.size))
        rows = np.concatenate([rows, rng.choice(pool, size=extra, replace=True)])
        num_gpu, gpu_milli, spec_id = num_gpu[rows], gpu_milli[rows], spec_id[rows]
        cpu_milli = cpu_milli[rows]
    elif kind == "gpushare":
        shares = p.gpu_milli[(p.num_gpu == 1) & (p.gpu_milli < 1000)]
        whole = np.flatnonzero((p.num_gpu == 1) & (p.gpu_milli == 1000))
        whole = rng.choice(whole, size=round(whole.size * min(n, 100) / 100), replace=False)
        if shares.size:
            gpu_milli[whole] = rng.choice(shares, size=whole.size, replace=True)
    elif kind == "gpucpu":
        gpu = p.num_gpu > 0
        cpu_milli[gpu] = (cpu_milli[gpu] * n) // 100
    else:
        gpu_pods = np.flatnonzero(p.num_gpu > 0)
        chosen = rng.choice(gpu_pods, size=gpu_pods.size * min(n, 100) // 100, replace=False)
        if kind == "pin":
            if model not in nodes.models:
                raise TraceError(f"variant step pin{n}-{model}: no such GPU model in the node list")
            wanted = [model] * chosen.size
        elif kind == "gpuspec":
            picks = rng.choice(present, size=chosen.size, replace=True, p=by_gpus)
            wanted = [nodes.models[m] for m in picks]
        else:
            wanted = [
                "|".join(
                    nodes.models[m]
                    for m in sorted(rng.choice(present, 2, replace=False, p=by_gpus))
                )
                for _ in range(chosen.size)
            ]
        specs, spec_id, spec_allowed = _require(specs, spec_id, chosen, wanted, nodes.models)
    names = [
        pods.names[r] if i < p.n_pods else f"{pods.names[r]}-x{i - p.n_pods}"
        for i, r in enumerate(rows.tolist())
    ]
    order = sorted(range(len(names)), key=names.__getitem__)
    idx = np.array(order, dtype=np.int64)
    trace = PodTrace(
        cpu_milli=cpu_milli[idx],
        memory_bytes=p.memory_bytes[rows][idx],
        num_gpu=num_gpu[idx],
        gpu_milli=gpu_milli[idx],
        spec_id=spec_id[idx],
        spec_allowed=spec_allowed,
        specs=tuple(specs),
    )
    sorted_names = [names[i] for i in order]
    return LoadedPods(
        trace=trace,
        names=sorted_names,
        source_rows=pods.source_rows[rows][idx],
        specs=pod_specs(trace, sorted_names),
    )
