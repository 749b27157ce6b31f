-- Raw samples: one row per GPU per interval, exactly as the agent reported it, plus what the
-- ingester derived at insert time (health state, peak FLOP/s, estimated FLOPs). Every row keeps
-- the agent's sample time and the ingest time, so lateness and clock skew are visible.
-- ORDER BY puts the low-cardinality keys first, then the series, then time (the order dashboards
-- and the ingester's dedup lookup read in). Daily partitions, dropped whole by TTL.
CREATE TABLE IF NOT EXISTS ${db}.gpu_samples ${on_cluster}
(
    time                      DateTime64(3, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    interval_ms               UInt32 CODEC(T64, ZSTD(1)),
    ingest_time               DateTime64(3, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    cluster                   LowCardinality(String),
    node                      LowCardinality(String),
    boot_id                   LowCardinality(String),
    seq                       UInt64 CODEC(Delta, ZSTD(1)),
    gpu_index                 UInt16,
    gpu_uuid                  LowCardinality(String),
    model                     LowCardinality(String),
    tenant                    LowCardinality(String) COMMENT 'empty = unallocated',
    job                       String CODEC(ZSTD(1)) COMMENT 'empty = no job',
    error                     String CODEC(ZSTD(1)) COMMENT 'empty = GPU read fine',
    util_gpu_ratio            Nullable(Float32) CODEC(ZSTD(1)),
    util_mem_ratio            Nullable(Float32) CODEC(ZSTD(1)),
    mem_used_bytes            Nullable(UInt64) CODEC(T64, ZSTD(1)),
    mem_total_bytes           Nullable(UInt64) CODEC(T64, ZSTD(1)),
    power_w                   Nullable(Float32) CODEC(ZSTD(1)),
    energy_j                  Nullable(Float64) CODEC(ZSTD(1)),
    temp_gpu_c                Nullable(Float32) CODEC(ZSTD(1)),
    temp_mem_c                Nullable(Float32) CODEC(ZSTD(1)),
    clock_sm_mhz              Nullable(UInt32) CODEC(T64, ZSTD(1)),
    clock_mem_mhz             Nullable(UInt32) CODEC(T64, ZSTD(1)),
    clock_event_reasons       Nullable(UInt64) CODEC(T64, ZSTD(1)),
    ecc_corrected_volatile    Nullable(UInt64) CODEC(T64, ZSTD(1)),
    ecc_uncorrected_volatile  Nullable(UInt64) CODEC(T64, ZSTD(1)),
    ecc_corrected_aggregate   Nullable(UInt64) CODEC(T64, ZSTD(1)),
    ecc_uncorrected_aggregate Nullable(UInt64) CODEC(T64, ZSTD(1)),
    remapped_rows_correctable   Nullable(UInt32) CODEC(T64, ZSTD(1)),
    remapped_rows_uncorrectable Nullable(UInt32) CODEC(T64, ZSTD(1)),
    remap_pending             Nullable(Bool),
    remap_failure             Nullable(Bool),
    retired_pages             Nullable(UInt32) CODEC(T64, ZSTD(1)),
    retired_pages_pending     Nullable(Bool),
    pcie_replay_count         Nullable(UInt64) CODEC(T64, ZSTD(1)),
    nvlink_crc_errors         Nullable(UInt64) CODEC(T64, ZSTD(1)),
    nvlink_replay_errors      Nullable(UInt64) CODEC(T64, ZSTD(1)),
    nvlink_recovery_errors    Nullable(UInt64) CODEC(T64, ZSTD(1)),
    nvlink_links_down         Nullable(UInt8),
    xids                      Array(UInt16),
    compute_processes         Nullable(UInt32) CODEC(T64, ZSTD(1)),
    sm_active_ratio           Nullable(Float32) CODEC(ZSTD(1)),
    tensor_active_ratio       Nullable(Float32) CODEC(ZSTD(1)),
    dram_active_ratio         Nullable(Float32) CODEC(ZSTD(1)),
    flops_measured            Nullable(Float64) CODEC(ZSTD(1)) COMMENT 'model FLOPs the job reported for this interval',
    -- derived by the ingester (pipeline/derive.py)
    peak_flops                Nullable(Float64) COMMENT 'peak dense BF16 FLOP/s of the model; NULL = unknown model',
    flops_estimated           Nullable(Float64) CODEC(ZSTD(1)) COMMENT 'tensor_active_ratio x peak x interval: a hardware estimate',
    health                    Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3),
    health_reasons            Array(LowCardinality(String))
)
ENGINE = ${replicated}MergeTree
PARTITION BY toDate(time)
ORDER BY (cluster, node, gpu_index, time)
TTL toDateTime(time) + INTERVAL ${raw_ttl_days} DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 1000;

-- The agents' own health, one row per message (collection time, spool depth, send errors, OTLP).
CREATE TABLE IF NOT EXISTS ${db}.agent_reports ${on_cluster}
(
    time              DateTime64(3, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    ingest_time       DateTime64(3, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    cluster           LowCardinality(String),
    node              LowCardinality(String),
    boot_id           LowCardinality(String),
    seq               UInt64 CODEC(Delta, ZSTD(1)),
    interval_ms       UInt32,
    gpus              UInt16,
    collect_seconds   Float32,
    nvml_errors       UInt32,
    spool_depth       UInt64,
    spool_dropped_total UInt64,
    send_errors_total UInt64,
    otlp_points_accepted_total UInt64,
    otlp_points_rejected_total UInt64
)
ENGINE = ${replicated}ReplacingMergeTree
PARTITION BY toDate(time)
ORDER BY (cluster, node, boot_id, seq)
TTL toDateTime(time) + INTERVAL ${raw_ttl_days} DAY
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 1000;

-- Messages that failed validation: the reason and the original bytes (also sent to the DLQ topic).
CREATE TABLE IF NOT EXISTS ${db}.dead_letters ${on_cluster}
(
    ingest_time  DateTime64(3, 'UTC'),
    topic        LowCardinality(String),
    partition    UInt32,
    offset       UInt64,
    key          String COMMENT 'message key bytes, as stored (may not be UTF-8)',
    reason       String,
    payload      String CODEC(ZSTD(3)) COMMENT 'the original message bytes'
)
ENGINE = ${replicated}ReplacingMergeTree
ORDER BY (topic, partition, offset)
SETTINGS non_replicated_deduplication_window = 1000;
