-- Counter minima for the health board's increase panels (docs/dashboards.md, "Health board at fleet scale").
--
-- `gpu_health_1m`/`_1h` (0041) kept a minimum beside the maximum of some error counters (PCIe replays,
-- corrected ECC, NVLink replay + recovery) but not of uncorrected ECC or of the NVLink CRC + replay +
-- recovery sum. With both, a reader finds from the hour level the GPUs whose counter changed in the hours
-- a range touches (max(x_max) > min(x_min)) and reads minute rows only for them: a GPU whose counter
-- did not change adds 0 to every interval's increase.
-- Rows rolled up before this migration read 0, at most the true minimum: such a GPU is picked whenever its
-- counter is non-zero, never missed. The views are replaced with CREATE OR REPLACE (an atomic swap; 0031
-- says why not MODIFY QUERY); their other columns are 0041's.

ALTER TABLE ${db}.gpu_health_1m ${on_cluster}
    ADD COLUMN IF NOT EXISTS ecc_uncorrected_min SimpleAggregateFunction(min, UInt64) DEFAULT 0
        COMMENT 'min of ifNull(ecc_uncorrected_volatile, 0); 0 in rows rolled up before 0102' AFTER unallocated_mem_max,
    ADD COLUMN IF NOT EXISTS nvlink_errors_min SimpleAggregateFunction(min, UInt64) DEFAULT 0
        COMMENT 'min of the CRC + replay + recovery counters (NULL as 0); 0 in rows rolled up before 0102'
        AFTER ecc_uncorrected_min;

ALTER TABLE ${db}.gpu_health_1h ${on_cluster}
    ADD COLUMN IF NOT EXISTS ecc_uncorrected_min SimpleAggregateFunction(min, UInt64) DEFAULT 0
        COMMENT 'min of ifNull(ecc_uncorrected_volatile, 0); 0 in rows rolled up before 0102' AFTER unallocated_mem_max,
    ADD COLUMN IF NOT EXISTS nvlink_errors_min SimpleAggregateFunction(min, UInt64) DEFAULT 0
        COMMENT 'min of the CRC + replay + recovery counters (NULL as 0); 0 in rows rolled up before 0102'
        AFTER ecc_uncorrected_min;

CREATE OR REPLACE MATERIALIZED VIEW ${db}.gpu_health_1m_mv ${on_cluster} TO ${db}.gpu_health_1m AS
SELECT
    toDateTime(intDiv(toUnixTimestamp64Milli(time) - interval_ms, 60000) * 60, 'UTC') AS minute,
    cluster, node, gpu_uuid, gpu_index, model, tenant,
    count() AS samples,
    sum(toUInt64(interval_ms)) AS reported_ms,
    sumIf(toUInt64(interval_ms), health = 'failing') AS failing_ms,
    sumIf(toUInt64(interval_ms), health = 'degraded') AS degraded_ms,
    max(health) AS worst,
    max((time, health)) AS last,
    sum(toUInt64(length(xids))) AS xid_events,
    groupUniqArrayArray(health_reasons) AS reasons,
    max(temp_gpu_c) AS temp_max_c,
    max(ifNull(ecc_corrected_volatile, 0)) AS ecc_corrected_max,
    max(ifNull(ecc_uncorrected_volatile, 0)) AS ecc_uncorrected_max,
    max(ifNull(retired_pages, 0)) AS retired_pages_max,
    min(ifNull(pcie_replay_count, 0)) AS pcie_replay_min,
    max(ifNull(pcie_replay_count, 0)) AS pcie_replay_max,
    max(ifNull(nvlink_crc_errors, 0) + ifNull(nvlink_replay_errors, 0) + ifNull(nvlink_recovery_errors, 0))
        AS nvlink_errors_max,
    max(ifNull(nvlink_links_down, 0)) AS nvlink_down_max,
    groupBitOr(ifNull(clock_event_reasons, 0)) AS clock_event_bits,
    min(ifNull(ecc_corrected_volatile, 0)) AS ecc_corrected_min,
    min(ifNull(nvlink_replay_errors, 0) + ifNull(nvlink_recovery_errors, 0)) AS nvlink_rr_min,
    max(ifNull(nvlink_replay_errors, 0) + ifNull(nvlink_recovery_errors, 0)) AS nvlink_rr_max,
    max(toUInt8(ifNull(remap_pending, 0) OR ifNull(retired_pages_pending, 0))) AS remap_pending_max,
    minIf(util_gpu_ratio, tenant != '' AND error = '' AND NOT ifNull(compute_processes = 0, 0)) AS idle_util_min,
    countIf(tenant != '' AND error = '' AND compute_processes = 0) AS held_no_process,
    maxIf(ifNull(compute_processes, 0), tenant = '' AND error = '') AS unallocated_processes_max,
    maxIf(ifNull(mem_used_bytes, 0), tenant = '' AND error = '') AS unallocated_mem_max,
    min(ifNull(ecc_uncorrected_volatile, 0)) AS ecc_uncorrected_min,
    min(ifNull(nvlink_crc_errors, 0) + ifNull(nvlink_replay_errors, 0) + ifNull(nvlink_recovery_errors, 0))
        AS nvlink_errors_min
FROM ${db}.gpu_samples
GROUP BY minute, cluster, node, gpu_uuid, gpu_index, model, tenant;

CREATE OR REPLACE MATERIALIZED VIEW ${db}.gpu_health_1h_mv ${on_cluster} TO ${db}.gpu_health_1h AS
SELECT
    toStartOfHour(minute) AS hour,
    cluster, node, gpu_uuid, gpu_index, model, tenant,
    sum(samples) AS samples,
    sum(reported_ms) AS reported_ms,
    sum(failing_ms) AS failing_ms,
    sum(degraded_ms) AS degraded_ms,
    max(worst) AS worst,
    max(last) AS last,
    sum(xid_events) AS xid_events,
    groupUniqArrayArray(reasons) AS reasons,
    max(temp_max_c) AS temp_max_c,
    max(ecc_corrected_max) AS ecc_corrected_max,
    max(ecc_uncorrected_max) AS ecc_uncorrected_max,
    max(retired_pages_max) AS retired_pages_max,
    min(pcie_replay_min) AS pcie_replay_min,
    max(pcie_replay_max) AS pcie_replay_max,
    max(nvlink_errors_max) AS nvlink_errors_max,
    max(nvlink_down_max) AS nvlink_down_max,
    groupBitOr(clock_event_bits) AS clock_event_bits,
    min(ecc_corrected_min) AS ecc_corrected_min,
    min(nvlink_rr_min) AS nvlink_rr_min,
    max(nvlink_rr_max) AS nvlink_rr_max,
    max(remap_pending_max) AS remap_pending_max,
    min(idle_util_min) AS idle_util_min,
    sum(held_no_process) AS held_no_process,
    max(unallocated_processes_max) AS unallocated_processes_max,
    max(unallocated_mem_max) AS unallocated_mem_max,
    min(ecc_uncorrected_min) AS ecc_uncorrected_min,
    min(nvlink_errors_min) AS nvlink_errors_min
FROM ${db}.gpu_health_1m
GROUP BY hour, cluster, node, gpu_uuid, gpu_index, model, tenant;
