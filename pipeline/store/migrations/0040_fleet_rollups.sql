-- Fleet- and tenant-level rollups: per minute and per hour, keyed by (cluster, tenant, model,
-- health) and never by GPU, node or job, so their size follows the number of tenants and models,
-- not the fleet (docs/aggregations.md, "Fleet rollups"). Both are fed from `gpu_usage_1m`'s insert
-- blocks (as `gpu_usage_1h` is): a fleet row is the sum of the per-GPU rows of its key, so every
-- board, `gpufleet status` and the MFU alert read the same numbers from either level. Integer
-- sums (milliseconds, millijoules) are exact in any order; FLOPs are Float64 sums (ratios, never
-- billed), equal to the per-GPU rollup's up to the order of addition.
--
-- `measured_peak_flop` and `unmeasured_peak_flop` split the MFU denominator by where the FLOPs came
-- from, per per-GPU rollup row (the row's peak FLOP/s x its measured, or other MFU, seconds), so the
-- "measured" and "hardware estimate" MFU lines need no per-GPU rows either.
--
-- Also here: projections that let one GPU's or one node's rows (and one job's) be read by key from
-- the per-GPU rollups; `node_latest` (each node's newest agent report) for the NodeSilent alert;
-- a projection of `agent_reports` sorted by time, so "the last N minutes" of every node's reports
-- reads those minutes, not the day. New tables are backfilled from what is already stored; run `gpufleet migrate` with the
-- ingesters stopped (compose runs it before them), or an insert racing the backfill counts twice.

CREATE TABLE IF NOT EXISTS ${db}.fleet_usage_1m ${on_cluster}
(
    minute                     DateTime('UTC') COMMENT 'minute containing the interval start',
    cluster                    LowCardinality(String),
    tenant                     LowCardinality(String) COMMENT 'empty = unallocated',
    model                      LowCardinality(String),
    health                     Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3),
    samples                    SimpleAggregateFunction(sum, UInt64),
    reported_ms                SimpleAggregateFunction(sum, UInt64) COMMENT 'GPU-milliseconds reported',
    claimed_ms                 SimpleAggregateFunction(sum, UInt64) COMMENT 'GPU-ms claimed (once per node): billed',
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
    measured_peak_flop         SimpleAggregateFunction(sum, Float64) COMMENT 'peak FLOP/s x measured seconds, per GPU row',
    unmeasured_peak_flop       SimpleAggregateFunction(sum, Float64) COMMENT 'peak FLOP/s x unmeasured MFU seconds, per GPU row',
    energy_mj                  SimpleAggregateFunction(sum, UInt64),
    model_peak_flop_s          SimpleAggregateFunction(max, Nullable(Float64)),
    first_start_ms             SimpleAggregateFunction(min, Int64),
    last_end_ms                SimpleAggregateFunction(max, Int64)
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, cluster, tenant, model, health)
SETTINGS ${dedup_window} = 10000;

CREATE TABLE IF NOT EXISTS ${db}.fleet_usage_1h ${on_cluster}
(
    hour                       DateTime('UTC') COMMENT 'hour containing the interval start',
    cluster                    LowCardinality(String),
    tenant                     LowCardinality(String) COMMENT 'empty = unallocated',
    model                      LowCardinality(String),
    health                     Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3),
    samples                    SimpleAggregateFunction(sum, UInt64),
    reported_ms                SimpleAggregateFunction(sum, UInt64) COMMENT 'GPU-milliseconds reported',
    claimed_ms                 SimpleAggregateFunction(sum, UInt64) COMMENT 'GPU-ms claimed (once per node): billed',
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
    measured_peak_flop         SimpleAggregateFunction(sum, Float64) COMMENT 'peak FLOP/s x measured seconds, per GPU row',
    unmeasured_peak_flop       SimpleAggregateFunction(sum, Float64) COMMENT 'peak FLOP/s x unmeasured MFU seconds, per GPU row',
    energy_mj                  SimpleAggregateFunction(sum, UInt64),
    model_peak_flop_s          SimpleAggregateFunction(max, Nullable(Float64)),
    first_start_ms             SimpleAggregateFunction(min, Int64),
    last_end_ms                SimpleAggregateFunction(max, Int64)
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, cluster, tenant, model, health)
SETTINGS ${dedup_window} = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.fleet_usage_1m_mv ${on_cluster} TO ${db}.fleet_usage_1m AS
SELECT
    minute, cluster, tenant, model, health,
    sum(samples) AS samples,
    sum(reported_ms) AS reported_ms,
    sum(claimed_ms) AS claimed_ms,
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
    sum(ifNull(u.model_peak_flop_s, 0) * u.measured_ms / 1000) AS measured_peak_flop,
    sum(ifNull(u.model_peak_flop_s, 0) * (toInt64(u.mfu_ms) - toInt64(u.measured_ms)) / 1000) AS unmeasured_peak_flop,
    sum(energy_mj) AS energy_mj,
    max(model_peak_flop_s) AS model_peak_flop_s,
    min(first_start_ms) AS first_start_ms,
    max(last_end_ms) AS last_end_ms
FROM ${db}.gpu_usage_1m AS u
GROUP BY minute, cluster, tenant, model, health;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.fleet_usage_1h_mv ${on_cluster} TO ${db}.fleet_usage_1h AS
SELECT
    toStartOfHour(minute) AS hour, cluster, tenant, model, health,
    sum(samples) AS samples,
    sum(reported_ms) AS reported_ms,
    sum(claimed_ms) AS claimed_ms,
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
    sum(measured_peak_flop) AS measured_peak_flop,
    sum(unmeasured_peak_flop) AS unmeasured_peak_flop,
    sum(energy_mj) AS energy_mj,
    max(model_peak_flop_s) AS model_peak_flop_s,
    min(first_start_ms) AS first_start_ms,
    max(last_end_ms) AS last_end_ms
FROM ${db}.fleet_usage_1m
GROUP BY hour, cluster, tenant, model, health;

-- Backfill from the per-GPU rollup already stored (it reaches fleet_usage_1h through its view); only
-- into an empty table, so a migration re-run after a failure part-way adds nothing twice.
INSERT INTO ${db}.fleet_usage_1m
SELECT
    minute, cluster, tenant, model, health,
    sum(samples) AS samples,
    sum(reported_ms) AS reported_ms,
    sum(claimed_ms) AS claimed_ms,
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
    sum(ifNull(u.model_peak_flop_s, 0) * u.measured_ms / 1000) AS measured_peak_flop,
    sum(ifNull(u.model_peak_flop_s, 0) * (toInt64(u.mfu_ms) - toInt64(u.measured_ms)) / 1000) AS unmeasured_peak_flop,
    sum(energy_mj) AS energy_mj,
    max(model_peak_flop_s) AS model_peak_flop_s,
    min(first_start_ms) AS first_start_ms,
    max(last_end_ms) AS last_end_ms
FROM ${db}.gpu_usage_1m AS u
WHERE (SELECT count() FROM ${db}.fleet_usage_1m) = 0
GROUP BY minute, cluster, tenant, model, health;

-- Per job and hour (tenant, job, cluster, model): the tenant board's job table over a week. Keyed by
-- tenant and job first, so one tenant's or one job's rows are read by key; `gpus` is the set of GPU
-- UUIDs the job used (merged as a set: exact distinct counts over any range of hours).
CREATE TABLE IF NOT EXISTS ${db}.job_usage_1h ${on_cluster}
(
    hour                       DateTime('UTC') COMMENT 'hour containing the interval start',
    tenant                     LowCardinality(String),
    job                        String,
    cluster                    LowCardinality(String),
    model                      LowCardinality(String),
    gpus                       SimpleAggregateFunction(groupUniqArrayArray, Array(String)) COMMENT 'GPU UUIDs',
    reported_ms                SimpleAggregateFunction(sum, UInt64),
    claimed_ms                 SimpleAggregateFunction(sum, UInt64),
    mfu_ms                     SimpleAggregateFunction(sum, UInt64),
    measured_ms                SimpleAggregateFunction(sum, UInt64),
    measured_flop              SimpleAggregateFunction(sum, Float64),
    estimated_unmeasured_flop  SimpleAggregateFunction(sum, Float64),
    peak_capacity_flop         SimpleAggregateFunction(sum, Float64),
    measured_peak_flop         SimpleAggregateFunction(sum, Float64),
    unmeasured_peak_flop       SimpleAggregateFunction(sum, Float64),
    first_start_ms             SimpleAggregateFunction(min, Int64),
    last_end_ms                SimpleAggregateFunction(max, Int64)
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant, job, hour, cluster, model)
SETTINGS ${dedup_window} = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.job_usage_1h_mv ${on_cluster} TO ${db}.job_usage_1h AS
SELECT
    toStartOfHour(minute) AS hour, tenant, job, cluster, model,
    groupUniqArray(toString(u.gpu_uuid)) AS gpus,
    sum(u.reported_ms) AS reported_ms,
    sum(u.claimed_ms) AS claimed_ms,
    sum(u.mfu_ms) AS mfu_ms,
    sum(u.measured_ms) AS measured_ms,
    sum(u.measured_flop) AS measured_flop,
    sum(u.estimated_unmeasured_flop) AS estimated_unmeasured_flop,
    sum(u.peak_capacity_flop) AS peak_capacity_flop,
    sum(ifNull(u.model_peak_flop_s, 0) * u.measured_ms / 1000) AS measured_peak_flop,
    sum(ifNull(u.model_peak_flop_s, 0) * (toInt64(u.mfu_ms) - toInt64(u.measured_ms)) / 1000) AS unmeasured_peak_flop,
    min(u.first_start_ms) AS first_start_ms,
    max(u.last_end_ms) AS last_end_ms
FROM ${db}.gpu_usage_1m AS u
WHERE tenant != '' AND job != ''
GROUP BY hour, tenant, job, cluster, model;

INSERT INTO ${db}.job_usage_1h
SELECT
    toStartOfHour(minute) AS hour, tenant, job, cluster, model,
    groupUniqArray(toString(u.gpu_uuid)), sum(u.reported_ms), sum(u.claimed_ms), sum(u.mfu_ms), sum(u.measured_ms), sum(u.measured_flop),
    sum(u.estimated_unmeasured_flop), sum(u.peak_capacity_flop),
    sum(ifNull(u.model_peak_flop_s, 0) * u.measured_ms / 1000),
    sum(ifNull(u.model_peak_flop_s, 0) * (toInt64(u.mfu_ms) - toInt64(u.measured_ms)) / 1000),
    min(u.first_start_ms), max(u.last_end_ms)
FROM ${db}.gpu_usage_1m AS u
WHERE tenant != '' AND job != '' AND (SELECT count() FROM ${db}.job_usage_1h) = 0
GROUP BY hour, tenant, job, cluster, model;

-- One GPU's, one node's or one job's rows by key: the per-GPU rollups sorted a second way.
-- (Part merges rebuild a projection: an AggregatingMergeTree needs that said.)
ALTER TABLE ${db}.gpu_usage_1m ${on_cluster} MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';

ALTER TABLE ${db}.gpu_usage_1m ${on_cluster}
    ADD PROJECTION IF NOT EXISTS by_gpu (SELECT * ORDER BY cluster, node, gpu_uuid, minute);

ALTER TABLE ${db}.gpu_usage_1m ${on_cluster}
    ADD PROJECTION IF NOT EXISTS by_job (SELECT * ORDER BY tenant, job, minute);

ALTER TABLE ${db}.gpu_usage_1h ${on_cluster} MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';

ALTER TABLE ${db}.gpu_usage_1h ${on_cluster}
    ADD PROJECTION IF NOT EXISTS by_gpu (SELECT * ORDER BY cluster, node, gpu_uuid, hour);

ALTER TABLE ${db}.gpu_usage_1m ${on_cluster} MATERIALIZE PROJECTION by_gpu;

ALTER TABLE ${db}.gpu_usage_1m ${on_cluster} MATERIALIZE PROJECTION by_job;

ALTER TABLE ${db}.gpu_usage_1h ${on_cluster} MATERIALIZE PROJECTION by_gpu;

-- Each node's newest agent report: what NodeSilent reads instead of a day of agent_reports. One row
-- per node per insert block (the view keeps each block's newest), one per node after merges.
CREATE TABLE IF NOT EXISTS ${db}.node_latest ${on_cluster}
(
    cluster  LowCardinality(String),
    node     LowCardinality(String),
    time     DateTime64(3, 'UTC') COMMENT 'the newest report time of the node'
)
ENGINE = ${replicated}ReplacingMergeTree(time)
ORDER BY (cluster, node)
SETTINGS ${dedup_window} = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.node_latest_mv ${on_cluster} TO ${db}.node_latest AS
SELECT cluster, node, max(time) AS time
FROM ${db}.agent_reports
GROUP BY cluster, node;

INSERT INTO ${db}.node_latest SELECT cluster, node, max(time) FROM ${db}.agent_reports GROUP BY cluster, node;

-- Agent reports sorted by time as well (they are sorted by node, boot and seq): "the last 15 minutes"
-- of every node (the agent-counter alerts, the pipeline panels) reads those minutes only.
ALTER TABLE ${db}.agent_reports ${on_cluster} MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';

ALTER TABLE ${db}.agent_reports ${on_cluster} ADD PROJECTION IF NOT EXISTS by_time (SELECT * ORDER BY time);

ALTER TABLE ${db}.agent_reports ${on_cluster} MATERIALIZE PROJECTION by_time
