"""Kafka client settings built from `KafkaConfig`: the one place that maps our config to kafka-python.

Producers, consumers and the admin client all get their connection and security keywords
(TLS, SASL) from `client_kwargs`, so the agent and the pipeline cannot drift apart. The SASL
password is read from the environment variable or file the config names, at build time, and
lives only inside a `KafkaSettings` mapping whose `repr`/`str` mask it: logging the settings
never prints it. `ensure_topics` creates missing topics and is a no-op for existing ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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
            return path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"kafka.sasl_password_file {path} cannot be read ({exc.strerror}); "
                "fix the path or its permissions, or unset it and use kafka.sasl_password_env"
            ) from None
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


def ensure_topics(
    cfg: KafkaConfig,
    topics: Iterable[str] | None = None,
    *,
    partitions: int | None = None,
    replication_factor: int = 1,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet (default: the samples and dead-letter topics).

    Returns the names it created. An existing topic is left alone, whatever its partitions.
    """
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    names = list(topics) if topics is not None else [cfg.topic, cfg.dlq_topic]
    admin = KafkaAdminClient(**admin_kwargs(cfg, environ=environ))
    created: list[str] = []
    try:
        existing = set(admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, partitions or cfg.partitions, replication_factor)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass  # created by someone else in between: that is what we wanted
    finally:
        with contextlib.suppress(Exception):
            admin.close()
    if created:
        log.info("created Kafka topics %s on %s", created, cfg.bootstrap_servers)
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
