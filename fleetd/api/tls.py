"""TLS of the gRPC server and of the metrics endpoint, from `server.tls`: the files are read
again when they change, so a rotated certificate (cert-manager, a mounted Secret) is served
from the next handshake on, without a restart."""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

from fleetd.config import ServerTlsConfig

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int, int], ...]


class TlsFilesError(ValueError):
    """A TLS file of the config cannot be read, is not PEM, or the key is not the
    certificate's; the message names it."""


class _CertFiles:
    """The server's key, certificate chain and client CAs, and whether they changed.

    A change is a moved inode, change or modification time, or size of any of them. What
    `read` refuses (a file caught half-written, a key that is not the certificate's: a
    rotation half done) leaves the last good files in use until the next change."""

    def __init__(self, tls: ServerTlsConfig) -> None:
        self.key_path = Path(tls.key_file).expanduser()
        self.cert_path = Path(tls.cert_file).expanduser()
        self.ca_path = Path(tls.client_ca_file).expanduser() if tls.client_ca_file else None
        self._paths = [self.key_path, self.cert_path] + ([self.ca_path] if self.ca_path else [])
        self._lock = threading.Lock()
        self._stamp = self._stamps()

    def _stamps(self) -> _Stamp:
        stamps = []
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError as exc:
                raise TlsFilesError(f"server.tls: cannot read {path}: {exc.strerror}") from exc
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        return tuple(stamps)

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(key, chain, client CAs or None), checked: TlsFilesError when unusable."""
        contents = []
        for path in self._paths:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise TlsFilesError(f"server.tls: cannot read {path}: {exc.strerror}") from exc
            if b"-----BEGIN " not in data:
                raise TlsFilesError(f"server.tls: {path} is not PEM")
            contents.append(data)
        roots = contents[2] if self.ca_path else None
        # gRPC alone would only fail the bind, or keep the old files, with the reason on
        # stderr. The pair is loaded from the paths again: what changes between the two
        # reads makes the next check read them once more (the stamp moves on success only).
        self.load_into(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), roots)
        return contents[0], contents[1], roots

    def load_into(self, context: ssl.SSLContext, roots: bytes | None) -> None:
        """Load the pair (and the CAs) into `context`; TlsFilesError when unusable."""
        try:
            context.load_cert_chain(self.cert_path, self.key_path)
        except (ssl.SSLError, OSError) as exc:
            raise TlsFilesError(
                f"server.tls: {self.cert_path} and {self.key_path} are not a certificate and"
                f" its key: {exc}"
            ) from exc
        if roots is not None:
            try:
                context.load_verify_locations(cadata=roots.decode("ascii"))
            except (ssl.SSLError, ValueError) as exc:
                raise TlsFilesError(
                    f"server.tls: {self.ca_path} holds no usable CA certificate: {exc}"
                ) from exc

    def forget(self) -> None:
        """Take the files as changed at the next check."""
        with self._lock:
            self._stamp = ()

    def if_changed(self) -> tuple[bytes, bytes, bytes | None] | None:
        """The files, read and checked, when they changed since the last good read; None
        when they did not, or are not usable (logged)."""
        with self._lock:
            try:
                stamp = self._stamps()
                if stamp == self._stamp:
                    return None
                files = self.read()
            except TlsFilesError as exc:
                log.error("TLS files changed but cannot be used (%s): keeping the previous", exc)
                return None
            self._stamp = stamp
            return files


def check_files(tls: ServerTlsConfig) -> None:
    """TlsFilesError unless the files make a usable server certificate, key and client
    CAs: what `server_credentials` and `MetricsTls` would refuse (`fleetd check-config`)."""
    _CertFiles(tls).read()


def server_credentials(tls: ServerTlsConfig) -> grpc.ServerCredentials:
    """Credentials for the gRPC server's `add_secure_port` (TlsFilesError when a file
    cannot be used). gRPC asks before every handshake, from its own threads, whether the
    files changed."""
    files = _CertFiles(tls)

    def configuration(
        key: bytes, chain: bytes, roots: bytes | None
    ) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        changed = files.if_changed()
        if changed is None:
            return None
        log.info("gRPC TLS: certificate files changed, serving the new ones")
        return configuration(*changed)

    return grpc.dynamic_ssl_server_credentials(
        configuration(*files.read()), fetch, require_client_authentication=bool(tls.client_ca_file)
    )


class MetricsTls:
    """The metrics endpoint's TLS: a context built from the files once they are checked
    (`check`), and a new one whenever they changed and are usable (`refresh`; the daemon
    calls it every few seconds). The server wraps each connection it accepts with the
    context current then: a rotated certificate is served, and a CA dropped from the client
    CA file refused, from the next connection on."""

    def __init__(self, tls: ServerTlsConfig) -> None:
        self._files = _CertFiles(tls)
        self.context: ssl.SSLContext | None = None

    def check(self) -> None:
        """Build the first context (TlsFilesError when a file cannot be used)."""
        self.context = self._context(self._files.read()[2])

    def refresh(self) -> bool:
        """Build a new context if the files changed (and are usable); True when it did."""
        changed = self._files.if_changed()
        if changed is None or self.context is None:
            return False
        try:
            context = self._context(changed[2])
        except TlsFilesError as exc:
            # (Changed again since they were checked: the next refresh reads them anew.)
            self._files.forget()
            log.error("metrics TLS: %s", exc)
            return False
        self.context = context
        log.info("metrics TLS: certificate files changed, serving the new ones")
        return True

    def _context(self, roots: bytes | None) -> ssl.SSLContext:
        """A server context of the pair and, with `roots`, client certificates required and
        verified against them only."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._files.load_into(context, roots)
        if roots is not None:
            context.verify_mode = ssl.CERT_REQUIRED
        return context
