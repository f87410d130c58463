"""The `fleetd` command line: `fleetd serve | agent | demo | explain ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the main job on embedded defaults")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        print("fleetd demo: the placement engine has not landed yet", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
