"""Independent Kubernetes control planes on 127.0.0.1: etcd + kube-apiserver + kwok + kube-scheduler.

Each cluster (``cluster-a``, ``cluster-b``) has its own etcd, its own kube-apiserver (token
auth, self-signed serving certificate) and its own kwok, which plays the kubelet of every
node annotated ``kwok.x-k8s.io/node=fake``. A kube-scheduler runs against each cluster, so
unbound pods that tolerate the kwok taint get scheduled. There is no kube-controller-manager:
no Deployment/ReplicaSet/Job controllers, no garbage collector, and deleted namespaces stay
Terminating; tests create pods directly and use unique names.

One kubeconfig holds a context per cluster (the context name is the cluster name).
"""

from __future__ import annotations

import json
import secrets
import shutil
import ssl
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.build import Artefacts
from tests.testbed.gpu_nodes import KWOK_ANNOTATION, KWOK_TOLERATION, gpu_node_manifest
from tests.testbed.procs import (
    PortInUseError,
    Process,
    Supervisor,
    free_ports,
    retry_on_port_clash,
    wait_until,
)
from tests.testbed.tls import self_signed_serving_cert

#: The clusters every test bed has; each name is also its kubeconfig context.
CLUSTERS: tuple[str, ...] = ("cluster-a", "cluster-b")

# Bounded waits (a warm start takes a few seconds for each).
ETCD_READY_TIMEOUT_S = 30.0
APISERVER_READY_TIMEOUT_S = 90.0
KWOK_READY_TIMEOUT_S = 60.0
SCHEDULER_READY_TIMEOUT_S = 60.0
#: Default wait for a node to turn Ready or a pod to reach a phase.
DEFAULT_WAIT_S = 60.0

_ADMIN_USER = "fleetd-testbed-admin"


@dataclass(frozen=True)
class _Tls:
    cert_path: Path
    key_path: Path
    sa_key_path: Path


def _make_tls(directory: Path) -> _Tls:
    """The serving certificate (`self_signed_serving_cert`, its own CA: the kubeconfig's
    trust anchor), its key and the service-account key, written to `directory`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key, cert = self_signed_serving_cert("fleetd-testbed")
    directory.mkdir(parents=True, exist_ok=True)
    tls = _Tls(
        directory / "serving.crt", directory / "serving.key", directory / "service-account.key"
    )
    tls.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key = serialization.PrivateFormat.TraditionalOpenSSL
    tls.key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, pem_key, serialization.NoEncryption())
    )
    # One private key serves both --service-account-key-file and --service-account-signing-key-file.
    sa_key = ec.generate_private_key(ec.SECP256R1())
    tls.sa_key_path.write_bytes(
        sa_key.private_bytes(serialization.Encoding.PEM, pem_key, serialization.NoEncryption())
    )
    for path in (tls.key_path, tls.sa_key_path):
        path.chmod(0o600)
    return tls


@dataclass
class ClusterProcesses:
    """The processes and endpoints of one control plane."""

    name: str
    server: str
    etcd: Process
    apiserver: Process
    kwok: Process | None = None
    scheduler: Process | None = None
    kubeconfig_path: Path = field(default_factory=Path)
    etcd_url: str = ""


def _kubeconfig(
    clusters: Mapping[str, str], ca_path: Path, token: str, current: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": n, "cluster": {"server": s, "certificate-authority": str(ca_path)}}
            for n, s in clusters.items()
        ],
        "users": [{"name": _ADMIN_USER, "user": {"token": token}}],
        "contexts": [{"name": n, "context": {"cluster": n, "user": _ADMIN_USER}} for n in clusters],
        "current-context": current,
    }


def _https_get(url: str, ca_path: Path | None, token: str | None) -> tuple[int, str]:
    if ca_path is None:
        ctx = ssl._create_unverified_context()  # kube-scheduler's own throw-away cert
    else:
        ctx = ssl.create_default_context(cafile=str(ca_path))
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
        return int(resp.status), resp.read().decode(errors="replace")


def _http_ok(
    url: str,
    ca_path: Path | None = None,
    token: str | None = None,
    check: Callable[[str], bool] = lambda body: True,
) -> bool:
    status, body = _https_get(url, ca_path, token)
    return status == 200 and check(body)


class KubeTestbed:
    """Running control planes: a kubeconfig with one context per cluster, and helpers.

    Attributes:
        kubeconfig_path: one kubeconfig file with a context per cluster
            (``kubectl --kubeconfig <it> --context cluster-b get nodes`` works).
        contexts: the context names, ``("cluster-a", "cluster-b")``.
        servers: context -> ``https://127.0.0.1:<port>`` of its kube-apiserver.
        ca_path: the CA (self-signed serving certificate) the kubeconfig trusts.
        token: the bearer token of the admin user (group ``system:masters``).

    The helpers use the blocking ``kubernetes`` client and poll with bounded timeouts;
    from async tests call them through ``await asyncio.to_thread(kube.create_gpu_node, ...)``.
    """

    def __init__(
        self, kubeconfig_path: Path, clusters: Sequence[ClusterProcesses], ca_path: Path, token: str
    ) -> None:
        self.kubeconfig_path = kubeconfig_path
        self.contexts: tuple[str, ...] = tuple(c.name for c in clusters)
        self.servers: dict[str, str] = {c.name: c.server for c in clusters}
        self.ca_path = ca_path
        self.token = token
        self._clusters = {c.name: c for c in clusters}
        self._api_clients: dict[str, Any] = {}

    def close(self) -> None:
        """Close the cached API clients (their thread pools); the servers keep running."""
        for api_client in self._api_clients.values():
            api_client.close()
        self._api_clients.clear()

    def cluster_processes(self, context: str) -> ClusterProcesses:
        """The processes of one cluster (for log paths in failure messages)."""
        self._check_context(context)
        return self._clusters[context]

    def api(self, context: str) -> Any:
        """A ``kubernetes.client.ApiClient`` for ``context`` (cached; do not close it)."""
        self._check_context(context)
        if context not in self._api_clients:
            from kubernetes import config

            self._api_clients[context] = config.new_client_from_config(
                config_file=str(self.kubeconfig_path), context=context
            )
        return self._api_clients[context]

    def core_v1(self, context: str) -> Any:
        """A ``kubernetes.client.CoreV1Api`` for ``context``."""
        from kubernetes import client

        return client.CoreV1Api(self.api(context))

    def create_gpu_node(
        self,
        context: str,
        name: str,
        *,
        gpus: int = 8,
        product: str = "NVIDIA-H100-80GB-HBM3",
        zone: str = "us-east-1a",
        pool: str = "gpu-default",
        taints: Sequence[Mapping[str, str]] | None = None,
        labels: Mapping[str, str] | None = None,
        cpu_millicores: int | None = None,
        memory_bytes: int | None = None,
        pods: int = 110,
        gpu_memory_mib: int | None = None,
        wait_ready: bool = True,
        timeout_s: float = DEFAULT_WAIT_S,
    ) -> Any:
        """Create a fake GPU node managed by kwok in ``context``; return the ``V1Node``.

        See :func:`tests.testbed.gpu_nodes.gpu_node_manifest` for the shape (capacity,
        allocatable, labels, the kwok annotation and taint). With ``wait_ready`` (default)
        it returns only once kwok has made the node Ready.
        """
        manifest = gpu_node_manifest(
            name,
            gpus=gpus,
            product=product,
            zone=zone,
            pool=pool,
            taints=taints,
            labels=labels,
            cpu_millicores=cpu_millicores,
            memory_bytes=memory_bytes,
            pods=pods,
            gpu_memory_mib=gpu_memory_mib,
        )
        node = self.core_v1(context).create_node(manifest)
        if wait_ready:
            return self.wait_node_ready(context, name, timeout_s=timeout_s)
        return node

    def delete_node(self, context: str, name: str) -> None:
        """Delete a node (no error if it is already gone)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.core_v1(context).delete_node(name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def wait_node_ready(self, context: str, name: str, *, timeout_s: float = DEFAULT_WAIT_S) -> Any:
        """Poll until node ``name`` has condition Ready=True; return the ``V1Node``."""
        core = self.core_v1(context)

        def ready() -> Any:
            node = core.read_node(name)
            conds = node.status.conditions or []
            return node if any(c.type == "Ready" and c.status == "True" for c in conds) else None

        return wait_until(
            f"node {name} Ready in {context}",
            ready,
            timeout_s=timeout_s,
            watch=self._watched(context),
            describe=lambda: _describe(core.read_node(name)),
        )

    def wait_pod(
        self,
        context: str,
        name: str,
        *,
        namespace: str = "default",
        phase: str = "Running",
        timeout_s: float = DEFAULT_WAIT_S,
    ) -> Any:
        """Poll until pod ``namespace/name`` reaches ``phase``; return the ``V1Pod``."""
        core = self.core_v1(context)

        def reached() -> Any:
            pod = core.read_namespaced_pod(name, namespace)
            return pod if pod.status.phase == phase else None

        return wait_until(
            f"pod {namespace}/{name} {phase} in {context}",
            reached,
            timeout_s=timeout_s,
            watch=self._watched(context),
            describe=lambda: _describe(core.read_namespaced_pod(name, namespace)),
        )

    def _watched(self, context: str) -> list[Process]:
        c = self._clusters[context]
        return [p for p in (c.etcd, c.apiserver, c.kwok, c.scheduler) if p is not None]

    def _check_context(self, context: str) -> None:
        if context not in self._clusters:
            raise KeyError(f"unknown context {context!r}; known: {', '.join(self.contexts)}")


def _describe(obj: Any) -> str:
    """Phase and conditions of a pod or node, for timeout messages."""
    status = obj.status
    conds = "; ".join(
        f"{c.type}={c.status}" + (f" ({c.reason}: {c.message})" if c.message else "")
        for c in status.conditions or []
    )
    phase = getattr(status, "phase", None)
    node = getattr(obj.spec, "node_name", None)
    return f"phase={phase} node={node} conditions: {conds or 'none'}"


def _describe(obj: Any) -> str:
    """Phase and conditions of a pod or node, for timeout messages."""
    status = obj.status
    conds = "; ".join(
        f"{c.type}={c.status}" + (f" ({c.reason}: {c.message})" if c.message else "")
        for c in status.conditions or []
    )
    phase = getattr(status, "phase", None)
    node = getattr(obj.spec, "node_name", None)
    return f"phase={phase} node={node} conditions: {conds or 'none'}"


def _start_etcd(arts: Artefacts, sup: Supervisor, name: str, data_dir: Path) -> tuple[Process, str]:
    client_port, peer_port = free_ports(2)
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    proc = sup.start(
        f"{name}-etcd",
        [
            str(arts.etcd),
            f"--name={name}",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={name}={peer}",
            "--initial-cluster-state=new",
            # Test data: losing it on a crash is fine, and fsync dominates write latency.
            "--unsafe-no-fsync",
            "--quota-backend-bytes=2147483648",
            "--log-level=warn",
        ],
        stop_wave=0,  # last: kube-apiserver needs it while shutting down
    )
    return proc, client


def _wait_etcd(name: str, proc: Process, client: str) -> None:
    wait_until(
        f"{name} etcd at {client}/health",
        lambda: _http_ok(f"{client}/health", check=lambda b: json.loads(b).get("health") == "true"),
        timeout_s=ETCD_READY_TIMEOUT_S,
        watch=[proc],
    )


def _start_apiserver(
    arts: Artefacts, sup: Supervisor, name: str, etcd_url: str, tls: _Tls, token_file: Path
) -> tuple[Process, str]:
    (port,) = free_ports(1)
    server = f"https://127.0.0.1:{port}"
    proc = sup.start(
        f"{name}-kube-apiserver",
        [
            str(arts.kube_apiserver),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={tls.cert_path}",
            f"--tls-private-key-file={tls.key_path}",
            f"--token-auth-file={token_file}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            f"--service-account-issuer={server}",
            f"--service-account-key-file={tls.sa_key_path}",
            f"--service-account-signing-key-file={tls.sa_key_path}",
            # No controller-manager: it would create service accounts (else ServiceAccount
            # admission rejects pods) and lift the node.kubernetes.io/not-ready taint that
            # TaintNodesByCondition puts on every new node (else nothing ever schedules).
            "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition",
            "--allow-privileged=true",
            "--profiling=false",
            "--enable-priority-and-fairness=false",
            # No endpoints for the `kubernetes` service (nothing in the test bed needs them);
            # that also lets the advertise address be loopback, which the default reconciler
            # rejects, so the test bed runs on machines without a default route too.
            "--endpoint-reconciler-type=none",
            "--advertise-address=127.0.0.1",
        ],
    )
    return proc, server


def _wait_apiserver(c: ClusterProcesses, ca_path: Path, token: str) -> None:
    wait_until(
        f"{c.name} kube-apiserver at {c.server}/readyz",
        lambda: _http_ok(f"{c.server}/readyz", ca_path, token, check=lambda b: b.strip() == "ok"),
        timeout_s=APISERVER_READY_TIMEOUT_S,
        watch=[c.etcd, c.apiserver],
    )


def _start_kwok(
    arts: Artefacts, sup: Supervisor, cluster: ClusterProcesses, kubeconfig: Path
) -> Process:
    proc = sup.start(
        f"{cluster.name}-kwok",
        [
            str(arts.kwok),
            f"--kubeconfig={kubeconfig}",
            f"--config={arts.kwok_stages}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            # No --server-address: its metrics/logs server is not needed, and one port
            # fewer is one clash fewer.
            "--node-ip=10.244.0.1",
            # Pod IPs: the default /24 would run out at 254 running pods per cluster.
            "--cidr=10.128.0.0/14",
        ],
        stop_wave=2,
    )
    return proc


def _start_scheduler(
    arts: Artefacts, sup: Supervisor, cluster: ClusterProcesses, kubeconfig: Path, cert_dir: Path
) -> Process:
    (port,) = free_ports(1)
    proc = sup.start(
        f"{cluster.name}-kube-scheduler",
        [
            str(arts.kube_scheduler),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            # Else it keeps looking for the requestheader configmap, which no one creates here.
            "--authentication-skip-lookup=true",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={cert_dir}",
            "--profiling=false",
        ],
        stop_wave=2,
    )
    wait_until(
        f"{cluster.name} kube-scheduler /healthz on 127.0.0.1:{port}",
        lambda: _http_ok(f"https://127.0.0.1:{port}/healthz"),
        timeout_s=SCHEDULER_READY_TIMEOUT_S,
        watch=[cluster.apiserver, proc],
    )
    return proc


def _probe_kwok(kube: KubeTestbed, context: str) -> None:
    """kwok is ready when a node it manages turns Ready; the probe node is then deleted."""
    name = "fleetd-testbed-probe"
    kube.create_gpu_node(context, name, gpus=0, wait_ready=False)
    try:
        kube.wait_node_ready(context, name, timeout_s=KWOK_READY_TIMEOUT_S)
    finally:
        kube.delete_node(context, name)


def start_kube(
    arts: Artefacts, sup: Supervisor, run_dir: Path, clusters: Sequence[str] = CLUSTERS
) -> KubeTestbed:
    """Start every cluster's etcd, kube-apiserver, kwok and kube-scheduler; wait for readiness.

    Raises TestbedError naming the component and its log path on any failure.
    """
    kdir = run_dir / "kube"
    tls = _make_tls(kdir / "pki")
    token = secrets.token_hex(16)
    token_file = kdir / "tokens.csv"
    token_file.write_text(f'{token},{_ADMIN_USER},{_ADMIN_USER},"system:masters"\n')
    token_file.chmod(0o600)

    def etcd_once(name: str) -> tuple[Process, str]:
        data_dir = kdir / name / "etcd"
        if data_dir.exists():  # a failed attempt's member data names the old peer port
            shutil.rmtree(data_dir)
        return _start_etcd(arts, sup, name, data_dir)

    def etcd_ready(name: str) -> tuple[Process, str]:
        proc, url = etcd_once(name)
        _wait_etcd(name, proc, url)
        return proc, url

    def apiserver_ready(c: ClusterProcesses) -> None:
        c.apiserver, c.server = _start_apiserver(arts, sup, c.name, c.etcd_url, tls, token_file)
        _wait_apiserver(c, tls.cert_path, token)

    # The clusters start side by side (all etcds, then all apiservers) so that their
    # start-ups overlap; readiness is awaited per component. A component that lost a port
    # to someone else between picking and binding is started again alone.
    etcds = {name: etcd_once(name) for name in clusters}
    for name, (etcd, etcd_url) in etcds.items():
        try:
            _wait_etcd(name, etcd, etcd_url)
        except PortInUseError:
            etcds[name] = retry_on_port_clash(lambda name=name: etcd_ready(name))
    running: list[ClusterProcesses] = []
    for name, (etcd, etcd_url) in etcds.items():
        apiserver, server = _start_apiserver(arts, sup, name, etcd_url, tls, token_file)
        running.append(ClusterProcesses(name, server, etcd, apiserver, etcd_url=etcd_url))
    for c in running:
        try:
            _wait_apiserver(c, tls.cert_path, token)
        except PortInUseError:
            retry_on_port_clash(lambda c=c: apiserver_ready(c))

    kubeconfig_path = kdir / "kubeconfig.yaml"
    servers = {c.name: c.server for c in running}
    kubeconfig_path.write_text(
        yaml.safe_dump(_kubeconfig(servers, tls.cert_path, token, clusters[0]))
    )
    for c in running:
        # Components take no --context flag: each gets a kubeconfig whose current context is its cluster.
        c.kubeconfig_path = kdir / c.name / "kubeconfig.yaml"
        c.kubeconfig_path.write_text(
            yaml.safe_dump(_kubeconfig({c.name: c.server}, tls.cert_path, token, c.name))
        )
        c.kwok = _start_kwok(arts, sup, c, c.kubeconfig_path)
        c.scheduler = retry_on_port_clash(
            lambda c=c: _start_scheduler(
                arts, sup, c, c.kubeconfig_path, kdir / c.name / "scheduler-certs"
            )
        )

    kube = KubeTestbed(kubeconfig_path, running, tls.cert_path, token)
    for c in running:
        _probe_kwok(kube, c.name)
    return kube


__all__ = ["CLUSTERS", "KWOK_TOLERATION", "ClusterProcesses", "KubeTestbed", "start_kube"]
