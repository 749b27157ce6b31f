"""The fleet summary behind `gpufleet status --json`, the demo's live view and its status API.

Everything is computed from ClickHouse, so the same answer comes from the running pipeline (over
its HTTP status API, since chDB lets one process own a store) and from the store after it stopped.
"Reporting" is relative to the newest sample in the store, not the wall clock, so a summary read
after the demo stopped still describes the fleet as it was. MFU and tenants come from the fleet
rollup, health from `gpu_latest`; reporting GPUs from the last `health.silent_after_s` of samples.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING, Any, Final

from gpufleet.config import Config
from gpufleet.pipeline.alerts.state import firing_alerts
from gpufleet.pipeline.queries import fleet_health, mfu
from gpufleet.pipeline.queries.policy import read_policy
from gpufleet.pipeline.queries.usage import billable_by_tenant
from gpufleet.pipeline.queries.window import Window, iso

SUMMARY_WINDOW_S = 24 * 3600
"""MFU and billable hours in the status document cover the last 24 h of data."""

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

_NEWEST: Final = "SELECT toUnixTimestamp64Milli(max(time)), count() FROM {db:Identifier}.gpu_samples"
_REPORTING: Final = (
    "SELECT uniqExact(gpu_uuid), uniqExact(cluster, node) FROM {db:Identifier}.gpu_samples "
    "WHERE time >= fromUnixTimestamp64Milli({since:Int64})"
)
_TENANTS: Final = "SELECT DISTINCT tenant FROM {db:Identifier}.fleet_usage_1h WHERE tenant != '' ORDER BY tenant"
"""Tenants with usage stored, from the fleet rollup (a few rows per hour: never a raw-sample scan)."""
_DEAD_LETTERS: Final = "SELECT count() FROM {db:Identifier}.dead_letters FINAL"
_LAG: Final = (
    "SELECT quantileExact(0.5)(d), quantileExact(0.99)(d) FROM (SELECT "
    "toUnixTimestamp64Milli(ingest_time) - toUnixTimestamp64Milli(time) AS d FROM {db:Identifier}.agent_reports "
    "WHERE time >= fromUnixTimestamp64Milli({since:Int64}))"
)


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat().replace("+00:00", "Z")


def basic_summary(store: Store, window_s: float) -> dict[str, Any]:
    """Reporting GPUs and nodes (within `window_s` of the newest sample), totals, tenants, DLQ."""
    last_ms, total = store.rows(_NEWEST)[0]
    if not total:
        last_ms = 0
    gpus, nodes = store.rows(_REPORTING, {"since": int(last_ms - window_s * 1000)})[0]
    tenants = [r[0] for r in store.rows(_TENANTS)]
    dlq = store.rows(_DEAD_LETTERS)[0][0]
    lag = store.rows(_LAG, {"since": int(last_ms - 60_000)})[0]
    return {
        "gpus_reporting": int(gpus) if total else 0,
        "nodes_reporting": int(nodes) if total else 0,
        "samples_total": int(total),
        "tenants": tenants,
        "dlq_total": int(dlq),
        "last_sample_at": _iso(int(last_ms) if total else None),
        "ingest_lag_ms": {"p50": _num(lag[0]), "p99": _num(lag[1])} if total else None,
    }


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return round(f, 1) if math.isfinite(f) else None


def fleet_status(store: Store, cfg: Config) -> dict[str, Any]:
    """The full `gpufleet status --json` document."""
    out = basic_summary(store, cfg.health.silent_after_s)
    if out["samples_total"]:
        now_ms = int(store.rows(_NEWEST)[0][0])
        out.update(fleet_summary(store, now_ms, SUMMARY_WINDOW_S, cfg))
    out["alerts_firing"] = firing_alerts(store)
    return out


def fleet_summary(store: Store, now_ms: int, window_s: float | None, cfg: Config | None = None) -> dict[str, Any]:
    """MFU, billable GPU-hours and health for `gpufleet status --json`, over the minutes covering
    `[now - window_s, now)` (all time when `window_s` is None); health is as of `now_ms`."""
    cfg = cfg or Config()
    window = Window.covering(int(now_ms - window_s * 1000), now_ms) if window_s else None
    policy = read_policy(store)
    fleet = mfu.mfu_by_scope(store, "fleet", window)
    allocated = mfu.mfu_by_scope(store, "fleet_allocated", window)
    tenants = mfu.mfu_by_scope(store, "tenant", window)
    billable = billable_by_tenant(store, window, policy)
    health = fleet_health.current_health(store, now_ms, cfg.health.silent_after_s)
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
