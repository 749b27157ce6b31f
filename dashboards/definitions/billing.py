"""Billing board: usage by tenant and period, closed statements, adjustments, and reporting gaps.

Usage comes from `usage_hourly_stored`, the stored `usage_hourly` rows billing reads (one per hour,
tenant and model, kept current by the ingester), and statements and adjustments from the tables
`gpufleet billing close` writes, so the board shows billing's own numbers. Those are per tenant and GPU
model: the cluster and node variables apply only to the per-node gaps table.
"""

from __future__ import annotations

from gpufleet.dashboards import fragments as f
from gpufleet.dashboards.builder import (
    TABLE,
    Board,
    Panel,
    Query,
    datasource_variable,
    rename,
    sql,
)
from gpufleet.dashboards.definitions import links

_USAGE = f.filters(f.USAGE_FILTERS, {"model": "gpu_model"})
_PERIODS = "formatDateTime($__fromTime, '%Y-%m', 'UTC') AND formatDateTime($__toTime, '%Y-%m', 'UTC')"

usage = Panel(
    "Usage by tenant and period",
    "table",
    (Query(
        sql(
            """
            SELECT
                formatDateTime(hour, '%Y-%m', 'UTC') AS period,
                tenant,
                gpu_model,
                sum(allocated_gpu_seconds) / 3600 AS allocated_gpu_hours,
                sum(unhealthy_gpu_seconds) / 3600 AS unhealthy_gpu_hours,
                sum(billable_gpu_hours) AS billable_gpu_hours,
                sum(idle_allocated_gpu_hours) AS idle_gpu_hours,
                sum(gap_gpu_seconds) / 3600 AS unreported_gpu_hours,
                sum(energy_kwh) AS energy_kwh
            FROM usage_hourly_stored FINAL
            WHERE hour >= toStartOfHour($__fromTime) AND hour <= $__toTime{filters}
            GROUP BY period, tenant, gpu_model
            ORDER BY period, tenant, gpu_model
            """,
            filters=_USAGE,
        ),
        ("period", "tenant", "gpu_model", "allocated_gpu_hours", "unhealthy_gpu_hours", "billable_gpu_hours",
         "idle_gpu_hours", "unreported_gpu_hours", "energy_kwh"),
        TABLE,
    ),),
    description=(
        "Hours of the range from the stored usage_hourly rows, per calendar month (UTC). Billable = allocated minus "
        "unhealthy (the SLA policy's excluded states); unreported hours (reporting gaps) are never billed."
    ),
    w=24,
    overrides=(
        rename("allocated_gpu_hours", "allocated GPU-h"),
        rename("unhealthy_gpu_hours", "unhealthy GPU-h"),
        rename("billable_gpu_hours", "billable GPU-h"),
        rename("idle_gpu_hours", "idle allocated GPU-h"),
        rename("unreported_gpu_hours", "unreported GPU-h"),
        rename("energy_kwh", "energy kWh"),
    ),
)

billable = Panel(
    "Billable GPU-hours by tenant",
    "timeseries",
    (Query(
        sql(
            """
            SELECT $__timeInterval(hour) AS t, tenant, sum(billable_gpu_hours) AS billable_gpu_hours
            FROM usage_hourly_stored FINAL
            WHERE hour >= toStartOfHour($__fromTime) AND hour <= $__toTime{filters}
            GROUP BY t, tenant
            ORDER BY t, tenant
            """,
            filters=_USAGE,
        ),
        ("t", "tenant", "billable_gpu_hours"),
    ),),
    description="Billable GPU-hours per tenant and interval (hourly resolution).",
    w=12,
    unit="suffix: GPU-h",
    min_interval="1h",
    defaults={"custom": {"drawStyle": "bars", "fillOpacity": 70, "stacking": {"group": "A", "mode": "normal"}}},
)

unreported = Panel(
    "Unreported GPU-hours by tenant (not billed)",
    "timeseries",
    (Query(
        sql(
            """
            SELECT $__timeInterval(hour) AS t, tenant, sum(gap_gpu_seconds) / 3600 AS unreported_gpu_hours
            FROM usage_hourly_stored FINAL
            WHERE hour >= toStartOfHour($__fromTime) AND hour <= $__toTime{filters}
            GROUP BY t, tenant
            ORDER BY t, tenant
            """,
            filters=_USAGE,
        ),
        ("t", "tenant", "unreported_gpu_hours"),
    ),),
    description=(
        "Reporting gaps as billing counts them: time a GPU did not report within the fleet's reporting "
        "span, charged to the tenant it served most in that hour. Never billed."
    ),
    w=12,
    unit="suffix: GPU-h",
    min_interval="1h",
    defaults={"custom": {"drawStyle": "bars", "fillOpacity": 70}},
)

statements = Panel(
    "Statements",
    "table",
    (Query(
        sql(
            """
            SELECT
                period,
                tenant,
                gpu_model,
                billable_gpu_hours,
                unhealthy_ms / {hour} AS unhealthy_gpu_hours,
                idle_allocated_ms / {hour} AS idle_gpu_hours,
                gap_ms / {hour} AS unreported_gpu_hours,
                energy_kwh,
                closed_at,
                checksum
            FROM billing_statements
            WHERE period BETWEEN {periods}{filters}
            ORDER BY period DESC, tenant, gpu_model
            """,
            hour=f.HOUR_MS, periods=_PERIODS, filters=_USAGE,
        ),
        ("period", "tenant", "gpu_model", "billable_gpu_hours", "unhealthy_gpu_hours", "idle_gpu_hours",
         "unreported_gpu_hours", "energy_kwh", "closed_at", "checksum"),
        TABLE,
    ),),
    description=(
        "Closed periods in the range (`gpufleet billing close`): immutable rows, each with the sha256 "
        "of its canonical text (`gpufleet billing verify` checks them)."
    ),
    w=24,
    overrides=(rename("billable_gpu_hours", "billable GPU-h"),),
)

adjustments = Panel(
    "Adjustments",
    "table",
    (Query(
        sql(
            """
            SELECT
                booked_period,
                usage_period,
                tenant,
                gpu_model,
                delta_billable_gpu_hours,
                delta_unhealthy_ms / {hour} AS delta_unhealthy_gpu_hours,
                delta_gap_ms / {hour} AS delta_unreported_gpu_hours,
                delta_energy_kwh,
                closed_at
            FROM billing_adjustments
            WHERE booked_period BETWEEN {periods}{filters}
            ORDER BY booked_period DESC, usage_period DESC, tenant, gpu_model
            """,
            hour=f.HOUR_MS, periods=_PERIODS, filters=_USAGE,
        ),
        ("booked_period", "usage_period", "tenant", "gpu_model", "delta_billable_gpu_hours",
         "delta_unhealthy_gpu_hours", "delta_unreported_gpu_hours", "delta_energy_kwh", "closed_at"),
        TABLE,
    ),),
    description=(
        "Usage of a closed period that arrived after its close, booked when a later period closed "
        "(`booked_period`); closed statements are never rewritten."
    ),
    w=24,
    overrides=(rename("delta_billable_gpu_hours", "Δ billable GPU-h"),),
)

gaps = Panel(
    "Reporting gaps by node",
    "table",
    (Query(
        sql(
            """
            SELECT
                cluster,
                node,
                gap_start,
                gap_end,
                (toUnixTimestamp64Milli(gap_end) - toUnixTimestamp64Milli(gap_start) - interval_ms) / 1000 AS missing_s,
                gpus,
                gpus * missing_s / 3600 AS unreported_gpu_hours
            FROM
            (
                SELECT
                    cluster, node, gpus, interval_ms, time AS gap_end,
                    lagInFrame(time, 1, time) OVER (
                        PARTITION BY cluster, node ORDER BY time ROWS BETWEEN 1 PRECEDING AND CURRENT ROW
                    ) AS gap_start
                FROM agent_reports
                WHERE {where}
            )
            WHERE toUnixTimestamp64Milli(gap_end) - toUnixTimestamp64Milli(gap_start) > interval_ms * 3 / 2
            ORDER BY gap_start DESC, cluster, node
            LIMIT 200
            """,
            where=f.where(names=f.AGENT_FILTERS),
        ),
        ("cluster", "node", "gap_start", "gap_end", "missing_s", "gpus", "unreported_gpu_hours"),
        TABLE,
    ),),
    description=(
        "Where reports stopped and resumed: a node's consecutive reports further apart than 1.5 "
        "intervals (raw agent_reports, one row per node and interval)."
    ),
    w=24,
    overrides=(rename("missing_s", "missing (s)"),),
)

BOARD = Board(
    uid=links.BILLING,
    title="GPU fleet billing",
    description="Billable usage per tenant and period, closed statements and adjustments, and reporting gaps.",
    variables=f.standard_variables(datasource_variable()),
    panels=(usage, billable, unreported, statements, adjustments, gaps),
    links=links.nav(links.BILLING),
    time_from="now-7d",
)
