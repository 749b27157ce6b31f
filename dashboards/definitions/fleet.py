"""Fleet overview: health, MFU against the target, the capacity waterfall, power and pipeline health."""

from __future__ import annotations

from gpufleet.dashboards import fragments as f
from gpufleet.dashboards.builder import (
    TABLE,
    Board,
    Panel,
    Query,
    Row,
    datasource_variable,
    override,
    rename,
    sql,
    thresholds,
)
from gpufleet.dashboards.definitions import links
from gpufleet.pipeline.queries import rollups

_MFU_NAMES = (
    rename("mfu", "MFU (measured where reported, else hardware estimate)"),
    rename("mfu_measured", "MFU measured (GPUs whose jobs report FLOPs)"),
    rename("mfu_hw_estimate", "MFU hardware estimate (tensor activity × peak, other GPUs)"),
)
_TARGET_LINE = {
    "custom": {"thresholdsStyle": {"mode": "line"}},
    "min": 0,
    "thresholds": thresholds((None, "red"), (f.MFU_TARGET, "green")),
}
_MFU_SOURCES = ("tenant", "mfu_ms", "measured_ms", *f.MFU_COLUMNS)

health_now = Panel(
    "GPUs by health state now",
    "bargauge",
    (Query(
        sql(
            """
            SELECT state, count() AS gpus
            FROM
            (
                SELECT
                    if(toUnixTimestamp64Milli($__toTime_ms) - toUnixTimestamp64Milli(time) > {silent_ms}, 'unknown',
                       toString(health)) AS state
                FROM gpu_latest FINAL
                WHERE 1{filters}
            )
            GROUP BY state
            ORDER BY indexOf({states}, state)
            """,
            silent_ms=str(f.SILENT_MS), filters=f.filters(), states=f.HEALTH_STATES,
        ),
        ("state", "gpus"),
        TABLE,
    ),),
    description=(
        "Each GPU's state in its latest sample (gpu_latest, one row per GPU; as `gpufleet status` counts "
        f"them), or `unknown` when that sample ended more than {f.SILENT_MS // 1000} s before the end of the "
        "range."
    ),
    w=8,
    options={
        "displayMode": "gradient",
        "orientation": "horizontal",
        "reduceOptions": {"calcs": [], "fields": "/^gpus$/", "values": True},
        "showUnfilled": True,
    },
    defaults={"min": 0, "thresholds": thresholds((None, "green"))},
)

health_over_time = Panel(
    "GPUs by health state over time (time-weighted)",
    "timeseries",
    (Query(
        sql(
            """
            SELECT {bucket} AS t, toString(health) AS state, sum(claimed_ms) / (1000 * {bucket_s}) AS gpus
            FROM {rows}
            GROUP BY t, state
            ORDER BY t, state
            """,
            bucket=f.bucket(), bucket_s=f.BUCKET_S, rows=f.fleet_rows(("health", "claimed_ms"), f.HOURLY_BUCKETS),
        ),
        ("t", "state", "gpus"),
    ),),
    description=(
        "GPUs in each state per interval, time-weighted: the GPU-seconds in the state (claimed: each second "
        "once per node) / the interval's seconds (a GPU failing for half the interval counts 0.5). Read from "
        "the fleet rollup, so its cost does not grow with the fleet; a GPU that did not report is in no state here."
    ),
    w=16,
    min_interval=f.MINUTE,
    defaults={"custom": {"stacking": {"group": "A", "mode": "normal"}, "fillOpacity": 40}},
    overrides=(
        override("ok", color={"fixedColor": "green", "mode": "fixed"}),
        override("degraded", color={"fixedColor": "orange", "mode": "fixed"}),
        override("failing", color={"fixedColor": "red", "mode": "fixed"}),
    ),
)

mfu_over_time = Panel(
    "Fleet MFU against the 50% target",
    "timeseries",
    (Query(
        sql(
            """
            SELECT
                {bucket} AS t,
                {mfu} AS mfu,
                {measured} AS mfu_measured,
                {estimated} AS mfu_hw_estimate
            FROM {rows}
            GROUP BY t
            ORDER BY t
            """,
            bucket=f.bucket(), mfu=f.MFU, measured=f.MFU_MEASURED, estimated=f.MFU_ESTIMATED,
            rows=f.fleet_rows(f.MFU_COLUMNS, f.HOURLY_BUCKETS),
        ),
        ("t", "mfu", "mfu_measured", "mfu_hw_estimate"),
    ),),
    description=(
        "Achieved FLOPs / peak FLOPs over every GPU of a known model. Measured FLOPs are what jobs "
        "report over OpenTelemetry; where a job reports nothing, the hardware estimate (tensor-pipe "
        "activity × peak, from GPU counters, not the model's FLOPs) stands in. The line is the 50% target."
    ),
    w=16,
    unit="percentunit",
    min_interval=f.MINUTE,
    defaults=_TARGET_LINE,
    overrides=_MFU_NAMES,
)

mfu_summary = Panel(
    "MFU over the time range",
    "stat",
    (Query(
        sql(
            """
            SELECT
                {mfu} AS mfu,
                {measured} AS mfu_measured,
                {estimated} AS mfu_hw_estimate,
                sumIf(measured_ms, tenant != '') / nullIf(sumIf(mfu_ms, tenant != ''), 0) AS measured_coverage
            FROM {rows}
            """,
            mfu=f.MFU, measured=f.MFU_MEASURED, estimated=f.MFU_ESTIMATED, rows=f.fleet_rows(_MFU_SOURCES),
        ),
        ("mfu", "mfu_measured", "mfu_hw_estimate", "measured_coverage"),
        TABLE,
    ),),
    description="Measured coverage: the share of allocated GPU-seconds whose FLOPs the job reported.",
    w=8,
    unit="percentunit",
    defaults={"thresholds": thresholds((None, "red"), (f.MFU_TARGET, "green"))},
    overrides=(
        *_MFU_NAMES,
        rename("measured_coverage", "Measured FLOPs coverage"),
        override("measured_coverage", color={"fixedColor": "blue", "mode": "fixed"}),
    ),
    options={"colorMode": "value", "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
)

waterfall = Panel(
    "Capacity waterfall (GPU-hours)",
    "barchart",
    (Query(
        sql(
            """
            {policy}
            SELECT stage, remaining_gpu_hours, lost_gpu_hours
            FROM
            (
                SELECT
                    (
                        SELECT sum(greatest(
                            toUnixTimestamp64Milli($__toTime_ms) - toUnixTimestamp64Milli($__fromTime_ms), reported))
                        FROM (SELECT sum(claimed_ms) AS reported FROM {gpus} GROUP BY cluster, node, gpu_uuid)
                    ) / {hour} AS installed,
                    sum(reported) / {hour} AS reporting,
                    (sum(reported) - sum(unhealthy)) / {hour} AS healthy,
                    (sum(reported) - sum(unhealthy) - sum(unallocated)) / {hour} AS allocated,
                    (sum(reported) - sum(unhealthy) - sum(unallocated) - sum(idle)) / {hour} AS not_idle,
                    not_idle - any(stalled) / {hour} AS busy,
                    sumIf(achieved / peak, peak > 0) / 3600 AS achieved_peak_hours
                FROM
                (
                    SELECT
                        sum(claimed_ms) AS reported,
                        sumIf(claimed_ms, NOT {healthy}) AS unhealthy,
                        sumIf(claimed_ms, {healthy} AND tenant = '') AS unallocated,
                        sumIf({idle}, {healthy} AND tenant != '') AS idle,
                        {achieved} AS achieved,
                        max(model_peak_flop_s) AS peak
                    FROM {rows}
                    GROUP BY model
                ) AS per_model
                CROSS JOIN
                (
                    SELECT ifNull(sum(claimed_ms), 0) AS stalled
                    FROM ({stalled})
                    WHERE {in_range}
                        AND {busy}
                ) AS stalls
            )
            ARRAY JOIN
                ['installed', 'reporting', 'healthy', 'allocated', 'not idle', 'busy', 'achieved (peak-equivalent)']
                    AS stage,
                [installed, reporting, healthy, allocated, not_idle, busy, achieved_peak_hours] AS remaining_gpu_hours,
                [0, installed - reporting, reporting - healthy, healthy - allocated, allocated - not_idle,
                 not_idle - busy, busy - achieved_peak_hours] AS lost_gpu_hours
            """,
            policy=f.POLICY, hour=f.HOUR_MS, healthy=f.HEALTHY, idle=f.IDLE_MS, achieved=f.ACHIEVED,
            rows=f.fleet_rows(("tenant", "model", "health", "claimed_ms", "model_peak_flop_s", *f.IDLE_COLUMNS,
                               "measured_flop", "estimated_unmeasured_flop")),
            gpus=f.level_rows(rollups.GPU_USAGE, ("cluster", "node", "gpu_uuid", "claimed_ms")),
            stalled=f.stalled_samples(f.SAMPLE_FILTERS), in_range=f.STALLED_IN_RANGE, busy=f.STALLED_BUSY,
        ),
        ("stage", "remaining_gpu_hours", "lost_gpu_hours"),
        TABLE,
    ),),
    description=(
        "Where capacity goes, as pipeline/queries/waterfall.py computes it: every GPU seen in the range for the "
        "whole range (installed) -> minus time it did not report -> minus unhealthy (health states the "
        "SLA policy excludes) -> minus unallocated -> minus allocated but idle (no process, or "
        "utilization under the policy's threshold) -> minus stalled (hung jobs: busy-looking, no work, still "
        "billed) -> busy -> achieved FLOPs as GPU-hours at peak "
        "(measured where jobs report FLOPs, else the hardware estimate: tensor activity × peak). "
        "The red part of each bar is what that step lost. Installed reads one row per GPU and hour, the "
        "stalled step raw samples, the rest the fleet rollup."
    ),
    w=12,
    h=9,
    unit="suffix: GPU-h",
    options={"orientation": "horizontal", "stacking": "normal", "showValue": "auto", "xField": "stage",
             "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
    overrides=(
        rename("remaining_gpu_hours", "remaining"),
        rename("lost_gpu_hours", "lost at this step"),
        override("lost_gpu_hours", color={"fixedColor": "red", "mode": "fixed"}),
        override("remaining_gpu_hours", color={"fixedColor": "green", "mode": "fixed"}),
    ),
)

util_heatmap = Panel(
    f"GPU utilization of the {f.TOP_NODES} least-utilized nodes",
    "heatmap",
    (Query(
        sql(
            """
            SELECT {bucket} AS t, node, sum(util_weighted_ms) / nullIf(sum(util_ms), 0) AS util
            FROM {rows}
            GROUP BY t, node
            ORDER BY t, node
            """,
            bucket=f.bucket(),
            rows=f.level_rows(
                rollups.GPU_USAGE, ("node", "util_ms", "util_weighted_ms"), f.HOURLY_BUCKETS,
                where=f.top_nodes(rollups.GPU_USAGE, ("util_ms", "util_weighted_ms"),
                                  order="sum(util_weighted_ms) / sum(util_ms)", having="sum(util_ms) > 0")),
        ),
        ("t", "node", "util"),
    ),),
    description=(
        f"Time-weighted mean GPU utilization per interval of the {f.TOP_NODES} nodes whose GPUs were least "
        "utilized in the hours the range touches (idle capacity to reclaim; a row per node would be unreadable "
        "across a fleet); a picked node shows its own. From the per-GPU rollups: the ranking from the hour "
        "level, then only those nodes' rows."
    ),
    w=12,
    h=9,
    unit="percentunit",
    min_interval=f.MINUTE,
    options={
        "calculate": False,
        "cellGap": 1,
        "color": {"exponent": 0.5, "fill": "dark-orange", "max": 1, "min": 0, "mode": "scheme",
                  "scale": "linear", "scheme": "Oranges", "steps": 64},
        "rowsFrame": {"layout": "auto"},
        "yAxis": {"axisPlacement": "left"},
    },
)

power = Panel(
    "Power draw",
    "timeseries",
    (Query(
        sql(
            """
            SELECT {bucket} AS t, sum(energy_mj) / 1000 / {bucket_s} AS power_w
            FROM {rows}
            GROUP BY t
            ORDER BY t
            """,
            bucket=f.bucket(), bucket_s=f.BUCKET_S, rows=f.fleet_rows(("energy_mj",), f.HOURLY_BUCKETS),
        ),
        ("t", "power_w"),
    ),),
    description="Mean GPU power per interval: energy (power × interval, summed) / interval length.",
    w=16,
    unit="watt",
    min_interval=f.MINUTE,
    overrides=(rename("power_w", "GPU power"),),
)

energy = Panel(
    "Energy over the time range",
    "stat",
    (Query(
        sql(
            """
            SELECT sum(energy_mj) / 3600000000 AS energy_kwh
            FROM {rows}
            """,
            rows=f.fleet_rows(("energy_mj",)),
        ),
        ("energy_kwh",),
        TABLE,
    ),),
    description="GPU energy in the range (millijoules summed exactly in the rollup, shown in kWh).",
    w=8,
    unit="kwatth",
    options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
)

ingest_lag = Panel(
    "Ingest lag (ingest time - sample time)",
    "timeseries",
    (Query(
        sql(
            """
            SELECT
                $__timeInterval(time) AS t,
                quantileExact(0.5)(dateDiff('millisecond', time, ingest_time)) / 1000 AS p50,
                quantileExact(0.99)(dateDiff('millisecond', time, ingest_time)) / 1000 AS p99,
                max(dateDiff('millisecond', time, ingest_time)) / 1000 AS max
            FROM agent_reports
            WHERE {where}
            GROUP BY t
            ORDER BY t
            """,
            where=f.where(names=f.AGENT_FILTERS),
        ),
        ("t", "p50", "p99", "max"),
    ),),
    description=(
        "Seconds from the agent's sample time to the row landing in ClickHouse (includes agent clock "
        "skew). Filtered by cluster and node only."
    ),
    w=12,
    unit="s",
)

agent_health = Panel(
    "Agent spool depth and send errors",
    "timeseries",
    (Query(
        sql(
            """
            SELECT t, sum(spool) AS spool_depth, sum(greatest(errors - prev_errors, 0)) AS send_errors
            FROM
            (
                SELECT t, spool, errors, lagInFrame(errors, 1, errors) OVER w AS prev_errors
                FROM
                (
                    SELECT $__timeInterval(time) AS t, cluster, node, boot_id,
                        max(spool_depth) AS spool, toInt64(max(send_errors_total)) AS errors
                    FROM agent_reports
                    WHERE {where}
                    GROUP BY t, cluster, node, boot_id
                )
                WINDOW w AS (PARTITION BY cluster, node, boot_id ORDER BY t ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)
            )
            GROUP BY t
            ORDER BY t
            """,
            where=f.where(names=f.AGENT_FILTERS),
        ),
        ("t", "spool_depth", "send_errors"),
    ),),
    description=(
        "Messages waiting in agents' local spools (Kafka unreachable or slow) and new send errors per "
        "interval. Filtered by cluster and node only."
    ),
    w=12,
    overrides=(override("send_errors", custom__axisPlacement="right", custom__drawStyle="bars"),),
)

dead_letters = Panel(
    "Dead-lettered messages",
    "stat",
    (Query(
        sql(
            """
            SELECT count() AS dead_letters
            FROM dead_letters FINAL
            WHERE $__timeFilter(ingest_time)
            """
        ),
        ("dead_letters",),
        TABLE,
    ),),
    description="Messages that failed validation (kept with their bytes). Not filtered: they carry no cluster.",
    w=4,
    defaults={"thresholds": thresholds((None, "green"), (1, "orange"))},
    options={"colorMode": "background", "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
)

dead_letter_reasons = Panel(
    "Dead letters by reason",
    "table",
    (Query(
        sql(
            """
            SELECT reason, count() AS messages, max(ingest_time) AS last_seen
            FROM dead_letters FINAL
            WHERE $__timeFilter(ingest_time)
            GROUP BY reason
            ORDER BY messages DESC
            LIMIT 20
            """
        ),
        ("reason", "messages", "last_seen"),
        TABLE,
    ),),
    w=8,
)

agents = Panel(
    "Agents",
    "table",
    (Query(
        sql(
            """
            SELECT
                cluster,
                node,
                max(time) AS last_report,
                argMax(spool_depth, time) AS spool_depth,
                max(spool_dropped_total) AS spool_dropped,
                max(send_errors_total) AS send_errors,
                sum(nvml_errors) AS nvml_errors,
                max(otlp_points_rejected_total) AS otlp_rejected,
                quantileExact(0.99)(collect_seconds) AS collect_p99_s
            FROM agent_reports
            WHERE {where}
            GROUP BY cluster, node
            ORDER BY spool_depth + spool_dropped + send_errors + nvml_errors + otlp_rejected DESC, cluster, node
            LIMIT 100
            """,
            where=f.where(names=f.AGENT_FILTERS),
        ),
        ("cluster", "node", "last_report", "spool_depth", "spool_dropped", "send_errors", "nvml_errors",
         "otlp_rejected", "collect_p99_s"),
        TABLE,
    ),),
    description="Per node: the agent's own health, worst first. Counters are totals since the agent started.",
    w=12,
    overrides=(override("collect_p99_s", unit="s"),),
)

BOARD = Board(
    uid=links.FLEET,
    title="GPU fleet overview",
    description="Fleet health, MFU against the target, where capacity goes, power, and pipeline health.",
    variables=f.standard_variables(datasource_variable()),
    panels=(
        Row("Health"),
        health_now,
        health_over_time,
        Row("Utilization"),
        mfu_over_time,
        mfu_summary,
        waterfall,
        util_heatmap,
        Row("Power"),
        power,
        energy,
        Row("Pipeline"),
        ingest_lag,
        agent_health,
        dead_letters,
        dead_letter_reasons,
        agents,
    ),
    links=links.nav(links.FLEET),
)
