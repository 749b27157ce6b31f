"""Configuration: one YAML file (`--config` or `GPUFLEET_CONFIG`), validated on load, before any data moves.

Every section is a typed struct that refuses unknown keys, so a typo fails at start-up with the
key's path and the fix. Secrets never live here in clear: passwords come from environment
variables or files named here, and `Config` never prints them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

from gpufleet.errors import ConfigError

__all__ = ["Config", "ConfigError", "Loaded", "load", "load_file", "parse", "with_clickhouse"]

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]


class Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base for config sections: unknown keys are errors."""


class KafkaConfig(Strict):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "gpufleet.samples"
    dlq_topic: str = "gpufleet.dlq"
    partitions: PositiveInt = 8
    compression: Literal["lz4", "gzip", "zstd", "none"] = "lz4"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password_env: str = "GPUFLEET_KAFKA_PASSWORD"  # noqa: S105 (a variable name, not a secret)
    """Name of the environment variable holding the SASL password (never the password itself)."""
    sasl_password_file: str | None = None
    retention_ms: PositiveInt = 7 * 24 * 3600 * 1000
    """`retention.ms` of the samples topic when gpufleet creates it (kafka-init and `ensure_topics`)."""
    retention_bytes: PositiveInt = 21 * 1024**3
    """`retention.bytes` of the samples topic, per partition: the disk bound (docs/scaling.md sizes it)."""


class ClickHouseConfig(Strict):
    dsn: str = "chdb:///var/lib/gpufleet/clickhouse"
    database: str = "gpufleet"
    cluster: str | None = None
    raw_ttl_days: Annotated[int, msgspec.Meta(gt=0, le=3650)] = 30
    """At most ten years: ClickHouse's DateTime ends in 2106; a TTL past it wraps and deletes every raw row."""


class AllocationConfig(Strict):
    source: Literal["none", "file", "dcgm_job_dir", "static", "kubernetes", "slurm"] = "none"
    path: str | None = None
    """`file`: the scheduler's allocation JSON; `dcgm_job_dir`: dcgm-exporter's HPC job-mapping dir."""
    static: dict[str, str] = {}
    """`static`: GPU index (as a string) -> "tenant/job"."""
    default_tenant: Annotated[str, msgspec.Meta(min_length=1)] = "default"
    """`dcgm_job_dir`: tenant of a job whose mapping line names no account (`account:jobid`)."""
    kubelet_socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    """`kubernetes`: the kubelet's PodResources socket."""
    kubelet_timeout_s: Positive = 0.5
    """`kubernetes`: how long one PodResources call may take before the interval's allocation is unknown."""
    namespace_tenants: dict[str, str] = {}
    """`kubernetes`: namespace -> tenant; a namespace not listed is its own tenant."""
    tenant_label: str | None = None
    """`kubernetes`: a pod label naming the tenant, read through the Kubernetes API (extra `kubernetes`)."""
    tenant_annotation: str | None = None
    """`kubernetes`: a pod annotation naming the tenant, read through the Kubernetes API."""
    job_label: str | None = None
    """`kubernetes`: a pod label naming the job (e.g. `batch.kubernetes.io/job-name`); else `namespace/pod`."""
    pod_metadata_ttl_s: Positive = 300.0
    """`kubernetes`: how long a pod's labels and annotations read from the API are reused."""
    proc_root: str = "/proc"
    """`slurm`: where the processes' `cgroup` and `environ` files are read."""
    cgroup_root: str = "/sys/fs/cgroup"
    """`slurm`: the cgroup file system (cgroup v1 device lists show GPUs held by jobs with no process)."""
    slurm_tenant: Literal["account", "user", "partition"] = "account"
    """`slurm`: which of the job's SLURM_JOB_ACCOUNT, SLURM_JOB_USER, SLURM_JOB_PARTITION is the tenant."""
    share_by: Literal["utilization", "even"] = "utilization"
    """A GPU several jobs hold: split its time by their processes' utilization where NVML reports it, or evenly."""


class AgentConfig(Strict):
    cluster: str = "default"
    node: str = msgspec.field(default_factory=socket.gethostname)
    interval_s: Positive = 1.0
    backend: Literal["nvml", "simulated"] = "nvml"
    spool_dir: str = "/var/lib/gpufleet/spool"
    spool_max_bytes: PositiveInt = 512 * 1024 * 1024
    allocation: AllocationConfig = msgspec.field(default_factory=AllocationConfig)
    otlp_receiver_host: str = "127.0.0.1"
    otlp_receiver_port: int = 4318
    otlp_receiver_enabled: bool = True
    otlp_export_endpoint: str | None = None
    """Also export the agent's metrics over OTLP/HTTP to this collector (e.g. http://otel:4318)."""
    health_host: str = "127.0.0.1"
    health_port: int = 0
    """Port of the agent's `/healthz` and `/readyz` (0: not served)."""
    collect_stale_s: Positive = 60.0
    """`/healthz` and `/readyz` fail when no collection completed for this long."""
    nvml_deadline_s: Positive | None = None
    """How long one interval waits for a GPU's NVML reads; null: 0.8 x interval_s."""
    nvml_slow_every_s: Positive = 10.0
    """Slow-changing error counters (ECC, remapped rows, PCIe, NVLink errors) are read this often."""
    nvml_call_budget_per_gpu: Annotated[int, msgspec.Meta(ge=0)] = 16
    """NVML queries per GPU per interval the agent expects; more is logged (0: no budget)."""
    nvml_release_file: str | None = "/run/gpufleet/nvml-release"
    """While this file exists the agent releases NVML (driver upgrade, GPU reset) and sends nothing."""
    kmsg_path: str | None = "/dev/kmsg"
    """The kernel log read for XIDs beside NVML events; null: NVML events only."""
    nvml_inventory_every_s: Positive = 300.0
    """Serial, VBIOS, driver, persistence and ECC mode and the temperature thresholds are read at attach and
    this often (one GPU per interval), and sent in the sample that read them."""
    gpus_expected: PositiveInt | None = None
    """GPUs this node should have; null: its first complete enumeration (kept in the spool directory)."""
    network_ports: bool = True
    """Report the node's InfiniBand/RoCE ports (state, rate, error counters) from sysfs."""
    sysfs_root: str = "/sys"
    """Where sysfs is mounted (ports are read under `<sysfs_root>/class/infiniband`)."""


class IngestConfig(Strict):
    group_id: str = "gpufleet-ingest"
    batch_rows: PositiveInt = 50_000
    batch_ms: PositiveInt = 1_000
    max_poll_interval_ms: PositiveInt = 30_000
    session_timeout_ms: PositiveInt = 10_000
    status_port: int = 0
    """Port of the small HTTP status API while the pipeline runs; 0 picks a free one."""
    poll_stale_s: Positive = 60.0
    """`/healthz` fails when the ingester has not polled Kafka for this long."""
    commit_stale_s: Positive = 300.0
    """`/healthz` fails when the ingester has held uncommitted messages for this long."""
    max_future_s: PositiveInt = 3600
    """A message dated further than this ahead of the ingester's clock is dead-lettered (the past
    bound is `clickhouse.raw_ttl_days`): pipeline/ingest/validation.py `TimeWindow`."""
    max_claim_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] = 60_000
    """The most one sample may claim (bill) of its interval: its last `max_claim_ms`. At least the
    agents' `interval_s` (docs/aggregations.md, "Claims")."""


class HealthConfig(Strict):
    failing_xids: tuple[int, ...] = (46, 48, 62, 64, 74, 79, 95, 119, 120, 136, 140, 143, 155, 156, 158)
    degrading_xids: tuple[int, ...] = (63, 94, 109, 38, 39, 42, 67, 73, 121, 137)
    application_xids: tuple[int, ...] = (13, 31, 43, 45, 68, 92)
    """Application errors (the job's fault, not the GPU's): recorded, never mark the GPU."""
    temp_slowdown_margin_c: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    """`temperature_high` from this many degrees below the GPU's own slowdown temperature (NVML's threshold)."""
    temp_shutdown_margin_c: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """`temperature_critical` from this many degrees below the GPU's own shutdown temperature."""
    temp_degraded_c: float = 87.0
    """`temperature_high` where the sample carries no slowdown temperature (NVML could not say)."""
    temp_failing_c: float = 95.0
    """`temperature_critical` where the sample carries no shutdown temperature."""
    mem_temp_degraded_c: float = 95.0
    """Memory `temperature_high` where the sample carries no memory maximum (`temp_mem_max_c`)."""
    power_limit_low_ratio: Ratio = 0.8
    """`power_limit_low` when the enforced power limit is below this share of the default limit (0: never)."""
    retired_pages_failing: PositiveInt = 63
    remapped_rows_uncorrectable_failing: PositiveInt = 512
    silent_after_s: Positive = 30.0
    """A GPU with no report for longer than this is `unknown`."""


class BillingConfig(Strict):
    exclude_states: tuple[Literal["failing", "degraded", "unknown"], ...] = ("failing",)
    """GPU-seconds in these health states are not billed (the SLA policy)."""
    idle_util_ratio: Ratio = 0.05
    """An allocated GPU below this utilization is idle."""


class StallConfig(Strict):
    """What a stalled job looks like, sample by sample (docs/alerts.md, JobStalled; docs/aggregations.md)."""

    for_s: Positive = 600.0
    """A GPU counts as stalled (the waterfall's `stalled`, `gpufleet jobs`) once its run of stall-like samples
    lasted this long; shorter runs (a slow step) stay busy."""
    util_above: Ratio = 0.9
    """Utilization at or above this: kernels are resident (a hung collective spins at ~100 %)."""
    tensor_below: Ratio = 0.05
    """Tensor-pipe activity at or below this: no math is done (a GPU without the counter: `sm_below`)."""
    sm_below: Ratio = 0.3
    """SM activity at or below this, where tensor activity is unknown (neither known: never stalled)."""
    power_below_ratio: Ratio = 0.3
    """Power at or below this share of the GPU's power limit (the enforced limit, else the model's default
    board power, `gpu_facts.POWER_LIMIT_TABLE`; neither known: never stalled)."""
    flops_below_ratio: Ratio = 0.01
    """Measured FLOPs, where the job reports them, at or below this share of peak x interval (flat)."""
    max_gap_s: Positive = 60.0
    """A run of stall-like samples ends at a gap in the GPU's samples longer than this."""


class StragglerConfig(Strict):
    """Which GPU of a job drags it (docs/alerts.md, JobStraggler); `gpufleet jobs` lists them with these."""

    for_s: Positive = 600.0
    below_ratio: Ratio = 0.9
    """A sample below this share of the job's median (SM clock, tensor activity, measured FLOP/s) is slow."""
    throttle_mask: int = 0xEC
    """Clock-event bits that count as throttling: SW power cap, HW slowdown, SW/HW thermal, HW power brake."""
    peers_throttling_below: Ratio = 0.5
    """Throttling makes a straggler only while fewer than this share of the job's other GPUs throttle."""
    min_job_util: Ratio = 0.5
    """Only a busy job has stragglers: its GPUs' median utilization over the window at least this."""
    min_job_tensor: Ratio = 0.05
    """Tensor activity is compared only when the job's median is at least this (no math, no straggler)."""


class JobsConfig(Strict):
    stall: StallConfig = msgspec.field(default_factory=StallConfig)
    straggler: StragglerConfig = msgspec.field(default_factory=StragglerConfig)


class AlertsConfig(Strict):
    rules_file: str | None = None
    """Declarative rules (YAML); the shipped defaults when unset."""
    alertmanager_url: str | None = None
    interval_s: Positive = 5.0
    """How often the rules are evaluated."""
    resend_s: Positive = 60.0
    """Firing alerts are re-sent this often; each says it is valid for 4x this (Alertmanager's endsAt)."""
    runbook_base_url: str | None = None
    """A relative `runbook_url` annotation (`docs/alerts.md#gpufailing`) is joined to this base URL, in the
    alerts sent to Alertmanager and in the generated Grafana rules; unset, links stay relative to the repository."""
    status_port: int = 0
    """Port of the evaluator's `/healthz` and `/readyz` (0: not served)."""
    eval_stale_s: Positive = 120.0
    """`/healthz` fails when no evaluation completed without error for this long."""


class Config(Strict):
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    clickhouse: ClickHouseConfig = msgspec.field(default_factory=ClickHouseConfig)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    billing: BillingConfig = msgspec.field(default_factory=BillingConfig)
    alerts: AlertsConfig = msgspec.field(default_factory=AlertsConfig)
    jobs: JobsConfig = msgspec.field(default_factory=JobsConfig)
    peak_flops: dict[str, Positive] = {}
    """Peak dense BF16 FLOP/s per GPU model name, overriding or extending the built-in table."""


class Loaded(msgspec.Struct, frozen=True):
    """A loaded config, the file it came from (None: the defaults) and the keys that file sets."""

    config: Config
    source: str | None = None
    keys: frozenset[str] = frozenset()
    """Dotted paths of the keys the file sets, e.g. `clickhouse.dsn` (a default is not "set")."""


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate the config from `path` (or `$GPUFLEET_CONFIG`); defaults when neither is set."""
    return load_file(path).config


def load_file(path: str | os.PathLike[str] | None = None) -> Loaded:
    """`load`, saying also which file was read and which keys it sets."""
    path = path or os.environ.get("GPUFLEET_CONFIG")
    if not path:
        return Loaded(Config())
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist: pass --config PATH or unset GPUFLEET_CONFIG") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    return Loaded(parse(raw, source=str(p)), str(p), frozenset(_keys(raw)))


def _keys(raw: object, prefix: str = "") -> list[str]:
    if not isinstance(raw, dict):
        return []
    out = []
    for key, value in raw.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, dict):
            out += _keys(value, f"{prefix}{key}.")
    return out


def parse(raw: object, source: str = "config") -> Config:
    """Validate a decoded mapping into a `Config`; the error names the key path and the fix."""
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        text = str(exc)
        hint = ""
        if "unknown field" in text:
            hint = " (remove it or fix its spelling; see docs/configuration.md for the keys)"
        raise ConfigError(f"{source}: {text.replace('`$.', '`')}{hint}") from None


def with_clickhouse(cfg: Config, dsn: str, database: str) -> Config:
    """A copy of `cfg` pointing at another ClickHouse target (command-line overrides)."""
    return msgspec.structs.replace(cfg, clickhouse=msgspec.structs.replace(cfg.clickhouse, dsn=dsn, database=database))
