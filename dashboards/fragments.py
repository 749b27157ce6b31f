"""SQL fragments every board shares: variable filters, rollup MFU and policy expressions, thresholds.

Boards read the rollups wherever one exists (pipeline/migrations/0002_usage_rollups.sql):
`gpu_usage_1m` (per minute, tenant, node, GPU, model, job and health state), `usage_hourly` (what
billing reads) and `gpu_latest`; raw `gpu_samples` only for what no rollup keeps (XIDs, ECC and link
counters, temperatures, clock-event bits, one GPU's detail). The SLA policy (excluded health states,
idle threshold) is read from `billing_policy`, the table billing itself reads, so a board's
"billable" or "idle" is billing's. Fixed thresholds come from the pipeline's own defaults
(`gpufleet.config`, `gpufleet.gpu_facts`), so they mean what the health rules mean.
"""

from __future__ import annotations

from typing import Final

from dashboards.builder import JSON, query_variable, sql
from gpufleet.config import BillingConfig, HealthConfig
from gpufleet.gpu_facts import (
    THROTTLE_HW_POWER_BRAKE,
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_SW_POWER_CAP,
    THROTTLE_THERMAL_MASK,
)

HEALTH: Final = HealthConfig()
BILLING: Final = BillingConfig()

MFU_TARGET: Final = 0.5
"""The fleet MFU target the boards draw (the FleetMfuBelowTarget rule's default)."""
SILENT_MS: Final = int(HEALTH.silent_after_s * 1000)
"""A GPU with no report for longer than this is `unknown` (health.silent_after_s)."""

THERMAL_BITS: Final = THROTTLE_THERMAL_MASK
POWER_BRAKE_BITS: Final = THROTTLE_HW_SLOWDOWN | THROTTLE_HW_POWER_BRAKE
POWER_CAP_BITS: Final = THROTTLE_SW_POWER_CAP

HOUR_MS: Final = "3600000"
MINUTE: Final = "1m"
"""Min interval of panels on the minute rollup: `$__interval` never goes below its resolution."""

# --- the rollup (gpu_usage_1m / gpu_usage_1h) ----------------------------------------------------

ACHIEVED: Final = "sum(measured_flop) + sum(estimated_unmeasured_flop)"
"""Achieved FLOPs: what jobs measured where they report, else the hardware estimate."""
MFU: Final = f"({ACHIEVED}) / nullIf(sum(peak_capacity_flop), 0)"
"""MFU as pipeline/mfu.py computes it: achieved / (peak FLOP/s x seconds), known models only."""
MFU_MEASURED: Final = "sum(measured_flop) / nullIf(sum(ifNull(model_peak_flop_s, 0) * measured_ms / 1000), 0)"
"""MFU over the GPU-seconds whose jobs reported FLOPs."""
MFU_ESTIMATED: Final = (
    "sum(estimated_unmeasured_flop)"
    " / nullIf(sum(ifNull(model_peak_flop_s, 0) * (toInt64(mfu_ms) - toInt64(measured_ms)) / 1000), 0)"
)
"""MFU over the GPU-seconds with no measured FLOPs, from the hardware estimate (tensor activity x peak)."""
COVERAGE: Final = "sum(measured_ms) / nullIf(sum(mfu_ms), 0)"
"""Share of GPU-seconds in the MFU whose FLOPs were measured."""

POLICY: Final = sql(
    """
    WITH
        (SELECT argMax(exclude_states, updated_at) FROM billing_policy) AS excluded,
        (SELECT argMax(idle_util_pct, updated_at) FROM billing_policy) AS idle_pct
    """
)
"""The SLA policy in force, as usage_hourly reads it (`excluded` states, `idle_pct`)."""
HEALTHY: Final = "NOT has(excluded, toString(health))"
IDLE_MS: Final = "held_no_process_ms + arraySum(mapValues(mapFilter((k, v) -> k < idle_pct, active_ms_by_util_pct)))"
"""Idle milliseconds of an allocated rollup row: no compute process, or utilization below the policy."""

# --- variable filters ----------------------------------------------------------------------------

SAMPLE_FILTERS: Final = ("cluster", "node", "tenant", "model")
AGENT_FILTERS: Final = ("cluster", "node")
"""`agent_reports` has no tenant or model: per-node panels filter by cluster and node only."""
USAGE_FILTERS: Final = ("tenant", "model")
"""`usage_hourly` and the billing tables are per tenant and GPU model: no cluster or node."""


def condition(variable: str, column: str | None = None) -> str:
    """`column IN (${variable:singlequote})`, or `1=1` when the variable is All or empty."""
    return f"$__conditionalAll({column or variable} IN (${{{variable}:singlequote}}), ${variable})"


def filters(names: tuple[str, ...] = SAMPLE_FILTERS, columns: dict[str, str] | None = None) -> str:
    """The variable filters, each on its own line starting with AND; `columns` renames a column."""
    columns = columns or {}
    return "".join(f"\n    AND {condition(n, columns.get(n))}" for n in names)


def where(time_column: str = "time", names: tuple[str, ...] = SAMPLE_FILTERS,
          columns: dict[str, str] | None = None) -> str:
    """`$__timeFilter(time)` AND the variable filters (a `{part}` for `builder.sql`)."""
    return f"$__timeFilter({time_column})" + filters(names, columns)


def standard_variables(datasource: JSON) -> tuple[JSON, ...]:
    """The variables every board has: datasource, cluster, node, tenant and GPU model.

    Filled from `gpu_latest` (one row per GPU) and `agent_reports` (one row per node and interval),
    never from a scan of raw samples.
    """
    return (
        datasource,
        query_variable(
            "cluster", "Cluster",
            """
            SELECT DISTINCT cluster FROM agent_reports
            WHERE $__timeFilter(time)
            ORDER BY cluster
            """,
        ),
        query_variable(
            "node", "Node",
            """
            SELECT DISTINCT node FROM agent_reports
            WHERE $__timeFilter(time)
                AND $__conditionalAll(cluster IN (${cluster:singlequote}), $cluster)
            ORDER BY node
            """,
        ),
        query_variable(
            "tenant", "Tenant",
            """
            SELECT DISTINCT tenant FROM gpu_usage_1h
            WHERE hour >= toStartOfHour($__fromTime) AND hour <= $__toTime AND tenant != ''
                AND $__conditionalAll(cluster IN (${cluster:singlequote}), $cluster)
            ORDER BY tenant
            """,
            description="Tenants holding GPUs in the time range (hourly rollup); All also includes unallocated GPUs.",
        ),
        query_variable(
            "model", "GPU model",
            """
            SELECT DISTINCT model FROM gpu_latest
            WHERE model != ''
                AND $__conditionalAll(cluster IN (${cluster:singlequote}), $cluster)
            ORDER BY model
            """,
        ),
    )
