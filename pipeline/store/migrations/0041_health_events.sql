-- GPU health without raw-sample scans (docs/aggregations.md, "Health events" and "Health rollups"):
--
-- * `gpu_samples.health_change`: the ingester marks each sample against the GPU's previous sample
--   (pipeline/ingest/transitions.py): same, changed, first (no previous known) or late (older than
--   one already processed). Rows stored before this migration, or written without it, read `first`.
-- * `gpu_health_events`: the samples not marked `same`, so every sample that changes a GPU's state.
--   Readers keep, per GPU in time order, the rows whose state differs from the row before, so the
--   restated `first` rows of a restarted ingester (or of a second one) change nothing.
-- * `gpu_xid_events`: one row per XID a sample carried (its position in the sample's list keeps two
--   equal codes apart).
-- * `gpu_health_1m`, `gpu_health_1h`: per GPU, tenant and minute (hour): health time, XIDs, reasons,
--   the highest temperature and error counters, clock-event bits: what the health board reads; and
--   what tells the alert evaluator which GPUs may meet a rule's condition (pipeline/alerts/queries.py),
--   so it reads raw samples of those GPUs only.
--
-- Both event tables are ReplacingMergeTree keyed by the sample's identity (GPU, sample time, boot id,
-- and the XID's position), so a sample written twice (two ingesters, a replay that got past the
-- ingester's dedup) is one event after merges; readers use FINAL. Everything is a function of the
-- stored samples, whatever their arrival order; the rollups sum integer milliseconds and take maxima.

ALTER TABLE ${db}.gpu_samples ${on_cluster}
    ADD COLUMN IF NOT EXISTS health_change Enum8('same' = 0, 'changed' = 1, 'first' = 2, 'late' = 3) DEFAULT 'first'
        COMMENT 'against the GPU''s previous sample as the ingester processed it (pipeline/ingest/transitions.py)'
        AFTER health_reasons;

CREATE TABLE IF NOT EXISTS ${db}.gpu_health_events ${on_cluster}
(
    time            DateTime64(3, 'UTC') COMMENT 'the sample''s time (its interval end)',
    interval_ms     UInt32,
    cluster         LowCardinality(String),
    node            LowCardinality(String),
    boot_id         LowCardinality(String),
    gpu_index       UInt16,
    gpu_uuid        LowCardinality(String),
    model           LowCardinality(String),
    tenant          LowCardinality(String),
    job             String,
    health          Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3),
    health_reasons  Array(LowCardinality(String)),
    change          Enum8('same' = 0, 'changed' = 1, 'first' = 2, 'late' = 3)
)
ENGINE = ${replicated}ReplacingMergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (cluster, node, gpu_uuid, time, boot_id)
SETTINGS ${dedup_window} = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.gpu_health_events_mv ${on_cluster} TO ${db}.gpu_health_events AS
SELECT time, interval_ms, cluster, node, boot_id, gpu_index, gpu_uuid, model, tenant, job, health, health_reasons,
       health_change AS change
FROM ${db}.gpu_samples
WHERE health_change != 'same';

INSERT INTO ${db}.gpu_health_events
SELECT time, interval_ms, cluster, node, boot_id, gpu_index, gpu_uuid, model, tenant, job, health, health_reasons,
       if(prev < 0, 'first', 'changed')
FROM (
    SELECT *, lagInFrame(toInt8(health), 1, toInt8(-1)) OVER (
        PARTITION BY cluster, node, gpu_uuid ORDER BY time, boot_id ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS prev
    FROM ${db}.gpu_samples
)
WHERE prev != toInt8(health);

CREATE TABLE IF NOT EXISTS ${db}.gpu_xid_events ${on_cluster}
(
    time            DateTime64(3, 'UTC'),
    interval_ms     UInt32,
    cluster         LowCardinality(String),
    node            LowCardinality(String),
    boot_id         LowCardinality(String),
    gpu_index       UInt16,
    gpu_uuid        LowCardinality(String),
    model           LowCardinality(String),
    tenant          LowCardinality(String),
    job             String,
    xid             UInt16,
    position        UInt16 COMMENT 'index of the XID in the sample''s list, from 1',
    health          Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3) COMMENT 'the sample''s state',
    health_reasons  Array(LowCardinality(String)) COMMENT 'the sample''s reasons'
)
ENGINE = ${replicated}ReplacingMergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (cluster, node, gpu_uuid, time, boot_id, position)
SETTINGS ${dedup_window} = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.gpu_xid_events_mv ${on_cluster} TO ${db}.gpu_xid_events AS
SELECT time, interval_ms, cluster, node, boot_id, gpu_index, gpu_uuid, model, tenant, job, xid, toUInt16(position) AS position,
       health, health_reasons
FROM ${db}.gpu_samples
ARRAY JOIN xids AS xid, arrayEnumerate(xids) AS position
WHERE notEmpty(xids);

INSERT INTO ${db}.gpu_xid_events
SELECT time, interval_ms, cluster, node, boot_id, gpu_index, gpu_uuid, model, tenant, job, xid, toUInt16(position), health,
       health_reasons
FROM ${db}.gpu_samples
ARRAY JOIN xids AS xid, arrayEnumerate(xids) AS position
WHERE notEmpty(xids);

CREATE TABLE IF NOT EXISTS ${db}.gpu_health_1m ${on_cluster}
(
    minute               DateTime('UTC') COMMENT 'minute containing the interval start',
    cluster              LowCardinality(String),
    node                 LowCardinality(String),
    gpu_uuid             LowCardinality(String),
    gpu_index            UInt16,
    model                LowCardinality(String),
    tenant               LowCardinality(String),
    samples              SimpleAggregateFunction(sum, UInt64),
    reported_ms          SimpleAggregateFunction(sum, UInt64),
    failing_ms           SimpleAggregateFunction(sum, UInt64),
    degraded_ms          SimpleAggregateFunction(sum, UInt64),
    worst                SimpleAggregateFunction(max, Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3)),
    last                 SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3)))
                         COMMENT 'the newest sample''s (time, state)',
    xid_events           SimpleAggregateFunction(sum, UInt64) COMMENT 'XIDs reported (length of xids, summed)',
    reasons              SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    temp_max_c           SimpleAggregateFunction(max, Nullable(Float32)),
    ecc_corrected_max    SimpleAggregateFunction(max, UInt64) COMMENT 'max of ifNull(ecc_corrected_volatile, 0)',
    ecc_uncorrected_max  SimpleAggregateFunction(max, UInt64) COMMENT 'max of ifNull(ecc_uncorrected_volatile, 0)',
    retired_pages_max    SimpleAggregateFunction(max, UInt32) COMMENT 'max of ifNull(retired_pages, 0)',
    pcie_replay_min      SimpleAggregateFunction(min, UInt64) COMMENT 'min of ifNull(pcie_replay_count, 0)',
    pcie_replay_max      SimpleAggregateFunction(max, UInt64),
    nvlink_errors_max    SimpleAggregateFunction(max, UInt64) COMMENT 'max of the CRC + replay + recovery counters (NULL as 0)',
    nvlink_down_max      SimpleAggregateFunction(max, UInt8) COMMENT 'max of ifNull(nvlink_links_down, 0)',
    clock_event_bits     SimpleAggregateFunction(groupBitOr, UInt64) COMMENT 'OR of ifNull(clock_event_reasons, 0)',
    ecc_corrected_min    SimpleAggregateFunction(min, UInt64),
    nvlink_rr_min        SimpleAggregateFunction(min, UInt64) COMMENT 'min of the replay + recovery counters (NULL as 0)',
    nvlink_rr_max        SimpleAggregateFunction(max, UInt64),
    remap_pending_max    SimpleAggregateFunction(max, UInt8) COMMENT 'a row remap or page retirement pending',
    idle_util_min        SimpleAggregateFunction(min, Nullable(Float32))
                         COMMENT 'lowest utilization of allocated, readable samples not known to have no process',
    held_no_process      SimpleAggregateFunction(sum, UInt64) COMMENT 'allocated, readable samples with no process',
    unallocated_processes_max SimpleAggregateFunction(max, UInt32) COMMENT 'of unallocated, readable samples',
    unallocated_mem_max  SimpleAggregateFunction(max, UInt64) COMMENT 'memory used by unallocated, readable samples'
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, cluster, node, gpu_uuid, gpu_index, model, tenant)
SETTINGS ${dedup_window} = 10000, deduplicate_merge_projection_mode = 'rebuild';

CREATE TABLE IF NOT EXISTS ${db}.gpu_health_1h ${on_cluster}
(
    hour                 DateTime('UTC') COMMENT 'hour containing the interval start',
    cluster              LowCardinality(String),
    node                 LowCardinality(String),
    gpu_uuid             LowCardinality(String),
    gpu_index            UInt16,
    model                LowCardinality(String),
    tenant               LowCardinality(String),
    samples              SimpleAggregateFunction(sum, UInt64),
    reported_ms          SimpleAggregateFunction(sum, UInt64),
    failing_ms           SimpleAggregateFunction(sum, UInt64),
    degraded_ms          SimpleAggregateFunction(sum, UInt64),
    worst                SimpleAggregateFunction(max, Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3)),
    last                 SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3))),
    xid_events           SimpleAggregateFunction(sum, UInt64),
    reasons              SimpleAggregateFunction(groupUniqArrayArray, Array(String)),
    temp_max_c           SimpleAggregateFunction(max, Nullable(Float32)),
    ecc_corrected_max    SimpleAggregateFunction(max, UInt64),
    ecc_uncorrected_max  SimpleAggregateFunction(max, UInt64),
    retired_pages_max    SimpleAggregateFunction(max, UInt32),
    pcie_replay_min      SimpleAggregateFunction(min, UInt64),
    pcie_replay_max      SimpleAggregateFunction(max, UInt64),
    nvlink_errors_max    SimpleAggregateFunction(max, UInt64),
    nvlink_down_max      SimpleAggregateFunction(max, UInt8),
    clock_event_bits     SimpleAggregateFunction(groupBitOr, UInt64),
    ecc_corrected_min    SimpleAggregateFunction(min, UInt64),
    nvlink_rr_min        SimpleAggregateFunction(min, UInt64),
    nvlink_rr_max        SimpleAggregateFunction(max, UInt64),
    remap_pending_max    SimpleAggregateFunction(max, UInt8),
    idle_util_min        SimpleAggregateFunction(min, Nullable(Float32)),
    held_no_process      SimpleAggregateFunction(sum, UInt64),
    unallocated_processes_max SimpleAggregateFunction(max, UInt32),
    unallocated_mem_max  SimpleAggregateFunction(max, UInt64)
)
ENGINE = ${replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, cluster, node, gpu_uuid, gpu_index, model, tenant)
SETTINGS ${dedup_window} = 10000, deduplicate_merge_projection_mode = 'rebuild';

ALTER TABLE ${db}.gpu_health_1m ${on_cluster}
    ADD PROJECTION IF NOT EXISTS by_gpu (SELECT * ORDER BY cluster, node, gpu_uuid, minute);

ALTER TABLE ${db}.gpu_health_1h ${on_cluster}
    ADD PROJECTION IF NOT EXISTS by_gpu (SELECT * ORDER BY cluster, node, gpu_uuid, hour);

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.gpu_health_1m_mv ${on_cluster} TO ${db}.gpu_health_1m AS
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
    maxIf(ifNull(mem_used_bytes, 0), tenant = '' AND error = '') AS unallocated_mem_max
FROM ${db}.gpu_samples
GROUP BY minute, cluster, node, gpu_uuid, gpu_index, model, tenant;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.gpu_health_1h_mv ${on_cluster} TO ${db}.gpu_health_1h AS
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
    max(unallocated_mem_max) AS unallocated_mem_max
FROM ${db}.gpu_health_1m
GROUP BY hour, cluster, node, gpu_uuid, gpu_index, model, tenant;

-- Backfills: the event tables dedup by identity; the rollup is filled only when empty (a re-run after a
-- failure part-way adds nothing twice).
INSERT INTO ${db}.gpu_health_1m
SELECT
    toDateTime(intDiv(toUnixTimestamp64Milli(time) - interval_ms, 60000) * 60, 'UTC') AS minute,
    cluster, node, gpu_uuid, gpu_index, model, tenant,
    count(), sum(toUInt64(interval_ms)), sumIf(toUInt64(interval_ms), health = 'failing'),
    sumIf(toUInt64(interval_ms), health = 'degraded'), max(health), max((time, health)), sum(toUInt64(length(xids))),
    groupUniqArrayArray(health_reasons), max(temp_gpu_c), max(ifNull(ecc_corrected_volatile, 0)),
    max(ifNull(ecc_uncorrected_volatile, 0)), max(ifNull(retired_pages, 0)), min(ifNull(pcie_replay_count, 0)),
    max(ifNull(pcie_replay_count, 0)),
    max(ifNull(nvlink_crc_errors, 0) + ifNull(nvlink_replay_errors, 0) + ifNull(nvlink_recovery_errors, 0)),
    max(ifNull(nvlink_links_down, 0)), groupBitOr(ifNull(clock_event_reasons, 0)), min(ifNull(ecc_corrected_volatile, 0)),
    min(ifNull(nvlink_replay_errors, 0) + ifNull(nvlink_recovery_errors, 0)),
    max(ifNull(nvlink_replay_errors, 0) + ifNull(nvlink_recovery_errors, 0)),
    max(toUInt8(ifNull(remap_pending, 0) OR ifNull(retired_pages_pending, 0))),
    minIf(util_gpu_ratio, tenant != '' AND error = '' AND NOT ifNull(compute_processes = 0, 0)),
    countIf(tenant != '' AND error = '' AND compute_processes = 0),
    maxIf(ifNull(compute_processes, 0), tenant = '' AND error = ''), maxIf(ifNull(mem_used_bytes, 0), tenant = '' AND error = '')
FROM ${db}.gpu_samples
WHERE (SELECT count() FROM ${db}.gpu_health_1m) = 0
GROUP BY minute, cluster, node, gpu_uuid, gpu_index, model, tenant
