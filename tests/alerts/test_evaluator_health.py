"""The evaluator's `/healthz` follows its evaluations, and runbook links sit under `alerts.runbook_base_url`.

Real chDB, the shipped rules, the health endpoint over HTTP; the heartbeats' clock is moved by hand."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import msgspec

from gpufleet.config import Config
from gpufleet.health_http import HealthServer
from gpufleet.liveness import Liveness
from gpufleet.pipeline.alerts.alertmanager import AlertmanagerError
from gpufleet.pipeline.alerts.evaluator import EVALUATED, Evaluator, runbook_link
from gpufleet.pipeline.alerts.rules import parse_rules
from gpufleet.pipeline.ingest.rows import insert_reports
from tests.alerts.helpers import MIN, base_ms, minute_reports
from tests.builders import gpu


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Refusing:
    """An Alertmanager that is down."""

    def post(self, alerts: Any) -> None:
        raise AlertmanagerError("Alertmanager at http://am:9093 unreachable: ConnectionError", retryable=True)


SILENT = parse_rules({"rules": [{"name": "NodeSilent", "kind": "node_silent", "severity": "critical",
                                 "silent_after": "60s", "annotations": {
                                     "summary": "{node} silent", "runbook_url": "docs/alerts.md#nodesilent"}}]})


def test_healthz_follows_evaluations_without_error(alerts_cfg: Config, ch_store: Any) -> None:
    clock = Clock()
    live = Liveness(clock).expect(EVALUATED, alerts_cfg.alerts.eval_stale_s)
    evaluator = Evaluator(alerts_cfg, ch_store, rules=SILENT, liveness=live)
    server = HealthServer(live).start()
    try:
        assert get(f"{server.url}/readyz")[0] == 503  # no evaluation yet
        assert get(f"{server.url}/healthz")[0] == 200  # within the start-up bound
        assert evaluator.evaluate_once(base_ms()).errors == []
        assert get(f"{server.url}/readyz") == (200, {"ok": True, "stale": [], "checks": {
            "evaluated": {"age_s": 0.0, "bound_s": 120.0}}})
        clock.now += 121
        code, body = get(f"{server.url}/healthz")
        assert (code, body["stale"]) == (503, ["evaluated"])
        evaluator.evaluate_once(base_ms())
        assert get(f"{server.url}/healthz")[0] == 200
        # An evaluation whose notifications fail is no heartbeat: Alertmanager down long enough is unhealthy.
        b = base_ms()
        insert_reports(ch_store, minute_reports("n1", b, range(1, 4), lambda k: [gpu(0, "n1")]), b + 4 * MIN)
        evaluator.notifier = Refusing()
        report = evaluator.evaluate_once(b + 10 * MIN)
        assert report.fired
        assert report.errors
        clock.now += 121
        assert get(f"{server.url}/healthz")[0] == 503
        assert get(f"{server.url}/other")[0] == 404
    finally:
        server.stop()


def test_runbook_links_are_joined_to_the_configured_base(alerts_cfg: Config, ch_store: Any) -> None:
    b = base_ms()
    insert_reports(ch_store, minute_reports("n1", b, range(1, 4), lambda k: [gpu(0, "n1")]), b + 4 * MIN)
    cfg = msgspec.structs.replace(alerts_cfg, alerts=msgspec.structs.replace(
        alerts_cfg.alerts, runbook_base_url="https://runbooks.example.com/gpufleet/"))
    (fired,) = Evaluator(cfg, ch_store, rules=SILENT).evaluate_once(b + 10 * MIN).fired
    assert fired.annotations["runbook_url"] == "https://runbooks.example.com/gpufleet/docs/alerts.md#nodesilent"
    plain = Evaluator(alerts_cfg, ch_store, rules=SILENT)  # reloads the open alert, renders it again
    plain.evaluate_once(b + 11 * MIN)
    (unset,) = plain.open_alerts()
    assert unset.annotations["runbook_url"] == "docs/alerts.md#nodesilent"


def test_runbook_link() -> None:
    assert runbook_link("docs/alerts.md#a", "https://h/x") == "https://h/x/docs/alerts.md#a"
    assert runbook_link("/docs/alerts.md#a", "https://h/x/") == "https://h/x/docs/alerts.md#a"
    assert runbook_link("https://wiki/rb", "https://h/x") == "https://wiki/rb"
    assert runbook_link("docs/alerts.md#a", None) == "docs/alerts.md#a"
