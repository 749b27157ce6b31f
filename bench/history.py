"""A large synthetic history generated inside ClickHouse (`INSERT ... SELECT FROM numbers()`).

`gpus` GPUs (8 per node) sampled every `interval_ms` for `days`, inserted into `gpu_samples`
the way the ingester writes rows, so every rollup view fills as in production. Values are
noisy functions of (GPU, time) through `cityHash64`, not constants: GPUs are allocated to one of
20 tenants for 4-hour jobs (70 % of the time), utilization and tensor activity vary per sample,
power follows utilization, energy accumulates, and about 1 in 1,000 samples is degraded and
1 in 10,000 failing, with the ingester's `health_change` marks (each sample against the same GPU's
previous one). One insert per day keeps memory bounded; `generate` says how the rollups are filled
(views over tables it does not write, such as agent_reports, are put back empty).
"""

from __future__ import annotations

import re
import time
from typing import Any

from bench.common import T0_MS

DAY_MS = 86_400_000
H100 = "NVIDIA H100 80GB HBM3"
H100_PEAK = 989e12
FILL_SAMPLES = 8_640_000
"""Samples one view fill reads at most (1,000 GPUs x 1 day at 10 s), in whole days: a month at 5 minutes
is one fill per view instead of 31."""


def _select(start_ms: int, gpus: int, intervals: int, interval_ms: int, offset: int) -> str:
    """The SELECT of one day: row `number` is sample `number // gpus` of GPU `number % gpus`."""
    def noise(k: int) -> str:
        return f"(cityHash64(number, {k}) / 18446744073709551615.)"

    slot = f"intDiv(t_ms, {4 * 3_600_000})"
    return f"""
SELECT
    fromUnixTimestamp64Milli(toInt64(t_ms), 'UTC') AS time,
    toUInt32({interval_ms}) AS interval_ms,
    toUInt32({interval_ms}) AS claimed_ms,
    fromUnixTimestamp64Milli(toInt64(t_ms - {interval_ms}), 'UTC') AS claim_start,
    fromUnixTimestamp64Milli(toInt64(t_ms + 700), 'UTC') AS ingest_time,
    'bench' AS cluster,
    concat('node-', leftPad(toString(intDiv(g, 8)), 4, '0')) AS node,
    'boot-1' AS boot_id,
    toUInt64(intDiv(number, {gpus}) + {offset}) AS seq,
    toUInt16(g % 8) AS gpu_index,
    concat('GPU-', leftPad(toString(g), 6, '0')) AS gpu_uuid,
    '{H100}' AS model,
    if(alloc, concat('tenant-', toString(cityHash64(intDiv(g, 8), {slot}, 2) % 20)), '') AS tenant,
    if(alloc, concat('job-', toString(intDiv(g, 8)), '-', toString({slot})), '') AS job,
    '' AS error,
    false AS allocation_unknown, CAST([], 'Array(Tuple(tenant String, job String, weight UInt32))') AS shares,
    '' AS parent_uuid, CAST(NULL AS Nullable(UInt32)) AS gpu_instance_id,
    CAST(NULL AS Nullable(UInt32)) AS compute_instance_id, '' AS mig_profile, CAST(NULL AS Nullable(UInt8)) AS slices,
    CAST(NULL AS Nullable(UInt8)) AS slices_total,
    toFloat32(round(if(alloc, 0.3 + 0.7 * {noise(3)}, 0.), 2)) AS util_gpu_ratio,
    toFloat32(round(util_gpu_ratio * 0.6 * {noise(4)}, 2)) AS util_mem_ratio,
    toUInt64(if(alloc, 40 + 40 * {noise(5)}, 0.5) * 1073741824) AS mem_used_bytes,
    toUInt64(85899345920) AS mem_total_bytes,
    toFloat32(round(70 + 600 * util_gpu_ratio + 10 * {noise(6)}, 3)) AS power_w,
    round(1e6 + t_ms / 1000 * 400 + g, 3) AS energy_j,
    CAST(NULL AS Nullable(Float64)) AS energy_interval_j,
    toFloat32(round(30 + 50 * util_gpu_ratio + 3 * {noise(7)})) AS temp_gpu_c,
    toFloat32(round(35 + 50 * util_gpu_ratio + 3 * {noise(8)})) AS temp_mem_c,
    toUInt32(if(alloc, 1980, 345)) AS clock_sm_mhz,
    toUInt32(2619) AS clock_mem_mhz,
    toUInt64(if(alloc, 0, 1)) AS clock_event_reasons,
    CAST(NULL AS Nullable(Float32)) AS throttle_power_ratio, CAST(NULL AS Nullable(Float32)) AS throttle_thermal_ratio,
    toUInt64(0) AS ecc_corrected_volatile, toUInt64(0) AS ecc_uncorrected_volatile,
    toUInt64(0) AS ecc_corrected_aggregate, toUInt64(0) AS ecc_uncorrected_aggregate,
    toUInt32(0) AS remapped_rows_correctable, toUInt32(0) AS remapped_rows_uncorrectable,
    false AS remap_pending, false AS remap_failure, toUInt32(0) AS retired_pages, false AS retired_pages_pending,
    toUInt64(0) AS pcie_replay_count, toUInt64(0) AS nvlink_crc_errors, toUInt64(0) AS nvlink_replay_errors,
    toUInt64(0) AS nvlink_recovery_errors, toUInt8(0) AS nvlink_links_down,
    CAST(NULL AS Nullable(UInt64)) AS nvlink_symbol_errors, CAST(NULL AS Nullable(UInt64)) AS nvlink_effective_errors,
    [] AS xids,
    toUInt32(if(alloc, 1, 0)) AS compute_processes,
    toFloat32(round(util_gpu_ratio * (0.6 + 0.4 * {noise(9)}), 4)) AS sm_active_ratio,
    toFloat32(round(sm_active_ratio * 0.6 * {noise(10)}, 4)) AS tensor_active_ratio,
    toFloat32(round(util_mem_ratio * {noise(11)}, 4)) AS dram_active_ratio,
    CAST(NULL AS Nullable(Float64)) AS flops_measured,
    CAST(NULL AS Nullable(Float64)) AS tokens_measured, CAST(NULL AS Nullable(Float64)) AS samples_measured,
    CAST(NULL AS Nullable(UInt8)) AS recovery_action, CAST(NULL AS Nullable(Float32)) AS temp_slowdown_c,
    CAST(NULL AS Nullable(Float32)) AS temp_shutdown_c, CAST(NULL AS Nullable(Float32)) AS temp_mem_max_c,
    CAST(NULL AS Nullable(Float32)) AS power_limit_w, CAST(NULL AS Nullable(Float32)) AS power_limit_default_w,
    CAST(NULL AS Nullable(UInt8)) AS fabric_state, CAST(NULL AS Nullable(UInt32)) AS fabric_status,
    CAST(NULL AS Nullable(UInt32)) AS fabric_clique_id, CAST(NULL AS Nullable(String)) AS fabric_cluster_uuid,
    CAST(NULL AS Nullable(UInt32)) AS fabric_health_mask, CAST(NULL AS Nullable(String)) AS serial,
    CAST(NULL AS Nullable(String)) AS vbios_version, CAST(NULL AS Nullable(String)) AS driver_version,
    CAST(NULL AS Nullable(Bool)) AS persistence_mode, CAST(NULL AS Nullable(Bool)) AS ecc_mode,
    {H100_PEAK} AS peak_flops,
    toFloat64(tensor_active_ratio) * {H100_PEAK} * {interval_ms} / 1000. AS flops_estimated,
    CAST(multiIf(h < 0.0001, 2, h < 0.001, 1, 0) AS Enum8('ok' = 0, 'degraded' = 1, 'failing' = 2, 'unknown' = 3))
        AS health,
    multiIf(h < 0.0001, ['xid_79'], h < 0.001, ['thermal_throttle'], []) AS health_reasons,
    CAST(if({offset} = 0 AND number < {gpus}, 2, multiIf(h < 0.0001, 2, h < 0.001, 1, 0) != multiIf(
            prev_h < 0.0001, 2, prev_h < 0.001, 1, 0))
         AS Enum8('same' = 0, 'changed' = 1, 'first' = 2, 'late' = 3)) AS health_change
FROM (
    SELECT number, number % {gpus} AS g,
        {start_ms} + (intDiv(number, {gpus}) + 1) * {interval_ms} AS t_ms,
        cityHash64(intDiv(number % {gpus}, 8), {slot}, 1) % 10 < 7 AS alloc,
        {noise(12)} AS h,
        cityHash64(if(number >= {gpus}, number - {gpus}, number + {gpus * (DAY_MS // interval_ms - 1)}), 12)
            / 18446744073709551615. AS prev_h
    FROM numbers({gpus * intervals})
)"""


def generated_columns(client: Any, select: str) -> list[str]:
    """The columns the generator's SELECT produces; columns added to `gpu_samples` since (claimed time,
    interval energy...) take their defaults, as rows stored before their migration read them."""
    return [row[0] for row in client.query(f"DESCRIBE TABLE ({select} LIMIT 0)").result_rows]


def views_of(client: Any, database: str) -> list[tuple[str, str, str, str, str]]:
    """Materialized views of the database: (name, source table, target table, CREATE statement, SELECT)."""
    out = []
    for name, create, as_select in client.query(
        "SELECT name, create_table_query, as_select FROM system.tables "
        "WHERE database = {db:String} AND engine = 'MaterializedView'", parameters={"db": database},
    ).result_rows:
        target = re.search(r"\bTO\s+([\w.`]+)", create)
        source = re.search(r"\bFROM\s+([\w.`]+)", as_select)
        if target and source:
            out.append((name, source.group(1).replace("`", ""), target.group(1).replace("`", ""), create, as_select))
    return out


def generate(client: Any, database: str, gpus: int = 1000, days: float = 7.0, interval_ms: int = 10_000,
             start_ms: int = T0_MS - T0_MS % DAY_MS) -> dict[str, Any]:
    """Fill `database.gpu_samples` and every rollup built from it; returns sizes and seconds.

    The views are detached while the raw rows go in (each insert block would otherwise pass through
    every view: three times slower), then each rollup is filled by its own view's SELECT over the
    stored samples, a day at a time, or as many whole days as `FILL_SAMPLES` allows (a few parts per
    fill, each already aggregated: what a week of inserts leaves once background merges have run),
    and the views are put back.
    """
    per_day = DAY_MS // interval_ms
    total = int(days * per_day)
    views = views_of(client, database)
    for name, *_ in views:
        client.command(f"DROP VIEW {database}.{name}")
    t = time.perf_counter()
    done = 0
    while done < total:
        n = min(per_day, total - done)
        select = _select(start_ms + done * interval_ms, gpus, n, interval_ms, done)
        client.command(f"INSERT INTO {database}.gpu_samples ({', '.join(generated_columns(client, select))}) "
                       f"{select}", settings={"max_insert_threads": 2})
        done += n
    raw_s = time.perf_counter() - t
    end_ms = start_ms + total * interval_ms
    filled = {f"{database}.gpu_samples"}
    pending = list(views)
    fill_s: dict[str, float] = {}
    while pending:
        ready = [v for v in pending if v[1] in filled]
        if not ready:
            break  # the rest read tables this generator does not write (agent_reports): put back, empty
        chunk_ms = DAY_MS * max(1, FILL_SAMPLES // (gpus * per_day))
        for view in ready:
            started = time.perf_counter()
            _fill(client, database, view[1], view[2], view[4], start_ms, end_ms, chunk_ms)
            fill_s[view[0]] = round(time.perf_counter() - started, 2)
            filled.add(view[2])
            pending.remove(view)
    for view in views:
        client.command(view[3])
    seconds = time.perf_counter() - t
    rows = client.query(f"SELECT count() FROM {database}.gpu_samples").result_rows[0][0]
    return {"gpus": gpus, "days": days, "interval_ms": interval_ms, "rows": rows, "seconds": seconds,
            "raw_insert_seconds": raw_s, "fill_seconds": fill_s, "start_ms": start_ms, "end_ms": end_ms}


def _fill(client: Any, database: str, source: str, target: str, select: str, start_ms: int, end_ms: int,
          chunk_ms: int = DAY_MS) -> None:
    engine = client.query("SELECT engine, sorting_key FROM system.tables WHERE database = {db:String} "
                          "AND name = {t:String}",
                          parameters={"db": database, "t": target.rsplit(".", 1)[-1]}).result_rows
    if (engine and engine[0][0].startswith("Replacing") and source.endswith(".gpu_samples")
            and not re.search(r"\b(WHERE|ARRAY JOIN)\b", select)):
        # Latest row per key: what the view's inserts leave after the table's FINAL merge.
        key = engine[0][1]
        columns = re.search(r"SELECT\s+(.*?)\s+FROM", select, re.S).group(1)  # type: ignore[union-attr]
        client.command(f"INSERT INTO {target} SELECT {columns} FROM {source} "
                       f"ORDER BY time DESC LIMIT 1 BY {key}")
        return
    if not source.endswith(".gpu_samples"):
        client.command(f"INSERT INTO {target} {select}")
        return
    for day in range(start_ms, end_ms + 3_600_000, chunk_ms):  # samples of the last hour belong to its minutes too
        pruned = (f"(SELECT * FROM {source} WHERE time >= fromUnixTimestamp64Milli({day}) "
                  f"AND time < fromUnixTimestamp64Milli({day + chunk_ms}))")
        # the view's own alias for the table, if it has one (`FROM db.gpu_samples AS s`), else the table's name
        found = re.search(rf"{re.escape(source)}(\s+AS\s+(\w+))?", select)
        alias = found.group(2) if found and found.group(2) else "gpu_samples"
        day_select = select.replace(found.group(0) if found else source, f"{pruned} AS {alias}", 1)
        client.command(f"INSERT INTO {target} {day_select}")
