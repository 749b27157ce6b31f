"""gpufleet.kafka: KafkaConfig -> kafka-python keywords (TLS, SASL), secrets masked, topics ensured."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from gpufleet.config import ConfigError, KafkaConfig
from gpufleet.embedded.broker import EmbeddedBroker
from gpufleet.kafka import (
    DLQ_RETENTION_BYTES,
    DLQ_RETENTION_MS,
    admin_kwargs,
    client_kwargs,
    consumer_kwargs,
    create_missing,
    ensure_topics,
    producer_kwargs,
    retention_bytes,
    topic_specs,
)

SECRET = "s3cr3t-pa55word"


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    files = {}
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = tmp_path / f"{key}.pem"
        path.write_text("-----BEGIN PLACEHOLDER-----\n")
        files[key] = str(path)
    return files


def test_plaintext_defaults() -> None:
    cfg = KafkaConfig(bootstrap_servers="k1:9092, k2:9092", compression="none")
    kw = producer_kwargs(cfg, environ={})
    assert kw["bootstrap_servers"] == ["k1:9092", "k2:9092"]
    assert kw["security_protocol"] == "PLAINTEXT"
    assert kw["acks"] == "all"
    assert kw["enable_idempotence"] is True
    assert kw["max_in_flight_requests_per_connection"] == 5
    assert kw["compression_type"] is None
    assert "sasl_plain_password" not in kw
    assert "ssl_cafile" not in kw


def test_compression_is_passed_through() -> None:
    assert producer_kwargs(KafkaConfig(compression="zstd"), environ={})["compression_type"] == "zstd"
    assert producer_kwargs(KafkaConfig(), environ={})["compression_type"] == "lz4"


def test_sasl_ssl_maps_every_option_and_reads_the_password_from_the_env(tls_files: dict[str, str]) -> None:
    cfg = KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="agent",
                      sasl_password_env="MY_KAFKA_PW", **tls_files)
    kw = client_kwargs(cfg, environ={"MY_KAFKA_PW": SECRET})
    assert kw == {
        "bootstrap_servers": ["127.0.0.1:9092"],
        "security_protocol": "SASL_SSL",
        "ssl_cafile": tls_files["ssl_cafile"],
        "ssl_certfile": tls_files["ssl_certfile"],
        "ssl_keyfile": tls_files["ssl_keyfile"],
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "agent",
        "sasl_plain_password": SECRET,
    }


def test_password_from_a_file_without_its_newline(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(SECRET + "\n")
    cfg = KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
                      sasl_password_file=str(pw))
    assert consumer_kwargs(cfg, group_id="g", environ={})["sasl_plain_password"] == SECRET


def test_the_password_never_shows_in_repr_str_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    cfg = KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u")
    kw = producer_kwargs(cfg, environ={"GPUFLEET_KAFKA_PASSWORD": SECRET})
    assert kw["sasl_plain_password"] == SECRET
    assert SECRET not in repr(kw)
    assert SECRET not in str(kw)
    assert SECRET not in repr(cfg)
    assert kw.masked()["sasl_plain_password"] == "***"
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("kafka settings: %s", kw)
        admin = admin_kwargs(cfg, environ={"GPUFLEET_KAFKA_PASSWORD": SECRET})
        logging.getLogger("test").info("kafka settings: %r", admin)
    assert "sasl_plain_password" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"security_protocol": "SASL_SSL", "sasl_username": "u"}, "needs kafka.sasl_mechanism"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"},
         "set the environment variable GPUFLEET_KAFKA_PASSWORD"),
        ({"sasl_mechanism": "PLAIN"}, "use SASL_PLAINTEXT or SASL_SSL"),
        ({"ssl_cafile": "/nonexistent/ca.pem"}, "set security_protocol to SSL"),
        ({"security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"},
         "kafka.ssl_cafile /nonexistent/ca.pem does not exist"),
        ({"bootstrap_servers": " , "}, "bootstrap_servers is empty"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
          "sasl_password_file": "/nonexistent/pw"}, "sasl_password_file /nonexistent/pw cannot be read"),
    ],
)
def test_mistakes_are_named(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        client_kwargs(KafkaConfig(**fields), environ={})


def test_cert_and_key_go_together(tls_files: dict[str, str]) -> None:
    cfg = KafkaConfig(security_protocol="SSL", ssl_cafile=tls_files["ssl_cafile"],
                      ssl_certfile=tls_files["ssl_certfile"])
    with pytest.raises(ConfigError, match="go together"):
        client_kwargs(cfg, environ={})


def test_ensure_topics_creates_missing_topics_once(broker: EmbeddedBroker) -> None:
    a, b = f"t-{uuid.uuid4().hex[:10]}", f"t-{uuid.uuid4().hex[:10]}"
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, topic=a, dlq_topic=b, partitions=3,
                      retention_ms=3_600_000, retention_bytes=5 * 1024**3)
    assert ensure_topics(cfg, environ={}) == [a, b]
    assert ensure_topics(cfg, environ={}) == []
    admin = KafkaAdminClient(**admin_kwargs(cfg, environ={}))
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([a, b])}
        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in (a, b)],
                                         config_filter="all")["topic"]
    finally:
        admin.close()
    assert described == {a: 3, b: 1}
    assert {t: (c["retention.ms"]["value"], c["retention.bytes"]["value"]) for t, c in configs.items()} == {
        a: ("3600000", str(5 * 1024**3)), b: (str(DLQ_RETENTION_MS), str(DLQ_RETENTION_BYTES))}


def test_topics_are_created_with_the_cluster_default_replication() -> None:
    cfg = KafkaConfig(topic="s", dlq_topic="d", partitions=8)
    specs = topic_specs(cfg)
    assert {n: (s["num_partitions"], s["replication_factor"]) for n, s in specs.items()} == {"s": (8, -1), "d": (1, -1)}
    assert topic_specs(cfg, ["x"], partitions=2)["x"]["replication_factor"] == -1


class FakeAdmin:
    """The admin calls `create_missing` makes, against a described cluster of `brokers` brokers."""

    def __init__(self, brokers: int, replicas: int, existing: tuple[str, ...] = ()) -> None:
        self.brokers, self.replicas, self.existing, self.created = brokers, replicas, set(existing), []

    def list_topics(self) -> list[str]:
        return sorted(self.existing)

    def create_topics(self, specs: dict) -> None:
        self.created.append(specs)
        self.existing |= set(specs)

    def describe_cluster(self) -> dict:
        return {"brokers": [{"broker_id": i} for i in range(self.brokers)]}

    def describe_topics(self, names: list[str]) -> list[dict]:
        return [{"name": n, "partitions": [{"replica_nodes": list(range(self.replicas))}] * 2} for n in names]


def test_a_single_replica_topic_is_refused_on_a_cluster() -> None:
    specs = topic_specs(KafkaConfig(topic="s", dlq_topic="d"))
    admin = FakeAdmin(brokers=3, replicas=1)
    with pytest.raises(ConfigError, match=r"topic s has 1 replica\(s\) on a cluster of 3 brokers.*"
                                          r"default\.replication\.factor=3 and min\.insync\.replicas=2"):
        create_missing(admin, specs)
    assert [list(c) for c in admin.created] == [["s"], ["d"]]  # asked with the cluster default, found wanting
    # An existing single-replica topic is refused too; three replicas, or a single broker, are fine.
    with pytest.raises(ConfigError, match="topic s has 1 replica"):
        create_missing(FakeAdmin(brokers=3, replicas=1, existing=("s", "d")), specs)
    assert create_missing(FakeAdmin(brokers=3, replicas=3), specs) == ["s", "d"]
    assert create_missing(FakeAdmin(brokers=1, replicas=1), specs) == ["s", "d"]


def test_retention_bytes_holds_the_documented_hours() -> None:
    # 10,000 GPUs at 1 s: 1,250 messages/s x 1,643 B = 2.05 MB/s; 24 h over 8 partitions = 20.7 GiB -> 21 GiB.
    assert retention_bytes(10_000, 1.0, 24, 8) == 21 * 1024**3
    assert KafkaConfig().retention_bytes == retention_bytes(10_000, 1.0, 24, 8)
    assert retention_bytes(10_000, 10.0, 24, 8) == 3 * 1024**3
    assert KafkaConfig().retention_ms == 7 * 24 * 3600 * 1000


def test_an_empty_password_file_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "pw"
    empty.write_text("\n")
    cfg = KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="u",
                      sasl_password_file=str(empty))
    with pytest.raises(ConfigError, match=f"kafka.sasl_password_file {empty} is empty"):
        client_kwargs(cfg, environ={})
