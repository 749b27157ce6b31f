"""Item 3: bytes on disk per GPU-sample and per counter value, gpufleet (ClickHouse) vs Prometheus.

The same simulated data (noise, jobs, faults: not constants) goes to both stores in the same run:

- gpufleet: the ingester's insert path into a fresh database, then `OPTIMIZE TABLE ... FINAL`
  (every partition merged into one part) and the active parts' `bytes_on_disk` from
  `system.parts`, for the raw `gpu_samples` table (rollups and `agent_reports` reported apart);
- Prometheus (Debian `prometheus`/`promtool` 2.42): the same values as dcgm-exporter-style series
  (dcgm metric names, dcgm labels `gpu`, `UUID`, `device`, `modelName`, `Hostname`, `hpc_job`),
  written as OpenMetrics and backfilled with `promtool tsdb create-blocks-from openmetrics`, then
  the size of the resulting TSDB block directories (chunks + index + meta; no WAL).

Backfill rather than a scraping Prometheus with a remote-write receiver: it writes the same
persistent block format a running Prometheus compacts its head into, with no WAL, head memory
or scrape timing in the figure, deterministically. The window is one aligned 2-hour block (what
Prometheus writes before any further compaction); chunk bytes are also reported apart, since
larger compacted blocks amortise the index further but not the chunks.

A counter value is one non-null metric of one GPU sample: one Prometheus sample.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.common import T0_MS, mergetree_tables

# gpufleet field -> dcgm-exporter metric (the names dcgm-exporter's default counters use).
DCGM_NAMES: dict[str, str] = {
    "util_gpu_ratio": "DCGM_FI_DEV_GPU_UTIL",
    "util_mem_ratio": "DCGM_FI_DEV_MEM_COPY_UTIL",
    "mem_used_bytes": "DCGM_FI_DEV_FB_USED",
    "mem_total_bytes": "DCGM_FI_DEV_FB_TOTAL",
    "power_w": "DCGM_FI_DEV_POWER_USAGE",
    "energy_j": "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "temp_gpu_c": "DCGM_FI_DEV_GPU_TEMP",
    "temp_mem_c": "DCGM_FI_DEV_MEMORY_TEMP",
    "clock_sm_mhz": "DCGM_FI_DEV_SM_CLOCK",
    "clock_mem_mhz": "DCGM_FI_DEV_MEM_CLOCK",
    "clock_event_reasons": "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
    "ecc_corrected_volatile": "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
    "ecc_uncorrected_volatile": "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
    "ecc_corrected_aggregate": "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
    "ecc_uncorrected_aggregate": "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
    "remapped_rows_correctable": "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
    "remapped_rows_uncorrectable": "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
    "remap_pending": "DCGM_FI_DEV_ROW_REMAP_PENDING",
    "remap_failure": "DCGM_FI_DEV_ROW_REMAP_FAILURE",
    "retired_pages": "DCGM_FI_DEV_RETIRED_DBE",
    "retired_pages_pending": "DCGM_FI_DEV_RETIRED_PENDING",
    "pcie_replay_count": "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "nvlink_crc_errors": "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
    "nvlink_replay_errors": "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
    "nvlink_recovery_errors": "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
    "nvlink_links_down": "DCGM_FI_DEV_NVLINK_LINKS_DOWN",
    "xids": "DCGM_FI_DEV_XID_ERRORS",
    "compute_processes": "DCGM_FI_DEV_COMPUTE_PIDS",
    "sm_active_ratio": "DCGM_FI_PROF_SM_ACTIVE",
    "tensor_active_ratio": "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    "dram_active_ratio": "DCGM_FI_PROF_DRAM_ACTIVE",
    "flops_measured": "GPUFLEET_FLOPS_MEASURED",
}
BLOCK_MS = 2 * 3600 * 1000


def simulated_reports(nodes: int, hours: float, interval_ms: int, seed: int = 3) -> list[Any]:
    """Reports of a simulated fleet over one aligned window of `hours` (at most one 2 h block)."""
    from gpufleet.agents.collectors.simulated import SimulatedFleet, default_faults, simulate_reports

    start = (T0_MS // BLOCK_MS) * BLOCK_MS
    end = start + int(hours * 3600 * 1000) - interval_ms  # samples at start+interval .. end: inside one block
    fleet = SimulatedFleet(nodes=nodes, seed=seed, start_ms=start, faults=default_faults(start, nodes=nodes),
                           interval_ms=interval_ms)
    return list(simulate_reports(fleet, start, end, interval_ms))


def _value(field: str, v: Any) -> float | None:
    if field == "xids":
        return float(v[-1]) if v else 0.0  # dcgm-exporter reports the last XID as a gauge
    if v is None:
        return None
    return float(v)


def _labels(node: str, g: Any) -> str:
    job = f',hpc_job="{g.job}"' if g.tenant and g.job else ""
    return (f'gpu="{g.index}",UUID="{g.uuid}",device="nvidia{g.index}",modelName="{g.model or ""}",'
            f'Hostname="{node}"{job}')


def openmetrics_lines(reports: Iterable[Any]) -> tuple[Iterable[str], int]:
    """The reports as OpenMetrics text (each family's samples together, series in time order), and
    how many samples (counter values) it holds."""
    per_family: dict[str, list[str]] = {name: [] for name in DCGM_NAMES.values()}
    count = 0
    for r in sorted(reports, key=lambda r: r.time_ms):
        ts = f"{r.time_ms / 1000:.3f}"
        for g in r.gpus:
            labels = _labels(r.node, g)
            for field, name in DCGM_NAMES.items():
                value = _value(field, getattr(g, field))
                if value is None:
                    continue
                per_family[name].append(f"{name}{{{labels}}} {value!r} {ts}\n")
                count += 1

    def lines() -> Iterable[str]:
        for name, samples in per_family.items():
            yield f"# TYPE {name} gauge\n"
            yield from sorted(samples, key=_series_then_time)
        yield "# EOF\n"

    return lines(), count


def _series_then_time(line: str) -> tuple[str, float]:
    head, _, rest = line.rpartition("} ")
    return head, float(rest.split()[1])


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prometheus_bytes(reports: list[Any], workdir: Path) -> dict[str, Any]:
    from bench.peers import PROMTOOL, require

    promtool = require(PROMTOOL)
    work = workdir / f"prom-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        lines, samples = openmetrics_lines(reports)
        source = work / "data.om"
        with source.open("w") as f:
            f.writelines(lines)
        out = work / "tsdb"
        t = time.perf_counter()
        proc = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "-q", str(source), str(out)],
                              capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"promtool failed: {proc.stderr[-2000:]}")
        blocks = [p for p in out.iterdir() if p.is_dir()]
        chunks = sum(dir_bytes(b / "chunks") for b in blocks)
        index = sum((b / "index").stat().st_size for b in blocks)
        total = sum(dir_bytes(b) for b in blocks)
        return {"status": "ok", "blocks": len(blocks), "samples": samples, "bytes": total, "chunk_bytes": chunks,
                "index_bytes": index, "openmetrics_bytes": source.stat().st_size,
                "backfill_seconds": time.perf_counter() - t}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def clickhouse_bytes(client: Any, reports: list[Any]) -> dict[str, Any]:
    """Insert through the ingester's JSON staging path, merge everything, measure the active parts."""
    from gpufleet import wire
    from gpufleet.pipeline.ingest import staging
    from gpufleet.pipeline.ingest.rows import Deriver, agent_columns, derive, insert_columns
    from gpufleet.pipeline.store import Store
    from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

    database = f"bench_storage_{uuid.uuid4().hex[:8]}"
    migrate(client, SchemaOptions(database=database))
    store = Store(client, database)
    try:
        path = staging.ensure(store)
        deriver = Deriver()
        splicer = staging.Splicer(deriver.peak)
        step = 2000
        for i in range(0, len(reports), step):
            chunk = reports[i:i + step]
            raw = [wire.encode(r) for r in chunk]
            decoded = [path.decoder.decode(b) for b in raw]
            derived = derive(decoded, deriver)
            block = splicer.block(derived, {id(r): b for r, b in zip(decoded, raw, strict=True)},
                                  [True] * len(decoded), chunk[-1].time_ms + 500)
            staging.insert(store, path, block)
            insert_columns(store, "agent_reports", agent_columns(decoded, chunk[-1].time_ms + 500))
        for table in mergetree_tables(client, database):
            client.command(f"OPTIMIZE TABLE {database}.{table} FINAL")
        parts = dict(client.query(
            "SELECT table, sum(bytes_on_disk) FROM system.parts WHERE database = {db:String} AND active "
            "GROUP BY table", parameters={"db": database}).result_rows)
        rows = client.query(f"SELECT count() FROM {database}.gpu_samples").result_rows[0][0]
        metric_cols = [f for f in DCGM_NAMES if f != "xids"]
        values = client.query(
            f"SELECT {' + '.join(f'countIf({c} IS NOT NULL)' for c in metric_cols)} + count() "
            f"FROM {database}.gpu_samples").result_rows[0][0]
        columns = client.query(
            "SELECT name, data_compressed_bytes FROM system.columns WHERE database = {db:String} "
            "AND table = 'gpu_samples' ORDER BY data_compressed_bytes DESC LIMIT 8",
            parameters={"db": database}).result_rows
        part_count = client.query(
            "SELECT count() FROM system.parts WHERE database = {db:String} AND table = 'gpu_samples' AND active",
            parameters={"db": database}).result_rows[0][0]
        return {"gpu_samples_bytes": int(parts.get("gpu_samples", 0)), "gpu_samples_rows": rows,
                "gpu_samples_parts": part_count, "counter_values": values,
                "other_tables_bytes": {t: int(b) for t, b in parts.items() if t != "gpu_samples"},
                "largest_columns": [{"column": c, "compressed_bytes": int(b)} for c, b in columns]}
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database} SYNC")


def run(client: Any, workdir: Path, nodes: int = 8, hours: float = 2.0, interval_ms: int = 10_000) -> dict[str, Any]:
    reports = simulated_reports(nodes, hours, interval_ms)
    samples = sum(len(r.gpus) for r in reports)
    ch = clickhouse_bytes(client, reports)
    prom = prometheus_bytes(reports, workdir)
    out: dict[str, Any] = {
        "gpus": nodes * 8, "hours": hours, "interval_ms": interval_ms, "gpu_samples": samples,
        "clickhouse": ch, "prometheus": prom,
        "bytes_per_gpu_sample": ch["gpu_samples_bytes"] / samples,
        "bytes_per_counter_value": ch["gpu_samples_bytes"] / ch["counter_values"],
        "target_ratio_to_prometheus": 0.5,
    }
    if prom["samples"] != ch["counter_values"]:
        raise RuntimeError(f"counter values differ: Prometheus {prom['samples']}, ClickHouse {ch['counter_values']}")
    out["prometheus_bytes_per_gpu_sample"] = prom["bytes"] / samples
    out["prometheus_bytes_per_counter_value"] = prom["bytes"] / prom["samples"]
    out["ratio_to_prometheus"] = ch["gpu_samples_bytes"] / prom["bytes"]
    out["ratio_to_prometheus_chunks_only"] = ch["gpu_samples_bytes"] / prom["chunk_bytes"]
    if not math.isfinite(out["bytes_per_gpu_sample"]):
        raise RuntimeError("no samples stored")
    return out
