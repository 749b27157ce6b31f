"""The alert gate (pipeline/alerts/gate.py) on real chDB: which rules it lets the evaluator skip, and that
every rule it skips would have found nothing (its own query returns no rows at that instant)."""

from __future__ import annotations

from gpufleet.pipeline.alerts import gate
from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.queries import build
from gpufleet.pipeline.alerts.rules import load_rules
from gpufleet.pipeline.ingest.rows import insert_reports
from tests.alerts.helpers import MIN, base_ms, minute_reports
from tests.builders import gpu

GATED = {"GpuFailing", "GpuDegraded", "GpuIdleAllocated", "GpuHeldNoProcess", "GpuBusyUnallocated", "JobStalled",
         "GpuClaimConflict", "GpuNeedsReset", "NodeNeedsReboot", "GpuNeedsDrain", "FabricDegraded"}
"""The default rules the gate covers: the per-GPU kinds, GpuClaimConflict and JobStalled."""


def _quiet_names(store, now: int) -> set[str]:
    rules = load_rules().rules
    gated = gate.gate(rules, now)
    assert gated is not None
    q, columns = gated
    assert {rules[i].name for i in columns.values()} == GATED
    (row,) = list(store.query(q.sql, q.parameters).named_results())
    quiet = {rules[i].name for i in gate.quiet(columns, row)}
    for rule in rules:  # what the gate skips, the rule's own query finds nothing for
        if rule.name in quiet:
            rq = build(rule, now)
            assert list(store.query(rq.sql, rq.parameters).named_results()) == [], rule.name
    return quiet


def test_the_gate_skips_the_rules_that_find_nothing_and_runs_the_rest(ch_store, alerts_cfg) -> None:
    b = base_ms()

    def gpus(k: int):
        lost = {"error": "GPU is lost", "xids": [79] if k == 8 else []} if k >= 8 else {}
        return [gpu(0, "n1", tenant="acme", job="j1", util_gpu_ratio=0.9),
                gpu(1, "n1", tenant="acme", job="j1", util_gpu_ratio=0.9, **lost)]

    insert_reports(ch_store, minute_reports("n1", b, range(1, 8), gpus), b)
    # k=1..7 healthy: nothing to find for any gated rule
    assert _quiet_names(ch_store, b + 7 * MIN) == GATED
    insert_reports(ch_store, minute_reports("n1", b, range(8, 11), gpus), b)
    # k=8: GPU 1 is lost (failing): GpuFailing's query runs, every other gated rule is still skipped
    assert _quiet_names(ch_store, b + 8 * MIN) == GATED - {"GpuFailing"}
    report = Evaluator(alerts_cfg, ch_store).evaluate_once(b + 10 * MIN)
    assert report.errors == []
    assert [(r.alertname, r.labels["gpu_index"], r.state) for r in report.fired] == [("GpuFailing", "1", "firing")]


def test_a_failing_gate_runs_every_rule(ch_store, alerts_cfg) -> None:
    ev = Evaluator(alerts_cfg, ch_store)
    ch_store.command("DROP TABLE {db:Identifier}.gpu_health_1h")  # the gate reads it; no rule does
    assert ev._quiet_rules(base_ms()) == set()
    assert ev.evaluate_once(base_ms()).errors == []
