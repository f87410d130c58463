"""Generate the Python stubs of `proto/fleetd/v1/*.proto` into `fleetd/v1/`.

`make proto` runs this; `tests/unit/test_proto_stubs.py` runs it into a temporary
directory and fails when the committed stubs differ (drift between .proto and stubs).
grpcio-tools and mypy-protobuf are dev dependencies: this module imports them lazily.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PACKAGE_DIR = "fleetd/v1"


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto source of package fleetd.v1, sorted for a stable generation order."""
    return sorted((proto_root / PACKAGE_DIR).glob("*.proto"))


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc (python, grpc, mypy and mypy_grpc plugins) writing under `out_root`.

    Returns the generated files (relative to `out_root`), sorted. Raises RuntimeError
    with protoc's exit code when generation fails.
    """
    import grpc_tools  # dev dependency
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    sources = [str(p.relative_to(proto_root)) for p in proto_files(proto_root)]
    # The mypy-protobuf plugins live next to the interpreter (the venv's bin/), which
    # need not be on PATH when make or pytest runs us.
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code} on {sources}")
    gen_dir = out_root / PACKAGE_DIR
    return sorted(p.relative_to(out_root) for p in gen_dir.glob("*_pb2*"))


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m fleetd.protogen [--out DIR]` (default: the repository root)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO)
    args = parser.parse_args(argv)
    gen_dir = args.out / PACKAGE_DIR
    # Remove stale stubs of deleted .proto files so the tree matches the sources exactly.
    for old in gen_dir.glob("*_pb2*"):
        old.unlink()
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
