"""Kafka client settings built from `KafkaConfig`: the one place that maps our config to kafka-python.

Producers, consumers and the admin client all get their connection and security keywords
(TLS, SASL) from `client_kwargs`, so the agent and the pipeline cannot drift apart. The SASL
password is read from the environment variable or file the config names, at build time, and
lives only inside a `KafkaSettings` mapping whose `repr`/`str` mask it: logging the settings
never prints it. `ensure_topics` creates missing topics with the cluster's default replication and
the configured retention, and refuses a single-replica topic on a cluster of several brokers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from gpufleet.config import ConfigError, KafkaConfig

log = logging.getLogger(__name__)

SECRET_KEYS = frozenset({"sasl_plain_password", "ssl_password"})
"""kafka-python keywords whose values are secrets and are masked in every repr."""

_MASK = "***"


class KafkaSettings(dict[str, Any]):
    """Keyword arguments for a kafka-python client; prints with every secret masked."""

    def masked(self) -> dict[str, Any]:
        """A copy that is safe to log: secret values replaced by `***`."""
        return {k: (_MASK if k in SECRET_KEYS and v is not None else v) for k, v in self.items()}

    def __repr__(self) -> str:
        return f"KafkaSettings({self.masked()!r})"

    __str__ = __repr__


def read_password(cfg: KafkaConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The SASL password: from `sasl_password_file` when set, else from the `sasl_password_env` variable."""
    env = os.environ if environ is None else environ
    if cfg.sasl_password_file:
        path = Path(cfg.sasl_password_file)
        try:
            password = path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"kafka.sasl_password_file {path} cannot be read ({exc.strerror}); "
                "fix the path or its permissions, or unset it and use kafka.sasl_password_env"
            ) from None
        if not password:
            raise ConfigError(f"kafka.sasl_password_file {path} is empty; write the SASL password into it")
        return password
    return env.get(cfg.sasl_password_env) or None


def client_kwargs(cfg: KafkaConfig, environ: Mapping[str, str] | None = None) -> KafkaSettings:
    """Connection and security keywords shared by producer, consumer and admin clients."""
    kw = KafkaSettings(bootstrap_servers=_split_servers(cfg.bootstrap_servers),
                       security_protocol=cfg.security_protocol)
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(cfg, key)
            if value is not None:
                if not Path(value).is_file():
                    raise ConfigError(f"kafka.{key} {value} does not exist; fix the path or unset it")
                kw[key] = value
        if (cfg.ssl_certfile is None) != (cfg.ssl_keyfile is None):
            raise ConfigError("kafka.ssl_certfile and kafka.ssl_keyfile go together: set both or neither")
    elif any(getattr(cfg, k) for k in ("ssl_cafile", "ssl_certfile", "ssl_keyfile")):
        raise ConfigError(
            f"kafka.ssl_* files are set but kafka.security_protocol is {cfg.security_protocol}; "
            "set security_protocol to SSL or SASL_SSL, or remove the ssl_* keys"
        )
    if cfg.security_protocol.startswith("SASL_"):
        if cfg.sasl_mechanism is None or not cfg.sasl_username:
            raise ConfigError(
                f"kafka.security_protocol {cfg.security_protocol} needs kafka.sasl_mechanism "
                "(PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512) and kafka.sasl_username"
            )
        password = read_password(cfg, environ)
        if password is None:
            raise ConfigError(
                f"no SASL password: set the environment variable {cfg.sasl_password_env} "
                "or kafka.sasl_password_file"
            )
        kw.update(sasl_mechanism=cfg.sasl_mechanism, sasl_plain_username=cfg.sasl_username,
                  sasl_plain_password=password)
    elif cfg.sasl_mechanism is not None:
        raise ConfigError(
            f"kafka.sasl_mechanism is set but kafka.security_protocol is {cfg.security_protocol}; "
            "use SASL_PLAINTEXT or SASL_SSL, or remove sasl_mechanism"
        )
    return kw


def producer_kwargs(
    cfg: KafkaConfig,
    *,
    client_id: str = "gpufleet-agent",
    bootstrap_timeout_ms: int = 5_000,
    max_block_ms: int = 5_000,
    delivery_timeout_ms: int = 60_000,
    environ: Mapping[str, str] | None = None,
) -> KafkaSettings:
    """Keywords for a `KafkaProducer`: acks from all replicas, idempotent, bounded in-flight and blocking.

    Idempotence keeps per-partition order through the client's own retries; `max_block_ms`
    bounds how long `send()` may wait for metadata, `delivery_timeout_ms` how long a record
    may wait for its acknowledgement before its future fails.
    """
    kw = client_kwargs(cfg, environ)
    kw.update(
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        max_in_flight_requests_per_connection=5,
        compression_type=None if cfg.compression == "none" else cfg.compression,
        linger_ms=5,
        bootstrap_timeout_ms=bootstrap_timeout_ms,
        max_block_ms=max_block_ms,
        request_timeout_ms=min(30_000, delivery_timeout_ms // 2),  # kafka-python: delivery > linger + request
        delivery_timeout_ms=delivery_timeout_ms,
        reconnect_backoff_max_ms=5_000,
    )
    return kw


def consumer_kwargs(
    cfg: KafkaConfig,
    *,
    group_id: str | None,
    client_id: str = "gpufleet-ingest",
    environ: Mapping[str, str] | None = None,
    **extra: Any,
) -> KafkaSettings:
    """Keywords for a `KafkaConsumer` (manual commits; `extra` adds or overrides any keyword)."""
    kw = client_kwargs(cfg, environ)
    kw.update(client_id=client_id, group_id=group_id, enable_auto_commit=False,
              auto_offset_reset="earliest")
    kw.update(extra)
    return kw


def admin_kwargs(
    cfg: KafkaConfig, *, client_id: str = "gpufleet-admin", environ: Mapping[str, str] | None = None
) -> KafkaSettings:
    """Keywords for a `KafkaAdminClient`."""
    kw = client_kwargs(cfg, environ)
    kw.update(client_id=client_id)
    return kw


MESSAGE_BYTES_LZ4: Final = 1643
"""One 8-GPU node report as the agent sends it, lz4-compressed alone (BENCHMARKS.md, docs/scaling.md)."""
DLQ_RETENTION_MS: Final = 30 * 24 * 3600 * 1000
DLQ_RETENTION_BYTES: Final = 1024**3
"""The dead-letter topic (one partition) keeps 30 days of bad messages, at most 1 GiB."""
CLUSTER_DEFAULT: Final = -1
"""CreateTopics' "use the broker's `default.replication.factor`" (Kafka 2.4+)."""


def retention_bytes(gpus: int, interval_s: float, hours: float, partitions: int,
                    message_bytes: int = MESSAGE_BYTES_LZ4, gpus_per_node: int = 8) -> int:
    """`retention.bytes` per partition that holds `hours` of a fleet's reports, rounded up to whole GiB.

    A fleet of `gpus` sends gpus / gpus_per_node messages per interval, spread evenly over the
    partitions by node key. docs/scaling.md explains the figure the shipped default comes from.
    """
    per_s = gpus / gpus_per_node / interval_s * message_bytes
    per_partition = per_s * hours * 3600 / partitions
    return math.ceil(per_partition / 1024**3) * 1024**3


def topic_specs(cfg: KafkaConfig, topics: Iterable[str] | None = None,
                partitions: int | None = None) -> dict[str, dict[str, Any]]:
    """CreateTopics options for each topic: the cluster's default replication, retention by time and bytes.

    Default topics are the samples topic (`kafka.partitions`) and the dead-letter topic (one partition).
    """
    names = list(dict.fromkeys(topics)) if topics is not None else [cfg.topic, cfg.dlq_topic]
    out = {}
    for name in names:
        dlq = name == cfg.dlq_topic
        configs = ({"retention.ms": str(DLQ_RETENTION_MS), "retention.bytes": str(DLQ_RETENTION_BYTES)} if dlq
                   else {"retention.ms": str(cfg.retention_ms), "retention.bytes": str(cfg.retention_bytes)})
        out[name] = {"num_partitions": 1 if dlq else (partitions or cfg.partitions),
                     "replication_factor": CLUSTER_DEFAULT, "configs": configs}
    return out


def replication_problem(topic: Mapping[str, Any], brokers: int) -> str | None:
    """Why a described topic is unsafe on this cluster (one replica while there are several brokers), or None."""
    parts = topic.get("partitions") or []
    if brokers < 2 or not parts:
        return None
    replicas = min(len(p.get("replica_nodes") or ()) for p in parts)
    if replicas > 1:
        return None
    return (f"topic {topic['name']} has {replicas} replica(s) on a cluster of {brokers} brokers: a lost disk would "
            "lose reports not yet ingested. Set default.replication.factor=3 and min.insync.replicas=2 on the "
            "brokers (docs/deploy.md), then raise the topic's replication (kafka-reassign-partitions.sh) or "
            "delete it and let gpufleet create it again")


def ensure_topics(
    cfg: KafkaConfig,
    topics: Iterable[str] | None = None,
    *,
    partitions: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet (default: the samples and dead-letter topics).

    Topics get the cluster's default replication factor, never a hard-coded one, and their
    retention (`topic_specs`). Returns the names created. An existing topic keeps its settings,
    but on a cluster of several brokers a topic with a single replica is refused (`ConfigError`).
    """
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**admin_kwargs(cfg, environ=environ))
    try:
        created = create_missing(admin, topic_specs(cfg, topics, partitions))
    finally:
        with contextlib.suppress(Exception):
            admin.close()
    if created:
        log.info("created Kafka topics %s on %s", created, cfg.bootstrap_servers)
    return created


def create_missing(admin: Any, specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """With an open admin client: create the topics of `specs` that are missing, then check every one's replicas."""
    from kafka.errors import TopicAlreadyExistsError

    existing = set(admin.list_topics())
    created: list[str] = []
    for name, spec in specs.items():
        if name in existing:
            continue
        try:
            admin.create_topics({name: dict(spec)})
            created.append(name)
        except TopicAlreadyExistsError:
            pass  # created by someone else in between: that is what we wanted
    brokers = len(admin.describe_cluster()["brokers"])
    for topic in admin.describe_topics(list(specs)):
        if problem := replication_problem(topic, brokers):
            raise ConfigError(problem)
    return created


def close_producer(producer: Any, timeout_s: float) -> bool:
    """Close a kafka-python producer within `timeout_s`; True when nothing was left unsent.

    kafka-python's `close()` raises `KafkaTimeoutError` from its final flush when records are
    still pending (broker down) and then leaves its I/O thread running; this forces it shut.
    """
    from kafka.errors import KafkaTimeoutError

    try:
        producer.close(timeout=max(0.0, timeout_s))
    except KafkaTimeoutError:
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
        with contextlib.suppress(Exception):
            producer._unregister_cleanup()
        producer._closed = True
        return False
    return True


def _split_servers(servers: str) -> list[str]:
    out = [s.strip() for s in servers.split(",") if s.strip()]
    if not out:
        raise ConfigError("kafka.bootstrap_servers is empty; set it to host:port[,host:port...]")
    return out
