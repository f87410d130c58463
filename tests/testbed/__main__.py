"""Command line of the test bed.

``python -m tests.testbed build [kafka|etcd|kubernetes|kwok ...]``
    build (or reuse from the cache) the components; ``make testbed`` runs this.
``python -m tests.testbed up``
    start the whole test bed, print the Kafka address and the kubeconfig, wait for Ctrl-C,
    then stop every process: handy to poke at it with kubectl or a Kafka client.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the sub-command."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build or reuse the cached components")
    build.add_argument(
        "components",
        nargs="*",
        help="kafka, etcd, kubernetes, kwok, grpctools, promtool (default: all)",
    )
    sub.add_parser("up", help="start the test bed until Ctrl-C")
    args = parser.parse_args(argv)
    if args.command == "build":
        from tests.testbed.build import main as build_main

        return build_main(args.components or None)
    from tests.testbed.runner import run_until_interrupted

    return run_until_interrupted()


if __name__ == "__main__":
    sys.exit(main())
