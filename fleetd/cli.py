"""The `fleetd` command line: `fleetd serve | demo` (and `agent`, from the sources)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path


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
    demo.add_argument("--concurrency", type=int, default=16, help="concurrent gRPC clients")
    demo.add_argument(
        "--chart", type=Path, default=Path("out/demo-allocation.png"), help="PNG chart path"
    )
    demo.add_argument("--config", type=Path, help="YAML config for the demo daemon")
    from fleetd import agent

    agent.build_parser(
        sub.add_parser("agent", help="publish one Kubernetes cluster's telemetry to Kafka")
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fleetd` script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from fleetd import config, daemon

        try:
            cfg = config.load(args.config)
        except config.ConfigError as exc:
            print(f"fleetd: invalid config: {exc}", file=sys.stderr)
            return 2
        daemon.configure_logging(cfg.logging)
        return asyncio.run(daemon.serve(cfg, args.config))
    if args.command == "demo":
        from fleetd import demo

        return demo.main(args)
    if args.command == "agent":
        from fleetd import agent

        return agent.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
