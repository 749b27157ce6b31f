-- Billing what each holder held (docs/allocation.md, "Shared GPUs" and "MIG instances"), on top of the
-- claimed time of 0031/0032: what is split and scaled here is each sample's claimed milliseconds.
--
-- Shared GPUs: the minute rollup splits each sample among its holders (`shares`) by weight: holder i
-- of n gets floor(ms x W_i / W) - floor(ms x W_(i-1) / W) milliseconds, W_i the sum of the first i
-- weights and W of all, so the parts are whole milliseconds adding up to exactly the sample's: no
-- GPU-second is billed twice, none to the first holder alone. The claimed and the reported ms, and the
-- energy (whole mJ) are split the same way, FLOPs in proportion. A sample with one holder or none is one
-- row, as before; `samples` counts each sample once (on its first holder's row).
--
-- MIG instances: every rollup row keeps its device's share of the GPU (`share_num / share_den`, a MIG
-- instance's compute slices over the GPU's, 1/1 for a whole GPU; fixed for a device UUID), and
-- `usage_hourly` bills GPU-seconds as claimed milliseconds x share, summed exactly in 1/840 ms (840 is
-- divisible by every GPU's slice count, 1 to 8) and divided once at the end.
--
-- Unknown allocations (`allocation_unknown`) stay unallocated rows (tenant ''), billed to nobody, and are
-- counted apart in `unknown_ms`. The views are replaced with CREATE OR REPLACE, as 0031 explains.

ALTER TABLE ${db}.gpu_usage_1m ${on_cluster}
    ADD COLUMN IF NOT EXISTS share_num SimpleAggregateFunction(max, UInt8) DEFAULT 1
        COMMENT 'the device''s share of its GPU, numerator (MIG: compute slices held)',
    ADD COLUMN IF NOT EXISTS share_den SimpleAggregateFunction(max, UInt8) DEFAULT 1
        COMMENT 'the device''s share of its GPU, denominator (MIG: the GPU''s compute slices)',
    ADD COLUMN IF NOT EXISTS unknown_ms SimpleAggregateFunction(sum, UInt64) DEFAULT 0
        COMMENT 'claimed ms whose allocation the agent could not say (billed to nobody)';

ALTER TABLE ${db}.gpu_usage_1h ${on_cluster}
    ADD COLUMN IF NOT EXISTS share_num SimpleAggregateFunction(max, UInt8) DEFAULT 1,
    ADD COLUMN IF NOT EXISTS share_den SimpleAggregateFunction(max, UInt8) DEFAULT 1,
    ADD COLUMN IF NOT EXISTS unknown_ms SimpleAggregateFunction(sum, UInt64) DEFAULT 0;

-- h: (tenant, job, claimed ms, energy mJ, n-th holder, reported ms) of each holder of a sample
CREATE OR REPLACE MATERIALIZED VIEW ${db}.gpu_usage_1m_mv ${on_cluster} TO ${db}.gpu_usage_1m AS
SELECT
    minute, h.1 AS tenant, cluster, node, gpu_uuid, model, h.2 AS job, health,
    sum(toUInt64(h.5 = 1)) AS samples,
    sum(h.6) AS reported_ms,
    sum(h.3) AS claimed_ms,
    sumIf(h.3, h.1 != '' AND ifNull(compute_processes = 0, 0)) AS held_no_process_ms,
    sumMapIf(
        map(toUInt8(least(floor(ifNull(util_gpu_ratio, 0) * 100 + 0.0001), 100)), h.3),
        h.1 != '' AND NOT ifNull(compute_processes = 0, 0) AND util_gpu_ratio IS NOT NULL
    ) AS active_ms_by_util_pct,
    sumIf(h.3, util_gpu_ratio IS NOT NULL) AS util_ms,
    sum(toFloat64(ifNull(util_gpu_ratio, 0)) * h.3) AS util_weighted_ms,
    sumIf(h.3, peak_flops IS NOT NULL) AS peak_known_ms,
    sumIf(h.3, peak_flops IS NOT NULL
          AND (flops_measured IS NOT NULL OR flops_estimated IS NOT NULL OR error != '')) AS mfu_ms,
    sumIf(h.3, peak_flops IS NOT NULL AND flops_measured IS NOT NULL) AS measured_ms,
    sumIf(if(h.3 = interval_ms, ifNull(flops_measured, 0), ifNull(flops_measured, 0) * h.3 / interval_ms),
          peak_flops IS NOT NULL) AS measured_flop,
    sumIf(if(h.3 = interval_ms, ifNull(flops_estimated, 0), ifNull(flops_estimated, 0) * h.3 / interval_ms),
          peak_flops IS NOT NULL AND flops_measured IS NULL) AS estimated_unmeasured_flop,
    sumIf(ifNull(peak_flops, 0) * h.3 / 1000, peak_flops IS NOT NULL
          AND (flops_measured IS NOT NULL OR flops_estimated IS NOT NULL OR error != '')) AS peak_capacity_flop,
    sum(h.4) AS energy_mj,
    max(peak_flops) AS model_peak_flop_s,
    min(start_ms) AS first_start_ms,
    max(end_ms) AS last_end_ms,
    min(if(h.3 > 0, start_ms, 9223372036854775807)) AS claim_first_ms,
    max(if(h.3 > 0, end_ms, 0)) AS claim_last_ms,
    max(ifNull(slices, 1)) AS share_num,
    max(ifNull(slices_total, 1)) AS share_den,
    sumIf(h.3, allocation_unknown) AS unknown_ms
FROM (
    SELECT
        toDateTime(intDiv(toUnixTimestamp64Milli(claim_start), 60000) * 60, 'UTC') AS minute,
        toUnixTimestamp64Milli(claim_start) AS start_ms,
        toUnixTimestamp64Milli(time) AS end_ms,
        interval_ms, cluster, node, gpu_uuid, model, health, error, compute_processes, util_gpu_ratio,
        peak_flops, flops_measured, flops_estimated, slices, slices_total, allocation_unknown,
        toUInt64(s.claimed_ms) AS claimed, toUInt64(interval_ms) AS reported,
        if(energy_interval_j IS NOT NULL,
           toUInt64(round(assumeNotNull(energy_interval_j) * 1000
                          * if(s.claimed_ms = interval_ms, 1., s.claimed_ms / interval_ms))),
           toUInt64(round(ifNull(power_w, 0) * s.claimed_ms))) AS mj,
        arrayCumSum(arrayMap(x -> toUInt64(greatest(x.3, 1)), shares)) AS cum,
        arrayPushFront(arrayPopBack(cum), toUInt64(0)) AS before,
        greatest(cum[-1], toUInt64(1)) AS weight_sum,
        if(empty(shares), [(toString(tenant), job, claimed, mj, toUInt32(1), reported)],
           arrayMap((x, c, b, n) -> (x.1, x.2,
                                     toUInt64(intDiv(claimed * c, weight_sum) - intDiv(claimed * b, weight_sum)),
                                     toUInt64(intDiv(mj * c, weight_sum) - intDiv(mj * b, weight_sum)),
                                     toUInt32(n),
                                     toUInt64(intDiv(reported * c, weight_sum) - intDiv(reported * b, weight_sum))),
                    shares, cum, before, arrayEnumerate(shares))) AS holders
    FROM ${db}.gpu_samples AS s
)
ARRAY JOIN holders AS h
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
    max(last_end_ms) AS last_end_ms,
    max(share_num) AS share_num,
    max(share_den) AS share_den,
    sum(unknown_ms) AS unknown_ms
FROM ${db}.gpu_usage_1m
GROUP BY hour, tenant, cluster, node, gpu_uuid, model, health;

-- usage_hourly as in 0032, with every time sum in GPU-milliseconds x 840 (claimed ms x share x 840): a
-- whole GPU's figures are what they were; a MIG instance's are its share of them.
CREATE OR REPLACE VIEW ${db}.usage_hourly ${on_cluster} AS
WITH
    policy AS (
        SELECT argMax(exclude_states, updated_at) AS excluded, argMax(idle_util_pct, updated_at) AS idle_pct
        FROM ${db}.billing_policy
    ),
    rollup AS (
        SELECT hour, cluster, node, gpu_uuid, tenant, model, health, toInt8(1) AS sign,
               claimed_ms, held_no_process_ms, active_ms_by_util_pct, energy_mj, util_ms, util_weighted_ms,
               peak_known_ms, mfu_ms, measured_ms, measured_flop, estimated_unmeasured_flop, peak_capacity_flop,
               share_num, share_den
        FROM ${db}.gpu_usage_1h
        UNION ALL
        SELECT toStartOfHour(minute) AS hour, cluster, node, gpu_uuid, tenant, model, health, toInt8(-1) AS sign,
               claimed_ms, held_no_process_ms, active_ms_by_util_pct, energy_mj, util_ms, util_weighted_ms,
               peak_known_ms, mfu_ms, measured_ms, measured_flop, estimated_unmeasured_flop, peak_capacity_flop,
               share_num, share_den
        FROM ${db}.gpu_usage_1m
        WHERE (minute, gpu_uuid, cluster, node) IN (
            SELECT minute, gpu_uuid, cluster, node FROM ${db}.gpu_claim_outranked)
    ),
    per_gpu AS (
        SELECT
            r.hour AS hour, r.cluster AS cluster, r.node AS node, r.gpu_uuid AS gpu_uuid,
            r.tenant AS tenant, r.model AS model,
            max(toInt64(r.share_num) * intDiv(840, greatest(r.share_den, 1))) AS x840,
            sum(r.sign * toInt64(r.claimed_ms)) AS allocated_ms,
            sum(r.sign * toInt64(r.claimed_ms)) * x840 AS allocated_x,
            sumIf(r.sign * toInt64(r.claimed_ms), has(p.excluded, toString(r.health))) * x840 AS unhealthy_x,
            sumIf(r.sign * toInt64(r.held_no_process_ms
                                   + arraySum(mapValues(mapFilter((k, v) -> k < p.idle_pct, r.active_ms_by_util_pct)))),
                  NOT has(p.excluded, toString(r.health))) * x840 AS idle_x,
            sum(r.sign * toInt64(r.energy_mj)) AS energy_mj,
            sum(r.sign * toInt64(r.util_ms)) AS util_ms,
            sum(r.sign * r.util_weighted_ms) AS util_weighted_ms,
            sum(r.sign * toInt64(r.peak_known_ms)) * x840 AS peak_known_x,
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
               sum(g.allocated_x) AS allocated_x, sum(g.unhealthy_x) AS unhealthy_x, sum(g.idle_x) AS idle_x,
               sum(g.energy_mj) AS energy_mj, sum(g.util_ms) AS util_ms, sum(g.util_weighted_ms) AS util_weighted_ms,
               sum(g.peak_known_x) AS peak_known_x, sum(g.mfu_ms) AS mfu_ms, sum(g.measured_ms) AS measured_ms,
               sum(g.achieved_flop) AS achieved_flop, sum(g.peak_flop) AS peak_flop,
               sumIf(greatest(
                   least(toInt64(toUnixTimestamp(g.hour)) * 1000 + 3600000, f.span_end)
                   - greatest(toInt64(toUnixTimestamp(g.hour)) * 1000, f.span_start)
                   - g.gpu_ms, 0) * g.x840, (g.tenant, g.model) = g.top AND g.nth = 1) AS gap_x
        FROM owned AS g CROSS JOIN fleet_span AS f
        WHERE g.tenant != ''
        GROUP BY hour, tenant, model
        HAVING allocated_x > 0
    )
SELECT
    u.hour AS hour,
    u.tenant AS tenant,
    u.model AS gpu_model,
    u.gpus AS gpus,
    u.allocated_x / 840000 AS allocated_gpu_seconds,
    u.unhealthy_x / 840000 AS unhealthy_gpu_seconds,
    (u.allocated_x - u.unhealthy_x) / 840000 AS billable_gpu_seconds,
    (u.allocated_x - u.unhealthy_x) / 3024000000 AS billable_gpu_hours,
    u.idle_x / 3024000000 AS idle_allocated_gpu_hours,
    u.gap_x / 840000 AS gap_gpu_seconds,
    u.energy_mj / 3600000000 AS energy_kwh,
    if(u.util_ms > 0, u.util_weighted_ms / u.util_ms, NULL) AS avg_utilization,
    if(u.peak_flop > 0, u.achieved_flop / u.peak_flop, NULL) AS mfu,
    multiIf(u.mfu_ms = 0, '', u.measured_ms = u.mfu_ms, 'measured', u.measured_ms = 0, 'estimated', 'mixed') AS mfu_source,
    if(u.mfu_ms > 0, u.measured_ms / u.mfu_ms, NULL) AS measured_coverage,
    (u.allocated_x - u.peak_known_x) / 840000 AS unknown_model_gpu_seconds
FROM usage AS u;
