"""Billable usage: the `usage_hourly` rows billing reads, and billable GPU-hours per tenant.

`usage_hourly` (migration 0002) is the table billing reads; its columns are documented in
docs/aggregations.md. The billing policy it applies is `policy.py`'s.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

from gpufleet.pipeline.queries.policy import Policy
from gpufleet.pipeline.queries.window import HOUR_MS, Window, iso

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client


USAGE_COLUMNS: Final = (
    "hour", "tenant", "gpu_model", "gpus", "allocated_gpu_seconds", "unhealthy_gpu_seconds",
    "billable_gpu_seconds", "billable_gpu_hours", "idle_allocated_gpu_hours", "gap_gpu_seconds", "energy_kwh",
    "avg_utilization", "mfu", "mfu_source", "measured_coverage", "unknown_model_gpu_seconds",
)
"""The columns of the `usage_hourly` view, in order (also the keys of `gpufleet usage --format json`)."""


def usage_rows(
    client: Client, db: str, from_ms: int | None = None, to_ms: int | None = None, tenant: str | None = None
) -> list[dict[str, Any]]:
    """`usage_hourly` rows for hours starting in `[from_ms, to_ms)` (from rounded down to the hour), one
    dict per row keyed by the view's columns, `hour` as UTC ISO text, NULLs as None."""
    where, params = ["1"], {}
    if from_ms is not None:
        where.append("hour >= toDateTime(intDiv({from_ms:Int64}, 3600000) * 3600, 'UTC')")
        params["from_ms"] = from_ms
    if to_ms is not None:
        where.append("hour < toDateTime(intDiv({to_ms:Int64}, 1000), 'UTC')")
        params["to_ms"] = to_ms
    if tenant is not None:
        where.append("tenant = {tenant:String}")
        params["tenant"] = tenant
    result = client.query(
        f"SELECT {', '.join(USAGE_COLUMNS)} FROM {db}.usage_hourly WHERE {' AND '.join(where)} "
        "ORDER BY hour, tenant, gpu_model",
        parameters=params,
    )
    return [_clean(dict(zip(USAGE_COLUMNS, row, strict=True))) for row in result.result_rows]


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    row["hour"] = iso(row["hour"])
    for key, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            row[key] = None
    return row


def billable_by_tenant(client: Client, db: str, window: Window | None, policy: Policy) -> dict[str, float]:
    """Billable GPU-hours per tenant in a minute window (None: all time), from the minute rollup."""
    where = window.sql() if window else "1"
    rows = client.query(
        f"SELECT tenant, sumIf(reported_ms, NOT has({{excl:Array(String)}}, toString(health))) "
        f"FROM {db}.gpu_usage_1m WHERE tenant != '' AND {where} GROUP BY tenant ORDER BY tenant",
        parameters={"excl": list(policy.exclude_states), **(window.params() if window else {})},
    ).result_rows
    return {t: int(ms) / HOUR_MS for t, ms in rows}
