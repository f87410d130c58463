"""TLS and SASL for fleetd's Kafka clients (the consumer, its dead-letter producer, the agent's
and the load generator's producers).

`KafkaSecurity` is the resolved form: protocol, trust and client certificate files, SASL
mechanism, user and password. The password is read from a file or an environment variable
(never from the config file or a command line), kept out of `repr`, and never logged:
`describe()` is what logs show. `client_options()` turns it into aiokafka keyword arguments.

Protocols are Kafka's: PLAINTEXT, SSL (TLS, optionally with a client certificate: mutual
TLS), SASL_PLAINTEXT and SASL_SSL; mechanisms PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512
(what aiokafka implements besides GSSAPI and OAUTHBEARER).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: Where the SASL password comes from when no file is named.
DEFAULT_PASSWORD_ENV = "FLEETD_KAFKA_SASL_PASSWORD"


class KafkaSecurityError(ValueError):
    """Security settings that cannot work (a missing file or password, a bad combination)."""


@dataclass(frozen=True)
class KafkaSecurity:
    """Resolved TLS and SASL settings of a Kafka client; the default is PLAINTEXT."""

    protocol: str = "PLAINTEXT"
    #: CA certificates (PEM) that verify the brokers; "" = the system trust store.
    ssl_ca_file: str = ""
    #: Client certificate and key (PEM) for mutual TLS; both or neither.
    ssl_cert_file: str = ""
    ssl_key_file: str = ""
    #: Verify that a broker's certificate names the host connected to.
    ssl_check_hostname: bool = True
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise KafkaSecurityError(f"protocol {self.protocol!r} is not one of {PROTOCOLS}")
        if self.uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise KafkaSecurityError(
                    f"sasl_mechanism {self.sasl_mechanism!r} is not one of {SASL_MECHANISMS}"
                )
            if not self.sasl_username or not self.sasl_password:
                raise KafkaSecurityError(
                    f"protocol {self.protocol} needs a SASL username and password"
                )
        if bool(self.ssl_cert_file) != bool(self.ssl_key_file):
            raise KafkaSecurityError("ssl_cert_file and ssl_key_file go together")
        if not self.uses_tls and (self.ssl_ca_file or self.ssl_cert_file):
            raise KafkaSecurityError(
                f"TLS files are set but protocol {self.protocol} does not use TLS (SSL or SASL_SSL)"
            )
        for path in (self.ssl_ca_file, self.ssl_cert_file, self.ssl_key_file):
            if path and not Path(path).expanduser().is_file():
                raise KafkaSecurityError(f"{path}: no such file")

    @property
    def uses_tls(self) -> bool:
        """SSL or SASL_SSL."""
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        """SASL_PLAINTEXT or SASL_SSL."""
        return self.protocol.startswith("SASL_")

    def describe(self) -> str:
        """A one-line summary for logs (no secrets)."""
        parts = [self.protocol]
        if self.uses_tls:
            parts.append(f"ca={self.ssl_ca_file or 'system'}")
            if self.ssl_cert_file:
                parts.append(f"client-cert={self.ssl_cert_file}")
        if self.uses_sasl:
            parts.append(f"{self.sasl_mechanism} user={self.sasl_username}")
        return " ".join(parts)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context (None without TLS). Raises KafkaSecurityError on unreadable or
        mismatched certificate files."""
        if not self.uses_tls:
            return None
        from aiokafka.helpers import create_ssl_context

        def path(p: str) -> str | None:
            return str(Path(p).expanduser()) if p else None

        try:
            context: ssl.SSLContext = create_ssl_context(
                cafile=path(self.ssl_ca_file),
                certfile=path(self.ssl_cert_file),
                keyfile=path(self.ssl_key_file),
            )
        except (ssl.SSLError, OSError) as exc:
            raise KafkaSecurityError(f"TLS files: {exc}") from exc
        if not self.ssl_check_hostname:
            context.check_hostname = False
        return context

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for AIOKafkaConsumer / AIOKafkaProducer / the admin client."""
        if self.protocol == "PLAINTEXT":
            return {}
        options: dict[str, Any] = {"security_protocol": self.protocol}
        context = self.ssl_context()
        if context is not None:
            options["ssl_context"] = context
        if self.uses_sasl:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        return options


def read_password(password_file: str, password_env: str) -> str:
    """The SASL password: the first line of `password_file` if named, else the variable
    `password_env` ('' when neither holds one). KafkaSecurityError if the file cannot be
    read."""
    if password_file:
        try:
            text = Path(password_file).expanduser().read_text()
        except OSError as exc:
            raise KafkaSecurityError(
                f"sasl_password_file {password_file}: {exc.strerror or exc}"
            ) from exc
        return text.splitlines()[0].strip() if text.strip() else ""
    return os.environ.get(password_env, "") if password_env else ""


def from_config(section: Any) -> KafkaSecurity:
    """KafkaSecurity from a config `security` block (fleetd.config.KafkaSecurity)."""
    uses_sasl = str(section.protocol).startswith("SASL_")
    password = read_password(section.sasl_password_file, section.sasl_password_env)
    if uses_sasl and not password:
        where = (
            f"file {section.sasl_password_file}"
            if section.sasl_password_file
            else f"environment variable {section.sasl_password_env}"
        )
        raise KafkaSecurityError(f"protocol {section.protocol}: no SASL password in {where}")
    return KafkaSecurity(
        protocol=section.protocol,
        ssl_ca_file=section.ssl_ca_file,
        ssl_cert_file=section.ssl_cert_file,
        ssl_key_file=section.ssl_key_file,
        ssl_check_hostname=section.ssl_check_hostname,
        sasl_mechanism=section.sasl_mechanism if uses_sasl else "",
        sasl_username=section.sasl_username if uses_sasl else "",
        sasl_password=password if uses_sasl else "",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line flags for the same settings (`fleetd agent`, `python -m fleetd.loadgen`)."""
    group = parser.add_argument_group("Kafka security")
    group.add_argument("--security-protocol", choices=PROTOCOLS, default="PLAINTEXT")
    group.add_argument("--ssl-ca-file", default="", help="CA certificates (PEM) for the brokers")
    group.add_argument("--ssl-cert-file", default="", help="client certificate (PEM), mutual TLS")
    group.add_argument("--ssl-key-file", default="", help="client private key (PEM)")
    group.add_argument(
        "--no-ssl-check-hostname",
        dest="ssl_check_hostname",
        action="store_false",
        help="do not check that broker certificates name the host",
    )
    group.add_argument("--sasl-mechanism", choices=SASL_MECHANISMS, default="SCRAM-SHA-512")
    group.add_argument("--sasl-username", default="")
    group.add_argument(
        "--sasl-password-file",
        default="",
        help=f"file whose first line is the SASL password (default: ${DEFAULT_PASSWORD_ENV})",
    )


def from_arguments(args: argparse.Namespace) -> KafkaSecurity:
    """KafkaSecurity from `add_arguments` flags (password from the file or the environment)."""
    return from_config(
        argparse.Namespace(
            protocol=args.security_protocol,
            ssl_ca_file=args.ssl_ca_file,
            ssl_cert_file=args.ssl_cert_file,
            ssl_key_file=args.ssl_key_file,
            ssl_check_hostname=args.ssl_check_hostname,
            sasl_mechanism=args.sasl_mechanism,
            sasl_username=args.sasl_username,
            sasl_password_file=args.sasl_password_file,
            sasl_password_env=DEFAULT_PASSWORD_ENV,
        )
    )


async def diagnose(bootstrap_servers: str, options: Mapping[str, Any]) -> str:
    """Why a client cannot connect, as precisely as one direct connection to the first
    bootstrap server can tell (aiokafka's own error only says "Unable to bootstrap"):
    refused, TLS verification, or SASL authentication. '' when that connection works."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaError

    host, _, port = bootstrap_servers.split(",")[0].strip().rpartition(":")
    try:
        conn = await asyncio.wait_for(
            create_conn(host.strip("[]"), int(port), request_timeout_ms=5000, **options),
            timeout=10,
        )
    except (KafkaError, OSError, ValueError, TimeoutError) as exc:
        cause = exc.__cause__ or exc
        return f"{type(cause).__name__}: {cause}"
    with contextlib.suppress(Exception):
        conn.close()
    return ""
