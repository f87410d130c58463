"""`python -m benchmarks NAME [--json] [...]`: run one benchmark module, or `all`.

Each benchmark is a module `benchmarks/NAME.py` with `main(argv) -> int`; with `--json` it
ends its output with one JSON line a script can read. `python -m benchmarks` lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path

#: Modules in benchmarks/ that are helpers, not benchmarks.
NOT_BENCHMARKS = frozenset({"common", "synthetic", "traces"})


def available() -> list[str]:
    """Names of the benchmark modules (those defining `main`)."""
    names = []
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("_") or info.name in NOT_BENCHMARKS:
            continue
        names.append(info.name)
    return sorted(names)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks:", ", ".join(names) or "(none)")
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name == "all":
        status = 0
        for n in names:
            print(f"== {n}", flush=True)
            status |= run(n, rest)
        return status
    if name not in names:
        print(f"unknown benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    return run(name, rest)


def run(name: str, argv: list[str]) -> int:
    """Import benchmarks.NAME and call its main(argv)."""
    module = importlib.import_module(f"benchmarks.{name}")
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"benchmarks.{name} has no main(argv)", file=sys.stderr)
        return 2
    return int(entry(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
