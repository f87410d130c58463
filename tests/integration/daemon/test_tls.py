"""gRPC over TLS and mutual TLS (`server.tls`), over real sockets: verified clients are
served, plaintext and unverified ones refused, stock clients work with the CA, and a
rotated certificate is served from the next handshake on without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

import fleetd.metrics
from fleetd import cli
from fleetd.api.tls import TlsFilesError
from fleetd.daemon import Daemon
from fleetd.metrics import TLS_MAX_CONNECTIONS
from fleetd.v1 import fleet_pb2, fleet_pb2_grpc, placement_pb2, placement_pb2_grpc, types_pb2
from tests.testbed.procs import async_wait_until
from tests.testbed.tls import client_cert, self_signed_serving_cert

from .conftest import StartDaemon
from .test_edge import _grpc_tool

pytestmark = pytest.mark.testbed


def _pem(key: Any, cert: Any) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization

    return (
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert.public_bytes(serialization.Encoding.PEM),
    )


class _Authority:
    """A self-signed certificate for 127.0.0.1 (its own CA), or with `ca_only` a CA that
    only signs, and PEM files of it."""

    def __init__(self, directory: Path, name: str, *, ca_only: bool = False) -> None:
        self.key, self.cert = self_signed_serving_cert(name, serving=not ca_only)
        self.key_pem, self.cert_pem = _pem(self.key, self.cert)
        self.key_file, self.cert_file = directory / f"{name}.key", directory / f"{name}.crt"
        self.key_file.write_bytes(self.key_pem)
        self.cert_file.write_bytes(self.cert_pem)

    def client(self, name: str) -> tuple[bytes, bytes]:
        """PEM key and certificate of a client certificate this authority issued."""
        return _pem(*client_cert(self.key, self.cert, name))


def _tls_section(server: _Authority, client_ca: _Authority | None = None) -> dict[str, Any]:
    tls = {"cert_file": str(server.cert_file), "key_file": str(server.key_file)}
    if client_ca is not None:
        tls["client_ca_file"] = str(client_ca.cert_file)
    return {"server": {"tls": tls}, "sources": {"simulated": {"confirm_after_s": 3600}}}


async def _status(
    daemon: Daemon, roots: bytes | None, client: tuple[bytes, bytes] | None = None
) -> grpc.StatusCode:
    """GetStatus on a fresh channel (a new handshake): OK, or the status it failed with.
    `roots` None: a plaintext channel."""
    target = f"127.0.0.1:{daemon.grpc_port}"
    if roots is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        key, chain = client if client is not None else (None, None)
        creds = grpc.ssl_channel_credentials(roots, private_key=key, certificate_chain=chain)
        channel = grpc.aio.secure_channel(target, creds)
    async with channel:
        try:
            reply = await fleet_pb2_grpc.FleetStub(channel).GetStatus(
                fleet_pb2.GetStatusRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    assert reply.ready
    return grpc.StatusCode.OK


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


async def test_tls_serves_verified_clients_and_refuses_plaintext(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    server, stranger = _Authority(tmp_path, "server"), _Authority(tmp_path, "stranger")
    daemon, _ = await start_daemon(**_tls_section(server))
    assert await _status(daemon, server.cert_pem) == grpc.StatusCode.OK
    assert await _status(daemon, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert await _status(daemon, stranger.cert_pem) == grpc.StatusCode.UNAVAILABLE  # unverified
    # Stock clients, given the CA.
    addr = f"127.0.0.1:{daemon.grpc_port}"
    probe, grpcurl = _grpc_tool("grpc-health-probe"), _grpc_tool("grpcurl")
    out = await asyncio.to_thread(
        _run, probe, "-addr", addr, "-tls", "-tls-ca-cert", str(server.cert_file)
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (await asyncio.to_thread(_run, probe, "-addr", addr)).returncode != 0
    out = await asyncio.to_thread(_run, grpcurl, "-cacert", str(server.cert_file), addr, "list")
    assert "fleetd.v1.Placement" in out.stdout, out.stderr


async def test_mutual_tls_requires_a_client_certificate_of_the_ca(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    server, clients, stranger = (
        _Authority(tmp_path, "server"),
        _Authority(tmp_path, "clients"),
        _Authority(tmp_path, "stranger"),
    )
    daemon, _ = await start_daemon(**_tls_section(server, client_ca=clients))
    roots = server.cert_pem
    assert await _status(daemon, roots, clients.client("ml-platform")) == grpc.StatusCode.OK
    assert await _status(daemon, roots) == grpc.StatusCode.UNAVAILABLE  # no certificate
    assert await _status(daemon, roots, stranger.client("ml")) == grpc.StatusCode.UNAVAILABLE
    # The command line, with the same files.
    key_pem, cert_pem = clients.client("cli")
    (tmp_path / "cli.key").write_bytes(key_pem)
    (tmp_path / "cli.crt").write_bytes(cert_pem)
    explain = ["explain", "--addr", f"127.0.0.1:{daemon.grpc_port}", "--gpus", "1"]
    tls = ["--tls-ca-file", str(server.cert_file)]
    mtls = [
        *tls,
        "--tls-cert-file",
        str(tmp_path / "cli.crt"),
        "--tls-key-file",
        str(tmp_path / "cli.key"),
    ]
    assert await asyncio.to_thread(cli.main, [*explain, *mtls]) == 0
    assert await asyncio.to_thread(cli.main, [*explain, *tls, "--timeout-s", "3"]) == 1


async def test_a_rotated_certificate_is_served_without_a_restart(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    first, second = _Authority(tmp_path, "first"), _Authority(tmp_path, "second")
    key_file, cert_file = tmp_path / "tls.key", tmp_path / "tls.crt"
    key_file.write_bytes(first.key_pem)
    cert_file.write_bytes(first.cert_pem)
    section = {"cert_file": str(cert_file), "key_file": str(key_file)}
    daemon, _ = await start_daemon(server={"tls": section})
    target = f"127.0.0.1:{daemon.grpc_port}"
    kept = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(first.cert_pem))
    async with kept:
        stub = fleet_pb2_grpc.FleetStub(kept)
        await stub.GetStatus(fleet_pb2.GetStatusRequest(), timeout=10)
        assert await _status(daemon, first.cert_pem) == grpc.StatusCode.OK
        assert await _status(daemon, second.cert_pem) == grpc.StatusCode.UNAVAILABLE
        # Rotation as a mounted Secret does it: new files swapped in whole.
        for path, data in ((key_file, second.key_pem), (cert_file, second.cert_pem)):
            path.with_suffix(".new").write_bytes(data)
            os.replace(path.with_suffix(".new"), path)
        assert await _status(daemon, second.cert_pem) == grpc.StatusCode.OK
        assert await _status(daemon, first.cert_pem) == grpc.StatusCode.UNAVAILABLE
        # A connection made before goes on; a broken rotation keeps the last good files:
        # not PEM, or a certificate without its key (a rotation caught half done).
        await stub.GetStatus(fleet_pb2.GetStatusRequest(), timeout=10)
        cert_file.write_bytes(b"not a certificate")
        assert await _status(daemon, second.cert_pem) == grpc.StatusCode.OK
        cert_file.write_bytes(first.cert_pem)
        assert await _status(daemon, second.cert_pem) == grpc.StatusCode.OK
        key_file.write_bytes(first.key_pem)  # (the rotation completes)
        assert await _status(daemon, first.cert_pem) == grpc.StatusCode.OK


async def test_unusable_tls_files_stop_the_start_with_their_names(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    server, other = _Authority(tmp_path, "server"), _Authority(tmp_path, "other")
    missing = tmp_path / "missing.key"
    with pytest.raises(TlsFilesError, match=str(missing)):
        await start_daemon(
            server={"tls": {"cert_file": str(server.cert_file), "key_file": str(missing)}}
        )
    # PEM, but the key is another certificate's (gRPC alone would only fail to bind).
    with pytest.raises(TlsFilesError, match="are not a certificate and its key"):
        await start_daemon(
            server={"tls": {"cert_file": str(server.cert_file), "key_file": str(other.key_file)}}
        )


async def test_teams_clients_decide_who_acts_for_which_team(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    server, clients = _Authority(tmp_path, "server"), _Authority(tmp_path, "clients")
    sections = _tls_section(server, client_ca=clients)
    sections["teams"] = {"clients": {"trainer": ["research"], "platform": ["*"]}}
    daemon, _ = await start_daemon(**sections)
    target = f"127.0.0.1:{daemon.grpc_port}"

    def channel(name: str) -> grpc.aio.Channel:
        key, chain = clients.client(name)
        creds = grpc.ssl_channel_credentials(
            server.cert_pem, private_key=key, certificate_chain=chain
        )
        return grpc.aio.secure_channel(target, creds)

    details: list[str] = []
    results: list[int] = []

    async def call(name: str, method: str, request: Any) -> grpc.StatusCode:
        async with channel(name) as ch:
            try:
                reply = await getattr(placement_pb2_grpc.PlacementStub(ch), method)(
                    request, timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                details.append(exc.details() or "")
                return exc.code()
        results.append(getattr(reply, "result", 0))
        return grpc.StatusCode.OK

    def workload(team: str, workload_id: str, gpus: int = 1) -> types_pb2.Workload:
        pod = types_pb2.PodSpec(cpu_millicores=1000, memory_bytes=2**30, gpu_count=gpus)
        return types_pb2.Workload(
            workload_id=workload_id, team=team, pod=pod, cluster="sim-west", pool="h100"
        )

    async def place(name: str, team: str, workload_id: str, gpus: int = 1) -> grpc.StatusCode:
        request = placement_pb2.PlaceRequest(workload=workload(team, workload_id, gpus))
        return await call(name, "Place", request)

    async def explain(name: str, team: str) -> grpc.StatusCode:
        request = placement_pb2.ExplainRequest(workload=workload(team, "x"))
        return await call(name, "Explain", request)

    async def release(name: str, workload_id: str) -> grpc.StatusCode:
        return await call(name, "Release", placement_pb2.ReleaseRequest(workload_id=workload_id))

    denied, ok = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK
    assert await place("trainer", "research", "r-1") == ok
    assert await place("trainer", "batch", "b-1") == denied
    assert details[-1] == "client 'trainer' may not act for team 'batch' (teams.clients)"
    assert await explain("trainer", "research") == ok
    assert await explain("trainer", "batch") == denied
    assert await place("stranger", "research", "r-2") == denied  # (a valid certificate, not listed)
    assert await place("platform", "batch", "b-1") == ok
    assert await release("trainer", "b-1") == denied
    assert details[-1] == "client 'trainer' may not act for team 'batch' (teams.clients)"
    assert await release("trainer", "r-1") == ok
    assert await release("platform", "b-1") == ok
    # A workload waiting in the queue is its team's too: fill the pool, then queue one.
    for i in range(64):
        assert await place("platform", "batch", f"fill-{i}", gpus=8) == ok
        if results[-1] == types_pb2.DECISION_RESULT_QUEUED:
            break
    assert results[-1] == types_pb2.DECISION_RESULT_QUEUED
    assert await place("trainer", "research", "r-queued", gpus=8) == ok
    assert results[-1] == types_pb2.DECISION_RESULT_QUEUED
    assert await release("trainer", "r-queued") == ok
    assert await place("platform", "batch", "b-queued", gpus=8) == ok
    assert await release("trainer", "b-queued") == denied  # (another team's, queued)
    # An unknown workload is NOT_FOUND, whoever asks; a Place without a team is invalid.
    assert await release("trainer", "no-such-workload") == grpc.StatusCode.NOT_FOUND
    assert await place("trainer", "", "r-3") == grpc.StatusCode.INVALID_ARGUMENT
    # Reading the fleet needs only a certificate of the CA.
    assert await _status(daemon, server.cert_pem, clients.client("stranger")) == ok
    # Listing workloads shows a client the teams it may act for only.

    async def listed(name: str, team: str = "") -> tuple[grpc.StatusCode, set[str]]:
        async with channel(name) as ch:
            try:
                reply = await placement_pb2_grpc.PlacementStub(ch).ListWorkloads(
                    placement_pb2.ListWorkloadsRequest(team=team, page_size=1000), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                details.append(exc.details() or "")
                return exc.code(), set()
        return grpc.StatusCode.OK, {w.team for w in reply.workloads}

    assert await place("trainer", "research", "r-last") == ok
    assert await listed("trainer") == (ok, {"research"})
    assert await listed("platform") == (ok, {"research", "batch"})
    assert await listed("trainer", "batch") == (denied, set())
    assert details[-1] == "client 'trainer' may not act for team 'batch' (teams.clients)"
    assert await listed("stranger") == (ok, set())


def _scrape(port: int, roots: bytes | None, client: tuple[Path, Path] | None = None) -> str:
    """GET /metrics over HTTPS (plain HTTP with `roots` None); the body, or the error's
    class name when it fails."""
    url = f"{'https' if roots is not None else 'http'}://127.0.0.1:{port}/metrics"
    context = None
    if roots is not None:
        context = ssl.create_default_context(cadata=roots.decode())
        if client is not None:
            context.load_cert_chain(client[0], client[1])
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as resp:
            return str(resp.read().decode())
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"


async def test_metrics_over_mutual_tls_with_rotation(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    first, second, clients = (
        _Authority(tmp_path, "first"),
        _Authority(tmp_path, "second"),
        _Authority(tmp_path, "clients", ca_only=True),
    )
    key_file, cert_file = tmp_path / "tls.key", tmp_path / "tls.crt"
    key_file.write_bytes(first.key_pem)
    cert_file.write_bytes(first.cert_pem)
    client = (tmp_path / "prometheus.crt", tmp_path / "prometheus.key")
    client_key, client_cert = clients.client("prometheus")
    client[0].write_bytes(client_cert)
    client[1].write_bytes(client_key)
    tls = {
        "cert_file": str(cert_file),
        "key_file": str(key_file),
        "client_ca_file": str(clients.cert_file),
        "metrics": True,
    }
    daemon, _ = await start_daemon(server={"tls": tls})
    port = daemon.metrics_port
    assert "fleetd_ready" in await asyncio.to_thread(_scrape, port, first.cert_pem, client)
    assert "fleetd_ready" not in await asyncio.to_thread(_scrape, port, first.cert_pem)
    assert "fleetd_ready" not in await asyncio.to_thread(_scrape, port, None)
    # Rotation: the files swapped in whole; served within the check interval.
    for path, data in ((key_file, second.key_pem), (cert_file, second.cert_pem)):
        path.with_suffix(".new").write_bytes(data)
        os.replace(path.with_suffix(".new"), path)

    async def rotated() -> bool:
        return "fleetd_ready" in await asyncio.to_thread(_scrape, port, second.cert_pem, client)

    await async_wait_until("the rotated certificate on /metrics", rotated, timeout_s=30)
    assert "fleetd_ready" not in await asyncio.to_thread(_scrape, port, first.cert_pem, client)
    # A client that connects and says nothing holds up no scrape (handshakes are per
    # connection, in its own thread).
    with socket.create_connection(("127.0.0.1", port)):
        assert "fleetd_ready" in await asyncio.to_thread(_scrape, port, second.cert_pem, client)
    # At most TLS_MAX_CONNECTIONS at once: one more is closed at once rather than given a
    # thread; once they are gone, scrapes are served again.
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(TLS_MAX_CONNECTIONS)]
    try:
        with socket.create_connection(("127.0.0.1", port)) as extra:
            extra.settimeout(10)
            with contextlib.suppress(ConnectionResetError):  # (closed: reset or EOF)
                assert extra.recv(1) == b""
    finally:
        for sock in silent:
            sock.close()

    async def served_again() -> bool:
        return "fleetd_ready" in await asyncio.to_thread(_scrape, port, second.cert_pem, client)

    await async_wait_until("scrapes served after the flood", served_again, timeout_s=30)
    # The client CA replaced: certificates of the old one are refused from then on, the new
    # one's accepted.
    new_clients = _Authority(tmp_path, "new-clients", ca_only=True)
    new_client = (tmp_path / "prometheus-2.crt", tmp_path / "prometheus-2.key")
    new_key, new_cert = new_clients.client("prometheus")
    new_client[0].write_bytes(new_cert)
    new_client[1].write_bytes(new_key)
    ca_file = tmp_path / "clients.crt"
    ca_file.with_suffix(".new").write_bytes(new_clients.cert_pem)
    os.replace(ca_file.with_suffix(".new"), ca_file)

    async def new_ca() -> bool:
        return "fleetd_ready" in await asyncio.to_thread(_scrape, port, second.cert_pem, new_client)

    await async_wait_until("the new client CA on /metrics", new_ca, timeout_s=30)
    assert "fleetd_ready" not in await asyncio.to_thread(_scrape, port, second.cert_pem, client)


def _trickle_until_cut(port: int, roots: bytes, limit_s: float) -> float | None:
    """Connect over TLS and send a request line a byte at a time, never ending it; the
    seconds until the server closed the connection (None: still open after `limit_s`)."""
    context = ssl.create_default_context(cadata=roots.decode())
    started = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.settimeout(0.5)
        tls.sendall(b"GET /")
        while time.monotonic() - started < limit_s:
            try:
                if tls.recv(1) == b"":
                    return time.monotonic() - started
            except TimeoutError:
                pass  # (nothing from the server: it still reads the request line)
            except (ConnectionResetError, ssl.SSLError):
                return time.monotonic() - started
            try:
                tls.sendall(b"x")  # (a byte each half second: every read wait is short)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                return time.monotonic() - started
    return None


async def test_a_metrics_connection_is_cut_at_its_deadline(
    start_daemon: StartDaemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads time out one at a time; a client that keeps sending a byte now and then is
    closed once its connection is TLS_CONNECTION_DEADLINE_S old, so it cannot keep one of
    the TLS_MAX_CONNECTIONS threads for ever."""
    monkeypatch.setattr(fleetd.metrics, "TLS_CONNECTION_DEADLINE_S", 2.0)
    server = _Authority(tmp_path, "server")
    tls = {"cert_file": str(server.cert_file), "key_file": str(server.key_file), "metrics": True}
    daemon, _ = await start_daemon(server={"tls": tls})
    port = daemon.metrics_port
    cut_after_s = await asyncio.to_thread(_trickle_until_cut, port, server.cert_pem, 20.0)
    assert cut_after_s is not None, "the trickling client was never cut"
    assert cut_after_s >= 2.0
    # (A scrape is a single request, well within the deadline.)
    assert "fleetd_ready" in await asyncio.to_thread(_scrape, port, server.cert_pem)
