-- Closed billing periods (pipeline/billing.py, docs/aggregations.md). Append-only: the code never
-- updates or deletes a row, and each statement and adjustment row carries the sha256 of its
-- canonical text, so an edit made behind the code's back is detected (gpufleet billing verify).
-- A period is closed exactly when it has a row in billing_periods, written last; a close retried
-- after a crash reuses the same insert_deduplication_token for each table, so it adds nothing twice.

CREATE TABLE IF NOT EXISTS ${db}.billing_statements ${on_cluster}
(
    period             String COMMENT 'YYYY-MM, calendar month UTC',
    tenant             String,
    gpu_model          String,
    allocated_ms       UInt64,
    unhealthy_ms       UInt64,
    billable_ms        UInt64,
    idle_allocated_ms  UInt64,
    gap_ms             UInt64,
    energy_mj          UInt64 COMMENT 'energy of the allocated GPUs, millijoules',
    energy_kwh         Float64 COMMENT 'energy_mj / 3600000000',
    billable_gpu_hours Float64 COMMENT 'billable_ms / 3600000',
    exclude_states     Array(String) COMMENT 'the SLA policy in force at the close',
    idle_util_pct      UInt8,
    checksum           String COMMENT 'sha256 of the canonical row text',
    closed_at          DateTime64(3, 'UTC')
)
ENGINE = ${replicated}MergeTree
ORDER BY (period, tenant, gpu_model)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS ${db}.billing_adjustments ${on_cluster}
(
    booked_period            String COMMENT 'the period whose close booked this row',
    usage_period             String COMMENT 'the closed period the late usage belongs to',
    tenant                   String,
    gpu_model                String,
    delta_allocated_ms       Int64,
    delta_unhealthy_ms       Int64,
    delta_billable_ms        Int64,
    delta_idle_allocated_ms  Int64,
    delta_gap_ms             Int64,
    delta_energy_mj          Int64,
    delta_energy_kwh         Float64,
    delta_billable_gpu_hours Float64,
    checksum                 String,
    closed_at                DateTime64(3, 'UTC')
)
ENGINE = ${replicated}MergeTree
ORDER BY (booked_period, usage_period, tenant, gpu_model)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS ${db}.billing_periods ${on_cluster}
(
    period           String,
    closed_at        DateTime64(3, 'UTC'),
    statement_rows   UInt32,
    adjustment_rows  UInt32,
    exclude_states   Array(String),
    idle_util_pct    UInt8,
    checksum         String COMMENT 'sha256 over the checksums of the statement and adjustment rows, in key order'
)
ENGINE = ${replicated}MergeTree
ORDER BY period
SETTINGS non_replicated_deduplication_window = 1000;
