"""`gpufleet dashboards deploy` against a fake of Grafana's HTTP API (tests/dashboards/fake_grafana.py)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpufleet.cli import cli
from gpufleet.dashboards import alerting
from gpufleet.dashboards.command import dashboards
from gpufleet.dashboards.definitions import BOARDS
from gpufleet.dashboards.deploy import DeployError, datasource_payload, run
from tests.dashboards.fake_grafana import fake_grafana

pytestmark = pytest.mark.integration  # starts a server or a process

TOKEN = "glsa_test_token_0123456789"
ENV = {
    "CLICKHOUSE_HOST": "clickhouse",
    "CLICKHOUSE_PORT": "8123",
    "CLICKHOUSE_USER": "gpufleet",
    "CLICKHOUSE_DATABASE": "gpufleet",
    "GF_CLICKHOUSE_PASSWORD": "s3cret-pw",
}
CREATES = {("POST", "/api/folders"), ("POST", "/api/datasources"), ("POST", "/api/v1/provisioning/alert-rules")}
RULE_UIDS = {r["uid"] for r in alerting.provisioning()["groups"][0]["rules"]}


def test_deploy_creates_then_only_updates(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with fake_grafana(TOKEN) as (url, state):
        first = run(url, TOKEN, ENV)
        snapshot = copy.deepcopy((state.folders, state.datasources, {u: d["dashboard"] for u, d in
                                                                    state.dashboards.items()}, state.rules))
        n_first = len(state.requests)
        second = run(url, TOKEN, ENV)
        again = (state.folders, state.datasources, {u: d["dashboard"] for u, d in state.dashboards.items()},
                 state.rules)

    boards = {b.uid for b in BOARDS}
    assert set(first.created) == {"folder gpufleet", "datasource gpufleet-clickhouse",
                                  *(f"dashboard {u}" for u in boards), *(f"alert rule {u}" for u in RULE_UIDS)}
    assert first.updated == []
    assert second.created == []
    assert set(second.updated) == set(first.created)
    assert {(r.method, r.path) for r in state.requests[n_first:]} & CREATES == set()
    # the second run leaves the same objects (only versions move)
    assert (snapshot[1], snapshot[2], snapshot[3]) == (again[1], again[2], again[3])
    assert {k: v["title"] for k, v in snapshot[0].items()} == {k: v["title"] for k, v in again[0].items()}
    assert set(state.dashboards) == boards
    assert all(d["meta"]["folderUid"] == "gpufleet" and d["meta"]["version"] == 2 for d in state.dashboards.values())
    assert set(state.rules) == RULE_UIDS
    assert state.groups[("gpufleet", "gpufleet")]["interval"] == 30
    ds = state.datasources["gpufleet-clickhouse"]
    assert ds["type"] == "grafana-clickhouse-datasource"
    assert ds["jsonData"] == {"host": "clickhouse", "port": "8123", "protocol": "http", "secure": False,
                              "username": "gpufleet", "defaultDatabase": "gpufleet"}
    assert ds["secureJsonData"] == {"password": "s3cret-pw"}
    assert all(r.authorization == f"Bearer {TOKEN}" for r in state.requests)
    assert TOKEN not in caplog.text
    assert "s3cret-pw" not in caplog.text


def test_deploy_reports_a_wrong_token_without_echoing_it() -> None:
    with fake_grafana(TOKEN) as (url, state), pytest.raises(DeployError) as err:
        run(url, "wrong-token-value", ENV)
    assert "refused" in str(err.value)
    assert "Admin or Editor" in str(err.value)
    assert "wrong-token-value" not in str(err.value)
    assert not state.folders


def test_deploy_puts_runbook_links_under_the_configured_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {**ENV, "GF_CLICKHOUSE_PASSWORD": "s3cret-pw"}.items():  # what the provisioned datasource names
        monkeypatch.setenv(k, v)
    config = tmp_path / "gpufleet.yaml"
    config.write_text("alerts: {runbook_base_url: 'https://git.example.com/gpufleet/blob/main/'}\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with fake_grafana(TOKEN) as (url, state):
        result = CliRunner().invoke(cli, ["dashboards", "deploy", "--url", url, "--token-file", str(token_file),
                                          "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert state.rules["gpufleet-gpu-failing"]["annotations"]["runbook_url"] == (
        "https://git.example.com/gpufleet/blob/main/docs/alerts.md#gpufailing")


def test_datasource_needs_its_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != "CLICKHOUSE_HOST"}
    with pytest.raises(DeployError, match=r"set CLICKHOUSE_HOST \(or CLICKHOUSE_HOST__FILE\) in the environment"):
        datasource_payload(env)
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    env = {k: v for k, v in ENV.items() if k != "GF_CLICKHOUSE_PASSWORD"}
    env["GF_CLICKHOUSE_PASSWORD__FILE"] = str(secret)
    assert datasource_payload(env)["secureJsonData"] == {"password": "from-file"}


def test_deploy_command_reads_the_token_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with fake_grafana(TOKEN) as (url, state):
        result = CliRunner().invoke(dashboards, ["deploy", "--url", url, "--token-file", str(token_file)])
    assert result.exit_code == 0, result.output
    # the folder, the datasource, every board and every alert rule
    assert f"created {2 + len(BOARDS) + len(RULE_UIDS)}, updated 0" in result.output
    assert TOKEN not in result.output
    assert len(state.dashboards) == len(BOARDS)
    missing = CliRunner().invoke(cli, ["dashboards", "deploy", "--url", url])
    assert missing.exit_code == 2
    assert "no Grafana token" in missing.output
