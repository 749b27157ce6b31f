"""gpufleet.kafka: KafkaConfig -> kafka-python keywords (TLS, SASL), secrets masked, topics ensured."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from gpufleet.config import ConfigError, KafkaConfig
from gpufleet.embedded.broker import EmbeddedBroker
from gpufleet.kafka import (
    admin_kwargs,
    client_kwargs,
    consumer_kwargs,
    ensure_topics,
    producer_kwargs,
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
    cfg = KafkaConfig(bootstrap_servers=broker.bootstrap, topic=a, dlq_topic=b, partitions=3)
    assert ensure_topics(cfg, environ={}) == [a, b]
    assert ensure_topics(cfg, environ={}) == []
    admin = KafkaAdminClient(**admin_kwargs(cfg, environ={}))
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([a, b])}
    finally:
        admin.close()
    assert described == {a: 3, b: 3}
