"""Wrong configuration stops `gpufleet ingest` and `gpufleet agent` at start-up with exit code 2 and a
message that names the key and says how to fix it, before any data moves.

Most cases run the real entry point (`gpufleet.cli.main`) in this process; one of each command runs
as a child process exactly as an operator would (`python -m gpufleet ... --config bad.yaml`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from gpufleet.config import ConfigError, parse
from gpufleet.config_check import problems, validate_startup
from gpufleet.embedded.broker import free_port
from tests.security import kafka_debug_logging

REPO = Path(__file__).resolve().parents[2]


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    from gpufleet.cli import main

    monkeypatch.setattr(sys, "argv", ["gpufleet", *argv])
    with pytest.raises(SystemExit) as exc:
        main()
    return int(exc.value.code or 0), capsys.readouterr().err


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(autouse=True)
def _kafka_loggers() -> Iterator[None]:
    with kafka_debug_logging():
        yield


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GPUFLEET_CONFIG", "GPUFLEET_KAFKA_PASSWORD", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)


def _ok_kafka() -> dict:
    return {"bootstrap_servers": "127.0.0.1:9092"}


INGEST_CASES = {
    "unknown key": ({"kafka": {"bootstrap_servrs": "k:9092"}},
                    ["unknown field `bootstrap_servrs`", "at `kafka`", "remove it or fix its spelling"]),
    "wrong type": ({"ingest": {"batch_ms": "fast"}}, ["Expected `int`", "`ingest.batch_ms`"]),
    "negative interval": ({"agent": {"interval_s": -1}}, ["Expected `float` > 0", "`agent.interval_s`"]),
    "ratio over 1": ({"billing": {"idle_util_ratio": 1.5}}, ["Expected `float` <= 1", "`billing.idle_util_ratio`"]),
    "mysql dsn": ({"clickhouse": {"dsn": "mysql://root:hunter2@db:3306/x"}},
                  ["clickhouse.dsn", "'mysql://root:***@db:3306/x' has scheme 'mysql'",
                   "chdb:///path, chdb://memory or http(s)://user@host:8123"]),
    "dsn without host": ({"clickhouse": {"dsn": "http://gpufleet@:8123"}},
                         ["clickhouse.dsn", "names no host", "http://user@clickhouse.example:8123"]),
    "dsn with a bad port": ({"clickhouse": {"dsn": "http://ch:99999"}},
                            ["clickhouse.dsn", "port that is not a number from 1 to 65535"]),
    "bad database name": ({"clickhouse": {"database": "prod; DROP"}}, ["clickhouse.database", "letters, digits"]),
    "bad cluster name": ({"clickhouse": {"cluster": "x' y"}}, ["clickhouse.cluster", "remote_servers"]),
    "bootstrap without port": ({"kafka": {"bootstrap_servers": "broker"}},
                               ["kafka.bootstrap_servers", "'broker' is not host:port"]),
    "missing SASL password": ({"kafka": {**_ok_kafka(), "security_protocol": "SASL_PLAINTEXT",
                                         "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "ingest"}},
                              ["kafka.sasl_password_env", "set the environment variable GPUFLEET_KAFKA_PASSWORD"]),
    "missing TLS file": ({"kafka": {**_ok_kafka(), "security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"}},
                         ["kafka.ssl_cafile /nonexistent/ca.pem does not exist", "fix the path"]),
    "thresholds that contradict": ({"health": {"temp_degraded_c": 99.0}},
                                   ["health.temp_degraded_c", "not below health.temp_failing_c (95 °C)"]),
    "an XID in two lists": ({"health": {"degrading_xids": [79, 63]}},
                            ["health.degrading_xids", "XID(s) [79] are also in health.failing_xids"]),
    "a claim shorter than the interval": ({"agent": {"interval_s": 10}, "ingest": {"max_claim_ms": 5000}},
                                          ["ingest.max_claim_ms", "is 5000 ms, shorter than agent.interval_s (10 s)",
                                           "set it to at least 10000"]),
    "a claim longer than the wire allows": ({"ingest": {"max_claim_ms": 7_200_000}},
                                            ["Expected `int` <= 3600000", "`ingest.max_claim_ms`"]),
}


@pytest.mark.parametrize("case", list(INGEST_CASES))
def test_ingest_refuses_a_wrong_config_naming_the_key(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    doc, expected = INGEST_CASES[case]
    doc.setdefault("clickhouse", {}).setdefault("dsn", f"chdb://{tmp_path / 'store'}")
    code, err = run_main(monkeypatch, capsys, "ingest", "--config", str(write(tmp_path, doc)))
    assert code == 2, err
    assert err.startswith("gpufleet: configuration error:")
    for text in expected:
        assert text in err
    assert "hunter2" not in err
    assert not (tmp_path / "store").exists(), "the store was opened before the config was checked"


def test_ingest_names_every_unreachable_endpoint_before_opening_anything(tmp_path: Path, monkeypatch,
                                                                        capsys) -> None:
    kafka_port, ch_port = free_port(), free_port()
    doc = {"kafka": {"bootstrap_servers": f"127.0.0.1:{kafka_port}"},
           "clickhouse": {"dsn": f"http://gpufleet:s3cret@127.0.0.1:{ch_port}"}}
    code, err = run_main(monkeypatch, capsys, "ingest", "--config", str(write(tmp_path, doc)))
    assert code == 2
    assert "2 problem(s)" in err
    assert f"kafka.bootstrap_servers: no broker answers: 127.0.0.1:{kafka_port} (Connection refused)" in err
    assert f"clickhouse.dsn: ClickHouse at 127.0.0.1:{ch_port} does not answer (Connection refused)" in err
    assert "s3cret" not in err


def test_every_problem_is_listed_at_once(tmp_path: Path, monkeypatch, capsys) -> None:
    doc = {"kafka": {"bootstrap_servers": "broker", "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                     "sasl_username": "u", "ssl_cafile": "/nonexistent/ca.pem"},
           "clickhouse": {"dsn": "postgres://db/x"}}
    code, err = run_main(monkeypatch, capsys, "ingest", "--config", str(write(tmp_path, doc)))
    assert code == 2
    assert "4 problem(s)" in err
    for key in ("kafka.bootstrap_servers", "kafka.ssl_cafile", "kafka.sasl_password_env", "clickhouse.dsn"):
        assert f"  - {key}" in err


AGENT_CASES = {
    "negative interval": ({"agent": {"interval_s": -2}}, ["`agent.interval_s`"]),
    "bootstrap without port": ({"kafka": {"bootstrap_servers": "k1:9092,k2"}}, ["kafka.bootstrap_servers", "'k2'"]),
    "allocation file without a path": ({"agent": {"allocation": {"source": "file"}}},
                                       ["agent.allocation.source is 'file' but agent.allocation.path is not set"]),
    "receiver port out of range": ({"agent": {"otlp_receiver_port": 70000}},
                                   ["agent.otlp_receiver_port", "70000 is not a TCP port"]),
    "export endpoint not a URL": ({"agent": {"otlp_export_endpoint": "collector:4318"}},
                                  ["agent.otlp_export_endpoint", "http://collector:4318"]),
    "missing SASL password": ({"kafka": {**_ok_kafka(), "security_protocol": "SASL_SSL",
                                         "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "agent"}},
                              ["kafka.sasl_password_env"]),
}


@pytest.mark.parametrize("case", list(AGENT_CASES))
def test_agent_refuses_a_wrong_config_naming_the_key(case: str, tmp_path: Path, monkeypatch, capsys) -> None:
    doc, expected = AGENT_CASES[case]
    doc.setdefault("agent", {}).update(spool_dir=str(tmp_path / "spool"), backend="simulated")
    code, err = run_main(monkeypatch, capsys, "agent", "--config", str(write(tmp_path, doc)), "--duration", "1")
    assert code == 2, err
    for text in expected:
        assert text in err
    assert not (tmp_path / "spool").exists(), "the agent started spooling before the config was checked"


def test_an_agent_starts_while_the_broker_is_down() -> None:
    """No network check for the agent: it must start and spool to disk while Kafka is unreachable."""
    cfg = parse({"kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"}, "agent": {"backend": "simulated"}})
    validate_startup(cfg, role="agent")  # does not raise
    with pytest.raises(ConfigError, match="no broker answers"):
        validate_startup(cfg, role="ingest", network=True)


def test_a_good_config_has_no_problems(tmp_path: Path) -> None:
    cfg = parse({"clickhouse": {"dsn": f"chdb://{tmp_path}", "cluster": "prod_ch-1"},
                 "kafka": {"bootstrap_servers": "k1:9092, [::1]:9093"},
                 "alerts": {"alertmanager_url": "http://user:pw@am:9093"}})
    for role in ("agent", "ingest", "query", "alerts"):
        assert problems(cfg, role=role, environ={}) == []


@pytest.mark.parametrize(("command", "doc", "key"), [
    ("ingest", {"clickhouse": {"dsn": "mysql://db/x"}}, "clickhouse.dsn"),
    ("agent", {"agent": {"backend": "simulated", "interval_s": 0}}, "agent.interval_s"),
])
@pytest.mark.integration
def test_the_installed_command_exits_2_with_the_message(command: str, doc: dict, key: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUFLEET_", "PYTEST_"))}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-m", "gpufleet", command, "--config", str(write(tmp_path, doc))],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("gpufleet: configuration error:")
    assert key in done.stderr
    assert "Traceback" not in done.stderr
