"""Kafka TLS/SASL settings: config validation, where the password comes from, and that it
never shows in logs or reprs. (Against the real broker: tests/integration/
test_sources_kafka_security.py.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleetd import config
from fleetd.sources import security
from fleetd.sources.security import KafkaSecurity, KafkaSecurityError


def _section(**fields: object) -> config.KafkaSecurity:
    return config.KafkaSecurity(**fields)  # type: ignore[arg-type]


def test_plaintext_by_default_adds_no_client_options() -> None:
    resolved = security.from_config(config.KafkaSourceConfig().security)
    assert resolved.protocol == "PLAINTEXT"
    assert resolved.client_options() == {}


def test_password_from_file_first_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEETD_KAFKA_SASL_PASSWORD", "from-env")
    env = security.from_config(_section(protocol="SASL_PLAINTEXT", sasl_username="u"))
    assert env.sasl_password == "from-env"
    (tmp_path / "pw").write_text("from-file\nignored\n")
    filed = security.from_config(
        _section(
            protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password_file=str(tmp_path / "pw")
        )
    )
    assert filed.sasl_password == "from-file"
    options = filed.client_options()
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("u", "from-file")


def test_the_password_is_never_in_repr_or_description() -> None:
    s = KafkaSecurity(
        protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="s3cret"
    )
    assert "s3cret" not in repr(s)
    assert "s3cret" not in s.describe()
    assert s.describe() == "SASL_PLAINTEXT PLAIN user=u"


def test_a_missing_password_names_where_it_was_looked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FLEETD_KAFKA_SASL_PASSWORD", raising=False)
    with pytest.raises(KafkaSecurityError, match="FLEETD_KAFKA_SASL_PASSWORD"):
        security.from_config(_section(protocol="SASL_SSL", sasl_username="u"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"protocol": "SASL_SSL"}, "needs sasl_username"),
        ({"protocol": "SSL", "ssl_cert_file": "c.pem"}, "go together"),
        ({"protocol": "PLAINTEXT", "ssl_ca_file": "ca.pem"}, "does not use TLS"),
        ({"protocol": "TLS"}, "protocol"),
        (
            {"protocol": "SASL_SSL", "sasl_username": "u", "sasl_mechanism": "GSSAPI"},
            "sasl_mechanism",
        ),
        ({"sasl_password": "x"}, "sasl_password"),  # passwords are not config options
    ],
)
def test_config_rejects_settings_that_cannot_work(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config.Config(**{"sources": {"kafka": {"security": fields}}})  # type: ignore[arg-type]


def test_tls_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(KafkaSecurityError, match="no such file"):
        KafkaSecurity(protocol="SSL", ssl_ca_file=str(tmp_path / "missing.pem"))


def test_command_line_flags(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    security.add_arguments(parser)
    (tmp_path / "pw").write_text("pw")
    args = parser.parse_args(
        ["--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "SCRAM-SHA-256",
         "--sasl-username", "agent", "--sasl-password-file", str(tmp_path / "pw")]
    )  # fmt: skip
    resolved = security.from_arguments(args)
    assert (resolved.sasl_mechanism, resolved.sasl_username, resolved.sasl_password) == (
        "SCRAM-SHA-256",
        "agent",
        "pw",
    )
