"""Kafka over TLS: the real path (agent producer -> broker -> ingester -> chDB) with only TLS on the wire.

A throwaway CA signs a certificate for 127.0.0.1; the broker is reachable only through a TLS front
(tests/security: tansu 0.6 cannot serve TLS itself) and advertises it, so every connection the
agent's producer, the ingester's consumer, its dead-letter producer and the topic admin make is
TLS, verified against the CA named in `kafka.ssl_cafile`. Clients that do not trust the server's
CA, or that speak plain text, get nothing through.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from gpufleet import kafka, wire
from gpufleet.config import KafkaConfig
from gpufleet.config_check import validate_startup
from tests.builders import T0_MS, clock_at, gpu, report
from tests.security import TlsFiles, ingest_config, make_tls_files, produce, running_ingester, tls_broker, wait_for

pytestmark = pytest.mark.integration  # starts a server or a process


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_agents_and_ingester_move_data_over_tls_only(tls_files: TlsFiles, ch_target, ch_client, topic) -> None:
    with tls_broker(tls_files) as bootstrap:
        cfg = ingest_config(bootstrap, ch_target, topic,
                            kafka_extra={"security_protocol": "SSL", "ssl_cafile": str(tls_files.ca)})
        validate_startup(cfg, role="ingest", network=True)
        reports = [report(node=f"n{n}", seq=s, time_ms=T0_MS + 1000 * s,
                          gpus=[gpu(0, f"n{n}", tenant="acme", job="j1", power_w=250.5)]) for n in range(3)
                   for s in range(4)]
        bad = b'{"schema_version": 1, "not": "a report"}'
        with running_ingester(cfg, clock=clock_at()) as ing:
            produce(cfg, [(r.node.encode(), wire.encode(r)) for r in reports] + [(b"n0", bad)])
            wait_for(ing, lambda: ing.stats.rows == 12 and ing.stats.dead_letters == 1, "12 rows and 1 dead letter")
        dead = _read(cfg.kafka, cfg.kafka.dlq_topic, 1)
    db = ch_target.database
    rows = ch_client.query(f"SELECT node, seq, tenant, job, power_w FROM {db}.gpu_samples ORDER BY node, seq")
    assert rows.result_rows == [(f"n{n}", s, "acme", "j1", 250.5) for n in range(3) for s in range(4)]
    assert dead == [bad]


def _read(cfg: KafkaConfig, topic: str, n: int, timeout_s: float = 30) -> list[bytes]:
    """The first `n` values of `topic`, read over the config's security settings."""
    consumer = KafkaConsumer(topic, **kafka.consumer_kwargs(cfg, group_id=None))
    got: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < n and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got += [r.value for r in records]
    finally:
        consumer.close()
    return got


def _refused(cfg: KafkaConfig) -> Exception:
    try:
        producer = KafkaProducer(**kafka.producer_kwargs(cfg, bootstrap_timeout_ms=2000, max_block_ms=2000))
    except Exception as exc:
        return exc
    producer.close(timeout=1)
    raise AssertionError(f"{cfg.security_protocol} client with ca {cfg.ssl_cafile} reached the TLS broker")


def test_clients_that_do_not_trust_the_server_or_speak_plaintext_get_nothing(tls_files: TlsFiles,
                                                                             tmp_path: Path) -> None:
    with tls_broker(tls_files) as bootstrap:
        wrong_ca = KafkaConfig(bootstrap_servers=bootstrap, security_protocol="SSL", ssl_cafile=str(tls_files.other_ca))
        plain = KafkaConfig(bootstrap_servers=bootstrap)
        _refused(wrong_ca)
        _refused(plain)
        trusted = KafkaConfig(bootstrap_servers=bootstrap, security_protocol="SSL", ssl_cafile=str(tls_files.ca))
        producer = KafkaProducer(**kafka.producer_kwargs(trusted))
        producer.close(timeout=5)
