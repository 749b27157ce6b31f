-- Claimed time: a GPU-second is billed at most once, whoever claims it (docs/aggregations.md, "Claims").
--
-- The ingester keeps, per GPU of a node (whatever boot id reports it), the time already claimed,
-- and stores for each sample the part of its interval no earlier sample claimed: `claimed_ms`
-- (the billable milliseconds, at most `ingest.max_claim_ms`) and `claim_start` (where that part
-- starts; the sample's `time` when it claimed nothing). `interval_ms` stays what the agent reported.
-- Rows stored before this migration read claimed_ms = interval_ms and claim_start = time - interval_ms,
-- which is what they were billed as.
--
-- The rollups attribute each sample to the minute (and hour) containing its claim start and sum its
-- claimed milliseconds wherever they summed time (allocated, idle, utilization, MFU weights,
-- energy); FLOPs, and the energy counter's interval energy (0030), are scaled by claimed / reported.
-- Without overlap every figure is what it was. Numbered after 0030, whose minute view it extends.
-- The views are replaced with CREATE OR REPLACE (an atomic swap: an insert uses the old view or the
-- new one), not ALTER ... MODIFY QUERY: after MODIFY QUERY, a repeated insert (same dedup token) from
-- another process than the one that ran it was not deduplicated in the view targets.
-- `reported_ms` keeps the sum of `interval_ms`; `claimed_ms` is new (old rows: reported_ms), and the
-- minute rollup records the span of the claimed time (`claim_first_ms`, `claim_last_ms`), which
-- resolving claims across nodes compares (0032).

ALTER TABLE ${db}.gpu_samples ${on_cluster}
    ADD COLUMN IF NOT EXISTS claimed_ms UInt32 DEFAULT interval_ms CODEC(T64, ZSTD(1))
        COMMENT 'billable ms: the part of the interval no earlier sample of this GPU on this node claimed' AFTER interval_ms,
    ADD COLUMN IF NOT EXISTS claim_start DateTime64(3, 'UTC') DEFAULT time - toIntervalMillisecond(interval_ms)
        CODEC(DoubleDelta, ZSTD(1)) COMMENT 'start of the claimed part (= time when nothing was claimed)' AFTER claimed_ms;

ALTER TABLE ${db}.gpu_usage_1m ${on_cluster}
    ADD COLUMN IF NOT EXISTS claimed_ms SimpleAggregateFunction(sum, UInt64) DEFAULT reported_ms
        COMMENT 'sum of claimed_ms: what billing counts' AFTER reported_ms,
    ADD COLUMN IF NOT EXISTS claim_first_ms SimpleAggregateFunction(min, Int64) DEFAULT first_start_ms
        COMMENT 'earliest claim start of samples that claimed time (max Int64: none)',
    ADD COLUMN IF NOT EXISTS claim_last_ms SimpleAggregateFunction(max, Int64) DEFAULT last_end_ms
        COMMENT 'latest end of samples that claimed time (0: none)';

ALTER TABLE ${db}.gpu_usage_1h ${on_cluster}
    ADD COLUMN IF NOT EXISTS claimed_ms SimpleAggregateFunction(sum, UInt64) DEFAULT reported_ms
        COMMENT 'sum of claimed_ms: what billing counts' AFTER reported_ms;

CREATE OR REPLACE MATERIALIZED VIEW ${db}.gpu_usage_1m_mv ${on_cluster} TO ${db}.gpu_usage_1m AS
SELECT
    toDateTime(intDiv(toUnixTimestamp64Milli(claim_start), 60000) * 60, 'UTC') AS minute,
    tenant, cluster, node, gpu_uuid, model, job, health,
    count() AS samples,
    sum(toUInt64(interval_ms)) AS reported_ms,
    sum(toUInt64(s.claimed_ms)) AS claimed_ms,
    sumIf(toUInt64(s.claimed_ms), tenant != '' AND ifNull(compute_processes = 0, 0)) AS held_no_process_ms,
    sumMapIf(
        map(toUInt8(least(floor(ifNull(util_gpu_ratio, 0) * 100 + 0.0001), 100)), toUInt64(s.claimed_ms)),
        tenant != '' AND NOT ifNull(compute_processes = 0, 0) AND util_gpu_ratio IS NOT NULL
    ) AS active_ms_by_util_pct,
    sumIf(toUInt64(s.claimed_ms), util_gpu_ratio IS NOT NULL) AS util_ms,
    sum(toFloat64(ifNull(util_gpu_ratio, 0)) * s.claimed_ms) AS util_weighted_ms,
    sumIf(toUInt64(s.claimed_ms), peak_flops IS NOT NULL) AS peak_known_ms,
    sumIf(toUInt64(s.claimed_ms), peak_flops IS NOT NULL
          AND (flops_measured IS NOT NULL OR flops_estimated IS NOT NULL OR error != '')) AS mfu_ms,
    sumIf(toUInt64(s.claimed_ms), peak_flops IS NOT NULL AND flops_measured IS NOT NULL) AS measured_ms,
    sumIf(if(s.claimed_ms = interval_ms, ifNull(flops_measured, 0), ifNull(flops_measured, 0) * s.claimed_ms / interval_ms),
          peak_flops IS NOT NULL) AS measured_flop,
    sumIf(if(s.claimed_ms = interval_ms, ifNull(flops_estimated, 0), ifNull(flops_estimated, 0) * s.claimed_ms / interval_ms),
          peak_flops IS NOT NULL AND flops_measured IS NULL) AS estimated_unmeasured_flop,
    sumIf(ifNull(peak_flops, 0) * s.claimed_ms / 1000, peak_flops IS NOT NULL
          AND (flops_measured IS NOT NULL OR flops_estimated IS NOT NULL OR error != '')) AS peak_capacity_flop,
    sum(if(energy_interval_j IS NOT NULL,
           toUInt64(round(assumeNotNull(energy_interval_j) * 1000
                          * if(s.claimed_ms = interval_ms, 1., s.claimed_ms / interval_ms))),
           toUInt64(round(ifNull(power_w, 0) * s.claimed_ms)))) AS energy_mj,
    max(peak_flops) AS model_peak_flop_s,
    min(toUnixTimestamp64Milli(claim_start)) AS first_start_ms,
    max(toUnixTimestamp64Milli(time)) AS last_end_ms,
    min(if(s.claimed_ms > 0, toUnixTimestamp64Milli(claim_start), 9223372036854775807)) AS claim_first_ms,
    max(if(s.claimed_ms > 0, toUnixTimestamp64Milli(time), 0)) AS claim_last_ms
FROM ${db}.gpu_samples AS s
GROUP BY minute, tenant, cluster, node, gpu_uuid, model, job, health;

CREATE OR REPLACE MATERIALIZED VIEW ${db}.gpu_usage_1h_mv ${on_cluster} TO ${db}.gpu_usage_1h AS
SELECT
    toStartOfHour(minute) AS hour,
    tenant, cluster, node, gpu_uuid, model, health,
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
    sum(energy_mj) AS energy_mj,
    max(model_peak_flop_s) AS model_peak_flop_s,
    min(first_start_ms) AS first_start_ms,
    max(last_end_ms) AS last_end_ms
FROM ${db}.gpu_usage_1m
GROUP BY hour, tenant, cluster, node, gpu_uuid, model, health;
