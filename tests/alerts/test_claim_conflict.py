"""GpuClaimConflict: one GPU reported by two streams for the same time, through the evaluator into a real
Alertmanager, and the generated Grafana rule on the same data.

Samples are 10 s long; second s is the interval [b + s, b + s + 10 s). By hand:
  n1, boot-a   GPU-shared  s = 0 .. 1790        (the whole half hour)
  n1, boot-b   GPU-shared  s = 300 .. 470       (the agent installed twice for 3 minutes: overlap [300, 480))
  n3           GPU-r       s = 0 .. 590, then renamed n3-new s = 600 .. 1190 (no second reported twice)
"""

from __future__ import annotations

from gpufleet.dashboards import alerting
from gpufleet.dashboards.macros import TimeRange, expand_macros
from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.rules import GpuClaimConflict, packaged_rules
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.store.client import Target, connect
from gpufleet.wire import NodeReport
from tests.alerts.helpers import am_alerts, base_ms, iso
from tests.builders import gpu, report

S = 1000


def _tens(b: int, node: str, boot: str, seconds: range, uuid_: str) -> list[NodeReport]:
    return [report(node=node, boot_id=boot, seq=n, time_ms=b + (s + 10) * S, interval_ms=10 * S,
                   gpus=[gpu(0, node, uuid=uuid_, tenant="acme")]) for n, s in enumerate(seconds)]


def _scenario(b: int) -> list[NodeReport]:
    return [*_tens(b, "n1", "boot-a", range(0, 1800, 10), "GPU-shared"),
            *_tens(b, "n1", "boot-b", range(300, 480, 10), "GPU-shared"),
            *_tens(b, "n3", "boot-1", range(0, 600, 10), "GPU-r"),
            *_tens(b, "n3-new", "boot-1", range(600, 1200, 10), "GPU-r")]


def test_a_gpu_claimed_by_two_streams_fires_then_resolves(alertmanager, alerts_cfg, ch_store) -> None:
    b = base_ms()
    insert_reports(ch_store, _scenario(b), b + 1800 * S)
    rules = packaged_rules("default_rules.yaml")
    rule = rules.by_name()["GpuClaimConflict"]
    assert isinstance(rule, GpuClaimConflict)
    assert rule.window == "15m"
    ev = Evaluator(alerts_cfg, ch_store, alertmanager_url=alertmanager.url,
                   rules=type(rules)((rule,), rules.source))

    # At b + 9 min: the two boot ids overlap in [b + 300 s, b + 480 s): fires, since the overlap began.
    report_ = ev.evaluate_once(b + 540 * S)
    assert report_.errors == []
    (alert,) = am_alerts(alertmanager.url)
    assert alert["labels"] == {"alertname": "GpuClaimConflict", "severity": "warning", "gpu": "GPU-shared"}
    assert alert["annotations"] == {
        "summary": "GPU GPU-shared is reported by 2 streams for the same time (c1/n1 (boot boot-a), "
                   "c1/n1 (boot boot-b)): each second is billed once, the other streams' overlapping time is "
                   "not billed",
        "runbook_url": "docs/alerts.md#gpuclaimconflict",
    }
    assert alert["startsAt"] == iso(b + 540 * S)
    (rec,) = ev.open_alerts()
    assert (rec.state, rec.active_at, rec.value) == ("firing", b + 300 * S, 2.0)

    # At b + 20 min the overlap ended 12 min ago (< 15m): still firing; the renamed node (n3 -> n3-new,
    # back to back) never fires.
    assert ev.evaluate_once(b + 1200 * S).errors == []
    assert [a["labels"]["gpu"] for a in am_alerts(alertmanager.url)] == ["GPU-shared"]

    # At b + 24 min the window (b + 9 min, b + 24 min] holds no overlap: resolved.
    report_ = ev.evaluate_once(b + 1440 * S)
    assert [r.labels["gpu"] for r in report_.resolved] == ["GPU-shared"]
    assert am_alerts(alertmanager.url) == []


def test_the_grafana_rule_finds_the_same_conflicts(chdb_dsn, ch_store) -> None:
    b = base_ms()
    insert_reports(ch_store, _scenario(b), b + 1800 * S)
    rule = packaged_rules("default_rules.yaml").by_name()["GpuClaimConflict"]
    query = alerting.query_for(rule)
    assert (query.labels, query.value, query.window_s) == (("gpu",), "streams", 900)
    client = connect(Target(dsn=chdb_dsn))
    client.database = ch_store.database

    def firing_at(now_ms: int) -> list[tuple]:
        sql = expand_macros(query.sql, TimeRange(now_ms - query.window_s * S, now_ms, 1000))
        return client.query(sql).result_rows

    assert firing_at(b + 540 * S) == [("GPU-shared", 2.0)]
    assert firing_at(b + 1200 * S) == [("GPU-shared", 2.0)]
    assert firing_at(b + 1440 * S) == []
