-- Node-side signals (docs/wire-format.md, docs/alerts.md): the GPU's recovery action, its own
-- temperature and power limits, its NVSwitch fabric state, its inventory (serial, VBIOS, driver,
-- persistence and ECC mode); per message the GPUs the node should have and those it lost; and the
-- node's InfiniBand/RoCE ports, one row per port per message; and gpu_inventory, each GPU's newest
-- inventory read, which NodeConfigDrift reads instead of a window of raw samples.
--
-- The new gpu_samples columns are plain Nullable(String) for the inventory strings: they are sent only
-- when read (every agent.nvml_inventory_every_s), so nearly every row holds NULL there.
--
-- network_ports is written by the batch writer under the batch's dedup tokens (pipeline/ingest/writer.py),
-- so it keeps the same dedup window as every other table a batch writes (10,000 blocks, migration 0080).

ALTER TABLE ${db}.gpu_samples ${on_cluster}
    ADD COLUMN IF NOT EXISTS recovery_action Nullable(UInt8)
        COMMENT 'NVML_FI_DEV_GET_GPU_RECOVERY_ACTION: 0 none, 1 GPU reset, 2 node reboot, 3 drain P2P, 4 drain and reset, 5 IMEX domain, 6 bus reset, 7 system reboot',
    ADD COLUMN IF NOT EXISTS temp_slowdown_c Nullable(Float32) CODEC(ZSTD(1)),
    ADD COLUMN IF NOT EXISTS temp_shutdown_c Nullable(Float32) CODEC(ZSTD(1)),
    ADD COLUMN IF NOT EXISTS temp_mem_max_c Nullable(Float32) CODEC(ZSTD(1)),
    ADD COLUMN IF NOT EXISTS power_limit_w Nullable(Float32) CODEC(ZSTD(1)) COMMENT 'enforced power limit',
    ADD COLUMN IF NOT EXISTS power_limit_default_w Nullable(Float32) CODEC(ZSTD(1)),
    ADD COLUMN IF NOT EXISTS fabric_state Nullable(UInt8) COMMENT '1 not started, 2 in progress, 3 completed',
    ADD COLUMN IF NOT EXISTS fabric_status Nullable(UInt32) COMMENT 'NVML return code of the fabric registration',
    ADD COLUMN IF NOT EXISTS fabric_clique_id Nullable(UInt32),
    ADD COLUMN IF NOT EXISTS fabric_cluster_uuid Nullable(String) CODEC(ZSTD(1)),
    ADD COLUMN IF NOT EXISTS fabric_health_mask Nullable(UInt32),
    ADD COLUMN IF NOT EXISTS serial Nullable(String) CODEC(ZSTD(1)),
    ADD COLUMN IF NOT EXISTS vbios_version Nullable(String) CODEC(ZSTD(1)),
    ADD COLUMN IF NOT EXISTS driver_version Nullable(String) CODEC(ZSTD(1)),
    ADD COLUMN IF NOT EXISTS persistence_mode Nullable(Bool),
    ADD COLUMN IF NOT EXISTS ecc_mode Nullable(Bool);

ALTER TABLE ${db}.agent_reports ${on_cluster}
    ADD COLUMN IF NOT EXISTS gpus_expected Nullable(UInt16) COMMENT 'GPUs the node should have; NULL = unknown',
    ADD COLUMN IF NOT EXISTS gpus_missing Array(String) COMMENT 'UUIDs of GPUs enumerated before and not now',
    ADD COLUMN IF NOT EXISTS gpus_enumerated UInt16 DEFAULT 0
        COMMENT 'physical GPUs the message lists (a MIG GPU once, by its parent), derived at ingest';

CREATE TABLE IF NOT EXISTS ${db}.network_ports ${on_cluster}
(
    time                DateTime64(3, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    interval_ms         UInt32,
    ingest_time         DateTime64(3, 'UTC') CODEC(DoubleDelta, ZSTD(1)),
    cluster             LowCardinality(String),
    node                LowCardinality(String),
    boot_id             LowCardinality(String),
    seq                 UInt64 CODEC(Delta, ZSTD(1)),
    device              LowCardinality(String) COMMENT 'RDMA device, e.g. mlx5_0',
    port                UInt16,
    link_layer          LowCardinality(String) COMMENT 'InfiniBand, Ethernet (RoCE); empty = unknown',
    state               Nullable(UInt8) COMMENT '1 DOWN, 2 INIT, 3 ARMED, 4 ACTIVE, 5 ACTIVE_DEFER',
    phys_state          Nullable(UInt8) COMMENT '1 Sleep, 2 Polling, 3 Disabled, 4 training, 5 LinkUp, 6 LinkErrorRecovery, 7 PhyTest',
    rate_gbps           Nullable(Float32),
    link_downed         Nullable(UInt64) CODEC(T64, ZSTD(1)),
    link_error_recovery Nullable(UInt64) CODEC(T64, ZSTD(1)),
    symbol_error        Nullable(UInt64) CODEC(T64, ZSTD(1)),
    port_rcv_errors     Nullable(UInt64) CODEC(T64, ZSTD(1)),
    port_xmit_discards  Nullable(UInt64) CODEC(T64, ZSTD(1))
)
ENGINE = ${replicated}ReplacingMergeTree
PARTITION BY toDate(time)
ORDER BY (cluster, node, device, port, boot_id, seq)
TTL toDateTime(time) + INTERVAL ${raw_ttl_days} DAY
SETTINGS ttl_only_drop_parts = 1, ${dedup_window} = 10000;

-- The port alerts (pipeline/alerts/node_queries.py) read the last minutes of every node's ports: sorted by
-- time as well, they read those minutes, not the day (as agent_reports' by_time, migration 0040).
ALTER TABLE ${db}.network_ports ${on_cluster} MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild';

ALTER TABLE ${db}.network_ports ${on_cluster} ADD PROJECTION IF NOT EXISTS by_time (SELECT * ORDER BY time);

-- Each GPU's newest inventory read (a small table: one row per GPU after merges, as gpu_latest). The view
-- takes only the samples that carry an inventory (read together, at attach and every
-- agent.nvml_inventory_every_s), so NodeConfigDrift reads a row per GPU, not a window of every sample.
-- Readers take argMax(..., time) per gpu_uuid: unmerged parts, or a GPU that moved between shards, may
-- hold more than one row.
CREATE TABLE IF NOT EXISTS ${db}.gpu_inventory ${on_cluster}
(
    gpu_uuid          LowCardinality(String),
    time              DateTime64(3, 'UTC'),
    cluster           LowCardinality(String),
    node              LowCardinality(String),
    model             LowCardinality(String),
    serial            Nullable(String),
    vbios_version     Nullable(String),
    driver_version    Nullable(String),
    persistence_mode  Nullable(Bool),
    ecc_mode          Nullable(Bool)
)
ENGINE = ${replicated}ReplacingMergeTree(time)
ORDER BY gpu_uuid
SETTINGS ${dedup_window} = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.gpu_inventory_mv ${on_cluster} TO ${db}.gpu_inventory AS
SELECT gpu_uuid, time, cluster, node, model, serial, vbios_version, driver_version, persistence_mode, ecc_mode
FROM ${db}.gpu_samples
WHERE serial IS NOT NULL OR vbios_version IS NOT NULL OR driver_version IS NOT NULL
   OR persistence_mode IS NOT NULL OR ecc_mode IS NOT NULL;
