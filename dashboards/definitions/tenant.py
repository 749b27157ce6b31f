"""Tenant board: allocated GPUs, MFU over time, idle allocated GPU-hours, billable hours, per-job MFU."""

from __future__ import annotations

from gpufleet.dashboards import fragments as f
from gpufleet.dashboards.builder import (
    TABLE,
    Board,
    Panel,
    Query,
    datasource_variable,
    override,
    rename,
    sql,
    thresholds,
)
from gpufleet.dashboards.definitions import links
from gpufleet.pipeline.queries import rollups

_IDLE_ROWS = f.fleet_rows(("tenant", "health", "claimed_ms", *f.IDLE_COLUMNS))

allocated = Panel(
    "Allocated GPUs by tenant (time-weighted)",
    "timeseries",
    (Query(
        sql(
            """
            SELECT {bucket} AS t, tenant, sum(claimed_ms) / (1000 * {bucket_s}) AS gpus
            FROM {rows}
            WHERE tenant != ''
            GROUP BY t, tenant
            ORDER BY t, tenant
            """,
            bucket=f.bucket(), bucket_s=f.BUCKET_S, rows=f.fleet_rows(("tenant", "claimed_ms"), f.HOURLY_BUCKETS),
        ),
        ("t", "tenant", "gpus"),
    ),),
    description=(
        "GPUs allocated to each tenant per interval, time-weighted: the tenant's GPU-seconds / the interval's "
        "seconds (two GPUs held for half the interval count 1)."
    ),
    w=12,
    min_interval=f.MINUTE,
    defaults={"custom": {"stacking": {"group": "A", "mode": "normal"}, "fillOpacity": 30}},
)

mfu = Panel(
    "MFU by tenant (measured where reported, else hardware estimate)",
    "timeseries",
    (Query(
        sql(
            """
            SELECT {bucket} AS t, tenant, {mfu} AS mfu
            FROM {rows}
            WHERE tenant != ''
            GROUP BY t, tenant
            ORDER BY t, tenant
            """,
            bucket=f.bucket(), mfu=f.MFU, rows=f.fleet_rows(("tenant", *f.MFU_COLUMNS), f.HOURLY_BUCKETS),
        ),
        ("t", "tenant", "mfu"),
    ),),
    description=(
        "Achieved / peak FLOPs over the tenant's GPUs. Where a job does not report FLOPs the hardware "
        "estimate (tensor activity × peak) stands in; the job table shows which is which."
    ),
    w=12,
    unit="percentunit",
    min_interval=f.MINUTE,
    defaults={
        "custom": {"thresholdsStyle": {"mode": "line"}},
        "min": 0,
        "thresholds": thresholds((None, "red"), (f.MFU_TARGET, "green")),
    },
)

idle = Panel(
    "Idle allocated GPU-hours",
    "table",
    (Query(
        sql(
            """
            {policy}
            SELECT
                tenant,
                sumIf({idle}, {healthy}) / {hour} AS idle_gpu_hours,
                sumIf({idle}, {healthy}) / nullIf(sumIf(claimed_ms, {healthy}), 0) AS idle_share,
                sumIf(held_no_process_ms, {healthy}) / {hour} AS no_process_gpu_hours
            FROM {rows}
            WHERE tenant != ''
            GROUP BY tenant
            ORDER BY idle_gpu_hours DESC, tenant
            """,
            policy=f.POLICY, idle=f.IDLE_MS, healthy=f.HEALTHY, hour=f.HOUR_MS, rows=_IDLE_ROWS,
        ),
        ("tenant", "idle_gpu_hours", "idle_share", "no_process_gpu_hours"),
        TABLE,
    ),),
    description=(
        "Billable GPU-hours that sat idle (money burning): no compute process, or utilization under "
        "the SLA policy's idle threshold; and how many of them had no process at all (held by a job "
        "that crashed or never started)."
    ),
    w=12,
    overrides=(
        rename("idle_gpu_hours", "idle GPU-h"),
        override("idle_share", unit="percentunit", custom__cellOptions={"type": "gauge", "mode": "basic"}),
        rename("no_process_gpu_hours", "of which no process, GPU-h"),
    ),
)

billable = Panel(
    "Billable GPU-hours this period",
    "table",
    (Query(
        sql(
            """
            SELECT
                tenant,
                sum(billable_gpu_hours) AS billable_gpu_hours,
                sum(unhealthy_gpu_seconds) / 3600 AS excluded_gpu_hours,
                sum(gap_gpu_seconds) / 3600 AS unreported_gpu_hours
            FROM usage_hourly_stored FINAL
            WHERE hour >= toStartOfMonth($__toTime, 'UTC') AND hour <= $__toTime{filters}
            GROUP BY tenant
            ORDER BY tenant
            """,
            filters=f.filters(f.USAGE_FILTERS, {"model": "gpu_model"}),
        ),
        ("tenant", "billable_gpu_hours", "excluded_gpu_hours", "unreported_gpu_hours"),
        TABLE,
    ),),
    description=(
        "From the stored usage_hourly rows (what billing reads), from the start of the billing period (the UTC "
        "calendar month of the range's end) to the end of the range. Unhealthy and unreported "
        "GPU-hours are not billed. Filtered by tenant and GPU model only."
    ),
    w=12,
    overrides=(
        rename("billable_gpu_hours", "billable GPU-h"),
        rename("excluded_gpu_hours", "unhealthy (not billed) GPU-h"),
        rename("unreported_gpu_hours", "unreported (not billed) GPU-h"),
    ),
)

stalled = Panel(
    "Stalled GPU-hours by tenant (billed, no work done)",
    "table",
    (Query(
        sql(
            """
            SELECT
                a.tenant AS tenant,
                a.allocated_gpu_hours AS allocated_gpu_hours,
                a.mfu AS mfu,
                ifNull(s.stalled_gpu_hours, 0) AS stalled_gpu_hours,
                ifNull(s.stalled_gpu_hours, 0) / nullIf(a.allocated_gpu_hours, 0) AS stalled_share
            FROM
            (
                SELECT tenant, sum(claimed_ms) / {hour} AS allocated_gpu_hours, {mfu} AS mfu
                FROM {rows}
                WHERE tenant != ''
                GROUP BY tenant
            ) AS a
            LEFT JOIN
            (
                SELECT tenant, sum(claimed_ms) / {hour} AS stalled_gpu_hours
                FROM ({stalled})
                WHERE {in_range}
                GROUP BY tenant
            ) AS s ON s.tenant = a.tenant
            ORDER BY stalled_gpu_hours DESC, tenant
            """,
            hour=f.HOUR_MS, mfu=f.MFU, rows=f.fleet_rows(("tenant", "claimed_ms", *f.MFU_COLUMNS)),
            stalled=f.stalled_samples(f.SAMPLE_FILTERS),
            in_range=f.STALLED_IN_RANGE,
        ),
        ("tenant", "allocated_gpu_hours", "mfu", "stalled_gpu_hours", "stalled_share"),
        TABLE,
    ),),
    description=(
        "GPU-hours each tenant's jobs spent stalled: busy-looking (high utilization) but doing no work (no "
        f"tensor activity, near-idle power, flat FLOPs) for at least {f.STALL.for_s / 60:g} minutes, as in the "
        "capacity waterfall's `stalled` step. Still billed: the tenant holds the GPUs. Beside the tenant's MFU "
        "(measured where its jobs report FLOPs, else the hardware estimate)."
    ),
    w=12,
    overrides=(
        rename("allocated_gpu_hours", "allocated GPU-h"),
        override("mfu", unit="percentunit"),
        rename("mfu", "MFU"),
        rename("stalled_gpu_hours", "stalled GPU-h"),
        override("stalled_share", unit="percentunit"),
        rename("stalled_share", "stalled share"),
    ),
)

jobs = Panel(
    "Jobs",
    "table",
    (Query(
        sql(
            """
            SELECT
                tenant,
                job,
                length(groupUniqArrayArray(gpus)) AS gpus,
                sum(claimed_ms) / {hour} AS gpu_hours,
                {mfu} AS mfu,
                {measured} AS mfu_measured,
                {estimated} AS mfu_hw_estimate,
                {coverage} AS measured_coverage,
                fromUnixTimestamp64Milli(min(first_start_ms), 'UTC') AS first_seen,
                fromUnixTimestamp64Milli(max(last_end_ms), 'UTC') AS last_seen
            FROM {rows}
            GROUP BY tenant, job
            ORDER BY gpu_hours DESC, tenant, job
            LIMIT 200
            """,
            hour=f.HOUR_MS, mfu=f.MFU, measured=f.MFU_MEASURED, estimated=f.MFU_ESTIMATED,
            coverage=f.COVERAGE,
            rows=f.level_rows(rollups.JOB, ("tenant", "job", "gpus", "claimed_ms", "mfu_ms", "measured_ms",
                                            *f.MFU_COLUMNS, "first_start_ms", "last_end_ms"),
                              names=("cluster", "tenant", "model"), where="tenant != '' AND job != ''"),
        ),
        ("tenant", "job", "gpus", "gpu_hours", "mfu", "mfu_measured", "mfu_hw_estimate", "measured_coverage",
         "first_seen", "last_seen"),
        TABLE,
    ),),
    description=(
        "Per job: distinct GPUs used, MFU (measured where reported, else hardware estimate), the measured and "
        "hardware-estimate parts side by side, and the share of GPU-seconds with measured FLOPs. From the "
        "per-job hourly rollup: filtered by cluster, tenant and GPU model (not node)."
    ),
    w=24,
    h=10,
    overrides=(
        override("mfu", unit="percentunit"),
        override("mfu_measured", unit="percentunit"),
        override("mfu_hw_estimate", unit="percentunit"),
        override("measured_coverage", unit="percentunit"),
        rename("mfu", "MFU"),
        rename("mfu_measured", "MFU measured"),
        rename("mfu_hw_estimate", "MFU hardware estimate"),
        rename("gpu_hours", "GPU-h"),
    ),
)

BOARD = Board(
    uid=links.TENANT,
    title="GPU fleet tenants",
    description="What each tenant holds, how well it uses it, what sits idle, and what is billable.",
    variables=f.standard_variables(datasource_variable()),
    panels=(allocated, mfu, idle, billable, stalled, jobs),
    links=links.nav(links.TENANT),
)
