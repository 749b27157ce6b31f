"""SASL/SCRAM from the config to a real broker's SCRAM exchange, over plain TCP and over TLS.

tansu with `--authentication` runs SCRAM-SHA-256/512 (rsasl), so the client's side is real here:
`gpufleet.kafka.producer_kwargs` reads the password from the environment variable the config
names, kafka-python sends the SCRAM client-first and client-final messages (the proof, computed
from the password), and tansu answers. What tansu 0.6 cannot do is hold a SCRAM user to log in
with: `tansu user create` itself needs an authenticated session, and its PLAIN mechanism closes
the connection, so the broker answers `e=unknown-user` and no data moves over SASL here (the
TLS tests move data; docs/security.md says so). The password never shows in any log record,
at DEBUG and from every library, nor in the error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer

from gpufleet import kafka
from gpufleet.config import KafkaConfig
from tests.security import TlsFiles, kafka_debug_logging, make_tls_files, tansu, tls_broker

pytestmark = pytest.mark.integration  # starts a server or a process

SECRET = "Sc4am-s3cret-\u00e9-do-not-log"
ENV = "GPUFLEET_TEST_KAFKA_PASSWORD"


@pytest.fixture(autouse=True)
def _kafka_loggers() -> Iterator[None]:
    with kafka_debug_logging():
        yield


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _attempt(cfg: KafkaConfig, caplog: pytest.LogCaptureFixture) -> tuple[str, str]:
    """Connect a producer with SASL; returns (every log record's text, the error's text)."""
    caplog.set_level(logging.DEBUG)
    error = ""
    try:
        producer = KafkaProducer(**kafka.producer_kwargs(cfg, bootstrap_timeout_ms=3000, max_block_ms=3000))
        producer.close(timeout=1)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    return text, error


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_exchange_uses_the_configured_password_and_never_logs_it(
        mechanism: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ENV, SECRET)
    with tansu(authentication=True) as port:
        cfg = KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}", security_protocol="SASL_PLAINTEXT",
                          sasl_mechanism=mechanism, sasl_username="gpufleet-agent", sasl_password_env=ENV)
        logs, error = _attempt(cfg, caplog)
    assert f"SaslHandshakeRequest(version=1, mechanism='{mechanism}')" in logs
    assert "n=gpufleet-agent" in logs  # SCRAM client-first
    assert ",p=" in logs  # SCRAM client-final: the proof computed from the password
    assert "e=unknown-user" in logs  # the broker verified it (tansu holds no users: see the module docstring)
    assert error
    assert SECRET not in logs
    assert SECRET not in error


def test_sasl_over_tls_reaches_the_scram_exchange(tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    password_file = tmp_path / "kafka.pw"
    password_file.write_text(SECRET + "\n")
    monkeypatch.delenv(ENV, raising=False)
    with tls_broker(tls_files, authentication=True) as bootstrap:
        cfg = KafkaConfig(bootstrap_servers=bootstrap, security_protocol="SASL_SSL", ssl_cafile=str(tls_files.ca),
                          sasl_mechanism="SCRAM-SHA-512", sasl_username="gpufleet-ingest",
                          sasl_password_file=str(password_file))
        logs, error = _attempt(cfg, caplog)
    assert "SaslHandshakeRequest(version=1, mechanism='SCRAM-SHA-512')" in logs
    assert "e=unknown-user" in logs
    assert SECRET not in logs
    assert SECRET not in error
