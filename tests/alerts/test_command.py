"""`gpufleet alerts` through the real CLI group: run once on the wall clock, list as JSON, check files."""

from __future__ import annotations

import json
import time

from click.testing import CliRunner

from gpufleet.cli import cli
from gpufleet.embedded.broker import free_port
from gpufleet.pipeline.alerts.lifecycle import AlertRecord, fingerprint
from gpufleet.pipeline.alerts.state import AlertStore
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


def _episode(name: str, node: str, state: str, active_min: int, starts_min: int | None, ends_min: int | None,
             now: int, revision: int = 1) -> AlertRecord:
    """An alert episode as the evaluator stores it; times in minutes before `now`."""
    labels = {"alertname": name, "severity": "warning", "cluster": "c1", "node": node}
    at = lambda m: None if m is None else now - m * 60_000  # noqa: E731
    return AlertRecord(alertname=name, fingerprint=fingerprint(labels), active_at=at(active_min), severity="warning",
                       state=state, labels=labels, annotations={"summary": f"{name} on {node}"},
                       starts_at=at(starts_min), ends_at=at(ends_min), last_eval=now, value=1.0,
                       sent_state="firing" if state == "firing" else "resolved" if starts_min else "none",
                       revision=revision)


def test_history_lists_every_alert_that_fired_in_the_window(ch_store, ch_target, monkeypatch) -> None:
    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    now = int(time.time() * 1000)
    AlertStore(ch_store).write([
        _episode("JobStalled", "n1", "firing", 31, 30, None, now),           # fired 30 min ago ...
        _episode("JobStalled", "n1", "resolved", 31, 30, 20, now, 2),        # ... and resolved 20 min ago
        _episode("GpuDegraded", "n2", "firing", 121, 120, None, now),        # firing for 2 h, still firing
        _episode("GpuIdleAllocated", "n3", "pending", 5, None, None, now),   # pending: never fired
        _episode("GpuHeldNoProcess", "n4", "cleared", 50, None, 40, now),    # cleared: never fired
        _episode("NodeSilent", "n5", "resolved", 181, 180, 150, now),        # fired and resolved 2.5 h ago
    ])
    target = ["--dsn", ch_target.dsn, "--database", ch_target.database]
    result = CliRunner().invoke(cli, ["alerts", "history", "--since", "1h", "--json", *target])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert [(a["alertname"], a["labels"]["node"], a["state"], a["starts_at"], a["ends_at"]) for a in got] == [
        ("GpuDegraded", "n2", "firing", iso(now - 120 * 60_000), None),
        ("JobStalled", "n1", "resolved", iso(now - 30 * 60_000), iso(now - 20 * 60_000)),
    ]
    assert got[1]["labels"] == {"alertname": "JobStalled", "severity": "warning", "cluster": "c1", "node": "n1"}
    assert got[1]["annotations"] == {"summary": "JobStalled on n1"}

    result = CliRunner().invoke(cli, ["alerts", "history", "--since", "3h30m", "--json", *target])
    assert [a["alertname"] for a in json.loads(result.output)] == ["NodeSilent", "GpuDegraded", "JobStalled"]
    result = CliRunner().invoke(cli, ["alerts", "history", "--since", "1h", *target])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].startswith(
        f"{iso(now - 30 * 60_000)} -> {iso(now - 20 * 60_000)}  warning   JobStalled")
    result = CliRunner().invoke(cli, ["alerts", "history", "--since", "0", *target])
    assert result.exit_code == 2
    assert "'0' is not longer than 0" in result.output
