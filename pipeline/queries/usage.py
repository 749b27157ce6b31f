"""Billable usage: the stored `usage_hourly` rows billing reads, their refresh, and billable GPU-hours per tenant.

`usage_hourly_stored` (migration 0090) holds `usage_hourly`'s rows per hour, tenant and GPU model; `refresh`
recomputes the hours whose inputs changed (the ingester after each batch, every reader before it reads),
so readers read O(tenants x models x hours) rows. Columns and design: docs/aggregations.md ("Stored usage").
The billing policy applied is `policy.py`'s.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Final

from gpufleet.pipeline.queries.claims import not_outranked
from gpufleet.pipeline.queries.policy import Policy
from gpufleet.pipeline.queries.window import ALL_TIME, HOUR_MS, WINDOW, Window, iso

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store


USAGE_COLUMNS: Final = (
    "hour", "tenant", "gpu_model", "gpus", "allocated_gpu_seconds", "unhealthy_gpu_seconds",
    "billable_gpu_seconds", "billable_gpu_hours", "idle_allocated_gpu_hours", "gap_gpu_seconds", "energy_kwh",
    "avg_utilization", "mfu", "mfu_source", "measured_coverage", "unknown_model_gpu_seconds",
)
"""The columns of the `usage_hourly` view, in order (also the keys of `gpufleet usage --format json`)."""


_SELECT: Final = ", ".join(USAGE_COLUMNS)
_FLOATS: Final = frozenset({
    "allocated_gpu_seconds", "unhealthy_gpu_seconds", "billable_gpu_seconds", "billable_gpu_hours",
    "idle_allocated_gpu_hours", "gap_gpu_seconds", "energy_kwh", "avg_utilization", "mfu", "measured_coverage",
    "unknown_model_gpu_seconds",
})
"""The Float64 columns of `usage_hourly_stored` (migration 0090)."""
_READ: Final = ", ".join(
    "formatDateTime(hour, '%Y-%m-%dT%H:%i:%SZ', 'UTC')" if c == "hour"
    else f"if(isFinite({c}), {c}, NULL)" if c in _FLOATS else c
    for c in USAGE_COLUMNS
)
"""`usage_rows`' columns as it returns them, made by ClickHouse (a month is ~15,000 rows, and doing it per value
in Python cost more than the query): `hour` as `iso` text, a non-finite float as NULL. No aliases: a column's
name in WHERE stays the column."""
_FILTERS: Final = {
    # argument -> its condition on the stored rows (the value is bound as the parameter of the same name)
    "from_ms": "hour >= toDateTime(intDiv({from_ms:Int64}, 3600000) * 3600, 'UTC')",
    "to_ms": "hour < toDateTime(intDiv({to_ms:Int64}, 1000), 'UTC')",
    "tenant": "tenant = {tenant:String}",
}
STORED: Final = "{db:Identifier}.usage_hourly_stored FINAL"
"""The stored rows as readers take them: the newest version of each (hour, tenant, model), deleted ones left out."""

NEAR_HOURS: Final = 2
"""An hour's rows depend on the samples this many hours either side of it: a claim spans at most an hour
(and a minute), so claims starting up to two hours apart can overlap and outrank one another."""
_NEAR: Final = "[" + ", ".join(str(d * 3600) for d in range(-NEAR_HOURS, NEAR_HOURS + 1)) + "]"
_INPUTS: Final = (
    # per hour of the range: its inputs now (samples near it, expected coverage, policy) and as stored
    "WITH (SELECT (argMax(exclude_states, updated_at), argMax(idle_util_pct, updated_at)) "
    "      FROM {db:Identifier}.billing_policy) AS policy, "
    "     (SELECT (min(first_start_ms), max(last_end_ms)) FROM {db:Identifier}.usage_hour_inputs) AS span, "
    "now_inputs AS ("
    " SELECT h, toString((sum(samples), least(toInt64(toUnixTimestamp(h)) * 1000 + 3600000, span.2) "
    "        - greatest(toInt64(toUnixTimestamp(h)) * 1000, span.1), policy.1, policy.2)) AS inputs"
    " FROM (SELECT hour + d AS h, samples FROM {db:Identifier}.usage_hour_inputs ARRAY JOIN " + _NEAR + " AS d"
    f"       WHERE hour >= toDateTime({{lo:Int64}} - {NEAR_HOURS * 3600}, 'UTC') "
    f"AND hour < toDateTime({{hi:Int64}} + {NEAR_HOURS * 3600}, 'UTC'))"
    " WHERE h >= toDateTime({lo:Int64}, 'UTC') AND h < toDateTime({hi:Int64}, 'UTC') GROUP BY h), "
    "stored AS ("
    " SELECT hour AS h, argMax(inputs, version) AS inputs FROM {db:Identifier}.usage_hourly_marks"
    " WHERE hour >= toDateTime({lo:Int64}, 'UTC') AND hour < toDateTime({hi:Int64}, 'UTC') GROUP BY hour) "
    "SELECT toUInt32(h), n.inputs FROM now_inputs AS n FULL OUTER JOIN stored AS s USING (h) "
)
_CHANGED: Final = _INPUTS + "WHERE n.inputs != s.inputs ORDER BY h"
"""The hours whose inputs changed since their rows were stored (or never stored), with their inputs now."""
_CURRENT: Final = _INPUTS + "WHERE n.inputs = s.inputs AND n.inputs != '' ORDER BY h"
"""The hours whose stored rows claim to be current: their mark holds their inputs now."""
BILLED: Final = (
    "gpus", "allocated_gpu_seconds", "unhealthy_gpu_seconds", "billable_gpu_seconds", "billable_gpu_hours",
    "idle_allocated_gpu_hours", "gap_gpu_seconds", "energy_kwh", "unknown_model_gpu_seconds",
)
"""The columns computed from integers until one final division: equal to the last bit wherever computed."""
_BILLED_SELECT: Final = "hour, tenant, gpu_model, " + ", ".join(BILLED)
_NULLABLE: Final = frozenset({"avg_utilization", "mfu", "measured_coverage"})
_TOMBSTONE: Final = ", ".join(
    c if c in ("hour", "tenant", "gpu_model")
    else f"{'NULL' if c in _NULLABLE else repr('') if c == 'mfu_source' else 0} AS {c}"
    for c in USAGE_COLUMNS
)
_VIEW: Final = "$usage_hourly_at"
"""Where `_RECOMPUTE` names the parameterized view: qualified by `Store.table` (a view's call takes no `{db:...}`)."""
_RECOMPUTE: Final = (
    # the hours' rows anew (version: this statement's start, +1 ns), over tombstones of every row they had
    f"INSERT INTO {{db:Identifier}}.usage_hourly_stored ({_SELECT}, version, is_deleted) "
    f"SELECT {_TOMBSTONE}, now64(9, 'UTC'), 1 FROM {STORED} WHERE hour IN {{hours:Array(DateTime('UTC'))}} "
    f"UNION ALL SELECT {_SELECT}, now64(9, 'UTC') + toIntervalNanosecond(1), 0 "
    f"FROM {_VIEW}(hours = {{hours:Array(DateTime('UTC'))}})"
)
_RECOMPUTED: Final = (
    f"SELECT {_BILLED_SELECT} FROM {_VIEW}(hours = {{hours:Array(DateTime('UTC'))}})"
)
_MARK: Final = (
    "INSERT INTO {db:Identifier}.usage_hourly_marks (hour, inputs, version) "
    "SELECT toDateTime(m.1, 'UTC'), m.2, now64(9, 'UTC') "
    "FROM (SELECT arrayJoin(arrayZip({hours:Array(UInt32)}, {inputs:Array(String)})) AS m)"
)
_ALL_HOURS: Final = (7_200_000, 4_102_444_800_000)
"""The range `refresh` covers when given none, and the earliest it reads: 1970-01-01T02:00 (so two hours before
it are a DateTime) to 2100."""
_BILLABLE: Final = {
    # windowed? -> billable milliseconds per tenant (bind `excl`, and the window's parameters)
    windowed: "SELECT tenant, sumIf(claimed_ms, NOT has({excl:Array(String)}, toString(health)) "
              f"AND {not_outranked(WINDOW if windowed else ALL_TIME)}) "
              f"FROM {{db:Identifier}}.gpu_usage_1m WHERE tenant != '' AND {WINDOW if windowed else ALL_TIME} "
              "GROUP BY tenant ORDER BY tenant"
    for windowed in (False, True)
}


def refresh(store: Store, from_ms: int | None = None, to_ms: int | None = None) -> list[int]:
    """Recompute the stored rows of every hour starting in `[from_ms, to_ms)` (from rounded down to the hour;
    None: unbounded) whose inputs changed since they were stored; returns those hours (Unix ms).

    Reads O(hours) rows to find them (`usage_hour_inputs`, the marks), then recomputes only those, from the
    hour rollups.
    The inputs are read before the rows are recomputed, so data arriving in between makes an hour's mark
    older than its rows (recomputed once more later), not newer; the one exception, an insert caught between
    its two hour rollups, is what `stale_hours` finds. Idempotent; safe to run from several processes at
    once (the newest refresh's rows win)."""
    changed = store.rows(_CHANGED, _range(from_ms, to_ms))
    if not changed:
        return []
    hours = [int(h) for h, _ in changed]
    store.command(_RECOMPUTE.replace(_VIEW, store.table("usage_hourly_at")), {"hours": hours})
    store.command(_MARK, {"hours": hours, "inputs": [str(i) for _, i in changed]})
    return [h * 1000 for h in hours]


def _range(from_ms: int | None, to_ms: int | None) -> dict[str, int]:
    """`lo`/`hi` (Unix seconds) of `_INPUTS`: the hours starting in `[from_ms, to_ms)`, from rounded down."""
    return {"lo": max(_ALL_HOURS[0], _ALL_HOURS[0] if from_ms is None else from_ms) // HOUR_MS * 3600,
            "hi": (_ALL_HOURS[1] if to_ms is None else to_ms) // 1000}


def stale_hours(store: Store, from_ms: int | None = None, to_ms: int | None = None) -> dict[int, str]:
    """Hours starting in `[from_ms, to_ms)` whose stored rows claim to be current but differ, in a billed
    column, from `usage_hourly` of the rollups now (hour in Unix ms -> the first difference). Empty unless a
    refresh raced an insert (docs/aggregations.md, "Stored usage"); recomputes the hours to compare, so it
    reads their hour rollup rows. Writes nothing."""
    hours = [int(h) for h, _ in store.rows(_CURRENT, _range(from_ms, to_ms))]
    if not hours:
        return {}
    stored = store.rows(f"SELECT {_BILLED_SELECT} FROM {STORED} WHERE hour IN {{hours:Array(DateTime('UTC'))}}",
                        {"hours": hours})
    now = store.rows(_RECOMPUTED.replace(_VIEW, store.table("usage_hourly_at")), {"hours": hours})
    was = {(iso(r[0]), r[1], r[2]): tuple(r[3:]) for r in stored}
    is_ = {(iso(r[0]), r[1], r[2]): tuple(r[3:]) for r in now}
    out: dict[int, str] = {}
    for key in sorted(set(was) | set(is_)):
        if was.get(key) != is_.get(key):
            ms = int(dt.datetime.fromisoformat(key[0]).timestamp()) * 1000
            out.setdefault(ms, f"{key[1]}/{key[2]}: stored {was.get(key)}, rollups {is_.get(key)} "
                               f"({', '.join(BILLED)})")
    return out


def usage_rows(
    store: Store, from_ms: int | None = None, to_ms: int | None = None, tenant: str | None = None
) -> list[dict[str, Any]]:
    """`usage_hourly` rows for hours starting in `[from_ms, to_ms)` (from rounded down to the hour), one
    dict per row keyed by the view's columns, `hour` as UTC ISO text, NULLs as None: the stored rows,
    after `refresh` of the range."""
    refresh(store, from_ms, to_ms)
    given = {"from_ms": from_ms, "to_ms": to_ms, "tenant": tenant}
    params = {name: value for name, value in given.items() if value is not None}
    where = " AND ".join(["1", *(_FILTERS[name] for name in params)])
    result = store.query(f"SELECT {_READ} FROM {STORED} WHERE {where} ORDER BY hour, tenant, gpu_model", params)
    return [dict(zip(USAGE_COLUMNS, row, strict=True)) for row in result.result_rows]


def billable_by_tenant(store: Store, window: Window | None, policy: Policy) -> dict[str, float]:
    """Billable GPU-hours per tenant in a minute window (None: all time), from the minute rollup: claimed
    time in a billed health state, less the claims another node outranked (`claims.not_outranked`)."""
    rows = store.rows(_BILLABLE[window is not None],
                      {"excl": list(policy.exclude_states), **(window.params() if window else {})})
    return {t: int(ms) / HOUR_MS for t, ms in rows}
