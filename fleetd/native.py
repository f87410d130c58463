"""Modules of fleetd compiled with mypyc, and how the daemon picks them up.

A few pure-Python modules run once per telemetry record (`fleetd.sources.repeats`). They
are written so that mypyc (part of mypy, a dev dependency) can compile them to a C
extension. `make install` runs `python -m fleetd.native build`, which compiles each such
module `M` to `M_native`, next to it in the source tree (ignored by git), stamped with the
SHA-256 of what it was built from: M's source and the sources of the fleetd modules it
imports (compiled code keeps the types of what it calls as they were when compiled).
`load(M)` returns `M_native` when that stamp is the one of the sources in the tree now,
else M itself (the Kafka source logs why when it starts). A stale build is never used, and
neither is one for another interpreter: the extension's file name carries its ABI tag, and
only a matching one imports.

The build compiles a copy of the packages in a temporary directory, so nothing but the
finished extensions is ever written into the tree, and it installs each with a rename: a
process running the previous build keeps its (unlinked) file mapped, where writing over it
would crash that process. Builds are cached under `$XDG_CACHE_HOME/fleetd-native` (default
`~/.cache`), keyed by the stamp, the interpreter and mypy's version, so a fresh checkout
installs in seconds. Where a C compiler and Python's headers are, a failed build is an
error; where they are not, the build says so and fleetd runs the interpreted modules, the
same results with more CPU a record (`FLEETD_NATIVE`: `auto`, `required`, `off`; `main`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
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
#: The modules compiled, by import name, with the fleetd modules each imports: a change of
#: any of them makes its build stale.
MODULES = {
    "fleetd.sources.repeats": ("fleetd.sources.codec", "fleetd.sources.updates"),
}
#: The constant a native build carries: the SHA-256 of the sources it was compiled from.
STAMP = "NATIVE_SOURCE_SHA256"
#: The packages copied for a build (what the compiled modules import is type-checked).
_PACKAGES = ("fleetd", "scheduling")

M = TypeVar("M", bound=ModuleType)

#: Why `load` fell back to a module itself, by module name.
_why: dict[str, str] = {}


def _path(name: str, root: Path) -> Path:
    return root / Path(*name.split(".")).with_suffix(".py")


def source_digest(name: str, root: Path = REPO) -> str:
    """The SHA-256 of module `name`'s source and of the fleetd modules it imports
    (`MODULES`), in the tree at `root`."""
    digest = hashlib.sha256()
    for part in (name, *MODULES.get(name, ())):
        data = _path(part, root).read_bytes()
        digest.update(f"{part}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def load(module: M) -> M:
    """`module`'s native build when it was compiled from the sources in the tree now (see
    the module docstring), else `module` itself (`why_interpreted` then says why)."""
    name = module.__name__
    try:
        native = importlib.import_module(f"{name}_native")
    except ImportError:
        why = "not built (make install builds it; it needs a C compiler)"
    else:
        assert module.__file__ is not None
        root = Path(module.__file__).resolve().parents[name.count(".")]
        try:
            current = source_digest(name, root)
        except OSError as exc:  # (installed without the sources it imports)
            current, why = "", f"not checkable against its sources ({exc})"
        else:
            why = "built from other sources than the tree's (make install builds it again)"
        if getattr(native, STAMP, None) == current:
            _why.pop(name, None)
            return native  # type: ignore[return-value]
    _why[name] = why
    return module


def why_interpreted(name: str) -> str | None:
    """Why `load` returned module `name` itself, not a native build (None: it did not, or
    was not asked). Callers log it once logging is set up."""
    return _why.get(name)


def is_native(module: ModuleType) -> bool:
    """Whether `module` is a native build (`load` returned it)."""
    return hasattr(module, STAMP)


def compiler() -> str | None:
    """Why a build cannot be made here (no C compiler, or no Python headers), or None when
    it can: what mypyc's build will use, sysconfig's CC (or $CC) and Python.h."""
    command = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if not command or shutil.which(command[0]) is None:
        return f"no C compiler ({' '.join(command) or 'CC unset'} not found)"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"no Python headers ({headers} missing)"
    return None


def _cache_key(stamp: str) -> str:
    import mypy.version

    try:
        setuptools_version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:  # (mypyc's build then fails, says so)
        setuptools_version = ""
    parts = [
        stamp,
        hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),  # (how it is built)
        setuptools_version,
        os.environ.get("CC") or sysconfig.get_config_var("CC") or "",
        os.environ.get("CFLAGS", ""),
        sys.implementation.cache_tag,
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        platform.machine(),
        mypy.version.__version__,
        os.environ.get("MYPYC_OPT_LEVEL", ""),
        os.environ.get("MYPYC_DEBUG_LEVEL", ""),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleetd-native"


def _compile(name: str, repo: Path, stamp: str, out: Path) -> None:
    """Compile `name` as `<name>_native` in a copy of the packages, its extensions (the
    module's, and mypyc's library of its code, `<stem>__mypyc`) into `out`."""
    stem = f"{name.rsplit('.', 1)[-1]}_native"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    with tempfile.TemporaryDirectory(prefix="fleetd-native-") as tmp:
        root = Path(tmp)
        for package in _PACKAGES:
            shutil.copytree(
                repo / package,
                root / package,
                ignore=shutil.ignore_patterns("__pycache__", "*.so"),
            )
        copy = _path(name, root).with_name(f"{stem}.py")
        copy.write_bytes(_path(name, root).read_bytes() + f'\n{STAMP} = "{stamp}"\n'.encode())
        result = subprocess.run(
            # (The tree's mypy settings; no pyproject.toml in the copy, which setuptools
            # would read as a project to build.)
            [
                sys.executable,
                "-m",
                "mypyc",
                "--config-file",
                str(repo / "pyproject.toml"),
                str(copy.relative_to(root)),
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"mypyc failed on {name}:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
            )
        package_dir = copy.parent.relative_to(root)
        built = sorted(root.glob(f"build/lib*/{package_dir}/{stem}*{suffix}"))
        if not any(path.name == f"{stem}{suffix}" for path in built):
            raise RuntimeError(f"mypyc built no {stem}{suffix}")
        for path in built:
            shutil.copy2(path, out / path.name)


def build(name: str, repo: Path = REPO) -> Path:
    """Compile module `name` (`fleetd.sources.repeats`) of the tree at `repo` to
    `<name>_native` next to it, or take it from the cache; the extension's path. Raises
    RuntimeError when mypyc fails."""
    stamp = source_digest(name, repo)
    cached = _cache_dir() / _cache_key(stamp)
    if not cached.is_dir():
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Staged beside the cache entry and renamed into place: a build interrupted (or
        # another checkout's at the same time) never leaves half an entry.
        staged = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
        try:
            _compile(name, repo, stamp, staged)
            staged.rename(cached)
        except OSError:
            if not cached.is_dir():
                raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    target_dir = _path(name, repo).parent
    for path in sorted(cached.iterdir()):
        # A new file renamed over the old one: a process that loaded the old one keeps it
        # (writing over a loaded extension in place crashes that process).
        temporary = target_dir / f".{path.name}.{os.getpid()}"
        try:
            shutil.copy2(path, temporary)
            os.replace(temporary, target_dir / path.name)
        finally:
            temporary.unlink(missing_ok=True)
    stem = f"{name.rsplit('.', 1)[-1]}_native"
    return target_dir / f"{stem}{sysconfig.get_config_var('EXT_SUFFIX')}"


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m fleetd.native build`: every module of MODULES, compiled or from the
    cache, then imported once to check. FLEETD_NATIVE: `auto` (the default) requires the
    build where a C compiler and Python's headers are (`compiler`) and skips it, saying so,
    where they are not (fleetd then runs interpreted); `required` always requires it; `off`
    skips it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["build"])
    parser.parse_args(argv)
    mode = os.environ.get("FLEETD_NATIVE") or "auto"
    if mode not in ("auto", "required", "off"):
        print(f"fleetd.native: FLEETD_NATIVE={mode!r}: expected auto, required or off",
              file=sys.stderr)  # fmt: skip
        return 2
    missing = compiler()
    if mode == "off" or (mode == "auto" and missing is not None):
        why = "FLEETD_NATIVE=off" if mode == "off" else missing
        print(f"fleetd.native: not compiling ({why}): fleetd runs its hot loop interpreted",
              file=sys.stderr)  # fmt: skip
        return 0
    for name in MODULES:
        try:
            path = build(name)
            # (Imported in a fresh interpreter: what the daemon will load.)
            check = (
                f"import {name} as m, fleetd.native as n; "
                f"assert n.is_native(n.load(m)), n.why_interpreted({name!r})"
            )
            result = subprocess.run(
                [sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True
            )
            if result.returncode != 0:
                raise RuntimeError(f"the build does not load: {result.stderr[-2000:]}")
        except (RuntimeError, OSError, ImportError) as exc:
            print(f"fleetd.native: {name} not compiled: {exc}", file=sys.stderr)
            return 1
        print(f"fleetd.native: {name} -> {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
