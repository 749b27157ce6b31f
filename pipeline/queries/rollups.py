"""A time range over a minute rollup and its hourly twin, each minute read once: whole hours from the hour level.

Every rollup exists at two levels with the same columns (`fleet_usage_1m`/`_1h`, `gpu_usage_1m`/`_1h`,
`gpu_health_1m`/`_1h`; migrations 0002, 0040, 0041). `rows` is the union that reads a range's whole
hours from the hour table and only its ragged ends (at most 59 minutes each side) from the minute
table, so a week reads ~170 hour rows per key instead of ~10,000 minute rows; sums over it equal the
sums over the minute table exactly, because each hour row is the sum of its minutes. Time-series
callers group by a bucket of whole hours (`HOURLY_OK`) or read minutes only.

Used by the read side (bound parameters) and by the Grafana boards (the plugin's macros), so both
split a range the same way. Pure SQL builders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

HOUR_S: Final = 3600


@dataclass(frozen=True)
class Levels:
    """A rollup at its two levels: the tables, their time columns, and the columns a reader takes from both."""

    minute_table: str
    hour_table: str
    columns: tuple[str, ...]
    minute_column: str = "minute"
    hour_column: str = "hour"
    hour_exprs: tuple[tuple[str, str], ...] = ()
    """(column, expression) read from the hour table in place of a column it does not have."""
    minute_exprs: tuple[tuple[str, str], ...] = ()
    """(column, expression) read from the minute table in place of a column it does not have."""


_USAGE_SUMS: Final = (
    "samples", "reported_ms", "claimed_ms", "held_no_process_ms", "active_ms_by_util_pct", "util_ms",
    "util_weighted_ms", "peak_known_ms", "mfu_ms", "measured_ms", "measured_flop", "estimated_unmeasured_flop",
    "peak_capacity_flop", "measured_peak_flop", "unmeasured_peak_flop", "energy_mj", "model_peak_flop_s",
    "first_start_ms", "last_end_ms",
)
_PEAK_SPLIT: Final = (
    ("measured_peak_flop", "ifNull(model_peak_flop_s, 0) * measured_ms / 1000"),
    ("unmeasured_peak_flop", "ifNull(model_peak_flop_s, 0) * (toInt64(mfu_ms) - toInt64(measured_ms)) / 1000"),
)
"""What fleet_usage_1m computes from each per-GPU row (migration 0040), for readers of the per-GPU rollups."""

FLEET: Final = Levels("fleet_usage_1m", "fleet_usage_1h", ("cluster", "tenant", "model", "health", *_USAGE_SUMS))
"""Per cluster, tenant, model and health state: what every fleet and tenant question reads."""
GPU_USAGE: Final = Levels(
    "gpu_usage_1m", "gpu_usage_1h",
    ("cluster", "node", "gpu_uuid", "tenant", "model", "health", *_USAGE_SUMS, "share_num", "share_den"),
    hour_exprs=_PEAK_SPLIT, minute_exprs=_PEAK_SPLIT,
)
"""Per GPU (no job: the hour level has none), with the fleet rollup's columns: a node's or a GPU's rows."""
FLEET_FROM_GPUS: Final = Levels("gpu_usage_1m", "gpu_usage_1h", FLEET.columns, hour_exprs=_PEAK_SPLIT,
                                minute_exprs=_PEAK_SPLIT)
"""The fleet rollup's columns read from the per-GPU rollups: the same rows for a node (or GPU) filter."""
JOB: Final = Levels(
    "gpu_usage_1m", "job_usage_1h",
    ("tenant", "job", "cluster", "model", "gpus", "nodes", "reported_ms", "claimed_ms", "mfu_ms", "measured_ms",
     "measured_flop", "estimated_unmeasured_flop", "peak_capacity_flop", "measured_peak_flop", "unmeasured_peak_flop",
     "first_start_ms", "last_end_ms"),
    minute_exprs=(("gpus", "[toString(gpu_uuid)]"), ("nodes", "[toString(node)]"), *_PEAK_SPLIT),
)
"""Per job: whole hours from `job_usage_1h`, the ragged ends from the per-GPU minute rollup."""
JOB_THROUGHPUT: Final = Levels(
    "job_throughput_1m", "job_throughput_1h",
    ("tenant", "job", "cluster", "model", "tokens_weighted", "tokens_reports", "samples_weighted", "samples_reports"),
)
"""Per job: the tokens and samples it reported over OTLP (claimed share of each sample; migration 0100)."""
HEALTH: Final = Levels(
    "gpu_health_1m", "gpu_health_1h",
    ("cluster", "node", "gpu_uuid", "gpu_index", "model", "tenant", "samples", "reported_ms", "failing_ms",
     "degraded_ms", "worst", "last", "xid_events", "reasons", "temp_max_c", "ecc_corrected_max", "ecc_uncorrected_max",
     "retired_pages_max", "pcie_replay_min", "pcie_replay_max", "nvlink_errors_max", "nvlink_down_max",
     "clock_event_bits", "ecc_corrected_min", "nvlink_rr_min", "nvlink_rr_max", "remap_pending_max", "idle_util_min",
     "held_no_process", "unallocated_processes_max", "unallocated_mem_max", "ecc_uncorrected_min", "nvlink_errors_min"),
)
"""Per GPU and tenant: health time, XIDs, reasons, temperatures, error counters, clock-event bits."""


def _seconds(expr: str) -> str:
    return f"toInt64(toUnixTimestamp({expr}))"


def _at(seconds: str) -> str:
    return f"toDateTime({seconds}, 'UTC')"


def whole_hours(start: str, end: str) -> tuple[str, str]:
    """The whole hours inside `[start, end)` (DateTime expressions), as `[h0, h1)` DateTime expressions;
    empty when h1 <= h0. A minute rollup row of minute m is in the range iff start <= m < end."""
    first = f"intDiv({_seconds(start)} + {HOUR_S - 1}, {HOUR_S}) * {HOUR_S}"
    end_minute = f"intDiv({_seconds(end)} + 59, 60) * 60"
    return _at(first), _at(f"intDiv({end_minute}, {HOUR_S}) * {HOUR_S}")


def _select(levels: Levels, level: str, columns: Sequence[str] | None) -> str:
    exprs = dict(levels.hour_exprs if level == "hour" else levels.minute_exprs)
    time_col = levels.hour_column if level == "hour" else levels.minute_column
    wanted = levels.columns if columns is None else columns
    unknown = set(wanted) - set(levels.columns)
    if unknown:
        raise ValueError(f"{levels.minute_table}/{levels.hour_table} have no column {sorted(unknown)}")
    cols = [f"{exprs[c]} AS {c}" if c in exprs else c for c in wanted]
    return f"SELECT {', '.join([f'{time_col} AS at', *cols])}"


def rows(levels: Levels, start: str, end: str, *, where: str = "1", hourly: str = "1", prefix: str = "",
         columns: Sequence[str] | None = None) -> str:
    """The rows of `levels` for `[start, end)` (DateTime SQL expressions), as a subquery with the time column
    `at` and `columns` (all of the level's when None).

    Whole hours come from the hour table when `hourly` (a SQL condition) holds, the rest from the minute
    table; `where` filters both (their shared columns only); `prefix` qualifies the table names (e.g.
    `{db:Identifier}.`). Group the result by `at`'s hour or a bucket of whole hours when `hourly` may hold.
    """
    h0, h1 = whole_hours(start, end)
    hour_rows = (f"{_select(levels, 'hour', columns)} FROM {prefix}{levels.hour_table} "
                 f"WHERE ({hourly}) AND {levels.hour_column} >= {h0} AND {levels.hour_column} < {h1} AND ({where})")
    minute = levels.minute_column
    minute_rows = (f"{_select(levels, 'minute', columns)} FROM {prefix}{levels.minute_table} "
                   f"WHERE {minute} >= {start} AND {minute} < {end} "
                   f"AND (NOT ({hourly}) OR {minute} < {h0} OR {minute} >= {h1}) AND ({where})")
    return f"({hour_rows}\n UNION ALL\n {minute_rows})"


def touched_hours(levels: Levels, start: str, end: str, *, where: str = "1", prefix: str = "",
                  columns: Sequence[str] | None = None) -> str:
    """The hour-level rows of every hour `[start, end)` touches, ragged ends included: a superset of the
    range read at one row per key and hour, for picking the keys (GPUs, nodes) whose rows of the range
    are then read by key. Same shape as `rows`."""
    return (f"({_select(levels, 'hour', columns)} FROM {prefix}{levels.hour_table} "
            f"WHERE {levels.hour_column} >= toStartOfHour({start}) AND {levels.hour_column} < {end} AND ({where}))")


def all_rows(levels: Levels, *, where: str = "1", prefix: str = "", columns: Sequence[str] | None = None) -> str:
    """Every row of `levels` (all time): the hour table alone, with the time column `at`."""
    return f"({_select(levels, 'hour', columns)} FROM {prefix}{levels.hour_table} WHERE {where})"


def ms_param(name: str) -> str:
    """A DateTime SQL expression of the bound Unix-millisecond parameter `name` (whole seconds)."""
    return f"toDateTime(intDiv({{{name}:Int64}}, 1000), 'UTC')"


WINDOW_START: Final = ms_param("w_start")
WINDOW_END: Final = ms_param("w_end")
"""A `Window`'s bounds (bind `Window.params()`): `rows(levels, WINDOW_START, WINDOW_END, ...)`."""
