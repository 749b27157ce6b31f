"""Start-up checks of a loaded config: every problem named by its key, with the fix, before any data moves.

`gpufleet.config.load` already refuses unknown keys, wrong types and out-of-range numbers (negative
intervals, ratios above 1). What a type cannot say is checked here: DSNs and URLs that cannot work,
ports out of range, TLS files that are missing, a SASL password that is not there, thresholds that
contradict each other, an allocation section that reads nothing. `problems` is pure and cheap (it
reads only the files the config names); `unreachable` opens one TCP connection per endpoint and is
run only when asked (`network=True`): the ingester cannot do anything without Kafka and ClickHouse,
whereas an agent must start and spool to disk while the broker is down, so it never probes.

`validate_startup` raises one `ConfigError` listing every problem, so an operator fixes them in one go.
No message ever contains a password: DSNs and URLs are shown through `gpufleet.dsn.redact`.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from gpufleet import kafka
from gpufleet.config import Config, ConfigError
from gpufleet.dsn import check_database_name, parse, redact
from gpufleet.errors import StoreError

Role = Literal["agent", "ingest", "query", "alerts"]
"""What the process does: it decides which sections matter."""

_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DSN_FORMS = "chdb:///path, chdb://memory or http(s)://user@host:8123"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the config: the key (dotted path) and what to do about it."""

    key: str
    message: str

    def __str__(self) -> str:
        return self.message if self.message.startswith(self.key) else f"{self.key}: {self.message}"


def validate_startup(
    cfg: Config,
    *,
    role: Role,
    environ: Mapping[str, str] | None = None,
    network: bool = False,
    timeout_s: float = 2.0,
    extra: Sequence[Problem] = (),
) -> None:
    """Raise `ConfigError` naming every problem of `cfg` for `role`, plus the caller's own `extra` checks
    (and, with `network`, every unreachable host)."""
    found = [*problems(cfg, role=role, environ=environ), *extra]
    if network and not found:
        found = unreachable(cfg, role=role, timeout_s=timeout_s)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise ConfigError(f"{len(found)} problem(s) in the configuration:\n{lines}")


def problems(cfg: Config, *, role: Role, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """Every problem of `cfg` that matters to `role` (pure: no network)."""
    out: list[Problem] = []
    if role in ("agent", "ingest"):
        out += kafka_problems(cfg, environ)
    if role in ("ingest", "query", "alerts"):
        out += clickhouse_problems(cfg)
    if role == "ingest":
        out += port_problems("ingest.status_port", cfg.ingest.status_port)
        out += health_problems(cfg)
        out += claim_problems(cfg)
    if role == "alerts":
        out += alerts_problems(cfg)
    return out


def kafka_problems(cfg: Config, environ: Mapping[str, str] | None = None) -> list[Problem]:
    out = [Problem("kafka.bootstrap_servers", m) for m in _server_problems(cfg.kafka.bootstrap_servers)]
    for key in ("topic", "dlq_topic"):
        name = getattr(cfg.kafka, key)
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", name):
            out.append(Problem(f"kafka.{key}", f"{name!r} is not a Kafka topic name: use letters, digits, "
                                               "'.', '_', '-'"))
    try:  # TLS files present, SASL mechanism, user and password: the one mapping agents and ingester share
        kafka.client_kwargs(cfg.kafka, environ)
    except ConfigError as exc:
        out.append(Problem(_key_of(str(exc), "kafka.security_protocol"), str(exc)))
    k = cfg.kafka
    if k.security_protocol.startswith("SASL_") and not any(p.key.startswith("kafka.sasl_password") for p in out):
        try:  # client_kwargs stops at its first problem; a missing password is worth naming as well
            missing = kafka.read_password(k, environ) is None
        except ConfigError as exc:
            out.append(Problem("kafka.sasl_password_file", str(exc)))
        else:
            if missing:
                out.append(Problem("kafka.sasl_password_env", f"no SASL password: set the environment variable "
                                                              f"{k.sasl_password_env} or kafka.sasl_password_file"))
    return out


def clickhouse_problems(cfg: Config) -> list[Problem]:
    ch = cfg.clickhouse
    out = [Problem("clickhouse.dsn", m) for m in dsn_problems(ch.dsn)]
    try:
        check_database_name(ch.database)
    except StoreError as exc:
        out.append(Problem("clickhouse.database", str(exc)))
    if ch.cluster is not None and not _CLUSTER_NAME.match(ch.cluster):
        out.append(Problem("clickhouse.cluster", f"{ch.cluster!r} is not a ClickHouse cluster name from "
                                                 "remote_servers: use letters, digits, '_', '.', '-'"))
    return out


def dsn_problems(dsn: str) -> list[str]:
    """Why a ClickHouse DSN cannot work (empty when it can); the DSN is shown redacted."""
    shown = redact(dsn)
    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    if scheme == "chdb":
        path = dsn[len("chdb://"):]
        return [] if path else [f"{shown!r} names no path: use chdb:///var/lib/gpufleet/clickhouse or chdb://memory"]
    if scheme not in ("http", "https"):
        what = f"has scheme {scheme!r}" if scheme else "has no scheme"
        return [f"{shown!r} {what}, which gpufleet cannot use: write it as {DSN_FORMS}"]
    parsed = parse(dsn)
    parts = parsed.host_part() if parsed else urlsplit(dsn)
    if not parts.hostname:
        return [f"{shown!r} names no host: write it as {scheme}://user@clickhouse.example:8123"]
    try:
        parts.port  # noqa: B018 (urlsplit checks the port when it is read)
    except ValueError:
        return [f"{shown!r} has a port that is not a number from 1 to 65535"]
    return []


def claim_problems(cfg: Config) -> list[Problem]:
    """A sample never bills more than `ingest.max_claim_ms`: below the agents' interval, each sample loses time."""
    interval_ms = cfg.agent.interval_s * 1000
    if cfg.ingest.max_claim_ms < interval_ms:
        return [Problem("ingest.max_claim_ms", f"is {cfg.ingest.max_claim_ms} ms, shorter than agent.interval_s "
                                               f"({cfg.agent.interval_s:g} s): each sample would bill only "
                                               f"{cfg.ingest.max_claim_ms} ms of its interval; set it to at least "
                                               f"{interval_ms:.0f}")]
    return []


def health_problems(cfg: Config) -> list[Problem]:
    h = cfg.health
    out = []
    if h.temp_degraded_c >= h.temp_failing_c:
        out.append(Problem("health.temp_degraded_c", f"is {h.temp_degraded_c:g} °C, not below health.temp_failing_c "
                                                     f"({h.temp_failing_c:g} °C): a GPU must degrade before it fails"))
    lists = {"failing_xids": h.failing_xids, "degrading_xids": h.degrading_xids,
             "application_xids": h.application_xids}
    names = list(lists)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = sorted(set(lists[a]) & set(lists[b]))
            if both:
                out.append(Problem(f"health.{b}", f"XID(s) {both} are also in health.{a}: list each XID once"))
    return out


def alerts_problems(cfg: Config) -> list[Problem]:
    a = cfg.alerts
    out = []
    if a.rules_file is not None and not Path(a.rules_file).is_file():
        out.append(Problem("alerts.rules_file", f"{a.rules_file} does not exist: fix the path, or remove the key "
                                                "to use the shipped rules"))
    if a.alertmanager_url is not None:
        parts = urlsplit(a.alertmanager_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            out.append(Problem("alerts.alertmanager_url", f"{redact(a.alertmanager_url)!r} is not an Alertmanager URL: "
                                                          "use http://alertmanager:9093"))
    return out


def unreachable(cfg: Config, *, role: Role, timeout_s: float = 2.0) -> list[Problem]:
    """The endpoints `role` needs that do not accept a TCP connection (one attempt each)."""
    out = []
    if role in ("agent", "ingest"):
        servers = _servers(cfg.kafka.bootstrap_servers)
        errors = [f"{h}:{p} ({e})" for h, p in servers if (e := tcp_error(h, p, timeout_s))]
        if len(errors) == len(servers):
            out.append(Problem("kafka.bootstrap_servers", f"no broker answers: {', '.join(errors)}; check the "
                                                          "addresses and that Kafka runs and is reachable from here"))
    parsed = parse(cfg.clickhouse.dsn)
    if role in ("ingest", "query", "alerts") and parsed is not None and parsed.scheme in ("http", "https"):
        parts = parsed.host_part()
        port = parts.port or (8443 if parts.scheme == "https" else 8123)
        error = tcp_error(parts.hostname or "", port, timeout_s)
        if error:
            out.append(Problem("clickhouse.dsn", f"ClickHouse at {parts.hostname}:{port} does not answer ({error}); "
                                                 "check the host and port and that the server runs"))
    return out


def tcp_error(host: str, port: int, timeout_s: float) -> str | None:
    """Why `host:port` does not accept a TCP connection (one attempt), or None when it does."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _servers(text: str) -> list[tuple[str, int]]:
    out = []
    for item in (s.strip() for s in text.split(",")):
        host, _, port = item.rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]"), int(port)))
    return out


def _server_problems(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        return ["is empty: set it to host:port[,host:port...]"]
    out = []
    for item in items:
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            out.append(f"{item!r} is not host:port (e.g. kafka-1.example:9092)")
    return out


def port_problems(key: str, port: int) -> list[Problem]:
    if 0 <= port <= 65535:
        return []
    return [Problem(key, f"{port} is not a TCP port: use 1-65535, or 0 to pick a free one")]


def _key_of(message: str, default: str) -> str:
    """The first `kafka.<key>` a message names (the Kafka settings' own errors name their key)."""
    if message.startswith("no SASL password"):
        return "kafka.sasl_password_env"
    m = re.search(r"\bkafka\.[a-z_]+", message)
    return m.group(0) if m else default

