"""The alert gate (pipeline/alerts/gate.py) on real chDB: which rules it lets the evaluator skip, and that
every rule it skips would have found nothing (its own query returns no rows at that instant)."""

from __future__ import annotations

from gpufleet.pipeline.alerts import gate
from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.queries import build, gpu_candidates
from gpufleet.pipeline.alerts.rules import RuleSet, load_rules
from gpufleet.pipeline.ingest.rows import insert_reports
from tests.alerts.helpers import MIN, base_ms, minute_reports
from tests.builders import gpu, report

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


def test_a_skipped_rule_with_open_alerts_runs_its_query_and_keeps_them_when_it_fails(ch_store, alerts_cfg) -> None:
    """The gate reads rollups; a rule it skips would close its alerts as "found nothing". A rule that holds
    open alerts runs anyway, so while the raw samples are unreadable its alerts stay as they were (as any
    rule whose query fails); once it has closed them, the gate skips it again. (GpuFailing alone: with the
    default rules the gate reads raw samples too, for JobStalled, and fails with them, so every rule runs.)"""
    b = base_ms()
    failing = lambda k: [gpu(0, "n1", tenant="acme", job="j1", error="GPU is lost", xids=[79])]  # noqa: E731
    insert_reports(ch_store, minute_reports("n1", b, range(1, 4), failing), b)
    rules = load_rules()
    ev = Evaluator(alerts_cfg, ch_store, rules=RuleSet(tuple(r for r in rules.rules if r.name == "GpuFailing"),
                                                          rules.source))
    assert [(r.alertname, r.state) for r in ev.evaluate_once(b + 3 * MIN).fired] == [("GpuFailing", "firing")]
    later = b + 3 * MIN + 180 * MIN  # the failing samples are 3 h old: no hour the gate reads holds them
    assert ev._quiet_rules(later) == {0}

    def gpu_failing(report):
        open_ = [r.state for r in ev.open_alerts() if r.alertname == "GpuFailing"]
        return open_, [e for e in report.errors if e.startswith("rule GpuFailing:")]

    ch_store.command("RENAME TABLE {db:Identifier}.gpu_samples TO {db:Identifier}.gpu_samples_away")
    open_, errors = gpu_failing(ev.evaluate_once(later))
    assert open_ == ["firing"]  # its own query failed: kept, not resolved
    assert len(errors) == 1
    ch_store.command("RENAME TABLE {db:Identifier}.gpu_samples_away TO {db:Identifier}.gpu_samples")
    report = ev.evaluate_once(later + MIN)
    assert gpu_failing(report) == ([], [])
    assert [(r.alertname, r.labels["gpu_index"]) for r in report.resolved] == [("GpuFailing", "0")]
    ch_store.command("RENAME TABLE {db:Identifier}.gpu_samples TO {db:Identifier}.gpu_samples_away")
    assert gpu_failing(ev.evaluate_once(later + 2 * MIN)) == ([], [])  # nothing open: skipped, not failed


def test_gpu_failing_candidates_are_the_gpus_with_a_failing_sample_ending_in_the_window(ch_store) -> None:
    """GpuFailing reads raw samples only of the GPUs whose rollup rows have failing time and a newest sample
    ending in its window: not a GPU that failed earlier in the hour the rollup is read over, but a GPU whose
    one failing sample covers 30 minutes (filed under the minute it began, long before the window)."""
    b = base_ms()
    lost = {"error": "GPU is lost", "xids": [79]}
    earlier = minute_reports("n1", b, range(1, 21), lambda k: [gpu(0, "n1", **(lost if k <= 3 else {}))])
    long = report(node="n2", seq=1, time_ms=b + 20 * MIN, interval_ms=30 * MIN, gpus=[gpu(0, "n2", **lost)])
    insert_reports(ch_store, [*earlier, long], b)
    now = b + 20 * MIN
    (rule,) = [r for r in load_rules().rules if r.name == "GpuFailing"]
    cond, params, from_ms = gpu_candidates(rule, now)
    picked = ch_store.rows(
        "SELECT cluster, node, gpu_index FROM {db:Identifier}.gpu_health_1m "
        "WHERE minute >= toDateTime(intDiv({first_ms:Int64}, 60000) * 60, 'UTC') "
        f"GROUP BY cluster, node, gpu_index HAVING {cond} ORDER BY node", {**params, "first_ms": from_ms})
    assert picked == [("c1", "n2", 0)]  # n1's GPU 0 failed 17 minutes before the window: not read
    q = build(rule, now)
    rows = list(ch_store.query(q.sql, q.parameters).named_results())
    assert [(r["node"], r["gpu_index"], r["first_true_ms"], r["last_ms"]) for r in rows] == [
        ("n2", 0, b - 10 * MIN, b + 20 * MIN)]
