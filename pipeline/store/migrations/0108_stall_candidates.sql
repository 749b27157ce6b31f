-- Which GPUs may hold a stall-like sample, per GPU, job and hour (pipeline/queries/job_signals.py, candidate_rows):
-- the extremes of every figure `formulas.stall_like` compares, so a reader tells, for any thresholds, the
-- (GPU, job, hour) rows that could hold a stall-like sample and reads the raw samples of those GPUs only
-- (pipeline/queries/job_signals.py). A sample that is stall-like makes its row pass; the detectors then judge
-- the raw samples as before, so answers are unchanged. Keyed by the hour of the sample's time (its end), a node's
-- rows together (one node's or GPU's panel reads its own rows by key; a week of the fleet reads ~170 rows per GPU).
-- Maxima, minima and a count: the same rows whatever the order or split of the inserts; a duplicated insert is
-- dropped by the insert token (`${dedup_window}`), and a replayed sample changes no extreme.
CREATE TABLE IF NOT EXISTS ${db}.stall_candidates_1h ${on_cluster}
(
    hour               DateTime('UTC') COMMENT 'hour containing the sample''s time (its interval end)',
    cluster            LowCardinality(String),
    node               LowCardinality(String),
    gpu_index          UInt16,
    gpu_uuid           LowCardinality(String),
    model              LowCardinality(String),
    tenant             LowCardinality(String),
    job                String,
    util_max           SimpleAggregateFunction(max, Nullable(Float32)),
    tensor_min         SimpleAggregateFunction(min, Nullable(Float32)),
    sm_untensored_min  SimpleAggregateFunction(min, Nullable(Float32)) COMMENT 'SM activity of samples without tensor activity',
    power_min          SimpleAggregateFunction(min, Nullable(Float32)) COMMENT 'power_w (the limit is the model''s: a key column)',
    flops_unreported   SimpleAggregateFunction(sum, UInt64) COMMENT 'samples without flops_measured',
    flops_ratio_min    SimpleAggregateFunction(min, Nullable(Float64)) COMMENT 'flops_measured / (peak x interval); 0 for none'
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (cluster, node, hour, gpu_index, gpu_uuid, model, tenant, job)
SETTINGS ${dedup_window} = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.stall_candidates_1h_mv ${on_cluster} TO ${db}.stall_candidates_1h AS
SELECT
    toStartOfHour(time) AS hour, cluster, node, gpu_index, gpu_uuid, model, tenant, job,
    max(util_gpu_ratio) AS util_max,
    min(tensor_active_ratio) AS tensor_min,
    min(if(tensor_active_ratio IS NULL, sm_active_ratio, NULL)) AS sm_untensored_min,
    min(power_w) AS power_min,
    countIf(flops_measured IS NULL) AS flops_unreported,
    min(if(flops_measured IS NULL, NULL, if(flops_measured <= 0, 0., flops_measured / (ifNull(peak_flops, 0) * interval_ms / 1000)))) AS flops_ratio_min
FROM ${db}.gpu_samples
WHERE tenant != '' AND job != '' AND error = ''
GROUP BY hour, cluster, node, gpu_index, gpu_uuid, model, tenant, job;

INSERT INTO ${db}.stall_candidates_1h
SELECT
    toStartOfHour(time) AS hour, cluster, node, gpu_index, gpu_uuid, model, tenant, job,
    max(util_gpu_ratio), min(tensor_active_ratio), min(if(tensor_active_ratio IS NULL, sm_active_ratio, NULL)),
    min(power_w), countIf(flops_measured IS NULL),
    min(if(flops_measured IS NULL, NULL, if(flops_measured <= 0, 0., flops_measured / (ifNull(peak_flops, 0) * interval_ms / 1000))))
FROM ${db}.gpu_samples
WHERE tenant != '' AND job != '' AND error = '' AND (SELECT count() FROM ${db}.stall_candidates_1h) = 0
GROUP BY hour, cluster, node, gpu_index, gpu_uuid, model, tenant, job
