"""Agent counters through the evaluator into a real Alertmanager: spool drops (the shipped
`AgentSpoolDropping` rule) and send errors (`agent_send_errors`), with a new boot_id and an agent
restart that resets the counter.

One report per node per minute; report k is at base + k min. The agents' counters, by k:
  n1  boot n1-a, seq k:      spool_dropped_total 0 (k<=10), 4, 9, 12 (k=11..13), 12 after;
                             send_errors_total 0 (k<=10), 4 after (under the send-errors rule's 5)
  n2  boot n2-a, seq k, k=1..10: dropped 7 and send errors 3, flat (drops from long ago);
      boot n2-b, seq k-11, k>=11: dropped 0 (a new boot starts its counters at 0: not a drop);
                             send errors 0, 2, 6 (k=11..13), 6 after
  n3  boot n3-a, seq k:      dropped 5 (k<=8); the agent restarted (same boot_id, counter from 0) and
                             dropped 2 before its first report: 2 (k=9,10), 3 (k>=11)
Expected values are worked out by hand below.
"""

from __future__ import annotations

import msgspec
import pytest
import yaml

from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.rules import AgentSpoolDropping, RulesError, packaged_path, packaged_rules, parse_rules
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.wire import AgentHealth, NodeReport
from tests.alerts.helpers import MIN, am_alerts, am_labels, base_ms, iso
from tests.builders import gpu, report

SEND_ERRORS_RULE = {
    "name": "AgentSendErrors", "kind": "agent_send_errors", "severity": "info", "window": "10m", "min_errors": 5,
    "annotations": {"summary": "{errors} send errors on {node} ({cluster}) in the last {window}"},
}


def _report(node: str, boot_id: str, seq: int, k: int, b: int, dropped: int, send_errors: int) -> NodeReport:
    r = report(node=node, seq=seq, time_ms=b + k * MIN, interval_ms=MIN, gpus=[gpu(0, node)], boot_id=boot_id)
    return msgspec.structs.replace(r, agent=AgentHealth(spool_dropped_total=dropped, send_errors_total=send_errors))


def _reports(b: int) -> list[NodeReport]:
    out = []
    for k in range(1, 41):
        n1_dropped = 0 if k <= 10 else {11: 4, 12: 9}.get(k, 12)
        out.append(_report("n1", "n1-a", k, k, b, n1_dropped, 0 if k <= 10 else 4))
        if k <= 10:
            out.append(_report("n2", "n2-a", k, k, b, 7, 3))
        else:
            out.append(_report("n2", "n2-b", k - 11, k, b, 0, {11: 0, 12: 2}.get(k, 6)))
        n3_dropped = 5 if k <= 8 else 2 if k <= 10 else 3
        out.append(_report("n3", "n3-a", k, k, b, n3_dropped, 0))
    return out


def _shipped_spool_rule() -> dict:
    raw = yaml.safe_load(packaged_path().read_text())["rules"]
    return next(r for r in raw if r["kind"] == "agent_spool_dropping")


def test_spool_drops_fire_in_alertmanager_and_resolve(alertmanager, alerts_cfg, ch_store, ch_target) -> None:
    b = base_ms()
    insert_reports(ch_store, _reports(b), b)
    rules = parse_rules({"rules": [_shipped_spool_rule(), SEND_ERRORS_RULE]})
    ev = Evaluator(alerts_cfg, ch_store, alertmanager_url=alertmanager.url, rules=rules)

    # k=8: no counter has risen yet (n2-a's 7 and n3's 5 are flat in the window).
    report = ev.evaluate_once(b + 8 * MIN)
    assert (report.errors, report.fired, report.pending) == ([], [], 0)

    # k=13. Spool window 15m = (b-2m, b+13m], reports k=1..13:
    #   n1: 0 -> 4 -> 9 -> 12 = 12 dropped, first rise at k=11;
    #   n2: n2-a flat at 7, n2-b flat at 0 -> nothing (7 -> 0 is a new boot, not a fall or a rise);
    #   n3: 5 -> 2 at the restart counts the new 2 (k=9), then 2 -> 3 = 3 dropped, first rise at k=9.
    # Send-errors window 10m = (b+3m, b+13m], k=4..13: n1 0 -> 4 (< 5); n2-b 0 -> 2 -> 6 = 6 (>= 5).
    report = ev.evaluate_once(b + 13 * MIN)
    assert report.errors == []
    assert am_labels(alertmanager.url) == [
        {"alertname": "AgentSendErrors", "severity": "info", "cluster": "c1", "node": "n2"},
        {"alertname": "AgentSpoolDropping", "severity": "warning", "cluster": "c1", "node": "n1"},
        {"alertname": "AgentSpoolDropping", "severity": "warning", "cluster": "c1", "node": "n3"},
    ]
    got = {(a["labels"]["alertname"], a["labels"]["node"]): a for a in am_alerts(alertmanager.url)}
    assert got[("AgentSpoolDropping", "n1")]["annotations"] == {
        "summary": "The agent on n1 (c1) dropped 12 unsent message(s) in the last 15m: its spool was full, "
                   "those samples are lost",
        "runbook_url": "docs/alerts.md#agentspooldropping",
    }
    assert got[("AgentSpoolDropping", "n3")]["annotations"]["summary"] == (
        "The agent on n3 (c1) dropped 3 unsent message(s) in the last 15m: its spool was full, those samples are lost")
    assert got[("AgentSendErrors", "n2")]["annotations"]["summary"] == "6 send errors on n2 (c1) in the last 10m"
    assert {a["startsAt"] for a in got.values()} == {iso(b + 13 * MIN)}
    opened = {(r.alertname, r.labels["node"]): (r.state, r.active_at, r.value) for r in ev.open_alerts()}
    assert opened == {
        ("AgentSpoolDropping", "n1"): ("firing", b + 11 * MIN, 12.0),
        ("AgentSpoolDropping", "n3"): ("firing", b + 9 * MIN, 3.0),
        ("AgentSendErrors", "n2"): ("firing", b + 12 * MIN, 6.0),
    }

    # k=26. Spool window (b+11m, b+26m], k=12..26: n1 9 -> 12 = 3, still firing; n3 flat at 3: resolves.
    # Send-errors window (b+16m, b+26m]: n2-b flat at 6: resolves.
    report = ev.evaluate_once(b + 26 * MIN)
    assert report.errors == []
    assert sorted((r.alertname, r.labels["node"]) for r in report.resolved) == [
        ("AgentSendErrors", "n2"), ("AgentSpoolDropping", "n3")]
    (n1,) = ev.open_alerts()
    assert (n1.labels["node"], n1.state, n1.value) == ("n1", "firing", 3.0)
    assert n1.annotations["summary"].startswith("The agent on n1 (c1) dropped 3 unsent message(s) in the last 15m")
    assert am_labels(alertmanager.url) == [
        {"alertname": "AgentSpoolDropping", "severity": "warning", "cluster": "c1", "node": "n1"}]

    # k=27. Window (b+12m, b+27m], k=13..27: n1 flat at 12 for the whole window: resolves.
    report = ev.evaluate_once(b + 27 * MIN)
    assert report.errors == []
    assert [(r.alertname, r.labels["node"]) for r in report.resolved] == [("AgentSpoolDropping", "n1")]
    assert am_alerts(alertmanager.url) == []


def test_shipped_spool_rule() -> None:
    for name, window in (("default_rules.yaml", "15m"), ("demo_rules.yaml", "1m")):
        rule = packaged_rules(name).by_name()["AgentSpoolDropping"]
        assert isinstance(rule, AgentSpoolDropping)
        assert (rule.severity, rule.window, rule.min_dropped, rule.labels) == ("warning", window, 1, {})


@pytest.mark.parametrize(("over", "message"), [
    ({"window": 0}, "`window` must be longer than 0"),
    ({"min_dropped": 0}, "Expected `int` >= 1 - at `min_dropped`"),
    ({"annotations": {"summary": "{gpu}"}},
     "`annotations.summary` uses {gpu}, which kind 'agent_spool_dropping' does not provide; use one of "
     "{cluster}, {node}, {dropped}, {window}, {active_for}, {value}"),
])
def test_spool_rule_errors(over, message) -> None:
    rule = {"name": "Drops", "kind": "agent_spool_dropping", "severity": "warning",
            "annotations": {"summary": "{dropped}"}, **over}
    with pytest.raises(RulesError) as info:
        parse_rules({"rules": [rule]}, "rules.yaml")
    assert str(info.value) == f"rules.yaml: rule 'Drops' (rules[0]): {message}"
