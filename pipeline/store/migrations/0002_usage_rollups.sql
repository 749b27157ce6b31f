-- Usage rollups, maintained inside ClickHouse by materialized views on gpu_samples
-- (docs/aggregations.md explains every column and why this design).
--
-- Each sample is attributed to the minute (and hour) that contains its interval START,
-- time - interval_ms, and counts its whole interval there. Time sums are integer milliseconds and
-- energy is integer millijoules, so sums are exact and independent of insert and merge order;
-- FLOPs and utilization are Float64 (ratios, never billed).
--
-- Health is part of the key, so every sum is split by health state and the SLA policy
-- (billing.exclude_states) is applied at query time. The idle threshold is applied at query time
-- too: allocated milliseconds are kept per whole-percent utilization (NVML reports whole percents).
--
-- The ingester drops duplicate messages before it inserts, so each sample reaches gpu_samples,
-- and these views, exactly once. An identical insert retried by the client is dropped by ClickHouse
-- at the source and at every view target alike (non_replicated_deduplication_window on each).

CREATE TABLE IF NOT EXISTS ${db}.gpu_usage_1m ${on_cluster}
(
    minute                     DateTime('UTC') COMMENT 'minute containing the interval start',
    tenant                     LowCardinality(String) COMMENT 'empty = unallocated',
    cluster                    LowCardinality(String),
    node                       LowCardinality(String),
    gpu_uuid                   LowCardinality(String),
    model                      LowCardinality(String),
    job                        String,
    health                     Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3),
    samples                    SimpleAggregateFunction(sum, UInt64),
    reported_ms                SimpleAggregateFunction(sum, UInt64) COMMENT 'sum of interval_ms',
    held_no_process_ms         SimpleAggregateFunction(sum, UInt64) COMMENT 'allocated, compute_processes = 0',
    active_ms_by_util_pct      SimpleAggregateFunction(sumMap, Map(UInt8, UInt64)) COMMENT 'allocated with a process (or process count unknown) and utilization known: ms per whole-percent utilization',
    util_ms                    SimpleAggregateFunction(sum, UInt64) COMMENT 'ms with utilization known',
    util_weighted_ms           SimpleAggregateFunction(sum, Float64) COMMENT 'sum of util_gpu_ratio x interval_ms',
    peak_known_ms              SimpleAggregateFunction(sum, UInt64) COMMENT 'ms of samples whose model has a peak FLOP/s',
    mfu_ms                     SimpleAggregateFunction(sum, UInt64) COMMENT 'ms in MFU: peak known and achieved FLOPs known',
    measured_ms                SimpleAggregateFunction(sum, UInt64) COMMENT 'ms in MFU whose FLOPs the job measured',
    measured_flop              SimpleAggregateFunction(sum, Float64) COMMENT 'job-reported FLOPs (known models)',
    estimated_unmeasured_flop  SimpleAggregateFunction(sum, Float64) COMMENT 'tensor-activity estimate where nothing was measured',
    peak_capacity_flop         SimpleAggregateFunction(sum, Float64) COMMENT 'peak FLOP/s x seconds over mfu_ms',
    energy_mj                  SimpleAggregateFunction(sum, UInt64) COMMENT 'round(power_w x interval_ms), millijoules',
    model_peak_flop_s          SimpleAggregateFunction(max, Nullable(Float64)) COMMENT 'peak FLOP/s of the model, NULL = unknown',
    first_start_ms             SimpleAggregateFunction(min, Int64) COMMENT 'earliest interval start, Unix ms',
    last_end_ms                SimpleAggregateFunction(max, Int64) COMMENT 'latest interval end, Unix ms'
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, tenant, cluster, node, gpu_uuid, model, job, health)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.gpu_usage_1m_mv ${on_cluster} TO ${db}.gpu_usage_1m AS
SELECT
    toDateTime(intDiv(toUnixTimestamp64Milli(time) - interval_ms, 60000) * 60, 'UTC') AS minute,
    tenant, cluster, node, gpu_uuid, model, job, health,
    count() AS samples,
    sum(toUInt64(interval_ms)) AS reported_ms,
    sumIf(toUInt64(interval_ms), tenant != '' AND ifNull(compute_processes = 0, 0)) AS held_no_process_ms,
    sumMapIf(
        map(toUInt8(least(floor(ifNull(util_gpu_ratio, 0) * 100 + 0.0001), 100)), toUInt64(interval_ms)),
        tenant != '' AND NOT ifNull(compute_processes = 0, 0) AND util_gpu_ratio IS NOT NULL
    ) AS active_ms_by_util_pct,
    sumIf(toUInt64(interval_ms), util_gpu_ratio IS NOT NULL) AS util_ms,
    sum(toFloat64(ifNull(util_gpu_ratio, 0)) * interval_ms) AS util_weighted_ms,
    sumIf(toUInt64(interval_ms), peak_flops IS NOT NULL) AS peak_known_ms,
    sumIf(toUInt64(interval_ms), peak_flops IS NOT NULL
          AND (flops_measured IS NOT NULL OR flops_estimated IS NOT NULL OR error != '')) AS mfu_ms,
    sumIf(toUInt64(interval_ms), peak_flops IS NOT NULL AND flops_measured IS NOT NULL) AS measured_ms,
    sumIf(ifNull(flops_measured, 0), peak_flops IS NOT NULL) AS measured_flop,
    sumIf(ifNull(flops_estimated, 0), peak_flops IS NOT NULL AND flops_measured IS NULL) AS estimated_unmeasured_flop,
    sumIf(ifNull(peak_flops, 0) * interval_ms / 1000, peak_flops IS NOT NULL
          AND (flops_measured IS NOT NULL OR flops_estimated IS NOT NULL OR error != '')) AS peak_capacity_flop,
    sum(toUInt64(round(ifNull(power_w, 0) * interval_ms))) AS energy_mj,
    max(peak_flops) AS model_peak_flop_s,
    min(toUnixTimestamp64Milli(time) - interval_ms) AS first_start_ms,
    max(toUnixTimestamp64Milli(time)) AS last_end_ms
FROM ${db}.gpu_samples
GROUP BY minute, tenant, cluster, node, gpu_uuid, model, job, health;

-- Per GPU and hour (no job): what usage_hourly and billing read. Fed from the minute rollup's
-- inserts (each carries the same samples once), so both rollups always agree.
CREATE TABLE IF NOT EXISTS ${db}.gpu_usage_1h ${on_cluster}
(
    hour                       DateTime('UTC') COMMENT 'hour containing the interval start',
    tenant                     LowCardinality(String),
    cluster                    LowCardinality(String),
    node                       LowCardinality(String),
    gpu_uuid                   LowCardinality(String),
    model                      LowCardinality(String),
    health                     Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3),
    samples                    SimpleAggregateFunction(sum, UInt64),
    reported_ms                SimpleAggregateFunction(sum, UInt64),
    held_no_process_ms         SimpleAggregateFunction(sum, UInt64),
    active_ms_by_util_pct      SimpleAggregateFunction(sumMap, Map(UInt8, UInt64)),
    util_ms                    SimpleAggregateFunction(sum, UInt64),
    util_weighted_ms           SimpleAggregateFunction(sum, Float64),
    peak_known_ms              SimpleAggregateFunction(sum, UInt64),
    mfu_ms                     SimpleAggregateFunction(sum, UInt64),
    measured_ms                SimpleAggregateFunction(sum, UInt64),
    measured_flop              SimpleAggregateFunction(sum, Float64),
    estimated_unmeasured_flop  SimpleAggregateFunction(sum, Float64),
    peak_capacity_flop         SimpleAggregateFunction(sum, Float64),
    energy_mj                  SimpleAggregateFunction(sum, UInt64),
    model_peak_flop_s          SimpleAggregateFunction(max, Nullable(Float64)),
    first_start_ms             SimpleAggregateFunction(min, Int64),
    last_end_ms                SimpleAggregateFunction(max, Int64)
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, tenant, cluster, node, gpu_uuid, model, health)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.gpu_usage_1h_mv ${on_cluster} TO ${db}.gpu_usage_1h AS
SELECT
    toStartOfHour(minute) AS hour,
    tenant, cluster, node, gpu_uuid, model, health,
    sum(samples) AS samples,
    sum(reported_ms) AS reported_ms,
    sum(held_no_process_ms) AS held_no_process_ms,
    sumMap(active_ms_by_util_pct) AS active_ms_by_util_pct,
    sum(util_ms) AS util_ms,
    sum(util_weighted_ms) AS util_weighted_ms,
    sum(peak_known_ms) AS peak_known_ms,
    sum(mfu_ms) AS mfu_ms,
    sum(measured_ms) AS measured_ms,
    sum(measured_flop) AS measured_flop,
    sum(estimated_unmeasured_flop) AS estimated_unmeasured_flop,
    sum(peak_capacity_flop) AS peak_capacity_flop,
    sum(energy_mj) AS energy_mj,
    max(model_peak_flop_s) AS model_peak_flop_s,
    min(first_start_ms) AS first_start_ms,
    max(last_end_ms) AS last_end_ms
FROM ${db}.gpu_usage_1m
GROUP BY hour, tenant, cluster, node, gpu_uuid, model, health;

-- Latest sample per GPU, for current fleet health (a small table, one row per GPU after merges).
CREATE TABLE IF NOT EXISTS ${db}.gpu_latest ${on_cluster}
(
    gpu_uuid        LowCardinality(String),
    time            DateTime64(3, 'UTC'),
    cluster         LowCardinality(String),
    node            LowCardinality(String),
    gpu_index       UInt16,
    model           LowCardinality(String),
    tenant          LowCardinality(String),
    health          Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3),
    health_reasons  Array(LowCardinality(String))
)
ENGINE = ${replicated}ReplacingMergeTree(time)
ORDER BY gpu_uuid
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.gpu_latest_mv ${on_cluster} TO ${db}.gpu_latest AS
SELECT gpu_uuid, time, cluster, node, gpu_index, model, tenant, health, health_reasons
FROM ${db}.gpu_samples;

-- The billing policy in force (written from config by pipeline.usage.sync_policy; the newest row
-- wins). usage_hourly reads it, so billing and dashboards apply the same SLA policy.
CREATE TABLE IF NOT EXISTS ${db}.billing_policy ${on_cluster}
(
    key            UInt8,
    exclude_states Array(String) COMMENT 'health states whose GPU-seconds are not billed',
    idle_util_pct  UInt8 COMMENT 'allocated GPU below this whole-percent utilization is idle',
    updated_at     DateTime64(3, 'UTC')
)
ENGINE = ${replicated}ReplacingMergeTree(updated_at)
ORDER BY key;

INSERT INTO ${db}.billing_policy (key, exclude_states, idle_util_pct, updated_at)
VALUES (0, ['failing'], 5, 0);

-- Hourly usage per tenant and GPU model: the table billing reads (docs/aggregations.md).
-- Gaps: per GPU and hour, the expected coverage is the hour clipped to the fleet's reporting
-- span (its first interval start ever to its last interval end so far); what the GPU did not
-- report of it is its gap, charged to the tenant and model it served most in that hour (ties: the
-- larger tenant name). Gaps are never billed.
CREATE VIEW IF NOT EXISTS ${db}.usage_hourly ${on_cluster} AS
WITH
    policy AS (
        SELECT argMax(exclude_states, updated_at) AS excluded, argMax(idle_util_pct, updated_at) AS idle_pct
        FROM ${db}.billing_policy
    ),
    per_gpu AS (
        SELECT
            u.hour AS hour, u.cluster AS cluster, u.node AS node, u.gpu_uuid AS gpu_uuid,
            u.tenant AS tenant, u.model AS model,
            sum(u.reported_ms) AS allocated_ms,
            sumIf(u.reported_ms, has(p.excluded, toString(u.health))) AS unhealthy_ms,
            sumIf(u.held_no_process_ms + arraySum(mapValues(mapFilter((k, v) -> k < p.idle_pct, u.active_ms_by_util_pct))),
                  NOT has(p.excluded, toString(u.health))) AS idle_ms,
            sum(u.energy_mj) AS energy_mj,
            sum(u.util_ms) AS util_ms,
            sum(u.util_weighted_ms) AS util_weighted_ms,
            sum(u.peak_known_ms) AS peak_known_ms,
            sum(u.mfu_ms) AS mfu_ms,
            sum(u.measured_ms) AS measured_ms,
            sum(u.measured_flop) + sum(u.estimated_unmeasured_flop) AS achieved_flop,
            sum(u.peak_capacity_flop) AS peak_flop,
            min(u.first_start_ms) AS first_start_ms,
            max(u.last_end_ms) AS last_end_ms
        FROM ${db}.gpu_usage_1h AS u CROSS JOIN policy AS p
        GROUP BY hour, cluster, node, gpu_uuid, tenant, model
    ),
    fleet_span AS (
        SELECT min(first_start_ms) AS span_start, max(last_end_ms) AS span_end FROM ${db}.gpu_usage_1h
    ),
    gaps AS (
        SELECT g.hour AS hour, g.top.1 AS tenant, g.top.2 AS model,
               sum(greatest(
                   least(toInt64(toUnixTimestamp(g.hour)) * 1000 + 3600000, f.span_end)
                   - greatest(toInt64(toUnixTimestamp(g.hour)) * 1000, f.span_start)
                   - toInt64(g.total_ms), 0)) AS gap_ms
        FROM (
            SELECT hour, cluster, node, gpu_uuid, sum(allocated_ms) AS total_ms,
                   argMax((tenant, model), (allocated_ms, tenant)) AS top
            FROM per_gpu GROUP BY hour, cluster, node, gpu_uuid
        ) AS g
        CROSS JOIN fleet_span AS f
        GROUP BY hour, tenant, model
    ),
    usage AS (
        SELECT hour, tenant, model,
               uniqExact(cluster, node, gpu_uuid) AS gpus,
               sum(allocated_ms) AS allocated_ms, sum(unhealthy_ms) AS unhealthy_ms, sum(idle_ms) AS idle_ms,
               sum(energy_mj) AS energy_mj, sum(util_ms) AS util_ms, sum(util_weighted_ms) AS util_weighted_ms,
               sum(peak_known_ms) AS peak_known_ms, sum(mfu_ms) AS mfu_ms, sum(measured_ms) AS measured_ms,
               sum(achieved_flop) AS achieved_flop, sum(peak_flop) AS peak_flop
        FROM per_gpu
        WHERE tenant != ''
        GROUP BY hour, tenant, model
    )
SELECT
    u.hour AS hour,
    u.tenant AS tenant,
    u.model AS gpu_model,
    u.gpus AS gpus,
    u.allocated_ms / 1000 AS allocated_gpu_seconds,
    u.unhealthy_ms / 1000 AS unhealthy_gpu_seconds,
    (u.allocated_ms - u.unhealthy_ms) / 1000 AS billable_gpu_seconds,
    (u.allocated_ms - u.unhealthy_ms) / 3600000 AS billable_gpu_hours,
    u.idle_ms / 3600000 AS idle_allocated_gpu_hours,
    gp.gap_ms / 1000 AS gap_gpu_seconds,
    u.energy_mj / 3600000000 AS energy_kwh,
    if(u.util_ms > 0, u.util_weighted_ms / u.util_ms, NULL) AS avg_utilization,
    if(u.peak_flop > 0, u.achieved_flop / u.peak_flop, NULL) AS mfu,
    multiIf(u.mfu_ms = 0, '', u.measured_ms = u.mfu_ms, 'measured', u.measured_ms = 0, 'estimated', 'mixed') AS mfu_source,
    if(u.mfu_ms > 0, u.measured_ms / u.mfu_ms, NULL) AS measured_coverage,
    (u.allocated_ms - u.peak_known_ms) / 1000 AS unknown_model_gpu_seconds
FROM usage AS u
LEFT JOIN gaps AS gp ON gp.hour = u.hour AND gp.tenant = u.tenant AND gp.model = u.model;
