"""Configured secrets never reach a log record or an error message, at any log level.

Every test captures all log records at DEBUG (kafka-python, clickhouse-connect, urllib3, requests
and gpufleet alike) plus the text of every error and command output, and looks for each secret,
in clear and as the HTTP Basic credential a server or proxy might echo back. The Kafka SASL
password in real use is covered by test_kafka_sasl.py; here: a pipeline run with secrets
configured, ClickHouse passwords (in the DSN or the environment) against unreachable and
refusing servers, Alertmanager and Grafana credentials, and kafka-python's request dump, which
would print a SASL PLAIN password at DEBUG unless the CLI caps its level.
"""

from __future__ import annotations

import base64
import logging
import sys
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from gpufleet import wire
from gpufleet.cli import cli
from gpufleet.config_check import validate_startup
from gpufleet.embedded.broker import free_port
from gpufleet.pipeline.alerts.alertmanager import AlertmanagerClient, AlertmanagerError
from gpufleet.pipeline.store.client import StoreError, Target, connect, redact
from tests.builders import report
from tests.security import EchoingServer, ingest_config, kafka_debug_logging, produce, running_ingester, wait_for

pytestmark = pytest.mark.integration  # starts a server or a process

CH_SECRET = "ch-S3cret-\u00e9xyz"
KAFKA_SECRET = "kafka-S3cret-pq"
AM_SECRET = "am-S3cret-rs"
GRAFANA_TOKEN = "glsa_T0ken-uvw"


def forms(secret: str, user: str = "gpufleet") -> list[str]:
    """The secret in clear and as an HTTP Basic credential."""
    return [secret, base64.b64encode(f"{user}:{secret}".encode()).decode()]


def assert_clean(text: str, *secrets: str) -> None:
    for secret in secrets:
        for form in forms(secret) + forms(secret, "default"):
            assert form not in text, f"secret {secret!r} leaked (as {form!r})"


def all_logs(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)


@pytest.fixture(autouse=True)
def _kafka_loggers() -> Iterator[None]:
    with kafka_debug_logging():
        yield


@pytest.fixture
def refusing_clickhouse() -> Iterator[EchoingServer]:
    server = EchoingServer(403, "Code: 516. DB::Exception: gpufleet: Authentication failed (AUTHENTICATION_FAILED)")
    yield server
    server.close()


def test_a_pipeline_run_with_secrets_configured_logs_none(broker, ch_target, ch_client, topic, caplog,
                                                          monkeypatch) -> None:
    monkeypatch.setenv("CLICKHOUSE_PASSWORD", CH_SECRET)
    monkeypatch.setenv("GPUFLEET_KAFKA_PASSWORD", KAFKA_SECRET)
    caplog.set_level(logging.DEBUG)
    cfg = ingest_config(broker.bootstrap, ch_target, topic)
    validate_startup(cfg, role="ingest", network=True)
    good = [report(node="n1", seq=s) for s in range(3)]
    with running_ingester(cfg) as ing:
        produce(cfg, [(b"n1", wire.encode(r)) for r in good] + [(b"n1", b"{not json")])
        wait_for(ing, lambda: ing.stats.rows == 6 and ing.stats.dead_letters == 1, "6 rows and 1 dead letter")
        stats = repr(ing.stats)
    assert caplog.records, "nothing was captured: the test would prove nothing"
    assert_clean(all_logs(caplog) + stats + repr(cfg), CH_SECRET, KAFKA_SECRET)


@pytest.mark.parametrize("where", ["dsn", "env"])
def test_clickhouse_password_stays_out_of_errors_and_logs(where: str, refusing_clickhouse: EchoingServer,
                                                         caplog, monkeypatch) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("CLICKHOUSE_PASSWORD_FILE", raising=False)
    monkeypatch.delenv("CLICKHOUSE_USER", raising=False)
    if where == "env":
        monkeypatch.setenv("CLICKHOUSE_PASSWORD", CH_SECRET)
        dsns = [f"http://gpufleet@127.0.0.1:{refusing_clickhouse.port}", f"http://gpufleet@127.0.0.1:{free_port()}"]
    else:
        monkeypatch.delenv("CLICKHOUSE_PASSWORD", raising=False)
        dsns = [f"http://gpufleet:{CH_SECRET}@127.0.0.1:{p}" for p in (refusing_clickhouse.port, free_port())]
    errors = []
    for dsn in dsns:
        with pytest.raises(StoreError) as exc:
            connect(Target(dsn, "gpufleet"))
        errors.append(str(exc.value))
    assert "AUTHENTICATION_FAILED" in errors[0]  # the server's answer is shown, the credential it echoed is not
    assert_clean("\n".join(errors) + all_logs(caplog), CH_SECRET)


def test_ingest_command_with_a_password_in_the_dsn_prints_it_nowhere(refusing_clickhouse: EchoingServer, broker,
                                                                    caplog, monkeypatch, capsys) -> None:
    from gpufleet.cli import main

    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    for port in (refusing_clickhouse.port, free_port()):
        dsn = f"http://gpufleet:{CH_SECRET}@127.0.0.1:{port}"
        monkeypatch.setattr(sys, "argv", ["gpufleet", "-vv", "ingest", "--dsn", dsn, "--bootstrap", broker.bootstrap])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
    out = capsys.readouterr()
    assert "clickhouse.dsn" in out.err
    assert "AUTHENTICATION_FAILED" in out.err  # the refusing server's echo was shown, scrubbed
    assert "gpufleet:***@127.0.0.1" in out.err
    assert_clean(out.out + out.err + all_logs(caplog), CH_SECRET)


SLASH_SECRET = "pa/ss-S3cret"
QUERY_SECRET = "q-S3cret-xyz"
DSN_FORMS = {
    # a password holding an unencoded "/": urlsplit ends the host part there, so the rest looked like a path
    "slash": ("http://gpufleet:{secret}@127.0.0.1:{port}", SLASH_SECRET, "http://gpufleet:***@127.0.0.1:{port}"),
    "query": ("http://gpufleet@127.0.0.1:{port}/?password={secret}", QUERY_SECRET,
              "http://gpufleet@127.0.0.1:{port}/?password=***"),
}


@pytest.mark.parametrize("form", list(DSN_FORMS))
def test_no_command_prints_a_dsn_password_in_any_form(form: str, refusing_clickhouse: EchoingServer, broker,
                                                      caplog, monkeypatch, capsys, tmp_path) -> None:
    from gpufleet.cli import main

    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    for name in ("GPUFLEET_CONFIG", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_PASSWORD_FILE", "CLICKHOUSE_USER"):
        monkeypatch.delenv(name, raising=False)
    template, secret, shown = DSN_FORMS[form]
    texts = []
    for port in (refusing_clickhouse.port, free_port()):
        dsn = template.format(secret=secret, port=port)
        for command in (["usage"], ["status"], ["migrate"], ["ingest", "--bootstrap", broker.bootstrap]):
            for verbose in ([], ["-vv"]):
                monkeypatch.setattr(sys, "argv", ["gpufleet", *verbose, *command, "--dsn", dsn])
                with pytest.raises(SystemExit) as exc:
                    main()
                out = capsys.readouterr()
                assert exc.value.code == 2, (command, out.err)
                # the DSN, redacted; ingest's start-up check names only the address it could not reach
                assert (shown.format(port=port) in out.err
                        or f"ClickHouse at 127.0.0.1:{port} does not answer" in out.err), (command, out.err)
                texts.append(out.out + out.err)
    assert "AUTHENTICATION_FAILED" in "\n".join(texts)  # the refusing server's echo was shown, scrubbed
    assert_clean("\n".join(texts) + all_logs(caplog), secret)


def test_alertmanager_and_grafana_credentials_stay_out_of_errors_and_logs(caplog) -> None:
    from gpufleet.dashboards.deploy import DeployError, run

    caplog.set_level(logging.DEBUG)
    texts = []
    am = AlertmanagerClient(f"http://gpufleet:{AM_SECRET}@127.0.0.1:{free_port()}", timeout_s=2)
    texts.append(repr(am))
    with pytest.raises(AlertmanagerError) as exc:
        am.post([{"labels": {"alertname": "X"}}])
    texts.append(str(exc.value))
    grafana = EchoingServer(401, '{"message": "invalid API key"}')
    try:
        with pytest.raises(DeployError) as exc2:
            run(f"http://127.0.0.1:{grafana.port}", GRAFANA_TOKEN, env={})
        texts.append(str(exc2.value))
    finally:
        grafana.close()
    with pytest.raises(DeployError) as exc3:
        run(f"http://127.0.0.1:{free_port()}", GRAFANA_TOKEN, env={})
    texts.append(str(exc3.value))
    assert "refused" in texts[2]
    assert_clean("\n".join(texts) + all_logs(caplog), AM_SECRET, GRAFANA_TOKEN)


def test_redact_hides_passwords_that_contain_at_signs_and_colons() -> None:
    assert redact("http://u:p@ss:w@rd@ch:8123/db?x=@y") == "http://u:***@ch:8123/db?x=@y"
    assert redact("http://u:pa/ss@ch:8123/db") == "http://u:***@ch:8123/db"
    assert redact("http://u:a/b@c/d@ch") == "http://u:***@ch"
    assert redact("https://ch:8443/?user=u&password=p%2Fw&x=1#frag") == "https://ch:8443/?user=u&password=***&x=1#frag"
    assert redact("http://ch/db?Password=p;access_token=t") == "http://ch/db?Password=***;access_token=***"
    assert redact("https://u:s3cret@ch") == "https://u:***@ch"
    assert redact("chdb:///var/lib/gpufleet") == "chdb:///var/lib/gpufleet"


def _plain_sasl_request_logged(caplog: pytest.LogCaptureFixture) -> str:
    """kafka-python's own send path for a SASL PLAIN authenticate request, as its connection runs it."""
    from kafka.net.sasl.plain import SaslMechanismPlain
    from kafka.protocol.parser import KafkaProtocol
    from kafka.protocol.sasl import SaslAuthenticateRequest

    caplog.clear()
    mechanism = SaslMechanismPlain(security_protocol="SASL_SSL", sasl_plain_username="gpufleet",
                                   sasl_plain_password=KAFKA_SECRET)
    protocol = KafkaProtocol(client_id="gpufleet-agent")
    protocol.send_request(SaslAuthenticateRequest(version=2, auth_bytes=mechanism.auth_bytes()))
    protocol.send_bytes()
    return all_logs(caplog)


def test_kafka_python_would_log_a_plain_password_at_debug_and_the_cli_caps_it(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    assert KAFKA_SECRET in _plain_sasl_request_logged(caplog)  # the leak the CLI prevents
    result = CliRunner().invoke(cli, ["-vv", "schema", "--help"])
    assert result.exit_code == 0
    caplog.set_level(logging.DEBUG)
    assert_clean(_plain_sasl_request_logged(caplog), KAFKA_SECRET)
    assert logging.getLogger("kafka.protocol.parser").getEffectiveLevel() == logging.INFO
