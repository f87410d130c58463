"""TLS of the gRPC server: credentials from `server.tls` whose files are read again when
they change, so a rotated certificate (cert-manager, a mounted Secret) is served from the
next handshake on, without a restart."""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

from fleetd.config import ServerTlsConfig

log = logging.getLogger(__name__)


class TlsFilesError(ValueError):
    """A TLS file of the config cannot be read or is not PEM; the message names it."""


class _CertFiles:
    """The server's key, certificate chain and client CAs, re-read when a file changes.

    gRPC asks `fetch` before every handshake (from its own threads); it answers None (keep
    the configuration in use) unless a file's modification time or size moved. A file
    caught half-written, or a key that does not match, keeps the old configuration (logged)
    until the next change."""

    def __init__(self, tls: ServerTlsConfig) -> None:
        self._paths = [Path(p).expanduser() for p in (tls.key_file, tls.cert_file)]
        if tls.client_ca_file:
            self._paths.append(Path(tls.client_ca_file).expanduser())
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self.initial = self._configuration()

    def _stamps(self) -> tuple[tuple[int, int, int, int], ...]:
        # (The change time and inode too: a copy that keeps size and modification time,
        # `cp -p`, still changes those.)
        stamps = []
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise TlsFilesError(f"server.tls: cannot read {path}: {exc.strerror}") from exc
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        return tuple(stamps)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        contents = []
        for path in self._paths:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise TlsFilesError(f"server.tls: cannot read {path}: {exc.strerror}") from exc
            if b"-----BEGIN " not in data:
                raise TlsFilesError(f"server.tls: {path} is not PEM")
            contents.append(data)
        key, chain = contents[0], contents[1]
        roots = contents[2] if len(contents) > 2 else None
        self._check(roots)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def _check(self, roots: bytes | None) -> None:
        """TlsFilesError unless the key and the chain make a pair and the CAs parse (gRPC
        itself would only fail the bind, or keep the old files, with the reason on stderr).
        The pair is loaded from the paths again: what changes between the two reads makes
        the next handshake read them once more (the stamp moves on success only)."""
        key_path, cert_path = self._paths[0], self._paths[1]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            raise TlsFilesError(
                f"server.tls: {cert_path} and {key_path} are not a certificate and its key: {exc}"
            ) from exc
        if roots is not None:
            try:
                context.load_verify_locations(cadata=roots.decode("ascii"))
            except (ssl.SSLError, ValueError) as exc:
                raise TlsFilesError(
                    f"server.tls: {self._paths[2]} holds no usable CA certificate: {exc}"
                ) from exc

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed since the last one, else None."""
        with self._lock:
            try:
                stamp = self._stamps()
                if stamp == self._stamp:
                    return None
                configuration = self._configuration()
            except TlsFilesError as exc:
                log.error("TLS files changed but cannot be used (%s): keeping the previous", exc)
                return None
            self._stamp = stamp
            log.info("gRPC TLS: certificate files changed, serving the new ones")
            return configuration


def server_credentials(tls: ServerTlsConfig) -> grpc.ServerCredentials:
    """Credentials for `add_secure_port` (TlsFilesError when a file cannot be used)."""
    files = _CertFiles(tls)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=bool(tls.client_ca_file)
    )
