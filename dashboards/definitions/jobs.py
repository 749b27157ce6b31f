"""Jobs board: per job, its GPUs, MFU, stalled time, stragglers and throughput; the job alerts in the range.

What `gpufleet jobs` shows (pipeline/queries/jobs.py), as panels. The Jobs table reads the job rollups
(`job_usage_1h`, `job_throughput_1m`/`_1h`; ragged ends from `gpu_usage_1m`): rows per job and hour, not
per GPU or sample. Stalled GPU-hours and stragglers come from raw samples with the pipeline's own detectors
(`pipeline/queries/job_signals.py`, thresholds from config `jobs` defaults); the throughput series from
`job_throughput_1m`, the tokens jobs report over OTLP. A job spans nodes, so the node variable does not apply here."""

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
)
from gpufleet.dashboards.definitions import links
from gpufleet.pipeline.queries import rollups

_JOB_ROWS = "tenant != '' AND job != ''"

jobs = Panel(
    "Jobs",
    "table",
    (Query(
        sql(
            """
            SELECT
                r.tenant AS tenant,
                r.job AS job,
                r.gpus AS gpus,
                r.nodes AS nodes,
                r.gpu_hours AS gpu_hours,
                r.mfu AS mfu,
                r.measured_coverage AS measured_coverage,
                ifNull(s.stalled_gpu_hours, 0) AS stalled_gpu_hours,
                if(t.tokens_reports > 0, t.tokens_weighted / r.span_s, NULL) AS tokens_per_s,
                if(t.samples_reports > 0, t.samples_weighted / r.span_s, NULL) AS samples_per_s,
                r.first_seen AS first_seen,
                r.last_seen AS last_seen
            FROM
            (
                SELECT
                    tenant,
                    job,
                    length(groupUniqArrayArray(gpus)) AS gpus,
                    arrayStringConcat(arraySort(groupUniqArrayArray(nodes)), ', ') AS nodes,
                    sum(claimed_ms) / {hour} AS gpu_hours,
                    {mfu} AS mfu,
                    {coverage} AS measured_coverage,
                    (max(last_end_ms) - min(first_start_ms)) / 1000 AS span_s,
                    fromUnixTimestamp64Milli(min(first_start_ms), 'UTC') AS first_seen,
                    fromUnixTimestamp64Milli(max(last_end_ms), 'UTC') AS last_seen
                FROM {rows}
                GROUP BY tenant, job
            ) AS r
            LEFT JOIN
            (
                SELECT tenant, job, sum(claimed_ms) / {hour} AS stalled_gpu_hours
                FROM ({stalled})
                WHERE {in_range}
                GROUP BY tenant, job
            ) AS s ON s.tenant = r.tenant AND s.job = r.job
            LEFT JOIN
            (
                SELECT
                    tenant,
                    job,
                    sum(tokens_weighted) AS tokens_weighted,
                    sum(tokens_reports) AS tokens_reports,
                    sum(samples_weighted) AS samples_weighted,
                    sum(samples_reports) AS samples_reports
                FROM {throughput}
                GROUP BY tenant, job
            ) AS t ON t.tenant = r.tenant AND t.job = r.job
            ORDER BY gpu_hours DESC, tenant, job
            LIMIT 200
            SETTINGS join_use_nulls = 1
            """,
            hour=f.HOUR_MS, mfu=f.MFU, coverage=f.COVERAGE, stalled=f.stalled_samples(),
            in_range=f.STALLED_IN_RANGE,
            rows=f.level_rows(rollups.JOB, ("tenant", "job", "gpus", "nodes", "claimed_ms", "mfu_ms", "measured_ms",
                                            *f.MFU_COLUMNS, "first_start_ms", "last_end_ms"),
                              names=f.JOB_FILTERS, where=_JOB_ROWS),
            throughput=f.level_rows(rollups.JOB_THROUGHPUT, rollups.JOB_THROUGHPUT.columns, names=f.JOB_FILTERS,
                                    where=_JOB_ROWS),
        ),
        ("tenant", "job", "gpus", "nodes", "gpu_hours", "mfu", "measured_coverage", "stalled_gpu_hours",
         "tokens_per_s", "samples_per_s", "first_seen", "last_seen"),
        TABLE,
    ),),
    description=(
        "Per job: its GPUs and nodes, GPU-hours, MFU (measured where the job reports FLOPs, else the hardware "
        "estimate) and the share measured, GPU-hours stalled (busy-looking with no work for at least "
        f"{f.STALL.for_s / 60:g} minutes; still billed), and the tokens and samples it reported per second of "
        "its time in the range (empty: it reports none)."
    ),
    w=24,
    h=10,
    overrides=(
        override("mfu", unit="percentunit"),
        override("measured_coverage", unit="percentunit"),
        rename("mfu", "MFU"),
        rename("measured_coverage", "measured"),
        rename("gpu_hours", "GPU-h"),
        rename("stalled_gpu_hours", "stalled GPU-h"),
        rename("tokens_per_s", "tokens/s"),
        rename("samples_per_s", "samples/s"),
    ),
)

stalled = Panel(
    "Stalled GPUs by job",
    "timeseries",
    (Query(
        sql(
            """
            SELECT
                $__timeInterval(toDateTime(intDiv(claim_ms, 60000) * 60, 'UTC')) AS t,
                concat(tenant, '/', job) AS job,
                sum(claimed_ms) / ($__interval_s * 1000) AS stalled_gpus
            FROM ({stalled})
            WHERE {in_range}
            GROUP BY t, job
            ORDER BY t, job
            """,
            stalled=f.stalled_samples(), in_range=f.STALLED_IN_RANGE,
        ),
        ("t", "job", "stalled_gpus"),
    ),),
    description=(
        "GPUs in a stall, per interval: utilization at or above "
        f"{f.STALL.util_above:.0%}, tensor activity at or below {f.STALL.tensor_below:.0%}, power at or below "
        f"{f.STALL.power_below_ratio:.0%} of the GPU's power limit and flat measured FLOPs, for at least "
        f"{f.STALL.for_s / 60:g} minutes (a hung collective). The JobStalled alert fires on the same signature."
    ),
    w=12,
    min_interval=f.MINUTE,
    defaults={"custom": {"stacking": {"group": "A", "mode": "normal"}, "fillOpacity": 30}},
)

throughput = Panel(
    "Throughput by job (tokens/s reported over OTLP)",
    "timeseries",
    (Query(
        sql(
            """
            SELECT $__timeInterval(minute) AS t, concat(tenant, '/', job) AS job,
                sum(tokens_weighted) / $__interval_s AS tokens_per_s
            FROM job_throughput_1m
            WHERE {where}
                AND tenant != '' AND job != ''
            GROUP BY t, job
            HAVING sum(tokens_reports) > 0
            ORDER BY t, job
            """,
            where=f.where("minute", f.JOB_FILTERS),
        ),
        ("t", "job", "tokens_per_s"),
    ),),
    description=(
        "Tokens per second each job reported (`gpufleet.job.tokens` over OTLP, split over its GPUs by the "
        "agents and added up here, filed under the minute its claimed time starts, as every rollup files a "
        "sample). A hung job's line drops to zero. Reads `job_throughput_1m`: a row per job and minute."
    ),
    w=12,
    min_interval=f.MINUTE,
)

stragglers = Panel(
    "Stragglers at the end of the range",
    "table",
    (Query(
        sql(
            """
            SELECT
                tenant,
                job,
                node,
                toString(gpu_index) AS gpu,
                cause,
                clock_mhz,
                job_clock_mhz,
                tensor,
                job_tensor,
                fromUnixTimestamp64Milli(since_ms, 'UTC') AS since,
                gpu_uuid,
                hex(gpu_uuid) AS gpu_hex
            FROM ({stragglers})
            WHERE sustained = 1
            ORDER BY tenant, job, node, gpu_index
            """,
            stragglers=f.stragglers(),
        ),
        ("tenant", "job", "node", "gpu", "cause", "clock_mhz", "job_clock_mhz", "tensor", "job_tensor", "since",
         "gpu_uuid", links.GPU_KEY),
        TABLE,
    ),),
    description=(
        f"GPUs of busy jobs on 2 or more GPUs that ran below {f.STRAGGLER.below_ratio:.0%} of their job's median "
        "SM clock, tensor activity or measured FLOP/s, or throttled while most of their peers did not, for the "
        f"last {f.STRAGGLER.for_s / 60:g} minutes of the range; the likely cause is thermal_throttle, "
        "power_throttle, pcie_nvlink_errors, clock (held low without a throttle reason) or below_median."
    ),
    w=24,
    h=8,
    overrides=(
        *links.gpu_detail(),
        override("tensor", unit="percentunit"),
        override("job_tensor", unit="percentunit"),
        rename("clock_mhz", "SM clock MHz"),
        rename("job_clock_mhz", "job median MHz"),
        rename("job_tensor", "job median tensor"),
    ),
)

_ALERT_FILTERS = f.filters(("cluster", "tenant"), {"cluster": "labels['cluster']", "tenant": "labels['tenant']"})

alerts = Panel(
    "Job alerts in the range",
    "table",
    (Query(
        sql(
            """
            SELECT
                alertname,
                labels['tenant'] AS tenant,
                labels['job'] AS job,
                labels['node'] AS node,
                labels['gpu_index'] AS gpu,
                annotations['summary'] AS summary,
                starts_at,
                ends_at
            FROM alerts FINAL
            WHERE alertname IN ('JobStalled', 'JobStraggler') AND starts_at IS NOT NULL
                AND starts_at <= $__toTime AND (ends_at IS NULL OR ends_at >= $__fromTime){filters}
            ORDER BY starts_at DESC, alertname
            """,
            filters=_ALERT_FILTERS,
        ),
        ("alertname", "tenant", "job", "node", "gpu", "summary", "starts_at", "ends_at"),
        TABLE,
    ),),
    description="JobStalled and JobStraggler alerts that fired during the range, from the evaluator's alerts table.",
    w=24,
    h=8,
    overrides=(override("summary", custom__width=520),),
)

BOARD = Board(
    uid=links.JOBS,
    title="GPU fleet jobs",
    description="Per job: GPUs, MFU, stalled time, stragglers and throughput; the node variable does not apply.",
    variables=f.standard_variables(datasource_variable()),
    panels=(jobs, stalled, throughput, stragglers, alerts),
    links=links.nav(links.JOBS),
)
