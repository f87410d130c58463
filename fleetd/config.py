"""fleetd's configuration: pydantic models, YAML loading, environment overrides, reload.

Precedence, highest first: environment (`FLEETD_<SECTION>__<FIELD>`, e.g.
`FLEETD_SERVER__GRPC_LISTEN=0.0.0.0:50051`), then the YAML file, then the defaults below.
The defaults are the embedded configuration `fleetd serve` runs on without arguments;
`config/fleetd.yaml` spells every one of them out with its documentation (a unit test keeps
the two equal). Unknown keys are rejected; every error names the file and the field.

Hot reload (file change or SIGHUP) applies the sections marked *reloadable*: `scheduling`,
`teams`, `reservations`, `staleness`, `limits`. Changes to the other sections are logged and
need a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "config" / "fleetd.yaml"

#: Sections a hot reload may change without a restart.
RELOADABLE_SECTIONS = (
    "scheduling", "teams", "reservations", "staleness", "limits", "autoscaling",
)  # fmt: skip

#: GPU model names: product names such as "A100-SXM4-80GB", "H100", or openb codes "V100M32", "G1".
GPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: Cluster, pool, team and similar names: DNS-label-like, case-insensitive.
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")

GIB = 1024**3


class ConfigError(ValueError):
    """An invalid configuration; the message names the file (or env) and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Name = Annotated[str, Field(pattern=NAME_RE.pattern)]
HostPort = Annotated[str, Field(pattern=r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")]


class ServerTlsConfig(_Strict):
    """TLS of the gRPC server (restart to change the paths; the files themselves are read
    again when they change, so rotated certificates need no restart)."""

    cert_file: str = Field(
        "", description="Server certificate chain (PEM); '' = plaintext gRPC (no TLS)."
    )
    key_file: str = Field("", description="The certificate's private key (PEM).")
    client_ca_file: str = Field(
        "",
        description=(
            "CA certificates (PEM): clients must present a certificate they issued (mutual"
            " TLS); '' = no client certificate asked for."
        ),
    )

    metrics: bool = Field(
        False,
        description=(
            "Serve /metrics over TLS too, with the same files (a client certificate of"
            " client_ca_file required when that is set)."
        ),
    )

    @model_validator(mode="after")
    def _files_together(self) -> ServerTlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        if self.metrics and not self.cert_file:
            raise ValueError("metrics (TLS for /metrics) needs cert_file and key_file")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("client_ca_file needs cert_file and key_file (mutual TLS is TLS)")
        return self

    @property
    def enabled(self) -> bool:
        """Whether the gRPC server speaks TLS."""
        return bool(self.cert_file)


class ServerConfig(_Strict):
    """Listen addresses and RPC limits (restart to change)."""

    grpc_listen: HostPort = Field(
        "127.0.0.1:50051", description="gRPC listen address host:port; 0.0.0.0:50051 when deployed."
    )
    metrics_listen: HostPort = Field(
        "127.0.0.1:9464", description="Prometheus /metrics listen address host:port."
    )
    max_receive_message_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Larger requests are refused with RESOURCE_EXHAUSTED before parsing.",
    )
    shutdown_grace_s: float = Field(
        10.0, gt=0, le=300, description="SIGTERM: how long in-flight RPCs may finish."
    )
    max_stream_backlog: int = Field(
        10_000,
        ge=16,
        description="Decisions buffered per Watch stream; a slower client is disconnected.",
    )
    tls: ServerTlsConfig = Field(
        default_factory=ServerTlsConfig, description="TLS (and mutual TLS) of the gRPC server."
    )


class LoggingConfig(_Strict):
    """Log output (restart to change)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Minimum level."
    )
    json_format: bool = Field(True, description="One JSON object per line (false: plain text).")


class JournalConfig(_Strict):
    """The durable reservation journal (restart to change)."""

    path: str = Field(
        "~/.local/state/fleetd/journal.sqlite3",
        description="SQLite file (WAL mode); '~' expands. Survives kill -9 and restart.",
    )
    synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL",
        description="SQLite synchronous mode: NORMAL survives process crashes, FULL also power loss.",
    )


class ReservationsConfig(_Strict):
    """Reservation lifetimes (reloadable)."""

    default_ttl_s: float = Field(
        300.0, gt=0, description="TTL of a reservation when Place does not ask for one."
    )
    max_ttl_s: float = Field(3600.0, gt=0, description="Upper bound on a requested TTL.")
    expiry_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often expired reservations are swept."
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> ReservationsConfig:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError("default_ttl_s must not exceed max_ttl_s")
        return self


class StalenessConfig(_Strict):
    """When a silent node stops receiving placements (reloadable)."""

    node_stale_after_s: float = Field(
        120.0,
        gt=0,
        description=(
            "A node with no telemetry for this long is unschedulable (also, read at start,"
            " the Kafka replay's bound: older reports come in stale)."
        ),
    )
    check_interval_s: float = Field(5.0, gt=0, le=300, description="How often staleness is swept.")


class SchedulingConfig(_Strict):
    """The placement policy (reloadable): score plugins of the scheduling core, weighted."""

    policy: str = Field(
        "fgd-plus",
        description=(
            "Score plugins as 'name:weight,...' (see scheduling.scorer_names()): fgd-plus, fgd, fgd-cpu, "
            "best-fit, gpu-packing, gpu-clustering, dot-product, most-allocated, ..."
        ),
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Alternative to policy: weights by plugin name (when set, policy is ignored).",
    )
    target_window_pods: int = Field(
        10_000,
        ge=1,
        description="fgd*: the target workload is the shapes of the last N requested pods.",
    )
    target_refresh_pods: int = Field(
        200, ge=1, description="fgd*: re-derive the target workload every N requested pods."
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        _check_policy(value)
        return value

    @field_validator("weights")
    @classmethod
    def _known_weights(cls, value: dict[str, float]) -> dict[str, float]:
        if value:
            _check_policy(",".join(f"{k}:{v!r}" for k, v in value.items()))
        return value


def _check_policy(spec: str) -> None:
    """Let the core validate plugin names and weights (one source of truth)."""
    from fleetd.engine import check_policy

    try:
        check_policy(spec)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(str(exc).strip("'\"")) from exc


def _not_bool(value: object) -> object:
    # YAML's `true` would otherwise pass as 1 GPU.
    if isinstance(value, bool):
        raise ValueError("expected a number of GPUs, not a boolean")
    return value


def _whole_milli(value: float) -> float:
    # Usage is kept in milli-GPU (a 0.5-GPU pod holds 500): a finer quota could not be met exactly.
    if abs(value * 1000 - round(value * 1000)) > 1e-6:
        raise ValueError(f"{value!r} is not a multiple of 0.001 GPU")
    return value


#: A number of GPUs in a quota: >= 0, finite, in steps of 0.001 (one milli-GPU).
Gpus = Annotated[
    float,
    BeforeValidator(_not_bool),
    Field(ge=0, allow_inf_nan=False),
    AfterValidator(_whole_milli),
]
GpuModel = Annotated[str, Field(pattern=GPU_MODEL_RE.pattern)]


def gpu_milli(gpus: float) -> int:
    """A quota's GPUs in milli-GPU (the unit the state counts usage in)."""
    return round(gpus * 1000)


class TeamQuota(_Strict):
    """What one team's held reservations may total (reloadable). A workload that would take
    the team over is QUEUED until the team's usage drops; one that needs more than the quota
    itself is UNSCHEDULABLE. Lowering a quota evicts nothing."""

    gpus: Gpus | None = Field(
        None,
        description=(
            "GPUs of every model together (fractional shares count as such: a 0.5-GPU pod"
            " uses 0.5); unset = no cap on the total."
        ),
    )
    gpus_by_model: dict[GpuModel, Gpus] = Field(
        default_factory=dict,
        description=(
            "GPUs per GPU model (the nodes' model name, e.g. H100-80GB); models not listed"
            " are capped by `gpus` only."
        ),
    )

    @model_validator(mode="after")
    def _caps_something(self) -> TeamQuota:
        # An empty entry caps nothing: most likely a typo'd or half-written quota.
        if self.gpus is None and not self.gpus_by_model:
            raise ValueError("a quota needs gpus, gpus_by_model or both")
        return self


class TeamsConfig(_Strict):
    """Team priorities, quotas and clients (reloadable): a workload's effective priority is
    the team's plus its own."""

    default_priority: int = Field(0, description="Priority of teams not listed.")
    priorities: dict[Name, int] = Field(
        default_factory=dict, description="Priority by team name; larger wins."
    )
    quotas: dict[Name, TeamQuota] = Field(
        default_factory=dict,
        description=(
            "GPU quota by team name: the cap on what the team's held reservations (pending or"
            " confirmed) total. Teams not listed are not capped."
        ),
    )
    clients: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            "Who may act for which team: client identity (the common name of its mutual-TLS"
            " certificate) -> the teams whose workloads it may place, explain and release"
            " ('*' = any). Empty = no check. Needs server.tls.client_ca_file."
        ),
    )

    @field_validator("clients")
    @classmethod
    def _team_names(cls, clients: dict[str, list[str]]) -> dict[str, list[str]]:
        for client, teams in clients.items():
            if not client:
                raise ValueError("a client identity is empty")
            for team in teams:
                if team != "*" and not NAME_RE.match(team):
                    raise ValueError(f"client {client!r}: {team!r} is not a team name or '*'")
        return clients

    def metric_label(self, team: str) -> str:
        """`team` as a metric label: itself when this config names it (priorities, quotas,
        clients), else "other" (team names come from clients: labels must stay bounded)."""
        named = team in self.priorities or team in self.quotas
        if named or any(team in teams for teams in self.clients.values()):
            return team
        return "other"

    def may_act_for(self, client: str, team: str) -> bool:
        """Whether `client` may place, explain or release workloads of `team`."""
        if not self.clients:
            return True
        teams = self.clients.get(client, ())
        return "*" in teams or team in teams


class LimitsConfig(_Strict):
    """Request validation bounds (reloadable): larger requests are INVALID_ARGUMENT."""

    max_cpu_millicores: int = Field(1_024_000, gt=0, description="Per pod.")
    max_memory_bytes: int = Field(16 * 1024 * GIB, gt=0, description="Per pod.")
    max_gpus_per_pod: int = Field(
        16, gt=0, le=63, description="Whole GPUs per pod (the core: <= 63)."
    )
    max_gang_pods: int = Field(1024, gt=0, description="Pods per gang.")
    max_queued_workloads: int = Field(
        100_000, ge=0, description="Queue bound: a Place that would queue beyond it is refused."
    )
    decision_history: int = Field(
        100_000, ge=100, description="Decisions kept for WatchDecisions resume."
    )


class AutoscalingConfig(_Strict):
    """Scale-up planning for queued workloads (reloadable); decisions go to WatchScaleDecisions."""

    enabled: bool = Field(True, description="Plan scale-ups while workloads are queued.")
    interval_s: float = Field(
        10.0, gt=0, le=3600, description="How often to plan scale-down and consolidation."
    )
    scale_up_after_s: float = Field(
        1.0,
        gt=0,
        le=3600,
        description="How soon pending work is planned for (at most interval_s): Karpenter's "
        "batch window; a plan on unchanged inputs is skipped.",
    )
    scale_down: bool = Field(
        False, description="Also plan scale-down and consolidation (advice on the same stream)."
    )
    scale_down_after_s: float = Field(
        600.0, ge=0, description="Stabilization window: a node unchanged this long is a candidate."
    )
    scale_down_utilization: float = Field(
        0.5, ge=0, le=1, description="Non-empty nodes below this utilization are candidates."
    )
    scale_down_empty_after_s: float = Field(
        600.0, ge=0, description="Stabilization window of empty nodes."
    )
    replace_every_s: float = Field(
        7200.0,
        ge=0,
        le=7 * 86400,
        description="Replacement (several nodes by fewer or cheaper ones) is searched at most "
        "this often; deletions every round.",
    )
    replace_max_nodes: int = Field(
        8, ge=1, le=1000, description="Nodes the replacement search considers at once."
    )
    replace_min_saving_per_hour: float = Field(
        2.0, ge=0, description="A replacement or multi-node deletion must save this much ($/h)."
    )
    scale_up_replace_nodes: int = Field(
        2,
        ge=0,
        le=1000,
        description="Consolidation on scale-up (with scale_down): a scale-up may take along the "
        "pods of up to this many stable nodes and retire them once its new nodes are up "
        "(0 = off).",
    )
    scale_up_replace_min_saving_per_hour: float = Field(
        1.0, ge=0, description="What consolidation on scale-up must save ($/h)."
    )
    scale_up_replace_saving_per_pod_per_hour: float = Field(
        0.25,
        ge=0,
        description="...and more by this for each pod it moves ($/h): an eviction's price.",
    )
    scale_up_replace_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Nodes a scale-up would retire stay when its new nodes are not up this long "
        "after it.",
    )
    dry_run: bool = Field(
        False,
        description="Compute and stream decisions marked dry_run, but never count them as in "
        "flight (targets unchanged) and let no pool manager act on them.",
    )


class SimPool(_Strict):
    """A simulated node pool."""

    name: Name = Field(description="Pool name.")
    gpu_model: str = Field("", description="GPU model of every node; empty = CPU-only.")
    gpus_per_node: int = Field(8, ge=0, le=64, description="GPUs per node.")
    gpu_memory_bytes: int = Field(80 * GIB, ge=0, description="Memory of each GPU.")
    cpu_millicores: int = Field(96_000, gt=0, description="Allocatable CPU per node.")
    memory_bytes: int = Field(768 * GIB, gt=0, description="Allocatable memory per node.")
    nodes: int = Field(4, ge=0, le=100_000, description="Nodes at start.")
    zone: str = Field("", description="Zone label of the pool's nodes.")
    price_per_hour: float = Field(0.0, ge=0, description="Price of one node per hour.")
    capacity_type: Literal["on-demand", "spot", "reserved"] = Field(
        "on-demand", description="Capacity type."
    )
    min_size: int = Field(0, ge=0, description="Autoscaling lower bound.")
    max_size: int = Field(0, ge=0, description="Autoscaling upper bound (0 = nodes).")

    @field_validator("gpu_model")
    @classmethod
    def _model_syntax(cls, value: str) -> str:
        if value and not GPU_MODEL_RE.match(value):
            raise ValueError(f"invalid GPU model name {value!r}")
        return value


class SimCluster(_Strict):
    """A simulated cluster."""

    name: Name = Field(description="Cluster name.")
    pools: list[SimPool] = Field(description="Its node pools.")


def _default_sim_clusters() -> list[SimCluster]:
    return [
        SimCluster(
            name="sim-east",
            pools=[
                SimPool(name="a100", gpu_model="A100-80GB", nodes=8, zone="east-1a",
                        price_per_hour=32.8, max_size=16),
                SimPool(name="t4", gpu_model="T4", gpus_per_node=4, gpu_memory_bytes=16 * GIB,
                        cpu_millicores=48_000, memory_bytes=192 * GIB, nodes=8,
                        zone="east-1b", price_per_hour=3.9, capacity_type="spot", max_size=32),
            ],
        ),
        SimCluster(
            name="sim-west",
            pools=[
                SimPool(name="h100", gpu_model="H100-80GB", nodes=4, zone="west-2a",
                        cpu_millicores=192_000, memory_bytes=2048 * GIB,
                        price_per_hour=98.3, max_size=8),
                SimPool(name="cpu", gpu_model="", gpus_per_node=0, gpu_memory_bytes=0,
                        cpu_millicores=64_000, memory_bytes=256 * GIB, nodes=4,
                        zone="west-2a", price_per_hour=2.7, max_size=16),
            ],
        ),
    ]  # fmt: skip


class SimulatedSourceConfig(_Strict):
    """The in-process simulated fleet: plays the clusters when no real source is configured."""

    enabled: bool = Field(True, description="Run the simulated fleet.")
    heartbeat_s: float = Field(
        10.0, gt=0, description="How often every simulated node reports (keeps it fresh)."
    )
    apply_scale_decisions: bool = Field(
        False,
        description="Play the pool manager: add the nodes scale-ups ask for, delete the nodes "
        "scale-downs and replacements name.",
    )
    provisioning_delay_s: float = Field(
        5.0, ge=0, description="How long a simulated scale decision takes to be carried out."
    )
    confirm_after_s: float = Field(
        0.5,
        ge=0,
        description="Simulated pods start this long after a placement (confirms reservations).",
    )
    clusters: list[SimCluster] = Field(
        default_factory=_default_sim_clusters, description="Clusters, pools and nodes."
    )


class KafkaSecurity(_Strict):
    """TLS and SASL of fleetd's Kafka clients (fleetd/sources/security.py; restart to change).

    Secrets never live in this file: the SASL password is read from `sasl_password_file`,
    or else from the environment variable named by `sasl_password_env`, and never logged.
    """

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol: TLS (SSL), SASL, both, or neither."
    )
    ssl_ca_file: str = Field(
        "", description="CA certificates (PEM) that verify the brokers; '' = system trust store."
    )
    ssl_cert_file: str = Field("", description="Client certificate (PEM) for mutual TLS.")
    ssl_key_file: str = Field("", description="Client private key (PEM) for mutual TLS.")
    ssl_check_hostname: bool = Field(
        True, description="Check that a broker's certificate names the host connected to."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (SASL_PLAINTEXT, SASL_SSL)."
    )
    sasl_username: str = Field("", description="SASL user name.")
    sasl_password_file: str = Field(
        "", description="File whose first line is the SASL password (takes precedence)."
    )
    sasl_password_env: str = Field(
        "FLEETD_KAFKA_SASL_PASSWORD",
        description="Environment variable holding the SASL password when no file is named.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecurity:
        sasl = self.protocol.startswith("SASL_")
        if sasl and not self.sasl_username:
            raise ValueError(f"protocol {self.protocol} needs sasl_username")
        if bool(self.ssl_cert_file) != bool(self.ssl_key_file):
            raise ValueError("ssl_cert_file and ssl_key_file go together")
        if self.protocol in ("PLAINTEXT", "SASL_PLAINTEXT") and (
            self.ssl_ca_file or self.ssl_cert_file
        ):
            raise ValueError(f"TLS files are set but protocol {self.protocol} does not use TLS")
        return self


class KafkaSourceConfig(_Strict):
    """Telemetry from Kafka (fleetd/sources/kafka.py)."""

    enabled: bool = Field(False, description="Consume telemetry from Kafka.")
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port.")
    topic: str = Field("fleet.telemetry.v1", description="Telemetry topic.")
    dead_letter_topic: str = Field("fleet.telemetry.v1.dlq", description="Dead-letter topic.")
    group_id: str = Field(
        "fleetd",
        description=(
            "Consumer group, one per fleetd: offsets are committed to it after apply; a"
            " group shared with another consumer splits the partitions (reported, not ready)."
        ),
    )
    clusters: list[Name] = Field(
        default_factory=list, description="Clusters whose initial sync readiness waits for."
    )
    sync_lost_after_s: float = Field(
        30.0,
        gt=0,
        description=(
            "The broker unreachable this long: every Kafka cluster loses its sync (readiness "
            "drops, Place answers UNAVAILABLE) until the consumer is back and caught up."
        ),
    )
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description=(
            "Decode in this many worker processes, each a consumer of the group, the daemon "
            "applying what they decode (0 = in the daemon's process; restart to change). "
            "One process decodes at most a core's worth of records: more workers for a "
            "topic whose partitions carry more than that."
        ),
    )
    sequence_tombstone_ttl_s: float = Field(
        600.0,
        gt=0,
        description=(
            "How long a removed node's (pool's, pending pod's) last sequence is kept to drop "
            "its redelivered older records; after that one floor per cluster and kind does, "
            "so memory stays bounded as nodes come and go (restart to change)."
        ),
    )
    security: KafkaSecurity = Field(
        default_factory=KafkaSecurity, description="TLS and SASL of the Kafka clients."
    )


class KubernetesSourceConfig(_Strict):
    """Node and pod watches of every kubeconfig context (fleetd/sources/kubernetes.py)."""

    enabled: bool = Field(False, description="Watch clusters through the Kubernetes API.")
    kubeconfig: str = Field("~/.kube/config", description="Kubeconfig; every context a cluster.")
    contexts: list[str] = Field(
        default_factory=list, description="Contexts to watch (empty = every context)."
    )
    sync_lost_after_s: float = Field(
        30.0,
        gt=0,
        description=(
            "A cluster whose watches cannot reconnect or relist this long loses its sync "
            "(readiness drops, Place answers UNAVAILABLE) until they are current again."
        ),
    )


class SourcesConfig(_Strict):
    """Where fleet state comes from (restart to change)."""

    simulated: SimulatedSourceConfig = Field(default_factory=SimulatedSourceConfig)
    kafka: KafkaSourceConfig = Field(default_factory=KafkaSourceConfig)
    kubernetes: KubernetesSourceConfig = Field(default_factory=KubernetesSourceConfig)


class Config(BaseSettings):
    """The whole configuration. See config/fleetd.yaml for every option with its documentation."""

    model_config = SettingsConfigDict(
        env_prefix="FLEETD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    reservations: ReservationsConfig = Field(default_factory=ReservationsConfig)
    staleness: StalenessConfig = Field(default_factory=StalenessConfig)
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig)
    teams: TeamsConfig = Field(default_factory=TeamsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    reload_poll_s: float = Field(
        2.0, gt=0, description="How often the config file is checked for changes (restart)."
    )

    @model_validator(mode="after")
    def _clients_need_mutual_tls(self) -> Config:
        if _clients_without_mutual_tls(self):
            raise ValueError(_CLIENTS_NEED_MTLS)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed as init kwargs), which overrides defaults.
        return (env_settings, init_settings)

    def version(self) -> str:
        """A short content hash of the effective configuration (GetStatus.config_version)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def team_priority(self, team: str) -> int:
        """The configured priority of `team` (default_priority when not listed)."""
        return self.teams.priorities.get(team, self.teams.default_priority)


def _format_errors(origin: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(part) for part in e["loc"]) or "<root>"
        msg = "unknown key (not a config option)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{origin}: {loc}: {msg}")
    return "; ".join(lines)


def load(path: Path | str | None = None) -> Config:
    """Load the configuration from `path` (None: embedded defaults) plus FLEETD_* env vars.

    Raises ConfigError naming the file (and the environment, when FLEETD_* variables are
    set) and the field on any problem.
    """
    data: Any = {}
    origin = "embedded defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{origin}: cannot read: {exc.strerror or exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: <root>: expected a mapping of sections")
    env_names = sorted(k for k in os.environ if k.upper().startswith("FLEETD_"))
    if env_names:
        origin += " + environment (" + ", ".join(env_names) + ")"
    try:
        return Config(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(origin, exc)) from exc


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Sections that differ between `old` and `new` but need a restart to take effect."""
    reloadable = set(RELOADABLE_SECTIONS)
    return [
        name
        for name in Config.model_fields
        if name not in reloadable and getattr(old, name) != getattr(new, name)
    ]


_CLIENTS_NEED_MTLS = (
    "teams.clients: client identities come from mutual TLS: set server.tls.client_ca_file"
)


def _clients_without_mutual_tls(cfg: Config) -> bool:
    return bool(cfg.teams.clients) and not cfg.server.tls.client_ca_file


def merge_reloadable(old: Config, new: Config) -> Config:
    """`old` with the reloadable sections of `new`: what a hot reload applies. ConfigError
    when the result breaks a rule across sections (a reloadable section that needs a
    restart-only setting the running config lacks)."""
    merged = old.model_copy(update={name: getattr(new, name) for name in RELOADABLE_SECTIONS})
    if _clients_without_mutual_tls(merged):
        raise ConfigError(
            f"{_CLIENTS_NEED_MTLS} (the running server has none: server settings need a"
            " restart, so restart with both)"
        )
    return merged
