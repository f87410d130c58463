"""Config: shipped YAML = embedded defaults, unknown keys rejected, errors name file and field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fleetd import config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleetd.yaml"
    path.write_text(text)
    return path


def test_shipped_yaml_equals_embedded_defaults() -> None:
    assert config.load(config.SHIPPED_CONFIG) == config.load(None) == config.Config()


def test_every_option_is_documented() -> None:
    def walk(model: type[config.BaseModel], prefix: str) -> list[str]:
        missing = []
        for name, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, config.BaseModel):
                missing += walk(ann, f"{prefix}{name}.")
            elif not info.description:
                missing.append(prefix + name)
        return missing

    nested = [config.SimCluster, config.SimPool]
    undocumented = walk(config.Config, "") + [m for n in nested for m in walk(n, n.__name__ + ".")]
    assert undocumented == []


def _commented_keys(text: str) -> dict[str, bool]:
    """Option path (list items as `[]`) -> whether some line defining it has a comment."""
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    out: dict[str, bool] = {}
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        body = raw.strip()
        if body.startswith("- "):  # a list item: its key is the list's entry, not a sibling
            body = body[2:]
            while stack and stack[-1][0] > indent:
                stack.pop()
            if not stack[-1][1].endswith("[]"):
                stack[-1] = (stack[-1][0], stack[-1][1] + "[]")
            indent += 2
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*):(.*)$", body)
        if not m:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(1)))
        path = ".".join(k for _, k in stack)
        out[path] = out.get(path, False) or "#" in m.group(2)
    return out


def _option_paths(model: type[config.BaseModel], prefix: str) -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        paths.append(prefix + name)
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, config.BaseModel):
            paths += _option_paths(ann, f"{prefix}{name}.")
    return paths


def test_every_option_is_commented_in_the_shipped_yaml() -> None:
    keys = _commented_keys(config.SHIPPED_CONFIG.read_text())
    options = (
        _option_paths(config.Config, "")
        + _option_paths(config.SimCluster, "sources.simulated.clusters[].")
        + _option_paths(config.SimPool, "sources.simulated.clusters[].pools[].")
    )
    assert [p for p in options if p not in keys] == []  # spelled out
    assert [p for p in options if not keys.get(p, True)] == []  # with a comment


def test_good_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "reservations:\n  default_ttl_s: 30\nteams:\n  priorities: {ml: 5}\n")
    cfg = config.load(path)
    assert cfg.reservations.default_ttl_s == 30
    assert cfg.team_priority("ml") == 5
    assert cfg.team_priority("other") == 0
    assert cfg.server == config.ServerConfig()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param("server:\n  grpc_port: 1\n", "server.grpc_port", id="unknown-nested-key"),
        pytest.param("bogus: 1\n", "bogus", id="unknown-section"),
        pytest.param(
            "reservations:\n  default_ttl_s: -1\n", "reservations.default_ttl_s", id="negative"
        ),
        pytest.param("server:\n  grpc_listen: nope\n", "server.grpc_listen", id="bad-address"),
        pytest.param(
            "scheduling:\n  weights: {best-fit: .nan}\n", "scheduling.weights", id="nan-weight"
        ),
        pytest.param(
            "sources:\n  simulated:\n    clusters:\n    - name: a\n      pools:\n      - name: p\n        gpu_model: 'bad model!'\n",
            "sources.simulated.clusters.0.pools.0.gpu_model",
            id="gpu-model-syntax",
        ),
        pytest.param(
            "server:\n  tls:\n    cert_file: a.crt\n", "server.tls", id="tls-cert-without-key"
        ),
        pytest.param(
            "server:\n  tls:\n    client_ca_file: ca.crt\n", "server.tls", id="mtls-without-tls"
        ),
        pytest.param(
            "teams:\n  clients: {trainer: [research]}\n", "teams.clients", id="clients-without-mtls"
        ),
        pytest.param("server:\n  tls:\n    metrics: true\n", "server.tls", id="metrics-tls-alone"),
        pytest.param(
            "teams:\n  clients: {trainer: ['bad team!']}\n", "teams.clients", id="client-team-name"
        ),
    ],
)
def test_bad_file_error_names_file_and_field(tmp_path: Path, text: str, field: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert field in str(err.value)


def test_unknown_key_says_so(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="unknown key"):
        config.load(write(tmp_path, "limits:\n  max_gpu: 3\n"))


@pytest.mark.parametrize("text", ["[1, 2]\n", "server: [\n"], ids=["not-a-mapping", "not-yaml"])
def test_malformed_yaml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError, match=str(path)):
        config.load(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.yaml")


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "server:\n  grpc_listen: 127.0.0.1:1000\n  shutdown_grace_s: 3\n")
    monkeypatch.setenv("FLEETD_SERVER__GRPC_LISTEN", "0.0.0.0:50051")
    cfg = config.load(path)
    assert cfg.server.grpc_listen == "0.0.0.0:50051"
    assert cfg.server.shutdown_grace_s == 3  # the rest of the section still comes from the file


def test_bad_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETD_RESERVATIONS__DEFAULT_TTL_S", "soon")
    with pytest.raises(config.ConfigError) as err:
        config.load(None)
    assert "FLEETD_RESERVATIONS__DEFAULT_TTL_S" in str(err.value)
    assert "reservations.default_ttl_s" in str(err.value)


def test_reload_merges_only_reloadable_sections(tmp_path: Path) -> None:
    old = config.Config()
    new = config.load(
        write(tmp_path, "server:\n  grpc_listen: 127.0.0.1:1\nscheduling:\n  policy: bestfit\n")
    )
    assert config.restart_only_changes(old, new) == ["server"]
    merged = config.merge_reloadable(old, new)
    assert merged.scheduling.policy == "bestfit"
    assert merged.server == old.server
    assert merged.version() != old.version()


def test_reload_refuses_client_teams_before_the_restart_that_enables_mutual_tls(
    tmp_path: Path,
) -> None:
    # The file gains both; only teams is reloadable, so the running server has no client
    # CA and every call would come from client '': refused rather than locking clients out.
    (tmp_path / "ca.crt").write_text("(a CA)")
    new = config.load(
        write(
            tmp_path,
            "server:\n  tls: {cert_file: a.crt, key_file: a.key, client_ca_file: ca.crt}\n"
            "teams:\n  clients: {trainer: [research]}\n",
        )
    )
    with pytest.raises(config.ConfigError, match=r"teams\.clients.*restart"):
        config.merge_reloadable(config.Config(), new)
