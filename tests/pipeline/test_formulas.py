"""The shared formulas: MFU and "sustained for D" are one definition wherever they are computed.

MFU is computed in four places: `pipeline/queries/mfu.py` (status, the MFU commands), the
`usage_hourly` view (billing), the boards and the Grafana MFU rule. The view comes from a migration
(the newest that defines it, 0032), which cannot change once applied, so it is held to `formulas` by
its text and by its numbers.
"""

from __future__ import annotations

import re

import pytest

from gpufleet.dashboards import alerting
from gpufleet.dashboards import fragments as f
from gpufleet.gpu_facts import peak_flops
from gpufleet.pipeline.alerts.queries import build
from gpufleet.pipeline.alerts.rules import GpuIdleAllocated, MfuBelowTarget
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries import formulas
from gpufleet.pipeline.queries.mfu import _QUERIES, mfu_by_scope
from gpufleet.pipeline.queries.usage import usage_rows
from gpufleet.pipeline.queries.window import Window
from gpufleet.pipeline.store.migrate import available
from tests.builders import H100, gpu, report

H = 1_794_999_600_000  # 2026-11-18T11:00:00Z, a whole hour
MYSTERY = "Mystery X1"  # no peak FLOP/s known: no MFU


def _usage_view_sql() -> str:
    """The `usage_hourly` the store runs: the newest migration that defines it."""
    defines = re.compile(r"CREATE (?:OR REPLACE )?VIEW (?:IF NOT EXISTS )?\$\{db\}\.usage_hourly")
    for m in reversed(available()):
        found = defines.search(m.sql)
        if found:
            return m.sql[found.start():]
    raise AssertionError("no migration defines usage_hourly")


def test_the_usage_view_spells_the_shared_mfu() -> None:
    view = _usage_view_sql()
    # 0032 sums the hour rollup's rows (sign 1) less the outranked claims' minute rows (sign -1)
    # per GPU, then per tenant and model: the same sums as `formulas`, signed.
    assert ("sum(r.sign * r.measured_flop) + sum(r.sign * r.estimated_unmeasured_flop) AS achieved_flop"
            in view)
    assert "sum(r.sign * r.peak_capacity_flop) AS peak_flop" in view
    assert "sum(g.achieved_flop) AS achieved_flop" in view
    assert "sum(g.peak_flop) AS peak_flop" in view
    assert f"{formulas.ratio('u.achieved_flop', 'u.peak_flop')} AS mfu" in view


def test_queries_boards_and_grafana_use_the_shared_mfu() -> None:
    assert f.MFU == formulas.MFU
    assert all(formulas.MFU in by_key for by_key, _ in _QUERIES.values())
    rule = MfuBelowTarget(name="m", severity="info", annotations={"summary": "s"})
    assert formulas.MFU in alerting.query_for(rule).sql


def test_the_evaluator_and_grafana_use_the_shared_sustained() -> None:
    rule = GpuIdleAllocated(name="idle", severity="warning", annotations={"summary": "s"}, for_="15m")
    evaluator = build(rule, now_ms=H).sql
    grafana = alerting.query_for(rule).sql
    assert formulas.sustained("{sustained_since_ms:Int64}", "{sustained_cover_ms:Float64}") in evaluator
    normalized = re.sub(r"\s+", " ", grafana)
    since = f"toUnixTimestamp64Milli($__toTime_ms) - {15 * 60_000}"
    assert re.sub(r"\s+", " ", formulas.sustained(since, f"0.9 * {15 * 60_000}")) in normalized


def test_mfu_is_the_same_number_in_the_view_the_mfu_query_and_the_boards(ch_store) -> None:
    # acme: GPU 0 job-measured at 0.5 x peak, GPU 1 estimated at 0.25 x peak (tensor activity), 10 s each:
    # 7.5 peak-seconds achieved of 20 -> 0.375, exactly. beta: an unknown model only -> no MFU (NULL).
    peak = peak_flops(H100)
    assert peak is not None
    reports = [
        report(seq=i, time_ms=H + (i + 1) * 1000, gpus=[
            gpu(0, tenant="acme", job="j", flops_measured=0.5 * peak),
            gpu(1, tenant="acme", job="j", tensor_active_ratio=0.25),
            gpu(2, tenant="beta", job="k", model=MYSTERY),
        ])
        for i in range(10)
    ]
    insert_reports(ch_store, reports, ingest_ms=H + 20_000)
    want = {"acme": 0.375, "beta": None}

    view = {r["tenant"]: r["mfu"] for r in usage_rows(ch_store)}
    query = {r.key: r.mfu for r in mfu_by_scope(ch_store, "tenant", Window.covering(H, H + 60_000)).rows}
    boards = dict(ch_store.rows(
        f"SELECT tenant, {f.MFU} FROM {{db:Identifier}}.gpu_usage_1m WHERE tenant != '' GROUP BY tenant"))
    assert view == query == boards == want


@pytest.mark.parametrize(("achieved", "peak", "want"), [(3.0, 4.0, 0.75), (0.0, 4.0, 0.0), (5.0, 0.0, None)])
def test_ratio_is_null_without_a_positive_denominator(ch_store, achieved: float, peak: float,
                                                      want: float | None) -> None:
    sql = f"SELECT {formulas.ratio('{a:Float64}', '{p:Float64}')}"
    assert ch_store.rows(sql, {"a": achieved, "p": peak}) == [(want,)]


# Per series: readings in time order (None: no reading), the increase counted by hand (a drop counts the
# new value) and so whether it rose. The rows go in reversed, so that the order read is not time order.
_COUNTER_SERIES = [
    ([5, 5, 5], 0), ([5, 5, 0, 0], 0), ([5, 0, 3], 3), ([5, 2], 2), ([1, 2], 1), ([None, None], 0),
    ([None, 4, None, 4], 0), ([7], 0), ([0, 0, 5], 5), ([3, None, 0, None, 0], 0), ([0, 3, 3], 3),
    ([2, 0, 2, 0], 2),
]


def test_rose_is_increase_above_zero(ch_client) -> None:
    rows = ", ".join(f"({g}, {t}, {'NULL' if v is None else v})"
                     for g, (values, _) in enumerate(_COUNTER_SERIES) for t, v in reversed(list(enumerate(values))))
    sql = (f"SELECT g, {formulas.increase('v')} AS inc, {formulas.rose('v')} AS rose FROM ("
           "SELECT g, toDateTime64(t, 3, 'UTC') AS time, v "
           f"FROM values('g UInt8, t UInt32, v Nullable(UInt64)', {rows})) GROUP BY g ORDER BY g")
    got = [(int(inc), bool(r)) for _, inc, r in ch_client.query(sql).result_rows]
    assert got == [(inc, inc > 0) for _, inc in _COUNTER_SERIES]
