-- The health rollups' views at less insert CPU, same rows (issue 12's insert budget; docs/aggregations.md,
-- "Health rollups"):
--
-- 1. `gpu_health_1m.last`, the newest sample's (time, state), from one integer maximum instead of a maximum of
-- tuples. `max((time, health))` compared tuples row by row (ClickHouse's generic maximum), a third of the view's
-- insert CPU. `time_health` packs the same pair into one Int64, time in milliseconds shifted left by 2 bits
-- and the state (0 to 3, an Enum8 of four values) in the 2 low bits: for any two samples it orders as the
-- tuples do (time first, then state), so its maximum is the same sample's pair, and the shift back (arithmetic,
-- so exact before 1970 as well) and the low bits give that pair back exactly. DateTime64(3) spans 1900 to 2299,
-- |ms| < 2^44: no overflow. The table and its columns are unchanged, so rows rolled up
-- before and after this migration merge as before; nothing to backfill.
-- 2. `gpu_health_1h` takes the minute rows as they are, filed under their hour, without grouping them again in
-- the view: an AggregatingMergeTree merges the rows of one key as it writes the part (and again in merges)
-- with each column's own function, the one the view applied (sum, min, max, groupBitOr, set union), and
-- readers aggregate the rows of a key in any case (several inserts leave several). Every function here is
-- exact in any order (integer sums; minima and maxima; bits; sets, which readers sort), so the rows read are
-- the same. It saves a second 31-aggregate GROUP BY per insert block.
-- Both views are replaced with CREATE OR REPLACE (an atomic swap, as 0102); their other columns are 0102's.

CREATE OR REPLACE MATERIALIZED VIEW ${db}.gpu_health_1m_mv ${on_cluster} TO ${db}.gpu_health_1m AS
WITH bitOr(bitShiftLeft(toUnixTimestamp64Milli(time), 2), toInt64(toInt8(health))) AS time_health
SELECT
    toDateTime(intDiv(toUnixTimestamp64Milli(time) - interval_ms, 60000) * 60, 'UTC') AS minute,
    cluster, node, gpu_uuid, gpu_index, model, tenant,
    count() AS samples,
    sum(toUInt64(interval_ms)) AS reported_ms,
    sumIf(toUInt64(interval_ms), health = 'failing') AS failing_ms,
    sumIf(toUInt64(interval_ms), health = 'degraded') AS degraded_ms,
    max(health) AS worst,
    (fromUnixTimestamp64Milli(bitShiftRight(max(time_health), 2), 'UTC'),
     CAST(toInt8(bitAnd(max(time_health), 3)), 'Enum8(\'ok\' = 0, \'degraded\' = 1, \'failing\' = 2, \'unknown\' = 3)'))
        AS last,
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
    samples, reported_ms, failing_ms, degraded_ms, worst, last, xid_events, reasons, temp_max_c,
    ecc_corrected_max, ecc_uncorrected_max, retired_pages_max, pcie_replay_min, pcie_replay_max,
    nvlink_errors_max, nvlink_down_max, clock_event_bits, ecc_corrected_min, nvlink_rr_min, nvlink_rr_max,
    remap_pending_max, idle_util_min, held_no_process, unallocated_processes_max, unallocated_mem_max,
    ecc_uncorrected_min, nvlink_errors_min
FROM ${db}.gpu_health_1m
