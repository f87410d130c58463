"""The `fleetd` command line: `fleetd serve | check-config | demo | explain | status | workloads |
release | agent | retire-cluster`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="fleetd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the daemon (embedded defaults: simulated fleet, no Kafka/Kubernetes)"
    )
    serve.add_argument(
        "--config", type=Path, help="YAML config (default: the embedded config/fleetd.yaml)"
    )
    check = sub.add_parser(
        "check-config",
        help="validate a config file as `serve` would load it (and its TLS files); exit 2 if invalid",
    )
    check.add_argument("config", type=Path, help="YAML config file")
    demo = sub.add_parser("demo", help="start the daemon and drive it through the gRPC API")
    demo.add_argument("--trace", type=Path, help="openb-format pod list CSV (default: synthetic)")
    demo.add_argument("--pods", type=int, default=0, help="only the first N pods (0 = all)")
    demo.add_argument(
        "--scale", type=int, default=10, help="synthetic mode: multiply the shipped fleet's nodes"
    )
    demo.add_argument("--seed", type=int, default=42, help="seed of the workload (and arrivals)")
    demo.add_argument(
        "--tune",
        type=float,
        default=1.3,
        help="--trace: shuffle and tune arrivals to this x the fleet's GPUs, as the FGD "
        "artifact does (0 = the trace as is, in creation order)",
    )
    demo.add_argument("--concurrency", type=int, default=4, help="concurrent gRPC clients")
    demo.add_argument(
        "--chart", type=Path, default=Path("out/demo-allocation.png"), help="PNG chart path"
    )
    demo.add_argument("--config", type=Path, help="YAML config for the demo daemon")
    explain = sub.add_parser(
        "explain", help="ask a running daemon whether a pod would fit now, where, and if not why"
    )
    _client_arguments(explain)
    explain.add_argument("--gpus", type=int, default=0, help="whole GPUs")
    explain.add_argument("--gpu-milli", type=int, default=0, help="a share of one GPU, 1..999")
    explain.add_argument("--cpu-millicores", type=int, default=1000)
    explain.add_argument("--memory-gib", type=float, default=4.0)
    explain.add_argument("--model", action="append", default=[], help="allowed GPU model")
    explain.add_argument("--cluster", default="", help="restrict to this cluster")
    explain.add_argument("--pool", default="", help="restrict to this node pool")
    explain.add_argument("--team", default="cli")
    status = sub.add_parser(
        "status", help="ask a running daemon whether it is ready, and each source's sync"
    )
    _client_arguments(status)
    listing = sub.add_parser(
        "workloads", help="list a running daemon's reservations and queued workloads"
    )
    _client_arguments(listing)
    listing.add_argument("--team", default="", help="only this team's")
    listing.add_argument(
        "--state", choices=("pending", "confirmed", "queued"), help="only those in this state"
    )
    listing.add_argument(
        "--limit",
        type=_non_negative,
        default=0,
        help="at most this many (0 = all, a page at a time)",
    )
    release = sub.add_parser(
        "release", help="release a workload's reservation, or take it out of the queue"
    )
    _client_arguments(release)
    release.add_argument("workload_id")
    from fleetd import agent

    agent.build_parser(
        sub.add_parser("agent", help="publish one Kubernetes cluster's telemetry to Kafka")
    )
    agent.build_retire_parser(
        sub.add_parser(
            "retire-cluster",
            help="publish that a cluster left the fleet for good: fleetd drops its nodes and pools",
        )
    )
    return parser


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the commands that call a running daemon."""
    parser.add_argument("--addr", default="127.0.0.1:50051", help="daemon gRPC address")
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument(
        "--tls-ca-file", type=Path, help="TLS: CA (PEM) that verifies the daemon (server.tls)"
    )
    parser.add_argument("--tls-cert-file", type=Path, help="mutual TLS: client certificate (PEM)")
    parser.add_argument("--tls-key-file", type=Path, help="mutual TLS: its private key (PEM)")


#: Replies up to 64 MiB (a page of 1,000 workloads holding large gangs is more than gRPC's
#: default 4 MiB).
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def _channel(args: argparse.Namespace) -> Any:
    """A gRPC channel to the daemon from `_client_arguments` flags; SystemExit(2) with the
    reason when they are unusable."""
    import grpc

    if args.tls_ca_file is None:
        if args.tls_cert_file or args.tls_key_file:
            print(f"fleetd {args.command}: --tls-cert-file needs --tls-ca-file", file=sys.stderr)
            raise SystemExit(2)
        return grpc.insecure_channel(args.addr, options=_CHANNEL_OPTIONS)
    try:
        creds = grpc.ssl_channel_credentials(
            args.tls_ca_file.read_bytes(),
            private_key=args.tls_key_file.read_bytes() if args.tls_key_file else None,
            certificate_chain=args.tls_cert_file.read_bytes() if args.tls_cert_file else None,
        )
    except OSError as exc:
        print(f"fleetd {args.command}: {exc.filename}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from exc
    return grpc.secure_channel(args.addr, creds, options=_CHANNEL_OPTIONS)


def _ask(args: argparse.Namespace, call: Callable[[Any], R]) -> R | None:
    """`call(channel)` on a channel to the daemon (`_channel`): its answer, or None, the
    failed RPC's status said on stderr (`fleetd <command>: CODE: details`)."""
    import grpc

    with _channel(args) as channel:
        try:
            return call(channel)
        except grpc.RpcError as exc:
            print(f"fleetd {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return None


def status(args: argparse.Namespace) -> int:
    """`fleetd status`: GetStatus, printed for a person; exit 0 when ready, 1 when not (or
    unreachable)."""
    from fleetd.v1 import fleet_pb2, fleet_pb2_grpc

    reply = _ask(
        args,
        lambda channel: fleet_pb2_grpc.FleetStub(channel).GetStatus(
            fleet_pb2.GetStatusRequest(), timeout=args.timeout_s
        ),
    )
    if reply is None:
        return 1
    state = "ready" if reply.ready else f"not ready: {reply.not_ready_reason}"
    print(
        f"{state} (fleetd {reply.version}, up {reply.uptime_s:.0f}s, config "
        f"{reply.config_version}, {reply.nodes_stale} nodes stale)"
    )
    for src in sorted(reply.sources, key=lambda x: (x.source, x.cluster)):
        synced = "synced" if src.synced else f"NOT SYNCED: {src.reason}"
        print(
            f"  {src.source:<10} {src.cluster:<24} {synced}, last update {src.last_update_age_s:.1f}s ago"
        )
    return 0 if reply.ready else 1


def explain(args: argparse.Namespace) -> int:
    """`fleetd explain`: one Explain RPC, printed for a person."""
    from fleetd.v1 import placement_pb2, placement_pb2_grpc, types_pb2

    pod = types_pb2.PodSpec(
        cpu_millicores=args.cpu_millicores,
        memory_bytes=int(args.memory_gib * 2**30),
        gpu_count=args.gpus,
        gpu_milli=args.gpu_milli,
        gpu_models=args.model,
    )
    workload = types_pb2.Workload(
        workload_id="fleetd-cli-explain", team=args.team, pod=pod, cluster=args.cluster,
        pool=args.pool,
    )  # fmt: skip
    reply = _ask(
        args,
        lambda channel: placement_pb2_grpc.PlacementStub(channel).Explain(
            placement_pb2.ExplainRequest(workload=workload), timeout=args.timeout_s
        ),
    )
    if reply is None:
        return 1
    result = types_pb2.DecisionResult.Name(reply.result).removeprefix("DECISION_RESULT_")
    print(f"{result.lower()}: {'fits now' if reply.fits else reply.explanation.summary}")
    for p in reply.placements:
        gpus = ",".join(str(g) for g in p.gpu_indices) or "-"
        print(f"  {p.pod_name}: {p.cluster}/{p.node} (pool {p.pool}) GPUs {gpus} x {p.gpu_milli}m")
    for r in reply.explanation.reasons:
        print(f"  {r.nodes:>6} nodes  {r.code}: {r.message}")
    return 0


def workloads(args: argparse.Namespace) -> int:
    """`fleetd workloads`: ListWorkloads, page after page, as a table; exit 1 on an error."""
    from fleetd.v1 import placement_pb2, placement_pb2_grpc

    state = getattr(placement_pb2, f"WORKLOAD_STATE_{(args.state or 'unspecified').upper()}")

    def pages(channel: Any) -> list[placement_pb2.WorkloadStatus]:
        stub = placement_pb2_grpc.PlacementStub(channel)
        rows: list[placement_pb2.WorkloadStatus] = []
        token = ""
        while True:
            want = args.limit - len(rows) if args.limit > 0 else 500
            request = placement_pb2.ListWorkloadsRequest(
                team=args.team, state=state, page_size=min(want, 1000), page_token=token
            )
            reply = stub.ListWorkloads(request, timeout=args.timeout_s)
            rows.extend(reply.workloads)
            token = reply.next_page_token
            if not token or (args.limit > 0 and len(rows) >= args.limit):
                return rows

    rows = _ask(args, pages)
    if rows is None:
        return 1
    now = time.time()
    print(f"{'WORKLOAD':<32} {'TEAM':<16} {'STATE':<10} {'PRIO':>6} {'PODS':>5} {'GPUS':>7} "
          f"{'AGE':>7}  WHERE / WHY")  # fmt: skip
    for w in rows:
        name = placement_pb2.WorkloadState.Name(w.state).removeprefix("WORKLOAD_STATE_").lower()
        if w.state == placement_pb2.WORKLOAD_STATE_QUEUED:
            why = w.explanation.summary or "-"
            if w.HasField("explained_at"):  # (the last try's reasons: how old they are)
                why += f" ({_duration(now - w.explained_at.ToNanoseconds() / 1e9)} ago)"
            where = f"#{w.queue_position} in queue: {why}"
        else:
            nodes = sorted({f"{p.cluster}/{p.node}" for p in w.placements})
            where = ", ".join(nodes[:3]) + (f" (+{len(nodes) - 3} nodes)" if len(nodes) > 3 else "")
        age = _duration(now - w.since.ToNanoseconds() / 1e9)
        print(f"{w.workload_id:<32} {w.team:<16} {name:<10} {w.effective_priority:>6} "
              f"{w.pods:>5} {w.gpu_milli / 1000:>7g} {age:>7}  {where}")  # fmt: skip
    return 0


def _duration(seconds: float) -> str:
    """A short age: 42s, 17m, 5h, 3d."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def release(args: argparse.Namespace) -> int:
    """`fleetd release WORKLOAD_ID`: Release, for the on-call (a reservation whose client is
    gone, a queued workload nobody wants); exit 1 on an error (NOT_FOUND included)."""
    from fleetd.v1 import placement_pb2, placement_pb2_grpc, types_pb2

    reply = _ask(
        args,
        lambda channel: placement_pb2_grpc.PlacementStub(channel).Release(
            placement_pb2.ReleaseRequest(workload_id=args.workload_id), timeout=args.timeout_s
        ),
    )
    if reply is None:
        return 1
    if reply.previous_state == types_pb2.RESERVATION_STATE_UNSPECIFIED:
        print(f"{reply.workload_id}: taken out of the queue (decision {reply.decision_seq})")
    else:
        previous = types_pb2.ReservationState.Name(reply.previous_state)
        print(
            f"{reply.workload_id}: released {reply.pods_released} pod(s), was "
            f"{previous.removeprefix('RESERVATION_STATE_').lower()} (decision {reply.decision_seq})"
        )
    return 0


def check_config(path: Path) -> int:
    """`fleetd check-config FILE`: what `serve --config FILE` would refuse, without starting
    (FLEETD_* environment overrides included, as for `serve`). For a config repository's CI,
    or before a SIGHUP."""
    from fleetd import config
    from fleetd.api.tls import TlsFilesError, check_files

    try:
        cfg = config.load(path)
        if cfg.server.tls.enabled:
            check_files(cfg.server.tls)
    except (config.ConfigError, TlsFilesError) as exc:
        print(f"fleetd: invalid config: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: valid (config_version {cfg.version()})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fleetd` script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        # grpc core writes its own log lines to stderr, outside the JSON logs: keep them to
        # errors (set before grpc initializes; an explicit GRPC_VERBOSITY wins).
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        from fleetd import config, daemon

        try:
            cfg = config.load(args.config)
        except config.ConfigError as exc:
            print(f"fleetd: invalid config: {exc}", file=sys.stderr)
            return 2
        daemon.configure_logging(cfg.logging)
        return asyncio.run(daemon.serve(cfg, args.config))
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "explain":
        return explain(args)
    if args.command == "status":
        return status(args)
    if args.command == "workloads":
        return workloads(args)
    if args.command == "release":
        return release(args)
    if args.command == "demo":
        from fleetd import demo

        return demo.main(args)
    if args.command == "agent":
        from fleetd import agent

        return agent.main(args)
    if args.command == "retire-cluster":
        from fleetd import agent

        return agent.retire_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
