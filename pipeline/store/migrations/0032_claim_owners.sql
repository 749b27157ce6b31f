-- Claims across nodes (docs/aggregations.md, "Claims"). The ingester makes the claims of one node
-- disjoint (0031); two node names reporting one GPU UUID (a renamed node, a node name set wrong)
-- are read by different consumers, so they are resolved here, from stored aggregates only, the same
-- whatever order the data arrived in:
--
-- * `gpu_claim_homes`: per GPU and stream (cluster, node, boot id), the span of time it reported.
--   A few rows per GPU: it says which GPUs two nodes reported at once, and when, without scanning
--   usage (GpuClaimConflict reads it too).
-- * `gpu_claim_outranked`: the (minute, GPU, cluster, node) claims that are not billed: those whose
--   claimed span (`gpu_usage_1m.claim_first_ms` .. `claim_last_ms`) overlaps the claimed span of
--   another node ranking higher (more claimed ms in its minute, ties: the smaller cluster, then
--   node). Two billed claims of different nodes never overlap, so no GPU-second is billed twice.
--   Only the GPUs and times where two nodes' reported spans overlap (widened by the longest
--   interval, an hour, and a minute) are read.
-- * `usage_hourly` bills the hour rollup less the minute rollup's rows of the outranked claims.
--
-- Rows stored before this migration have no homes recorded: they are billed as they were.

CREATE TABLE IF NOT EXISTS ${db}.gpu_claim_homes ${on_cluster}
(
    gpu_uuid        LowCardinality(String),
    cluster         LowCardinality(String),
    node            LowCardinality(String),
    boot_id         LowCardinality(String),
    tenant          LowCardinality(String) COMMENT 'empty = unallocated',
    first_start_ms  SimpleAggregateFunction(min, Int64) COMMENT 'earliest reported interval start (time - interval_ms), Unix ms',
    last_end_ms     SimpleAggregateFunction(max, Int64) COMMENT 'latest interval end, Unix ms'
)
ENGINE = ${replicated}AggregatingMergeTree
ORDER BY (gpu_uuid, cluster, node, boot_id, tenant)
SETTINGS non_replicated_deduplication_window = 1000;

CREATE MATERIALIZED VIEW IF NOT EXISTS ${db}.gpu_claim_homes_mv ${on_cluster} TO ${db}.gpu_claim_homes AS
SELECT gpu_uuid, cluster, node, boot_id, tenant,
       min(toUnixTimestamp64Milli(time) - interval_ms) AS first_start_ms,
       max(toUnixTimestamp64Milli(time)) AS last_end_ms
FROM ${db}.gpu_samples
GROUP BY gpu_uuid, cluster, node, boot_id, tenant;

CREATE OR REPLACE VIEW ${db}.gpu_claim_outranked ${on_cluster} AS
WITH
    homes AS (
        SELECT gpu_uuid, cluster, node, min(first_start_ms) AS lo, max(last_end_ms) AS hi
        FROM ${db}.gpu_claim_homes
        GROUP BY gpu_uuid, cluster, node
    ),
    shared AS (
        SELECT a.gpu_uuid AS gpu_uuid, min(greatest(a.lo, b.lo)) - 3660000 AS from_ms, max(least(a.hi, b.hi)) AS to_ms
        FROM homes AS a
        INNER JOIN homes AS b ON a.gpu_uuid = b.gpu_uuid
        WHERE (a.cluster, a.node) < (b.cluster, b.node) AND a.lo < b.hi AND b.lo < a.hi
        GROUP BY gpu_uuid
    ),
    claims AS (
        SELECT c.gpu_uuid AS gpu_uuid, c.minute AS minute, c.cluster AS cluster, c.node AS node,
               sum(c.claimed_ms) AS ms, min(c.claim_first_ms) AS lo, max(c.claim_last_ms) AS hi
        FROM ${db}.gpu_usage_1m AS c
        INNER JOIN shared AS w ON c.gpu_uuid = w.gpu_uuid
        PREWHERE c.gpu_uuid IN (SELECT gpu_uuid FROM shared)
        WHERE c.minute >= (SELECT toDateTime(intDiv(min(from_ms), 1000), 'UTC') FROM shared)
          AND c.minute < (SELECT toDateTime(intDiv(max(to_ms), 1000), 'UTC') FROM shared)
          AND toInt64(toUnixTimestamp(c.minute)) * 1000 >= w.from_ms
          AND toInt64(toUnixTimestamp(c.minute)) * 1000 < w.to_ms
        GROUP BY gpu_uuid, minute, cluster, node
        HAVING ms > 0
    ),
    buckets AS (
        SELECT gpu_uuid, bucket, groupArray((ms, cluster, node, lo, hi, minute)) AS rows
        FROM (
            SELECT gpu_uuid, cluster, node, minute, ms, lo, hi,
                   arrayJoin(range(intDiv(lo, 60000), intDiv(hi - 1, 60000) + 1)) AS bucket
            FROM claims
        )
        GROUP BY gpu_uuid, bucket
        HAVING uniqExact(cluster, node) > 1
    ),
    beaten AS (
        SELECT gpu_uuid, r.6 AS minute, r.2 AS cluster, r.3 AS node, r.1 AS ms, r.4 AS lo, r.5 AS hi,
               arrayFilter(o -> (o.2, o.3) != (r.2, r.3) AND o.4 < r.5 AND r.4 < o.5
                                AND (o.1, r.2, r.3) > (r.1, o.2, o.3), rows) AS above,
               arraySort(o -> (-toInt64(o.1), o.2, o.3), above)[1] AS best
        FROM buckets
        ARRAY JOIN rows AS r
    )
SELECT
    minute, gpu_uuid, cluster, node,
    any(ms) AS claimed_ms, any(lo) AS claim_first_ms, any(hi) AS claim_last_ms,
    argMin((best.2, best.3), (-toInt64(best.1), best.2, best.3)) AS outranked_by
FROM beaten
WHERE notEmpty(above)
GROUP BY minute, gpu_uuid, cluster, node;

-- Hourly usage per tenant and GPU model: the table billing reads (docs/aggregations.md). As in
-- 0002, with claimed time: allocated time is claimed ms, less the outranked claims. Gaps are now
-- per GPU (its UUID, across the nodes that claimed it) and `gpus` counts distinct UUIDs.
CREATE OR REPLACE VIEW ${db}.usage_hourly ${on_cluster} AS
WITH
    policy AS (
        SELECT argMax(exclude_states, updated_at) AS excluded, argMax(idle_util_pct, updated_at) AS idle_pct
        FROM ${db}.billing_policy
    ),
    rollup AS (
        SELECT hour, cluster, node, gpu_uuid, tenant, model, health, toInt8(1) AS sign,
               claimed_ms, held_no_process_ms, active_ms_by_util_pct, energy_mj, util_ms, util_weighted_ms,
               peak_known_ms, mfu_ms, measured_ms, measured_flop, estimated_unmeasured_flop, peak_capacity_flop
        FROM ${db}.gpu_usage_1h
        UNION ALL
        SELECT toStartOfHour(minute) AS hour, cluster, node, gpu_uuid, tenant, model, health, toInt8(-1) AS sign,
               claimed_ms, held_no_process_ms, active_ms_by_util_pct, energy_mj, util_ms, util_weighted_ms,
               peak_known_ms, mfu_ms, measured_ms, measured_flop, estimated_unmeasured_flop, peak_capacity_flop
        FROM ${db}.gpu_usage_1m
        WHERE (minute, gpu_uuid, cluster, node) IN (
            SELECT minute, gpu_uuid, cluster, node FROM ${db}.gpu_claim_outranked)
    ),
    per_gpu AS (
        SELECT
            r.hour AS hour, r.cluster AS cluster, r.node AS node, r.gpu_uuid AS gpu_uuid,
            r.tenant AS tenant, r.model AS model,
            sum(r.sign * toInt64(r.claimed_ms)) AS allocated_ms,
            sumIf(r.sign * toInt64(r.claimed_ms), has(p.excluded, toString(r.health))) AS unhealthy_ms,
            sumIf(r.sign * toInt64(r.held_no_process_ms
                                   + arraySum(mapValues(mapFilter((k, v) -> k < p.idle_pct, r.active_ms_by_util_pct)))),
                  NOT has(p.excluded, toString(r.health))) AS idle_ms,
            sum(r.sign * toInt64(r.energy_mj)) AS energy_mj,
            sum(r.sign * toInt64(r.util_ms)) AS util_ms,
            sum(r.sign * r.util_weighted_ms) AS util_weighted_ms,
            sum(r.sign * toInt64(r.peak_known_ms)) AS peak_known_ms,
            sum(r.sign * toInt64(r.mfu_ms)) AS mfu_ms,
            sum(r.sign * toInt64(r.measured_ms)) AS measured_ms,
            sum(r.sign * r.measured_flop) + sum(r.sign * r.estimated_unmeasured_flop) AS achieved_flop,
            sum(r.sign * r.peak_capacity_flop) AS peak_flop
        FROM rollup AS r CROSS JOIN policy AS p
        GROUP BY hour, cluster, node, gpu_uuid, tenant, model
    ),
    fleet_span AS (
        SELECT min(first_start_ms) AS span_start, max(last_end_ms) AS span_end FROM ${db}.gpu_usage_1h
    ),
    -- per GPU-hour (its UUID, across the nodes that claimed it): billed ms, and the (tenant, model) it
    -- served most (ties: the larger tenant name), whose first row carries the GPU-hour's gap
    ranked AS (
        SELECT *,
               sum(allocated_ms) OVER (PARTITION BY hour, gpu_uuid, tenant, model) AS served_ms,
               sum(allocated_ms) OVER (PARTITION BY hour, gpu_uuid) AS gpu_ms,
               row_number() OVER (PARTITION BY hour, gpu_uuid, tenant, model ORDER BY cluster, node) AS nth
        FROM per_gpu
    ),
    owned AS (
        SELECT *, argMax((tenant, model), (served_ms, tenant)) OVER (PARTITION BY hour, gpu_uuid) AS top
        FROM ranked
    ),
    usage AS (
        SELECT g.hour AS hour, g.tenant AS tenant, g.model AS model,
               uniqExactIf(g.gpu_uuid, g.allocated_ms > 0) AS gpus,
               sum(g.allocated_ms) AS allocated_ms, sum(g.unhealthy_ms) AS unhealthy_ms, sum(g.idle_ms) AS idle_ms,
               sum(g.energy_mj) AS energy_mj, sum(g.util_ms) AS util_ms, sum(g.util_weighted_ms) AS util_weighted_ms,
               sum(g.peak_known_ms) AS peak_known_ms, sum(g.mfu_ms) AS mfu_ms, sum(g.measured_ms) AS measured_ms,
               sum(g.achieved_flop) AS achieved_flop, sum(g.peak_flop) AS peak_flop,
               sumIf(greatest(
                   least(toInt64(toUnixTimestamp(g.hour)) * 1000 + 3600000, f.span_end)
                   - greatest(toInt64(toUnixTimestamp(g.hour)) * 1000, f.span_start)
                   - g.gpu_ms, 0), (g.tenant, g.model) = g.top AND g.nth = 1) AS gap_ms
        FROM owned AS g CROSS JOIN fleet_span AS f
        WHERE g.tenant != ''
        GROUP BY hour, tenant, model
        HAVING allocated_ms > 0
    )
SELECT
    u.hour AS hour,
    u.tenant AS tenant,
    u.model AS gpu_model,
    u.gpus AS gpus,
    u.allocated_ms / 1000 AS allocated_gpu_seconds,
    u.unhealthy_ms / 1000 AS unhealthy_gpu_seconds,
    (u.allocated_ms - u.unhealthy_ms) / 1000 AS billable_gpu_seconds,
    (u.allocated_ms - u.unhealthy_ms) / 3600000 AS billable_gpu_hours,
    u.idle_ms / 3600000 AS idle_allocated_gpu_hours,
    u.gap_ms / 1000 AS gap_gpu_seconds,
    u.energy_mj / 3600000000 AS energy_kwh,
    if(u.util_ms > 0, u.util_weighted_ms / u.util_ms, NULL) AS avg_utilization,
    if(u.peak_flop > 0, u.achieved_flop / u.peak_flop, NULL) AS mfu,
    multiIf(u.mfu_ms = 0, '', u.measured_ms = u.mfu_ms, 'measured', u.measured_ms = 0, 'estimated', 'mixed') AS mfu_source,
    if(u.mfu_ms > 0, u.measured_ms / u.mfu_ms, NULL) AS measured_coverage,
    (u.allocated_ms - u.peak_known_ms) / 1000 AS unknown_model_gpu_seconds
FROM usage AS u;
