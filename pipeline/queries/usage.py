"""Billable usage: the `usage_hourly` rows billing reads, and billable GPU-hours per tenant.

`usage_hourly` (migration 0002) is the table billing reads; its columns are documented in
docs/aggregations.md. The billing policy it applies is `policy.py`'s.
"""

from __future__ import annotations

import math
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
_FILTERS: Final = {
    # argument -> its condition on the view (the value is bound as the parameter of the same name)
    "from_ms": "hour >= toDateTime(intDiv({from_ms:Int64}, 3600000) * 3600, 'UTC')",
    "to_ms": "hour < toDateTime(intDiv({to_ms:Int64}, 1000), 'UTC')",
    "tenant": "tenant = {tenant:String}",
}
_BILLABLE: Final = {
    # windowed? -> billable milliseconds per tenant (bind `excl`, and the window's parameters)
    windowed: "SELECT tenant, sumIf(claimed_ms, NOT has({excl:Array(String)}, toString(health)) "
              f"AND {not_outranked(WINDOW if windowed else ALL_TIME)}) "
              f"FROM {{db:Identifier}}.gpu_usage_1m WHERE tenant != '' AND {WINDOW if windowed else ALL_TIME} "
              "GROUP BY tenant ORDER BY tenant"
    for windowed in (False, True)
}


def usage_rows(
    store: Store, from_ms: int | None = None, to_ms: int | None = None, tenant: str | None = None
) -> list[dict[str, Any]]:
    """`usage_hourly` rows for hours starting in `[from_ms, to_ms)` (from rounded down to the hour), one
    dict per row keyed by the view's columns, `hour` as UTC ISO text, NULLs as None."""
    given = {"from_ms": from_ms, "to_ms": to_ms, "tenant": tenant}
    params = {name: value for name, value in given.items() if value is not None}
    where = " AND ".join(["1", *(_FILTERS[name] for name in params)])
    result = store.query(
        f"SELECT {_SELECT} FROM {{db:Identifier}}.usage_hourly WHERE {where} ORDER BY hour, tenant, gpu_model",
        params,
    )
    return [_clean(dict(zip(USAGE_COLUMNS, row, strict=True))) for row in result.result_rows]


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    row["hour"] = iso(row["hour"])
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            row[key] = None
    return row


def billable_by_tenant(store: Store, window: Window | None, policy: Policy) -> dict[str, float]:
    """Billable GPU-hours per tenant in a minute window (None: all time), from the minute rollup: claimed
    time in a billed health state, less the claims another node outranked (`claims.not_outranked`)."""
    rows = store.rows(_BILLABLE[window is not None],
                      {"excl": list(policy.exclude_states), **(window.params() if window else {})})
    return {t: int(ms) / HOUR_MS for t, ms in rows}
