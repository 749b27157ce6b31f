"""Usage: the billing policy, query windows, the `usage_hourly` rows and the fleet summary.

`usage_hourly` (migration 0002) is the table billing reads; its columns are documented in
docs/aggregations.md. The SLA policy (`billing.exclude_states`) and the idle threshold
(`billing.idle_util_ratio`) are applied when the rollups are read, from the one-row
`billing_policy` table that `sync_policy` writes from config, so the view, the commands and the
dashboards all apply the same policy and changing it needs no migration.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from gpufleet.config import BillingConfig, Config

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
STATES: Final = ("ok", "degraded", "failing", "unknown")
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

USAGE_COLUMNS: Final = (
    "hour", "tenant", "gpu_model", "gpus", "allocated_gpu_seconds", "unhealthy_gpu_seconds",
    "billable_gpu_seconds", "billable_gpu_hours", "idle_allocated_gpu_hours", "gap_gpu_seconds", "energy_kwh",
    "avg_utilization", "mfu", "mfu_source", "measured_coverage", "unknown_model_gpu_seconds",
)
"""The columns of the `usage_hourly` view, in order (also the keys of `gpufleet usage --format json`)."""


@dataclass(frozen=True)
class Policy:
    """The billing policy the rollups are read with."""

    exclude_states: tuple[str, ...] = ("failing",)
    """GPU-seconds in these health states are not billed (and are `unhealthy` in the waterfall)."""
    idle_util_pct: int = 5
    """An allocated GPU whose utilization, in whole percent, is below this is idle."""

    @classmethod
    def from_config(cls, billing: BillingConfig) -> Policy:
        """`idle_util_ratio` in whole percent, rounded up (NVML reports utilization in whole percents)."""
        return cls(tuple(sorted(set(billing.exclude_states))), math.ceil(round(billing.idle_util_ratio * 100, 6)))


def read_policy(client: Client, db: str) -> Policy:
    """The policy in force (the newest `billing_policy` row)."""
    rows = client.query(
        "SELECT argMax(exclude_states, updated_at), argMax(idle_util_pct, updated_at), count() "
        f"FROM {db}.billing_policy"
    ).result_rows
    excluded, pct, n = rows[0]
    return Policy(tuple(excluded), int(pct)) if n else Policy()


def sync_policy(client: Client, db: str, billing: BillingConfig, now_ms: int) -> Policy:
    """Make the config's policy the one in force; writes only when it differs. Returns it."""
    wanted = Policy.from_config(billing)
    if read_policy(client, db) != wanted:
        client.insert(
            f"{db}.billing_policy", [[0, list(wanted.exclude_states), wanted.idle_util_pct, ms_datetime(now_ms)]],
            column_names=["key", "exclude_states", "idle_util_pct", "updated_at"],
        )
    return wanted


@dataclass(frozen=True)
class Window:
    """A half-open time window `[start_ms, end_ms)` on whole minutes (the rollups' resolution)."""

    start_ms: int
    end_ms: int

    @classmethod
    def covering(cls, from_ms: int, to_ms: int) -> Window:
        """The smallest whole-minute window containing `[from_ms, to_ms)`."""
        if to_ms <= from_ms:
            raise ValueError(f"empty window: to ({to_ms}) must be after from ({from_ms})")
        return cls(from_ms // MINUTE_MS * MINUTE_MS, -(-to_ms // MINUTE_MS) * MINUTE_MS)

    @property
    def length_ms(self) -> int:
        return self.end_ms - self.start_ms

    def sql(self, column: str = "minute") -> str:
        """A filter on a rollup's time column; bind `params()` with it."""
        return (f"{column} >= toDateTime(intDiv({{w_start:Int64}}, 1000), 'UTC') "
                f"AND {column} < toDateTime(intDiv({{w_end:Int64}}, 1000), 'UTC')")

    def params(self) -> dict[str, int]:
        return {"w_start": self.start_ms, "w_end": self.end_ms}


def idle_ms_sql(pct_param: str = "idle_pct") -> str:
    """Idle milliseconds of a rollup row: allocated with no process, or below the idle utilization."""
    return (f"(held_no_process_ms + arraySum(mapValues(mapFilter((k, v) -> k < {{{pct_param}:UInt8}}, "
            "active_ms_by_util_pct))))")


def ms_datetime(ms: int) -> dt.datetime:
    """Unix milliseconds as an exact UTC datetime (for DateTime64(3) columns)."""
    return _EPOCH + dt.timedelta(milliseconds=ms)


def iso(ts: dt.datetime | int) -> str:
    """UTC ISO-8601 with a `Z`, from a datetime or Unix milliseconds."""
    if isinstance(ts, int):
        ts = ms_datetime(ts)
    elif ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


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


def fleet_summary(
    client: Client, db: str, now_ms: int, window_s: float | None, cfg: Config | None = None
) -> dict[str, Any]:
    """MFU, billable GPU-hours and health for `gpufleet status --json`, over the minutes covering
    `[now - window_s, now)` (all time when `window_s` is None); health is as of `now_ms`."""
    from pipeline import fleet_health, mfu

    cfg = cfg or Config()
    window = Window.covering(int(now_ms - window_s * 1000), now_ms) if window_s else None
    policy = read_policy(client, db)
    fleet = mfu.mfu_by_scope(client, db, "fleet", window)
    allocated = mfu.mfu_by_scope(client, db, "fleet_allocated", window)
    tenants = mfu.mfu_by_scope(client, db, "tenant", window)
    billable = billable_by_tenant(client, db, window, policy)
    health = fleet_health.current_health(client, db, now_ms, cfg.health.silent_after_s)
    f = fleet.rows[0] if fleet.rows else None
    a = allocated.rows[0] if allocated.rows else None
    return {
        "fleet_mfu": f.mfu if f else None,
        "fleet_mfu_allocated": a.mfu if a else None,
        "mfu_source": f.source if f else "none",
        "mfu_measured_coverage": a.measured_coverage if a else None,  # share of *allocated* GPU-seconds
        "mfu": {r.key: r.mfu for r in tenants.rows},
        "billable_gpu_hours": sum(billable.values()),
        "billable_gpu_hours_by_tenant": billable,
        "unknown_models": fleet.unknown_models,
        "health": health.by_state,
        "health_by_reason": health.by_reason,
        "aggregation_window": {"from": iso(window.start_ms), "to": iso(window.end_ms)} if window else None,
        "billing_policy": {"exclude_states": list(policy.exclude_states), "idle_util_pct": policy.idle_util_pct},
    }
