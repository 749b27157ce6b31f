-- The batch ledger (pipeline/ingest/ledger.py, docs/reliability.md G18): before an ingester writes a
-- batch it records the batch here, one partition's offset range [first_offset, last_offset] with the
-- time it was planned at, so whoever owns the partition next repeats exactly that batch (same insert
-- blocks, same dedup tokens) before anything else, and ClickHouse drops whichever copy lands second.
--
-- kind 'batch': the batch itself. The first row at (group_id, topic, partition, first_offset) wins:
-- a second entry at the same first offset carries the same insert_deduplication_token and is dropped
-- by ClickHouse (or, past the dedup window, loses on recorded_at, which the server stamps), and the
-- loser writes the winner's batch instead of its own. kind 'json_failed': block `block` of the batch
-- whose JSON insert ClickHouse refused goes as columns (entered before that insert, so a repeat takes
-- the same path). Rows are only read for the newest batches of a partition; they expire after a week.

CREATE TABLE IF NOT EXISTS ${db}.ingest_batches ${on_cluster}
(
    group_id        LowCardinality(String),
    topic           LowCardinality(String),
    partition       UInt32,
    first_offset    UInt64,
    kind            Enum8('batch' = 0, 'json_failed' = 1),
    block           UInt16 COMMENT 'json_failed: the insert block that goes as columns',
    last_offset     UInt64 COMMENT 'inclusive',
    planned_ms      Int64 COMMENT 'the batch time: every row of the batch carries it as ingest_time',
    token           String COMMENT 'the batch dedup token (ledger.batch_token)',
    staging_table   String COMMENT 'the JSON staging table the batch goes through; empty: columns only',
    column_offsets  Array(UInt64) COMMENT 'offsets whose message goes as columns though the batch uses JSON',
    planner         LowCardinality(String) COMMENT 'gpufleet version that planned the batch',
    recorded_at     DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = ${replicated}MergeTree
PARTITION BY toDate(recorded_at)
ORDER BY (group_id, topic, partition, first_offset, kind)
TTL toDateTime(recorded_at) + INTERVAL 7 DAY
SETTINGS ttl_only_drop_parts = 1, ${dedup_window} = 10000;

-- A batch's two copies (the first owner's insert, still running when the partition moved, and the
-- next owner's repeat) are one insert for ClickHouse only while each table still remembers the first:
-- the last `dedup_window` blocks of each table. 1000 covered 16 s of inserts at fleet scale with one
-- batch per partition; 10000 covers minutes (docs/scaling.md, "Batches and the dedup window").
ALTER TABLE ${db}.gpu_samples ${on_cluster} MODIFY SETTING ${dedup_window} = 10000;
ALTER TABLE ${db}.agent_reports ${on_cluster} MODIFY SETTING ${dedup_window} = 10000;
ALTER TABLE ${db}.dead_letters ${on_cluster} MODIFY SETTING ${dedup_window} = 10000;
ALTER TABLE ${db}.gpu_usage_1m ${on_cluster} MODIFY SETTING ${dedup_window} = 10000;
ALTER TABLE ${db}.gpu_usage_1h ${on_cluster} MODIFY SETTING ${dedup_window} = 10000;
ALTER TABLE ${db}.gpu_latest ${on_cluster} MODIFY SETTING ${dedup_window} = 10000;
ALTER TABLE ${db}.gpu_claim_homes ${on_cluster} MODIFY SETTING ${dedup_window} = 10000;
