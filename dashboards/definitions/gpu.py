"""Per-GPU board: one GPU's health, utilization, MFU, temperatures, power, clocks, memory and errors.

Reached from the health board's tables (a data link sets `gpu`). The cluster, node, tenant and
model variables narrow the list of GPUs to pick from; the panels follow the chosen GPU only.
"""

from __future__ import annotations

from typing import Any

from gpufleet.dashboards import fragments as f
from gpufleet.dashboards.builder import (
    TABLE,
    Board,
    Panel,
    Query,
    datasource_variable,
    override,
    query_variable,
    rename,
    sql,
    thresholds,
)
from gpufleet.dashboards.definitions import links
from gpufleet.dashboards.definitions.health import HEALTH_MAPPINGS
from gpufleet.pipeline.queries import rollups

IS_THIS_GPU = f"has({f.selected('gpu')}, gpu_uuid)"
"""The row is the chosen GPU's (`gpu` holds the UUID's hex; see `fragments.selected`)."""
THIS_GPU = (
    f"$__timeFilter(time) AND {IS_THIS_GPU}\n"
    "    AND (cluster, node, gpu_index) IN (\n"
    f"        SELECT cluster, node, gpu_index FROM gpu_latest WHERE {IS_THIS_GPU}\n"
    "    )"
)
"""This GPU's raw samples. The GPU's (cluster, node, gpu_index), looked up in the small `gpu_latest`,
lets ClickHouse use gpu_samples' primary key instead of scanning every GPU's rows."""
THIS_GPU_ROLLUP = (
    "(cluster, node, gpu_uuid) IN (\n"
    f"    SELECT cluster, node, gpu_uuid FROM gpu_latest WHERE {IS_THIS_GPU}\n"
    ")"
)
"""This GPU's per-GPU rollup rows, read through the rollups' `by_gpu` projection (cluster, node, GPU first)."""

gpu_variable = query_variable(
    "gpu", "GPU",
    f.options("gpu_uuid", "gpu_latest", "1" + f.filters()),
    multi=False,
    include_all=False,
    description="The GPU (UUID) this board shows; the other variables narrow the list (by where each GPU is now).",
)


def _series(title: str, columns: dict[str, str], unit: str | None = None, **kw: Any) -> Panel:
    """A time series of per-interval aggregates of this GPU's samples (`columns`: name -> aggregate)."""
    select = ",\n".join(f"{expr} AS {name}" for name, expr in columns.items())
    query = sql(
        """
        SELECT
            $__timeInterval(time) AS t,
            {select}
        FROM gpu_samples
        WHERE {where}
        GROUP BY t
        ORDER BY t
        """,
        select=select, where=THIS_GPU,
    )
    return Panel(title, "timeseries", (Query(query, ("t", *columns)),), unit=unit, **kw)


state = Panel(
    "Health state",
    "state-timeline",
    (Query(
        sql(
            """
            SELECT $__timeInterval(time) AS t, toUInt8(max(health)) AS state
            FROM gpu_samples
            WHERE {where}
            GROUP BY t
            ORDER BY t
            """,
            where=THIS_GPU,
        ),
        ("t", "state"),
    ),),
    description="The worst state the GPU reported in each interval.",
    w=24,
    h=4,
    defaults={"mappings": HEALTH_MAPPINGS, "color": {"mode": "thresholds"},
              "thresholds": thresholds((None, "green"), (1, "orange"), (2, "red"))},
    options={"mergeValues": True, "showValue": "auto"},
)

utilization = _series(
    "Utilization and activity",
    {
        "util_gpu": "avg(util_gpu_ratio)",
        "util_mem": "avg(util_mem_ratio)",
        "sm_active": "avg(sm_active_ratio)",
        "tensor_active": "avg(tensor_active_ratio)",
        "dram_active": "avg(dram_active_ratio)",
    },
    unit="percentunit",
    description="NVML utilization and (Hopper and later) GPM SM, tensor-pipe and DRAM activity.",
)

mfu = Panel(
    "MFU",
    "timeseries",
    (Query(
        sql(
            """
            SELECT
                {bucket} AS t,
                {mfu} AS mfu,
                {measured} AS mfu_measured,
                {estimated} AS mfu_hw_estimate
            FROM {rows}
            GROUP BY t
            ORDER BY t
            """,
            bucket=f.bucket(), mfu=f.MFU, measured=f.MFU_MEASURED, estimated=f.MFU_ESTIMATED,
            rows=rollups.rows(rollups.GPU_USAGE, *f.RANGE, where=THIS_GPU_ROLLUP, hourly=f.HOURLY_BUCKETS,
                              columns=f.MFU_COLUMNS),
        ),
        ("t", "mfu", "mfu_measured", "mfu_hw_estimate"),
    ),),
    description=(
        "From the per-GPU rollups (this GPU's rows, by key): measured where the job reports FLOPs, else the "
        "hardware estimate (tensor activity × peak)."
    ),
    w=12,
    unit="percentunit",
    min_interval=f.MINUTE,
    defaults={"custom": {"thresholdsStyle": {"mode": "line"}}, "min": 0,
              "thresholds": thresholds((None, "red"), (f.MFU_TARGET, "green"))},
    overrides=(
        rename("mfu", "MFU"),
        rename("mfu_measured", "MFU measured"),
        rename("mfu_hw_estimate", "MFU hardware estimate"),
    ),
)

temperature = _series(
    "Temperature",
    {"gpu_c": "max(temp_gpu_c)", "memory_c": "max(temp_mem_c)"},
    unit="celsius",
    defaults={"custom": {"thresholdsStyle": {"mode": "line"}},
              "thresholds": thresholds((None, "green"), (f.HEALTH.temp_degraded_c, "orange"),
                                       (f.HEALTH.temp_failing_c, "red"))},
)

power = _series("Power", {"power_w": "avg(power_w)"}, unit="watt")

clocks = _series("Clocks", {"sm_mhz": "avg(clock_sm_mhz)", "memory_mhz": "avg(clock_mem_mhz)"}, unit="MHz")

memory = _series("Memory", {"used_bytes": "max(mem_used_bytes)", "total_bytes": "max(mem_total_bytes)"},
                 unit="bytes")

errors = _series(
    "Error counters",
    {
        "ecc_corrected": "max(ecc_corrected_volatile)",
        "ecc_uncorrected": "max(ecc_uncorrected_volatile)",
        "retired_pages": "max(retired_pages)",
        "remapped_rows_uncorrectable": "max(remapped_rows_uncorrectable)",
        "pcie_replays": "max(pcie_replay_count)",
        "nvlink_errors": "max(ifNull(nvlink_crc_errors, 0) + ifNull(nvlink_replay_errors, 0)"
                         " + ifNull(nvlink_recovery_errors, 0))",
    },
    description="Cumulative counters as NVML reports them (volatile ECC resets with the driver).",
    overrides=(override("ecc_uncorrected", color={"fixedColor": "red", "mode": "fixed"}),),
)

events = Panel(
    "Samples with problems",
    "table",
    (Query(
        sql(
            """
            SELECT
                time,
                tenant,
                job,
                toString(health) AS state,
                arrayStringConcat(health_reasons, ', ') AS reasons,
                arrayStringConcat(arrayMap(x -> toString(x), xids), ', ') AS xid_codes,
                error
            FROM gpu_samples
            WHERE {where}
                AND (health != 'ok' OR notEmpty(xids) OR error != '')
            ORDER BY time DESC
            LIMIT 200
            """,
            where=THIS_GPU,
        ),
        ("time", "tenant", "job", "state", "reasons", "xid_codes", "error"),
        TABLE,
    ),),
    description="Samples where the GPU was not ok, raised an XID or could not be read, newest first.",
    w=24,
)

BOARD = Board(
    uid=links.GPU,
    title="GPU fleet GPU detail",
    description="One GPU in detail: health, utilization, MFU, temperature, power, clocks, memory and errors.",
    variables=(*f.standard_variables(datasource_variable()), gpu_variable),
    panels=(state, utilization, mfu, temperature, power, clocks, memory, errors, events),
    links=links.nav(links.GPU),
)
