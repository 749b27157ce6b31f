"""`equal_to_raw`: gpufleet's answers against the same answers computed from raw `gpu_samples`.

Compared: the questions of bench/questions.py as their panels (or bench queries) answer them,
`gpufleet usage` (`usage_rows`, every column) and MFU per tenant (`mfu_by_scope`), against
hand-written SQL that reads no rollup. Floats equal to 1e-9 relative, the rest exactly. The
generated history has one stream per GPU and no interval energy, so each sample claims its whole
interval and its energy is round(power_w x interval_ms) mJ: the references use those (overlapping
streams would need the claims rules of docs/aggregations.md too).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from typing import Any

from bench.panels import SETTINGS, Panel
from bench.questions import RAW, Question

REL_TOL = 1e-9


def same(a: Any, b: Any) -> bool:
    """Equal, floats to `REL_TOL` (NaN equals NaN), recursively through rows."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _sorted(rows: list[Any]) -> list[Any]:
    return sorted(rows, key=lambda r: json.dumps(r, default=str))


def _first_difference(ours: list[Any], raw: list[Any]) -> str | None:
    if not raw:
        return "no rows from raw samples: nothing was compared"
    if len(ours) != len(raw):
        return f"{len(ours)} rows, raw {len(raw)}"
    for a, b in zip(ours, raw, strict=True):
        if not same(a, b):
            return f"{a!r} != raw {b!r}"[:400]
    return None


def _verdict(name: str, range_ms: int, ours: list[Any], raw: list[Any], raw_s: float) -> dict[str, Any]:
    ours, raw = _sorted(ours), _sorted(raw)
    diff = _first_difference(ours, raw)
    out = {"question": name, "range_h": round(range_ms / 3_600_000, 2), "rows": len(ours), "equal": diff is None,
           "raw_seconds": round(raw_s, 2)}
    if diff:
        out["difference"] = diff
    return out


def _rows(client: Any, sql: str, parameters: dict[str, Any] | None = None) -> tuple[list[Any], float]:
    t = time.perf_counter()
    rows = client.query(sql, parameters=parameters or {}, settings=SETTINGS).result_rows
    return [tuple(r) for r in rows], time.perf_counter() - t


def question_sql(q: Question, panels: list[Panel], from_ms: int, to_ms: int) -> tuple[str, str | None]:
    """gpufleet's SQL for `q` over the range (the panel's, found among `panels`), and its min interval."""
    from bench.questions import MIN_INTERVAL
    from gpufleet.dashboards.macros import render
    from gpufleet.dashboards.queries import panel_range

    if q.panel is None:
        assert q.sql is not None
        return render(q.sql, {}, panel_range(from_ms, to_ms, MIN_INTERVAL)), MIN_INTERVAL
    for p in panels:
        if (p.board, p.title) == q.panel and p.range_ms == to_ms - from_ms:
            return p.sql, p.min_interval
    titles = sorted({f"{p.board}/{p.title}" for p in panels})
    raise LookupError(f"no panel {q.panel[0]}/{q.panel[1]} answers {q.name!r} any more; update bench/questions.py "
                      f"(panels now: {titles})")


def compare_question(client: Any, q: Question, panels: list[Panel], from_ms: int, to_ms: int) -> dict[str, Any]:
    from gpufleet.dashboards.macros import render
    from gpufleet.dashboards.queries import panel_range

    sql, interval = question_sql(q, panels, from_ms, to_ms)
    ours, _ = _rows(client, sql)
    raw, raw_s = _rows(client, render(q.raw_sql, {}, panel_range(from_ms, to_ms, interval)))
    return _verdict(q.name, to_ms - from_ms, ours, raw, raw_s)


# --- gpufleet usage, from raw samples -----------------------------------------------------------

_MFU_IN = ("peak_flops IS NOT NULL AND (flops_measured IS NOT NULL OR flops_estimated IS NOT NULL "
           "OR error != '')")
_PER_GPU = f"""
    SELECT toStartOfHour(minute) AS hour, cluster, node, gpu_uuid, tenant, model,
        sum(toUInt64(interval_ms)) AS allocated_ms,
        sumIf(toUInt64(interval_ms), has({{excluded:Array(String)}}, toString(health))) AS unhealthy_ms,
        sumIf(toUInt64(interval_ms), NOT has({{excluded:Array(String)}}, toString(health)) AND tenant != ''
              AND (ifNull(compute_processes = 0, 0) OR (util_gpu_ratio IS NOT NULL
                   AND toUInt8(least(floor(ifNull(util_gpu_ratio, 0) * 100 + 0.0001), 100)) < {{idle_pct:UInt8}})))
            AS idle_ms,
        sum(toUInt64(round(ifNull(power_w, 0) * interval_ms))) AS energy_mj,
        sumIf(toUInt64(interval_ms), util_gpu_ratio IS NOT NULL) AS util_ms,
        sum(toFloat64(ifNull(util_gpu_ratio, 0)) * interval_ms) AS util_weighted_ms,
        sumIf(toUInt64(interval_ms), peak_flops IS NOT NULL) AS peak_known_ms,
        sumIf(toUInt64(interval_ms), {_MFU_IN}) AS mfu_ms,
        sumIf(toUInt64(interval_ms), peak_flops IS NOT NULL AND flops_measured IS NOT NULL) AS measured_ms,
        sumIf(ifNull(flops_measured, 0), peak_flops IS NOT NULL)
            + sumIf(ifNull(flops_estimated, 0), peak_flops IS NOT NULL AND flops_measured IS NULL) AS achieved_flop,
        sumIf(ifNull(peak_flops, 0) * interval_ms / 1000, {_MFU_IN}) AS peak_flop
    FROM {RAW}
    GROUP BY hour, cluster, node, gpu_uuid, tenant, model"""

RAW_USAGE = f"""
WITH
    per_gpu AS ({_PER_GPU}),
    span AS (SELECT min(toUnixTimestamp64Milli(time) - interval_ms) AS s, max(toUnixTimestamp64Milli(time)) AS e
             FROM gpu_samples),
    gaps AS (
        SELECT g.hour AS hour, g.top.1 AS tenant, g.top.2 AS model,
               sum(greatest(least(toInt64(toUnixTimestamp(g.hour)) * 1000 + 3600000, span.e)
                            - greatest(toInt64(toUnixTimestamp(g.hour)) * 1000, span.s)
                            - toInt64(g.total_ms), 0)) AS gap_ms
        FROM (SELECT hour, cluster, node, gpu_uuid, sum(allocated_ms) AS total_ms,
                     argMax((tenant, model), (allocated_ms, tenant)) AS top
              FROM per_gpu GROUP BY hour, cluster, node, gpu_uuid) AS g CROSS JOIN span
        GROUP BY hour, tenant, model),
    usage AS (
        SELECT hour, tenant, model, uniqExact(cluster, node, gpu_uuid) AS gpus,
               sum(allocated_ms) AS allocated_ms, sum(unhealthy_ms) AS unhealthy_ms, sum(idle_ms) AS idle_ms,
               sum(energy_mj) AS energy_mj, sum(util_ms) AS util_ms, sum(util_weighted_ms) AS util_weighted_ms,
               sum(peak_known_ms) AS peak_known_ms, sum(mfu_ms) AS mfu_ms, sum(measured_ms) AS measured_ms,
               sum(achieved_flop) AS achieved_flop, sum(peak_flop) AS peak_flop
        FROM per_gpu WHERE tenant != '' GROUP BY hour, tenant, model)
SELECT u.hour, u.tenant, u.model, u.gpus,
    u.allocated_ms / 1000, u.unhealthy_ms / 1000, (u.allocated_ms - u.unhealthy_ms) / 1000,
    (u.allocated_ms - u.unhealthy_ms) / 3600000, u.idle_ms / 3600000, gp.gap_ms / 1000, u.energy_mj / 3600000000,
    if(u.util_ms > 0, u.util_weighted_ms / u.util_ms, NULL), if(u.peak_flop > 0, u.achieved_flop / u.peak_flop, NULL),
    multiIf(u.mfu_ms = 0, '', u.measured_ms = u.mfu_ms, 'measured', u.measured_ms = 0, 'estimated', 'mixed'),
    if(u.mfu_ms > 0, u.measured_ms / u.mfu_ms, NULL), (u.allocated_ms - u.peak_known_ms) / 1000
FROM usage AS u LEFT JOIN gaps AS gp ON gp.hour = u.hour AND gp.tenant = u.tenant AND gp.model = u.model
WHERE u.hour >= toDateTime(intDiv({{from_ms:Int64}}, 3600000) * 3600, 'UTC')
  AND u.hour < toDateTime(intDiv({{to_ms:Int64}}, 1000), 'UTC')"""


def _cell(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        from gpufleet.pipeline.queries.window import iso

        return iso(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def compare_usage(store: Any, from_ms: int, to_ms: int, name: str) -> dict[str, Any]:
    """`gpufleet usage` rows against the same rows from raw samples (the policy in force applied). The
    store's client reads unqualified table names in its database (as the Grafana datasource does)."""
    from gpufleet.pipeline.queries.policy import read_policy
    from gpufleet.pipeline.queries.usage import USAGE_COLUMNS, usage_rows

    ours = [tuple(r[c] for c in USAGE_COLUMNS) for r in usage_rows(store, from_ms, to_ms)]
    policy = read_policy(store)
    raw, raw_s = _rows(store.client, RAW_USAGE, {"excluded": list(policy.exclude_states),
                                           "idle_pct": policy.idle_util_pct, "from_ms": from_ms, "to_ms": to_ms})
    return _verdict(name, to_ms - from_ms, ours, [tuple(_cell(v) for v in r) for r in raw], raw_s)


RAW_MFU = f"""
SELECT tenant, if(peak > 0, achieved / peak, NULL), mfu_ms / 1000
FROM (
    SELECT tenant,
        sumIf(ifNull(flops_measured, 0), peak_flops IS NOT NULL)
            + sumIf(ifNull(flops_estimated, 0), peak_flops IS NOT NULL AND flops_measured IS NULL) AS achieved,
        sumIf(ifNull(peak_flops, 0) * interval_ms / 1000, {_MFU_IN}) AS peak,
        sumIf(toUInt64(interval_ms), {_MFU_IN}) AS mfu_ms
    FROM {RAW}
    WHERE tenant != '' AND minute >= toDateTime(intDiv({{from_ms:Int64}}, 1000), 'UTC')
        AND minute < toDateTime(intDiv({{to_ms:Int64}}, 1000), 'UTC')
    GROUP BY tenant)"""


def compare_mfu(store: Any, from_ms: int, to_ms: int) -> dict[str, Any]:
    """MFU per tenant (`mfu_by_scope`) against the same from raw samples, over the whole minutes of the range."""
    from gpufleet.pipeline.queries.mfu import mfu_by_scope
    from gpufleet.pipeline.queries.window import Window

    window = Window.covering(from_ms, to_ms)
    ours = [(r.key, r.mfu, r.gpu_seconds) for r in mfu_by_scope(store, "tenant", window).rows]
    raw, raw_s = _rows(store.client, RAW_MFU, {"from_ms": window.start_ms, "to_ms": window.end_ms})
    return _verdict("MFU per tenant", to_ms - from_ms, ours, [tuple(_cell(v) for v in r) for r in raw], raw_s)
