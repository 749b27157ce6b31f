"""`gpufleet alerts` through the real CLI group: run once on the wall clock, list as JSON, check files."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner

from gpufleet.cli import cli
from gpufleet.embedded.broker import free_port
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.store import Store
from tests.alerts.helpers import am_alerts, iso
from tests.builders import gpu, report


def test_run_once_then_list_as_json(alertmanager, ch_client, ch_target) -> None:
    now = int(time.time() * 1000)
    lost = gpu(0, "n7", tenant="acme", error="GPU is lost", xids=[79], util_gpu_ratio=None, compute_processes=None)
    ok = gpu(1, "n7", tenant="acme")
    insert_reports(Store(ch_client, ch_target.database), [report(node="n7", time_ms=now - 2000, gpus=[lost, ok])], now)
    target = ["--dsn", ch_target.dsn, "--database", ch_target.database]
    runner = CliRunner()

    result = runner.invoke(cli, ["alerts", "run", "--once", *target, "--alertmanager", alertmanager.url])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["fired"] == ["GpuFailing"]
    assert out["errors"] == []
    assert [a["labels"]["node"] for a in am_alerts(alertmanager.url)] == ["n7"]
    starts_at = am_alerts(alertmanager.url)[0]["startsAt"]

    result = runner.invoke(cli, ["alerts", "--json", *target])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert len(listed) == 1
    a = listed[0]
    assert (a["alertname"], a["severity"], a["state"], a["starts_at"]) == ("GpuFailing", "critical", "firing",
                                                                          starts_at)
    assert a["labels"] == {"alertname": "GpuFailing", "severity": "critical", "cluster": "c1", "node": "n7",
                           "gpu": "GPU-n7-0", "gpu_index": "0"}
    assert a["active_at"] == iso(now - 3000)  # the failing sample's interval began 1 s before it ended
    assert a["annotations"]["runbook_url"] == "docs/alerts.md#gpufailing"  # no base set: relative to the repository

    result = runner.invoke(cli, ["alerts", *target])
    assert result.exit_code == 0
    assert "GpuFailing" in result.output
    assert "GPU 0 on n7 (c1) is failing: unreachable, xid_79" in result.output


def test_run_once_puts_runbook_links_under_the_configured_base(ch_store, ch_target, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    now = int(time.time() * 1000)
    lost = gpu(0, "n7", tenant="acme", error="GPU is lost", xids=[79], util_gpu_ratio=None, compute_processes=None)
    insert_reports(ch_store, [report(node="n7", time_ms=now - 2000, gpus=[lost])], now)
    config = tmp_path / "gpufleet.yaml"
    config.write_text("alerts: {runbook_base_url: 'https://git.example.com/gpufleet/blob/main/'}\n")
    target = ["--dsn", ch_target.dsn, "--database", ch_target.database]
    runner = CliRunner()
    result = runner.invoke(cli, ["alerts", "run", "--once", "--config", str(config), *target])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["alerts", "--json", *target])
    assert result.exit_code == 0, result.output
    assert [a["annotations"]["runbook_url"] for a in json.loads(result.output)] == [
        "https://git.example.com/gpufleet/blob/main/docs/alerts.md#gpufailing"]


def test_run_once_with_an_unreachable_alertmanager_reports_and_exits_1(ch_store, ch_target, monkeypatch) -> None:
    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    now = int(time.time() * 1000)
    lost = gpu(0, "n7", tenant="acme", error="GPU is lost", xids=[79], util_gpu_ratio=None, compute_processes=None)
    insert_reports(ch_store, [report(node="n7", time_ms=now - 2000, gpus=[lost])], now)
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(cli, ["alerts", "run", "--once", "--dsn", ch_target.dsn, "--database",
                                      ch_target.database, "--alertmanager", url])
    assert result.exit_code == 1
    expected = f"Alertmanager at {url} unreachable: ConnectionError; 1 notification(s) kept for the next evaluation"
    assert json.loads(result.stdout)["errors"] == [expected]
    assert result.stderr == f"gpufleet: the evaluation had errors: {expected}\n"


def test_check_names_the_broken_rule(tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("rules:\n  - {name: A, kind: node_silent, severity: critical, annotations: {summary: down}}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {name: B, kind: node_silent, severity: critical, silent_after: 1 minute,\n"
                   "     annotations: {summary: down}}\n")
    result = CliRunner().invoke(cli, ["alerts", "check", str(good), str(bad)])
    assert result.exit_code == 1
    assert f"OK   {good}: 1 rules (A)" in result.output
    assert (f"FAIL {bad}: rule 'B' (rules[0]): `silent_after`: '1 minute' is not a duration: "
            "write e.g. 30s, 5m, 1h30m, 2d, or 0") in result.output
