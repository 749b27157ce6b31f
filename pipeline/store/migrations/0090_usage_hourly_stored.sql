-- Billing reads stored rows (docs/aggregations.md, "Stored usage"): `usage_hourly` materialized per hour,
-- one row per (hour, tenant, GPU model), so `gpufleet usage`, the billing board and `billing close` read
-- O(tenants x models x hours) rows whatever the fleet's size.
--
-- An hour's answer is not a sum of its samples (the gap of a GPU-hour is charged to the (tenant, model) it
-- served most and clipped to the fleet's reporting span; `gpus` counts distinct GPUs; claims outranked by
-- another node's are taken out), so it is recomputed, whole, from the hour rollups when its inputs change:
-- `usage_hourly_at(hours)` is `usage_hourly` (0071) for the given hours only, the fleet span read from
-- `usage_hour_inputs`. `pipeline/queries/usage.py` (`refresh`) finds the hours whose inputs changed and stores
-- their rows with a version; the ingester refreshes the hours of each batch, and every reader refreshes
-- the hours it reads first. The view `usage_hourly` stays: the raw answer the stored rows are checked against.

-- Per hour, what the hour rollup holds: its samples and its span. Fed by a view on gpu_usage_1h, so it
-- changes exactly when the hour rollup does (an insert that reached the minute rollup but not the hour
-- rollup changes neither; its repeat changes both). One row per hour after merges: what `refresh`
-- compares, and the fleet's reporting span (the same minimum and maximum as gpu_usage_1h's).
CREATE TABLE IF NOT EXISTS ${db}.usage_hour_inputs ${on_cluster}
(
    hour            DateTime('UTC'),
    samples         SimpleAggregateFunction(sum, UInt64),
    first_start_ms  SimpleAggregateFunction(min, Int64),
    last_end_ms     SimpleAggregateFunction(max, Int64)
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY hour
SETTINGS ${dedup_window} = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.usage_hour_inputs_mv ${on_cluster} TO ${db}.usage_hour_inputs AS
SELECT hour, sum(samples) AS samples, min(first_start_ms) AS first_start_ms, max(last_end_ms) AS last_end_ms
FROM ${db}.gpu_usage_1h
GROUP BY hour;

-- Backfill from the hour rollup already stored (an insert racing this counts twice in `samples`, which
-- only makes its hour recomputed once more: the counts are compared, never billed).
INSERT INTO ${db}.usage_hour_inputs
SELECT hour, sum(samples), min(first_start_ms), max(last_end_ms)
FROM ${db}.gpu_usage_1h
WHERE (SELECT count() FROM ${db}.usage_hour_inputs) = 0
GROUP BY hour;

-- usage_hourly_at: 0071's usage_hourly, restricted to `hours` (whole-hour DateTimes); the fleet span from
-- usage_hour_inputs (one row per hour).
CREATE OR REPLACE VIEW ${db}.usage_hourly_at ${on_cluster} AS
WITH
    policy AS (
        SELECT argMax(exclude_states, updated_at) AS excluded, argMax(idle_util_pct, updated_at) AS idle_pct
        FROM ${db}.billing_policy
    ),
    rollup AS (
        SELECT hour, cluster, node, gpu_uuid, tenant, model, health, toInt8(1) AS sign,
               claimed_ms, held_no_process_ms, active_ms_by_util_pct, energy_mj, util_ms, util_weighted_ms,
               peak_known_ms, mfu_ms, measured_ms, measured_flop, estimated_unmeasured_flop, peak_capacity_flop,
               share_num, share_den
        FROM ${db}.gpu_usage_1h
        WHERE hour IN {hours:Array(DateTime('UTC'))}
        UNION ALL
        SELECT toStartOfHour(minute) AS hour, cluster, node, gpu_uuid, tenant, model, health, toInt8(-1) AS sign,
               claimed_ms, held_no_process_ms, active_ms_by_util_pct, energy_mj, util_ms, util_weighted_ms,
               peak_known_ms, mfu_ms, measured_ms, measured_flop, estimated_unmeasured_flop, peak_capacity_flop,
               share_num, share_den
        FROM ${db}.gpu_usage_1m
        WHERE toStartOfHour(minute) IN {hours:Array(DateTime('UTC'))}
          AND (minute, gpu_uuid, cluster, node) IN (
            SELECT minute, gpu_uuid, cluster, node FROM ${db}.gpu_claim_outranked
            WHERE toStartOfHour(minute) IN {hours:Array(DateTime('UTC'))})
    ),
    per_gpu AS (
        SELECT
            r.hour AS hour, r.cluster AS cluster, r.node AS node, r.gpu_uuid AS gpu_uuid,
            r.tenant AS tenant, r.model AS model,
            max(toInt64(r.share_num) * intDiv(840, greatest(r.share_den, 1))) AS x840,
            sum(r.sign * toInt64(r.claimed_ms)) AS allocated_ms,
            sum(r.sign * toInt64(r.claimed_ms)) * x840 AS allocated_x,
            sumIf(r.sign * toInt64(r.claimed_ms), has(p.excluded, toString(r.health))) * x840 AS unhealthy_x,
            sumIf(r.sign * toInt64(r.held_no_process_ms
                                   + arraySum(mapValues(mapFilter((k, v) -> k < p.idle_pct, r.active_ms_by_util_pct)))),
                  NOT has(p.excluded, toString(r.health))) * x840 AS idle_x,
            sum(r.sign * toInt64(r.energy_mj)) AS energy_mj,
            sum(r.sign * toInt64(r.util_ms)) AS util_ms,
            sum(r.sign * r.util_weighted_ms) AS util_weighted_ms,
            sum(r.sign * toInt64(r.peak_known_ms)) * x840 AS peak_known_x,
            sum(r.sign * toInt64(r.mfu_ms)) AS mfu_ms,
            sum(r.sign * toInt64(r.measured_ms)) AS measured_ms,
            sum(r.sign * r.measured_flop) + sum(r.sign * r.estimated_unmeasured_flop) AS achieved_flop,
            sum(r.sign * r.peak_capacity_flop) AS peak_flop
        FROM rollup AS r CROSS JOIN policy AS p
        GROUP BY hour, cluster, node, gpu_uuid, tenant, model
    ),
    fleet_span AS (
        SELECT min(first_start_ms) AS span_start, max(last_end_ms) AS span_end FROM ${db}.usage_hour_inputs
    ),
    ranked AS (
        SELECT *,
               sum(allocated_ms) OVER (PARTITION BY hour, gpu_uuid, tenant, model) AS served_ms,
               sum(allocated_ms) OVER (PARTITION BY hour, gpu_uuid) AS gpu_ms,
               row_number() OVER (PARTITION BY hour, gpu_uuid, tenant, model ORDER BY cluster, node) AS nth
        FROM per_gpu
    ),
    owned AS (
        SELECT *, argMax((tenant, model), (served_ms, tenant)) OVER (PARTITION BY hour, gpu_uuid) AS top
        FROM ranked
    ),
    usage AS (
        SELECT g.hour AS hour, g.tenant AS tenant, g.model AS model,
               uniqExactIf(g.gpu_uuid, g.allocated_ms > 0) AS gpus,
               sum(g.allocated_x) AS allocated_x, sum(g.unhealthy_x) AS unhealthy_x, sum(g.idle_x) AS idle_x,
               sum(g.energy_mj) AS energy_mj, sum(g.util_ms) AS util_ms, sum(g.util_weighted_ms) AS util_weighted_ms,
               sum(g.peak_known_x) AS peak_known_x, sum(g.mfu_ms) AS mfu_ms, sum(g.measured_ms) AS measured_ms,
               sum(g.achieved_flop) AS achieved_flop, sum(g.peak_flop) AS peak_flop,
               sumIf(greatest(
                   least(toInt64(toUnixTimestamp(g.hour)) * 1000 + 3600000, f.span_end)
                   - greatest(toInt64(toUnixTimestamp(g.hour)) * 1000, f.span_start)
                   - g.gpu_ms, 0) * g.x840, (g.tenant, g.model) = g.top AND g.nth = 1) AS gap_x
        FROM owned AS g CROSS JOIN fleet_span AS f
        WHERE g.tenant != ''
        GROUP BY hour, tenant, model
        HAVING allocated_x > 0
    )
SELECT
    u.hour AS hour,
    u.tenant AS tenant,
    u.model AS gpu_model,
    u.gpus AS gpus,
    u.allocated_x / 840000 AS allocated_gpu_seconds,
    u.unhealthy_x / 840000 AS unhealthy_gpu_seconds,
    (u.allocated_x - u.unhealthy_x) / 840000 AS billable_gpu_seconds,
    (u.allocated_x - u.unhealthy_x) / 3024000000 AS billable_gpu_hours,
    u.idle_x / 3024000000 AS idle_allocated_gpu_hours,
    u.gap_x / 840000 AS gap_gpu_seconds,
    u.energy_mj / 3600000000 AS energy_kwh,
    if(u.util_ms > 0, u.util_weighted_ms / u.util_ms, NULL) AS avg_utilization,
    if(u.peak_flop > 0, u.achieved_flop / u.peak_flop, NULL) AS mfu,
    multiIf(u.mfu_ms = 0, '', u.measured_ms = u.mfu_ms, 'measured', u.measured_ms = 0, 'estimated', 'mixed') AS mfu_source,
    if(u.mfu_ms > 0, u.measured_ms / u.mfu_ms, NULL) AS measured_coverage,
    (u.allocated_x - u.peak_known_x) / 840000 AS unknown_model_gpu_seconds
FROM usage AS u;

-- The stored rows: usage_hourly's columns, the version of the refresh that wrote them (its start on the
-- server's clock, so a later refresh, which read later data, wins), and `is_deleted` for the (tenant,
-- model) rows an hour no longer has. Read them with FINAL.
CREATE TABLE IF NOT EXISTS ${db}.usage_hourly_stored ${on_cluster}
(
    hour                       DateTime('UTC'),
    tenant                     LowCardinality(String),
    gpu_model                  LowCardinality(String),
    gpus                       UInt64,
    allocated_gpu_seconds      Float64,
    unhealthy_gpu_seconds      Float64,
    billable_gpu_seconds       Float64,
    billable_gpu_hours         Float64,
    idle_allocated_gpu_hours   Float64,
    gap_gpu_seconds            Float64,
    energy_kwh                 Float64,
    avg_utilization            Nullable(Float64),
    mfu                        Nullable(Float64),
    mfu_source                 LowCardinality(String),
    measured_coverage          Nullable(Float64),
    unknown_model_gpu_seconds  Float64,
    version                    DateTime64(9, 'UTC') COMMENT 'start of the refresh that wrote the row',
    is_deleted                 UInt8 COMMENT '1: the hour no longer has this (tenant, model)'
)
ENGINE = ${replicated}ReplacingMergeTree(version, is_deleted)
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, tenant, gpu_model);

-- Per hour, the inputs its stored rows were computed from (pipeline/queries/usage.py, `refresh`): the
-- hour rollup's samples within two hours of it (claims reach that far), its expected coverage within the
-- fleet's reporting span, and the billing policy. An hour whose inputs differ is recomputed.
CREATE TABLE IF NOT EXISTS ${db}.usage_hourly_marks ${on_cluster}
(
    hour     DateTime('UTC'),
    inputs   String,
    version  DateTime64(9, 'UTC')
)
ENGINE = ${replicated}ReplacingMergeTree(version)
ORDER BY hour;
