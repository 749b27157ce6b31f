"""The fleet-level questions gpufleet and its peers both answer, each in three forms.

For each question: where gpufleet answers it (a board panel, found by board and title when the run
starts; or, where no panel answers it yet, the query such a panel would run on today's tables),
the same answer computed from raw `gpu_samples` by hand-written SQL that follows the documented
semantics (docs/aggregations.md), and the question in MetricsQL over dcgm-exporter-style series
for VictoriaMetrics (bench/victoria.py).

The raw SQL never reads a rollup, so it stays the reference whatever the rollups become; both
gpufleet's and the raw SQL use the plugin's macros and are expanded with the same time range and
`$__interval`, so their buckets are the same. A sample belongs to the minute containing its
interval start (`time - interval_ms`), as in every rollup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gpufleet.dashboards import fragments
from gpufleet.pipeline.queries import rollups

RAW: Final = ("(SELECT *, toDateTime(intDiv(toUnixTimestamp64Milli(time) - interval_ms, 60000) * 60, 'UTC') "
              "AS minute FROM gpu_samples)")
"""Raw samples with the minute their interval started in."""

MIN_INTERVAL: Final = "1m"
"""The panels' minimum interval (the minute rollup's resolution): bench queries use it too."""


@dataclass(frozen=True)
class Question:
    name: str
    panel: tuple[str, str] | None
    """(board uid, panel title) of the panel that answers it, or None."""
    sql: str | None
    """Where no panel answers it: the query a panel would run today (macros, current tables)."""
    raw_sql: str
    promql: str | None
    """MetricsQL; `$step` is the panel's interval, `$range` the whole range. None: no dcgm-exporter series
    answers it (a per-job table), so it is compared with raw only, not asked of the peer."""
    instant: bool = False
    """True: one value over the range (an instant query at its end); False: a series over time."""


BUCKET: Final = f"toStartOfInterval(minute, INTERVAL {fragments.BUCKET_S} second)"
"""The boards' time-series bucket (Grafana's interval, whole hours from 30 minutes on) over raw minutes."""


def _raw(select: str, group: str = "") -> str:
    tail = f" GROUP BY {group} ORDER BY {group}" if group else ""
    return f"SELECT {select} FROM {RAW} WHERE $__timeFilter(minute){tail}"


def _fleet(columns: tuple[str, ...], select: str, group: str, where: str = "1") -> str:
    """What a fleet panel would run: the fleet rollup's rows of the range (whole hours from the hour level)."""
    rows = rollups.rows(rollups.FLEET, *fragments.RANGE, where=where, hourly=fragments.HOURLY_BUCKETS,
                        columns=columns)
    return f"SELECT {fragments.bucket()} AS t, {select} FROM {rows} GROUP BY {group} ORDER BY {group}"


_UTIL = ("sum(toFloat64(ifNull(util_gpu_ratio, 0)) * interval_ms) "
         "/ nullIf(sumIf(toUInt64(interval_ms), util_gpu_ratio IS NOT NULL), 0) AS util")
_ENERGY_MJ = "sum(toUInt64(round(ifNull(power_w, 0) * interval_ms)))"
_FLEET_UTIL = "sum(util_weighted_ms) / nullIf(sum(util_ms), 0) AS util"

_MFU_IN = ("peak_flops IS NOT NULL AND (flops_measured IS NOT NULL OR flops_estimated IS NOT NULL "
           "OR error != '')")
_START_MS = "(toUnixTimestamp64Milli(time) - interval_ms)"
JOBS_RAW: Final = f"""
SELECT r.tenant, r.job, r.gpus, r.nodes, r.gpu_hours, r.mfu, r.measured_coverage,
    ifNull(s.stalled_gpu_hours, 0), if(r.tokens_n > 0, r.tokens / r.span_s, NULL),
    if(r.samples_n > 0, r.samples / r.span_s, NULL), r.first_seen, r.last_seen
FROM (
    SELECT tenant, job, uniqExact(gpu_uuid) AS gpus,
        arrayStringConcat(arraySort(groupUniqArray(toString(node))), ', ') AS nodes,
        sum(toUInt64(interval_ms)) / 3600000 AS gpu_hours,
        (sumIf(ifNull(flops_measured, 0), peak_flops IS NOT NULL)
            + sumIf(ifNull(flops_estimated, 0), peak_flops IS NOT NULL AND flops_measured IS NULL)) AS achieved,
        sumIf(ifNull(peak_flops, 0) * interval_ms / 1000, {_MFU_IN}) AS peak,
        if(peak > 0, achieved / peak, NULL) AS mfu,
        sumIf(toUInt64(interval_ms), peak_flops IS NOT NULL AND flops_measured IS NOT NULL)
            / nullIf(sumIf(toUInt64(interval_ms), {_MFU_IN}), 0) AS measured_coverage,
        sum(ifNull(tokens_measured, 0)) AS tokens, countIf(tokens_measured IS NOT NULL) AS tokens_n,
        sum(ifNull(samples_measured, 0)) AS samples, countIf(samples_measured IS NOT NULL) AS samples_n,
        (max(toUnixTimestamp64Milli(time)) - min({_START_MS})) / 1000 AS span_s,
        fromUnixTimestamp64Milli(min({_START_MS}), 'UTC') AS first_seen,
        fromUnixTimestamp64Milli(max(toUnixTimestamp64Milli(time)), 'UTC') AS last_seen
    FROM {RAW}
    WHERE $__timeFilter(minute) AND tenant != '' AND job != ''
    GROUP BY tenant, job
) AS r
LEFT JOIN (
    SELECT tenant, job, sum(claimed_ms) / 3600000 AS stalled_gpu_hours
    FROM ({fragments.stalled_samples(())})
    WHERE {fragments.STALLED_IN_RANGE}
    GROUP BY tenant, job
) AS s ON s.tenant = r.tenant AND s.job = r.job
ORDER BY r.gpu_hours DESC, r.tenant, r.job
LIMIT 200
SETTINGS join_use_nulls = 1
"""
"""The Jobs table from raw samples: each sample claims its whole interval (one stream per GPU), filed under the
minute its interval starts in; tokens and samples per second of the job's first to last second in the range;
stalled GPU-hours by the stall detector, which reads raw samples itself."""

_NOT_OK_MS = "sumIf(toUInt64(interval_ms), health IN ('degraded', 'failing'))"
NOT_OK_TIMELINE_RAW: Final = f"""
SELECT tupleElement(p, 1) AS t, gpu, tupleElement(p, 2) AS state
FROM (
    SELECT gpu, arraySort(groupArray((t, state))) AS pts
    FROM (
        SELECT {BUCKET} AS t, concat(node, ' / GPU ', toString(gpu_index)) AS gpu, gpu_uuid,
            toUInt8(max(health)) AS state
        FROM {RAW}
        WHERE $__timeFilter(minute) AND (cluster, node, gpu_uuid) IN (
            SELECT cluster, node, gpu_uuid FROM {RAW} WHERE $__timeFilter(minute)
            GROUP BY cluster, node, gpu_uuid
            HAVING {_NOT_OK_MS} > 0
            ORDER BY {_NOT_OK_MS} DESC, cluster, node, gpu_uuid
            LIMIT {fragments.TOP_GPUS})
        GROUP BY t, node, gpu_index, gpu_uuid
    )
    GROUP BY gpu_uuid, gpu
)
ARRAY JOIN arrayFilter((x, i) -> i = 1 OR x.2 != pts[i - 1].2, pts, arrayEnumerate(pts)) AS p
"""
"""The not-ok timeline from raw samples: the `TOP_GPUS` GPUs with the most milliseconds degraded or failing in the
range (ties by cluster, node, UUID), their worst state per bucket, and the points where it changes."""

QUESTIONS: Final = (
    Question(
        "fleet utilization over time", None,
        _fleet(("util_ms", "util_weighted_ms"), _FLEET_UTIL, "t"),
        _raw(f"{BUCKET} AS t, {_UTIL}", "t"),
        "avg(avg_over_time(DCGM_FI_DEV_GPU_UTIL[$step]))",
    ),
    Question(
        "utilization per tenant over time", None,
        _fleet(("tenant", "util_ms", "util_weighted_ms"), f"tenant, {_FLEET_UTIL}", "t, tenant", "tenant != ''"),
        f"SELECT {BUCKET} AS t, tenant, {_UTIL} FROM {RAW} "
        "WHERE $__timeFilter(minute) AND tenant != '' GROUP BY t, tenant ORDER BY t, tenant",
        'avg by (tenant) (avg_over_time(DCGM_FI_DEV_GPU_UTIL{tenant!=""}[$step]))',
    ),
    Question(
        "GPUs by health state over time", ("gpufleet-fleet", "GPUs by health state over time (time-weighted)"), None,
        # time-weighted: GPU-seconds claimed in each state over the bucket's seconds (each sample claims its interval)
        f"SELECT {BUCKET} AS t, toString(health) AS state, "
        f"sum(toUInt64(interval_ms)) / (1000 * {fragments.BUCKET_S}) AS gpus FROM {RAW} "
        "WHERE $__timeFilter(minute) GROUP BY t, state ORDER BY t, state",
        'count_values("state", max by (UUID) (max_over_time(gpufleet_health_state[$step])))',
    ),
    Question(
        "power over time", ("gpufleet-fleet", "Power draw"), None,
        _raw(f"{BUCKET} AS t, {_ENERGY_MJ} / 1000 / {fragments.BUCKET_S} AS power_w", "t"),
        "sum(avg by (UUID) (avg_over_time(DCGM_FI_DEV_POWER_USAGE[$step])))",
    ),
    Question(
        "energy over the range", ("gpufleet-fleet", "Energy over the time range"), None,
        _raw(f"{_ENERGY_MJ} / 3600000000 AS energy_kwh"),
        "sum(increase(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[$range])) / 3.6e9",
        instant=True,
    ),
    Question(
        "health timeline of the GPUs not ok the longest",
        ("gpufleet-health", f"Health timeline of the {fragments.TOP_GPUS} GPUs not ok the longest"), None,
        NOT_OK_TIMELINE_RAW, None,
    ),
    Question(
        "per-job table (GPUs, nodes, GPU-hours, MFU, stalled, throughput)", ("gpufleet-jobs", "Jobs"), None,
        JOBS_RAW, None, instant=True,
    ),
)
