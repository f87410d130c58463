"""`fleetd check-config FILE`: exit 0 and the config version for a valid file, exit 2 and
the file and field for an invalid one (what `serve` would refuse)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetd import cli, config


def test_a_valid_file_passes_with_its_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fleetd.yaml"
    path.write_text("scheduling:\n  policy: best-fit\n")
    assert cli.main(["check-config", str(path)]) == 0
    version = config.load(path).version()
    assert capsys.readouterr().out == f"{path}: valid (config_version {version})\n"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("server:\n  grpc_port: 1\n", "server.grpc_port", id="unknown-key"),
        pytest.param(
            "scheduling:\n  policy: no-such-plugin\n", "scheduling.policy", id="bad-policy"
        ),
        pytest.param(
            "server:\n  tls:\n    cert_file: /nonexistent/tls.crt\n    key_file: /nonexistent/tls.key\n",
            "/nonexistent/tls.key",
            id="missing-tls-file",
        ),
    ],
)
def test_an_invalid_file_fails_naming_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    path = tmp_path / "fleetd.yaml"
    path.write_text(text)
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleetd: invalid config: ")
    assert says in err


def test_a_key_that_is_not_the_certificates_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization

    from tests.testbed.tls import self_signed_serving_cert

    _, cert = self_signed_serving_cert("server")
    other_key, _ = self_signed_serving_cert("other")
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(
        other_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path = tmp_path / "fleetd.yaml"
    path.write_text(
        f"server:\n  tls:\n    cert_file: {tmp_path / 'tls.crt'}\n    key_file: {tmp_path / 'tls.key'}\n"
    )
    assert cli.main(["check-config", str(path)]) == 2
    assert "are not a certificate and its key" in capsys.readouterr().err


def test_retire_cluster_refuses_a_name_that_is_no_cluster_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # (Checked before any connection: fleetd would dead-letter such an inventory.)
    assert cli.main(["retire-cluster", "--cluster", "not a name!"]) == 2
    assert "is not a cluster name" in capsys.readouterr().err
