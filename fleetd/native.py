"""Modules of fleetd compiled with mypyc, and how the daemon picks them up.

A few pure-Python modules run once per telemetry record (`fleetd.sources.repeats`). They
are written so that mypyc (part of mypy, a dev dependency) can compile them to a C
extension. `make install` runs `python -m fleetd.native build`, which compiles each such
module `M` to `M_native`, next to it in the source tree (ignored by git), stamped with the
SHA-256 of the source it was built from; `load(M)` returns `M_native` when it was built from
M's current source, else M itself (the Kafka source logs
why when it starts). A stale build (M edited since) is
never used, and neither is one for another interpreter: the extension's file name carries
its ABI tag, and only a matching one imports.

Builds are cached under `$XDG_CACHE_HOME/fleetd-native` (default `~/.cache`), keyed by
the source, the interpreter and mypy's version, so a fresh checkout installs in seconds.
Without a C compiler (or mypy) the build says so and leaves nothing: fleetd then runs the
interpreted modules, the same results with more CPU a record.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
#: The modules compiled, by import name.
MODULES = ("fleetd.sources.repeats",)
#: The constant a native build carries: the SHA-256 of the source it was compiled from.
STAMP = "NATIVE_SOURCE_SHA256"

M = TypeVar("M", bound=ModuleType)

#: Why `load` fell back to a module itself, by module name.
_why: dict[str, str] = {}


def source_digest(module: ModuleType) -> str:
    """The SHA-256 of `module`'s source file."""
    assert module.__file__ is not None
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()


def load(module: M) -> M:
    """`module`'s native build when it was compiled from `module`'s current source (see the
    module docstring), else `module` itself (`why_interpreted` then says why)."""
    name = module.__name__
    try:
        native = importlib.import_module(f"{name}_native")
    except ImportError:
        why = "not built (make install builds it; it needs a C compiler)"
    else:
        if getattr(native, STAMP, None) == source_digest(module):
            _why.pop(name, None)
            return native  # type: ignore[return-value]
        why = "built from another version of its source (make install builds it again)"
    _why[name] = why
    return module


def why_interpreted(name: str) -> str | None:
    """Why `load` returned module `name` itself, not a native build (None: it did not, or
    was not asked). Callers log it once logging is set up."""
    return _why.get(name)


def is_native(module: ModuleType) -> bool:
    """Whether `module` is a native build (`load` returned it)."""
    return hasattr(module, STAMP)


def _cache_key(source: bytes) -> str:
    import mypy.version

    parts = [
        hashlib.sha256(source).hexdigest(),
        sys.implementation.cache_tag,
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        platform.machine(),
        mypy.version.__version__,
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetd-native"


def build(name: str, repo: Path = REPO) -> Path:
    """Compile module `name` (`fleetd.sources.repeats`) of the tree at `repo` to
    `<name>_native` next to it, or take it from the cache; the extension's path. Raises
    RuntimeError when mypyc fails."""
    relative = Path(*name.split("."))
    source_path = repo / relative.with_suffix(".py")
    source = source_path.read_bytes()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    stem = f"{relative.name}_native"
    cached = _cache_dir() / _cache_key(source)
    if not (cached / f"{stem}{suffix}").exists():
        digest = hashlib.sha256(source).hexdigest()
        # The copy is compiled inside the real tree (mypyc type-checks it against the
        # modules it imports), then removed: only the extensions stay (the module's, and
        # mypyc's library of its code, `<stem>__mypyc`).
        copy = source_path.with_name(f"{stem}.py")
        copy.write_bytes(source + f'\n{STAMP} = "{digest}"\n'.encode())
        try:
            result = subprocess.run(
                [sys.executable, "-m", "mypyc", str(copy.relative_to(repo))],
                cwd=repo,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            copy.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"mypyc failed on {name}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
            )
        built = sorted((repo / "build").glob(f"lib*/{relative.parent}/{stem}*{suffix}"))
        if not any(path.name == f"{stem}{suffix}" for path in built):
            raise RuntimeError(f"mypyc built no {stem}{suffix} under {repo / 'build'}")
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Staged beside the cache entry and renamed into place: a build interrupted (or
        # another checkout's at the same time) never leaves half an entry.
        staged = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
        for path in built:
            shutil.copy2(path, staged / path.name)
        try:
            staged.rename(cached)
        except OSError:  # (another build put it there meanwhile)
            shutil.rmtree(staged, ignore_errors=True)
    for path in cached.iterdir():
        shutil.copy2(path, source_path.parent / path.name)
    return source_path.with_name(f"{stem}{suffix}")


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m fleetd.native build`: every module of MODULES, compiled or from the
    cache. Exits 0 without a compiler (fleetd runs interpreted), saying so."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["build"])
    parser.parse_args(argv)
    for name in MODULES:
        try:
            path = build(name)
        except (RuntimeError, OSError, ImportError) as exc:
            print(f"fleetd.native: {name} not compiled, fleetd runs it interpreted: {exc}",
                  file=sys.stderr)  # fmt: skip
            if os.environ.get("FLEETD_NATIVE") == "required":
                return 1
            continue
        print(f"fleetd.native: {name} -> {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
