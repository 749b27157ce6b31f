-- The Jobs board's per-job table from job-level rollups (docs/aggregations.md, "Job rollups"): its size
-- follows jobs x hours, not GPUs x samples. Two things it read per GPU or per sample move to the job level:
--
-- 1. `job_usage_1h.nodes`: the set of node names a job ran on (merged as a set, like `gpus`: exact over any
--    range of hours). Backfilled from `gpu_usage_1m` as rows that carry only the nodes (every other column
--    at its neutral value: 0 for sums, [] for sets, +inf/-inf for min/max), which merge into the rows of
--    the same key: a job's sums, sets and spans are unchanged.
-- 2. `job_throughput_1m`/`_1h`: the tokens and samples jobs report over OTLP (0060), weighted by the claimed
--    share of each sample's interval and filed under the minute of its claim start, as every rollup files
--    a sample; only the samples that report either. `*_reports` counts them (0: the job reported none).
--    Fed from raw samples, so insert dedup (batch tokens) keeps them exact under replays as it does
--    `gpu_usage_1m`; backfilled from the raw samples stored (the hour table through its view).
-- Run `gpufleet migrate` with the ingesters stopped (compose runs it before them), as for 0040.

ALTER TABLE ${db}.job_usage_1h ${on_cluster}
    ADD COLUMN IF NOT EXISTS nodes SimpleAggregateFunction(groupUniqArrayArray, Array(String))
        COMMENT 'node names' AFTER gpus;

CREATE OR REPLACE MATERIALIZED VIEW ${db}.job_usage_1h_mv ${on_cluster} TO ${db}.job_usage_1h AS
SELECT
    toStartOfHour(minute) AS hour, tenant, job, cluster, model,
    groupUniqArray(toString(u.gpu_uuid)) AS gpus,
    groupUniqArray(toString(u.node)) AS nodes,
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

-- Only while no row has nodes yet: a re-run after a failure part-way adds nothing twice.
INSERT INTO ${db}.job_usage_1h (hour, tenant, job, cluster, model, nodes, first_start_ms, last_end_ms)
SELECT
    toStartOfHour(minute) AS hour, tenant, job, cluster, model,
    groupUniqArray(toString(u.node)),
    toInt64(9223372036854775807), toInt64(-9223372036854775807)
FROM ${db}.gpu_usage_1m AS u
WHERE tenant != '' AND job != '' AND (SELECT count() FROM ${db}.job_usage_1h WHERE notEmpty(nodes)) = 0
GROUP BY hour, tenant, job, cluster, model;

CREATE TABLE IF NOT EXISTS ${db}.job_throughput_1m ${on_cluster}
(
    minute            DateTime('UTC') COMMENT 'minute containing the claim start',
    tenant            LowCardinality(String),
    job               String,
    cluster           LowCardinality(String),
    model             LowCardinality(String),
    tokens_weighted   SimpleAggregateFunction(sum, Float64) COMMENT 'sum of tokens_measured x claimed_ms / interval_ms',
    tokens_reports    SimpleAggregateFunction(sum, UInt64) COMMENT 'samples with tokens_measured',
    samples_weighted  SimpleAggregateFunction(sum, Float64) COMMENT 'sum of samples_measured x claimed_ms / interval_ms',
    samples_reports   SimpleAggregateFunction(sum, UInt64) COMMENT 'samples with samples_measured'
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (tenant, job, minute, cluster, model)
SETTINGS ${dedup_window} = 10000;

CREATE TABLE IF NOT EXISTS ${db}.job_throughput_1h ${on_cluster}
(
    hour              DateTime('UTC') COMMENT 'hour containing the claim start',
    tenant            LowCardinality(String),
    job               String,
    cluster           LowCardinality(String),
    model             LowCardinality(String),
    tokens_weighted   SimpleAggregateFunction(sum, Float64),
    tokens_reports    SimpleAggregateFunction(sum, UInt64),
    samples_weighted  SimpleAggregateFunction(sum, Float64),
    samples_reports   SimpleAggregateFunction(sum, UInt64)
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant, job, hour, cluster, model)
SETTINGS ${dedup_window} = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.job_throughput_1m_mv ${on_cluster} TO ${db}.job_throughput_1m AS
SELECT
    toDateTime(intDiv(toUnixTimestamp64Milli(claim_start), 60000) * 60, 'UTC') AS minute,
    tenant, job, cluster, model,
    sum(ifNull(tokens_measured * claimed_ms / interval_ms, 0)) AS tokens_weighted,
    toUInt64(countIf(tokens_measured IS NOT NULL)) AS tokens_reports,
    sum(ifNull(samples_measured * claimed_ms / interval_ms, 0)) AS samples_weighted,
    toUInt64(countIf(samples_measured IS NOT NULL)) AS samples_reports
FROM ${db}.gpu_samples
WHERE tenant != '' AND job != '' AND (tokens_measured IS NOT NULL OR samples_measured IS NOT NULL)
GROUP BY minute, tenant, job, cluster, model;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.job_throughput_1h_mv ${on_cluster} TO ${db}.job_throughput_1h AS
SELECT
    toStartOfHour(minute) AS hour, tenant, job, cluster, model,
    sum(tokens_weighted) AS tokens_weighted,
    sum(tokens_reports) AS tokens_reports,
    sum(samples_weighted) AS samples_weighted,
    sum(samples_reports) AS samples_reports
FROM ${db}.job_throughput_1m
GROUP BY hour, tenant, job, cluster, model;

INSERT INTO ${db}.job_throughput_1m
SELECT
    toDateTime(intDiv(toUnixTimestamp64Milli(claim_start), 60000) * 60, 'UTC') AS minute,
    tenant, job, cluster, model,
    sum(ifNull(tokens_measured * claimed_ms / interval_ms, 0)),
    toUInt64(countIf(tokens_measured IS NOT NULL)),
    sum(ifNull(samples_measured * claimed_ms / interval_ms, 0)),
    toUInt64(countIf(samples_measured IS NOT NULL))
FROM ${db}.gpu_samples
WHERE tenant != '' AND job != '' AND (tokens_measured IS NOT NULL OR samples_measured IS NOT NULL)
    AND (SELECT count() FROM ${db}.job_throughput_1m) = 0
GROUP BY minute, tenant, job, cluster, model
