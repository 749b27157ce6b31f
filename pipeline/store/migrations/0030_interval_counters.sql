-- Interval figures from the agent's cumulative counters (docs/wire-format.md, "Interval averages"),
-- the NVLink5 counters, and the NVML collector's own health.
--
-- Energy: the minute rollup now sums each sample's `energy_interval_j` (the growth of NVML's energy
-- counter over the interval, exact to the mJ) and falls back to round(power_w x interval_ms) only
-- where a sample has none (first reading after the agent or NVML started, GPUs without the counter,
-- older agents). power_w is NVML's 1 s average at the moment of the read: times a 10 s interval it
-- bills a bursty job's energy from one point. The hourly rollup and usage_hourly read energy_mj from
-- the minute rollup, so they follow. Rows already rolled up keep the energy they were given.
--
-- The view is dropped and created again, not changed with ALTER ... MODIFY QUERY: after MODIFY QUERY
-- and a server restart, ClickHouse (26.9, measured) no longer deduplicates the view's blocks when an
-- insert is retried with the same token, so a repeated batch would be counted twice in the rollups
-- (tests/reliability/test_ingester_kill.py catches it). An insert that lands in the milliseconds between
-- the DROP and the CREATE misses the rollups: apply this migration with the ingesters stopped, or run
-- the rollup check of docs/reliability.md ("minutes whose raw samples and minute rollup disagree") after.

ALTER TABLE ${db}.gpu_samples ${on_cluster}
    ADD COLUMN IF NOT EXISTS energy_interval_j Nullable(Float64) CODEC(ZSTD(1))
        COMMENT 'energy used during the interval: growth of the energy counter, J' AFTER energy_j,
    ADD COLUMN IF NOT EXISTS throttle_power_ratio Nullable(Float32) CODEC(ZSTD(1)) AFTER clock_event_reasons,
    ADD COLUMN IF NOT EXISTS throttle_thermal_ratio Nullable(Float32) CODEC(ZSTD(1)) AFTER throttle_power_ratio,
    ADD COLUMN IF NOT EXISTS nvlink_symbol_errors Nullable(UInt64) CODEC(T64, ZSTD(1)) AFTER nvlink_links_down,
    ADD COLUMN IF NOT EXISTS nvlink_effective_errors Nullable(UInt64) CODEC(T64, ZSTD(1)) AFTER nvlink_symbol_errors;

ALTER TABLE ${db}.agent_reports ${on_cluster}
    ADD COLUMN IF NOT EXISTS nvml_calls UInt32 DEFAULT 0 AFTER nvml_errors,
    ADD COLUMN IF NOT EXISTS nvml_call_budget UInt32 DEFAULT 0 AFTER nvml_calls,
    ADD COLUMN IF NOT EXISTS nvml_deadline_misses UInt32 DEFAULT 0 AFTER nvml_call_budget,
    ADD COLUMN IF NOT EXISTS xids_dropped_total UInt64 DEFAULT 0 AFTER nvml_deadline_misses;

DROP VIEW IF EXISTS ${db}.gpu_usage_1m_mv ${on_cluster};

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
    sum(if(energy_interval_j IS NOT NULL,
           toUInt64(round(assumeNotNull(energy_interval_j) * 1000)),
           toUInt64(round(ifNull(power_w, 0) * interval_ms)))) AS energy_mj,
    max(peak_flops) AS model_peak_flop_s,
    min(toUnixTimestamp64Milli(time) - interval_ms) AS first_start_ms,
    max(toUnixTimestamp64Milli(time)) AS last_end_ms
FROM ${db}.gpu_samples
GROUP BY minute, tenant, cluster, node, gpu_uuid, model, job, health;
