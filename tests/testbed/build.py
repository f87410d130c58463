"""Build (or reuse) the test-bed binaries and jars, cached outside the repo by version.

Layout of the cache (``$FLEETD_TESTBED_CACHE``, default ``~/.cache/fleetd-testbed``)::

    kafka-4.4.0/libs/*.jar              broker, clients, scala, log4j2 binding (Maven)
    etcd-v3.6.16/bin/etcd               built from a consumer module in .../src
    kubernetes-v1.37.2/bin/kube-apiserver, kube-scheduler
    kwok-v0.8.0/bin/kwok, stages.yaml   kwok and the stages shipped in its module
    grpctools-v1.9.3-v0.4.62/bin/grpcurl, grpc-health-probe
    prometheus-2.42.0+ds-5+deb12u1/bin/promtool   from Debian's package (apt-get download)
    go/mod, go/build                    GOMODCACHE and GOCACHE shared by the Go builds
    logs/<component>-<version>.log      output of the last build of each component

A component counts as built only when its folder holds a ``.complete`` marker written
after a successful build, so an interrupted build is redone, and a warm ``make testbed``
only checks the markers. Builds hold a file lock so that two worktrees never build the
same component at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.testbed import versions

_REPO = Path(__file__).resolve().parents[2]
_KAFKA_POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
_LOG_TAIL_LINES = 40

# Stages that make kwok behave like kubelets: nodes become Ready and keep heartbeating,
# pods bound to a kwok node start Running, deleted pods go away, Jobs complete.
_KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat/node-heartbeat.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


class BuildError(RuntimeError):
    """A component could not be built; the message names it and its build log."""


def cache_root() -> Path:
    """Where built artefacts live: ``$FLEETD_TESTBED_CACHE`` or ``~/.cache/fleetd-testbed``."""
    override = os.environ.get("FLEETD_TESTBED_CACHE")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fleetd-testbed"


@dataclass(frozen=True)
class Artefacts:
    """Paths of everything the test bed runs, all inside the cache."""

    root: Path

    @property
    def kafka_dir(self) -> Path:
        """Folder of the Kafka component (holds ``libs/``)."""
        return self.root / f"kafka-{versions.KAFKA_VERSION}"

    @property
    def kafka_libs(self) -> Path:
        """Folder of the broker's jars (the Java classpath is ``<this>/*``)."""
        return self.kafka_dir / "libs"

    @property
    def etcd_dir(self) -> Path:
        """Folder of the etcd component."""
        return self.root / f"etcd-{versions.ETCD_VERSION}"

    @property
    def etcd(self) -> Path:
        """The etcd server binary."""
        return self.etcd_dir / "bin" / "etcd"

    @property
    def kubernetes_dir(self) -> Path:
        """Folder of the kube-apiserver and kube-scheduler component."""
        return self.root / f"kubernetes-{versions.KUBERNETES_VERSION}"

    @property
    def kube_apiserver(self) -> Path:
        """The kube-apiserver binary."""
        return self.kubernetes_dir / "bin" / "kube-apiserver"

    @property
    def kube_scheduler(self) -> Path:
        """The kube-scheduler binary."""
        return self.kubernetes_dir / "bin" / "kube-scheduler"

    @property
    def kwok_dir(self) -> Path:
        """Folder of the kwok component."""
        return self.root / f"kwok-{versions.KWOK_VERSION}"

    @property
    def kwok(self) -> Path:
        """The kwok binary."""
        return self.kwok_dir / "bin" / "kwok"

    @property
    def kwok_stages(self) -> Path:
        """kwok's stage definitions, concatenated into one ``--config`` file."""
        return self.kwok_dir / "stages.yaml"

    @property
    def grpctools_dir(self) -> Path:
        """Folder of the stock gRPC clients (grpcurl, grpc-health-probe)."""
        return (
            self.root / f"grpctools-{versions.GRPCURL_VERSION}-{versions.GRPC_HEALTH_PROBE_VERSION}"
        )

    def grpc_tool(self, name: str) -> Path:
        """Path of ``grpcurl`` or ``grpc-health-probe`` in the cache (built or not)."""
        return self.grpctools_dir / "bin" / name

    @property
    def prometheus_dir(self) -> Path:
        """Folder of promtool, unpacked from Debian's ``prometheus`` package."""
        return self.root / f"prometheus-{versions.PROMETHEUS_DEB_VERSION}"

    @property
    def promtool(self) -> Path:
        """The ``promtool`` binary (``promtool check metrics`` lints the exposition)."""
        return self.prometheus_dir / "bin" / "promtool"

    def missing(self) -> list[str]:
        """Names of the components not yet built (empty when the test bed can start)."""
        return [name for name, folder in self._components() if not _is_complete(folder)]

    def _components(self) -> list[tuple[str, Path]]:
        return [
            ("kafka", self.kafka_dir),
            ("etcd", self.etcd_dir),
            ("kubernetes", self.kubernetes_dir),
            ("kwok", self.kwok_dir),
            ("grpctools", self.grpctools_dir),
            ("promtool", self.prometheus_dir),
        ]


def artefacts() -> Artefacts:
    """The artefact paths in the current cache root (built or not)."""
    return Artefacts(cache_root())


def _is_complete(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def _mark_complete(folder: Path, info: dict[str, str]) -> None:
    (folder / ".complete").write_text(json.dumps(info, sort_keys=True) + "\n")


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Log:
    """One build log file; every command's output is appended to it."""

    def __init__(self, component: str, path: Path) -> None:
        self.component = component
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def note(self, text: str) -> None:
        with self.path.open("a") as f:
            f.write(f"# {text}\n")

    def run(
        self, argv: list[str], *, cwd: Path, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run one command with output to the log; raise BuildError with the log's tail."""
        self.note("$ " + " ".join(argv))
        with self.path.open("a") as f:
            try:
                proc = subprocess.run(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    text=True,
                    check=False,
                )
            except FileNotFoundError as exc:
                raise BuildError(
                    f"{self.component}: {argv[0]!r} is not installed ({exc}); log: {self.path}"
                ) from exc
        if proc.returncode != 0:
            raise BuildError(
                f"{self.component}: `{' '.join(argv[:3])} ...` failed with exit code "
                f"{proc.returncode}\n--- last lines of {self.path} ---\n{self.tail()}\n"
                f"--- full log: {self.path}"
            )
        return proc

    def output(self, argv: list[str], *, cwd: Path, env: dict[str, str]) -> str:
        """Run one command and return its stdout (stderr goes to the log)."""
        self.note("$ " + " ".join(argv))
        with self.path.open("a") as f:
            proc = subprocess.run(
                argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=f, text=True, check=False
            )
        if proc.returncode != 0:
            raise BuildError(
                f"{self.component}: `{' '.join(argv[:3])} ...` failed with exit code "
                f"{proc.returncode}\n--- last lines of {self.path} ---\n{self.tail()}\n"
                f"--- full log: {self.path}"
            )
        return proc.stdout

    def tail(self) -> str:
        lines = self.path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:])


def _go_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOMODCACHE=str(root / "go" / "mod"),
        GOCACHE=str(root / "go" / "build"),
        # The machine's toolchain only: never download another one behind our back.
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
        # -modcacherw: leave the module cache writable, so `rm -rf` of the cache just works.
        GOFLAGS="-mod=mod -modcacherw -buildvcs=false",
    )
    return env


def _fresh_module(src: Path, name: str, log: _Log, env: dict[str, str]) -> None:
    """An empty consumer module: replace directives of the built module do not apply here."""
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    log.run(["go", "mod", "init", name], cwd=src, env=env)


def _mod_download(module: str, src: Path, log: _Log, env: dict[str, str]) -> dict[str, str]:
    info: dict[str, str] = json.loads(
        log.output(["go", "mod", "download", "-json", module], cwd=src, env=env)
    )
    if "Error" in info:
        raise BuildError(f"go mod download {module}: {info['Error']}; log: {log.path}")
    return info


def staging_modules(kubernetes_go_mod: str) -> list[str]:
    """The ``k8s.io/*`` staging modules that ``k8s.io/kubernetes`` replaces with local paths.

    Those are exactly the modules a consumer module must pin with ``replace`` directives
    to their published ``v0.N.M`` tags, since their ``require`` lines say ``v0.0.0``.
    """
    found = re.findall(r"^\s*(k8s\.io/[A-Za-z0-9._-]+)\s+=>\s+\./staging/", kubernetes_go_mod, re.M)
    return sorted(set(found))


def _build_kubernetes(arts: Artefacts, log: _Log) -> None:
    kv = versions.KUBERNETES_VERSION
    sv = versions.staging_version(kv)
    env = _go_env(arts.root)
    src = arts.kubernetes_dir / "src"
    _fresh_module(src, "fleetd.local/testbed/kubernetes", log, env)
    info = _mod_download(f"k8s.io/kubernetes@{kv}", src, log, env)
    staging = staging_modules(Path(info["GoMod"]).read_text())
    if len(staging) < 20:
        raise BuildError(
            f"kubernetes: only {len(staging)} staging modules found in {info['GoMod']}"
        )
    log.note(f"{len(staging)} staging modules replaced by {sv}: {' '.join(staging)}")
    with (src / "go.mod").open("a") as f:
        f.write("\n" + "".join(f"replace {m} => {m} {sv}\n" for m in staging))
    commands = [f"k8s.io/kubernetes/cmd/{c}" for c in ("kube-apiserver", "kube-scheduler")]
    log.run(["go", "get", *(f"{c}@{kv}" for c in commands)], cwd=src, env=env)
    major, minor = kv.lstrip("v").split(".")[:2]
    ldflags = ["-s", "-w"]
    # Without these, clients (kubectl version, the Python client) see v0.0.0.
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        ldflags += [
            f"-X {pkg}.gitVersion={kv}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
        ]
    bin_dir = arts.kubernetes_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log.run(
        ["go", "build", "-trimpath", "-ldflags", " ".join(ldflags), "-o", f"{bin_dir}/", *commands],
        cwd=src,
        env=env,
    )
    _mark_complete(arts.kubernetes_dir, {"kubernetes": kv, "staging": sv})


def _build_etcd(arts: Artefacts, log: _Log) -> None:
    ev = versions.ETCD_VERSION
    env = _go_env(arts.root)
    src = arts.etcd_dir / "src"
    _fresh_module(src, "fleetd.local/testbed/etcd", log, env)
    log.run(["go", "get", f"go.etcd.io/etcd/server/v3@{ev}"], cwd=src, env=env)
    bin_dir = arts.etcd_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log.run(
        [
            "go",
            "build",
            "-trimpath",
            "-ldflags",
            "-s -w",
            "-o",
            str(arts.etcd),
            "go.etcd.io/etcd/server/v3",
        ],
        cwd=src,
        env=env,
    )
    _mark_complete(arts.etcd_dir, {"etcd": ev})


def _build_kwok(arts: Artefacts, log: _Log) -> None:
    kv = versions.KWOK_VERSION
    env = _go_env(arts.root)
    src = arts.kwok_dir / "src"
    _fresh_module(src, "fleetd.local/testbed/kwok", log, env)
    log.run(["go", "get", f"sigs.k8s.io/kwok/cmd/kwok@{kv}"], cwd=src, env=env)
    bin_dir = arts.kwok_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log.run(
        [
            "go",
            "build",
            "-trimpath",
            "-ldflags",
            "-s -w",
            "-o",
            str(arts.kwok),
            "sigs.k8s.io/kwok/cmd/kwok",
        ],
        cwd=src,
        env=env,
    )
    module_dir = Path(_mod_download(f"sigs.k8s.io/kwok@{kv}", src, log, env)["Dir"])
    docs = []
    for rel in _KWOK_STAGES:
        path = module_dir / rel
        if not path.is_file():
            raise BuildError(f"kwok: stage file {rel} not in {module_dir}; log: {log.path}")
        docs.append(f"# from sigs.k8s.io/kwok@{kv}/{rel}\n" + path.read_text().strip() + "\n")
    arts.kwok_stages.write_text("---\n".join(docs))
    _mark_complete(arts.kwok_dir, {"kwok": kv})


def _build_kafka(arts: Artefacts, log: _Log) -> None:
    staging = arts.kafka_dir / "libs.partial"
    if staging.exists():
        shutil.rmtree(staging)
    arts.kafka_dir.mkdir(parents=True, exist_ok=True)
    log.run(
        [
            "mvn",
            "-B",
            "-q",
            "-f",
            str(_KAFKA_POM),
            f"-Dkafka.version={versions.KAFKA_VERSION}",
            f"-Dlog4j.version={versions.LOG4J_VERSION}",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ],
        cwd=_KAFKA_POM.parent,
    )
    if not any(staging.glob(f"kafka_2.13-{versions.KAFKA_VERSION}.jar")):
        raise BuildError(
            f"kafka: kafka_2.13-{versions.KAFKA_VERSION}.jar not resolved; log: {log.path}"
        )
    if arts.kafka_libs.exists():
        shutil.rmtree(arts.kafka_libs)
    staging.rename(arts.kafka_libs)
    _mark_complete(
        arts.kafka_dir, {"kafka": versions.KAFKA_VERSION, "log4j": versions.LOG4J_VERSION}
    )


def _build_grpctools(arts: Artefacts, log: _Log) -> None:
    # Both modules carry no replace directives, so `go install module@version` works as is.
    env = _go_env(arts.root)
    env["GOBIN"] = str(arts.grpctools_dir / "bin")
    arts.grpctools_dir.mkdir(parents=True, exist_ok=True)
    for module in (
        f"github.com/fullstorydev/grpcurl/cmd/grpcurl@{versions.GRPCURL_VERSION}",
        f"github.com/grpc-ecosystem/grpc-health-probe@{versions.GRPC_HEALTH_PROBE_VERSION}",
    ):
        log.run(
            ["go", "install", "-trimpath", "-ldflags", "-s -w", module],
            cwd=arts.grpctools_dir,
            env=env,
        )
    _mark_complete(
        arts.grpctools_dir,
        {
            "grpcurl": versions.GRPCURL_VERSION,
            "grpc-health-probe": versions.GRPC_HEALTH_PROBE_VERSION,
        },
    )


def _build_promtool(arts: Artefacts, log: _Log) -> None:
    # No root needed: `apt-get download` fetches the .deb into the working folder and
    # `dpkg-deb -x` unpacks it anywhere; only promtool is kept (the server is ~100 MB).
    folder = arts.prometheus_dir
    work = folder / "download"
    shutil.rmtree(folder, ignore_errors=True)
    work.mkdir(parents=True)
    package = f"prometheus={versions.PROMETHEUS_DEB_VERSION}"
    try:
        try:
            log.run(["apt-get", "download", package], cwd=work)
        except BuildError:
            # The machine's package lists may be missing or stale (a fresh image): fetch
            # Debian's index into a private folder (no root, the system's lists untouched).
            lists, cache = work / "apt-lists", work / "apt-cache"
            (lists / "partial").mkdir(parents=True)
            (cache / "archives" / "partial").mkdir(parents=True)
            private = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}"]
            log.run(["apt-get", "-q", *private, "update"], cwd=work)
            log.run(["apt-get", "-q", *private, "download", package], cwd=work)
    except BuildError as exc:
        raise BuildError(
            f"{exc}\nIf Debian no longer serves {package}, set PROMETHEUS_DEB_VERSION in "
            "tests/testbed/versions.py to the version `apt-cache policy prometheus` shows."
        ) from exc
    [deb] = sorted(work.glob("prometheus_*.deb"))
    log.run(["dpkg-deb", "-x", str(deb), str(work / "root")], cwd=work)
    (folder / "bin").mkdir()
    shutil.move(work / "root" / "usr" / "bin" / "promtool", arts.promtool)
    shutil.rmtree(work)
    log.run([str(arts.promtool), "--version"], cwd=folder)
    _mark_complete(folder, {"prometheus": versions.PROMETHEUS_DEB_VERSION})


_BUILDERS: dict[str, tuple[str, Callable[[Artefacts, _Log], None]]] = {
    "kafka": (versions.KAFKA_VERSION, _build_kafka),
    "etcd": (versions.ETCD_VERSION, _build_etcd),
    "kubernetes": (versions.KUBERNETES_VERSION, _build_kubernetes),
    "kwok": (versions.KWOK_VERSION, _build_kwok),
    "grpctools": (versions.GRPCURL_VERSION, _build_grpctools),
    "promtool": (versions.PROMETHEUS_DEB_VERSION, _build_promtool),
}


def ensure_built(
    print_fn: Callable[[str], None] = print, only: list[str] | None = None
) -> Artefacts:
    """Build every missing component (a no-op taking milliseconds when the cache is warm).

    ``only`` restricts the build to some of ``kafka``, ``etcd``, ``kubernetes``, ``kwok``, ``grpctools``,
    ``promtool``.
    Raises BuildError naming the component, with the tail and the path of its build log.
    """
    arts = artefacts()
    wanted = set(only or _BUILDERS)
    unknown = wanted - set(_BUILDERS)
    if unknown:
        raise BuildError(f"unknown component(s) {sorted(unknown)}; known: {sorted(_BUILDERS)}")
    if not wanted & set(arts.missing()):
        return arts
    with _build_lock(arts.root):
        # Checked again under the lock: another build may have finished meanwhile.
        for name in [n for n in arts.missing() if n in wanted]:
            version, builder = _BUILDERS[name]
            log = _Log(name, arts.root / "logs" / f"{name}-{version}.log")
            print_fn(f"testbed: building {name} {version} (log: {log.path})")
            started_s = time.monotonic()
            builder(arts, log)
            print_fn(f"testbed: built {name} {version} in {time.monotonic() - started_s:.0f} s")
    return arts


def main(components: list[str] | None = None) -> int:
    """``python -m tests.testbed build [component...]``: build what is missing, print where."""
    started_s = time.monotonic()
    try:
        arts = ensure_built(lambda line: print(line, flush=True), only=components)
    except BuildError as exc:
        print(f"testbed: build failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"testbed: ready in {arts.root} (kafka {versions.KAFKA_VERSION}, etcd {versions.ETCD_VERSION}, "
        f"kubernetes {versions.KUBERNETES_VERSION}, kwok {versions.KWOK_VERSION}) "
        f"[{time.monotonic() - started_s:.1f} s]"
    )
    return 0
