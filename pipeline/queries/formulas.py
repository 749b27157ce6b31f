"""Formulas several readers share, written once as SQL: MFU over the rollups, "sustained for D" over samples,
a counter's increase, a GPU's power limit and what a stalled GPU sample looks like.

The read side (pipeline/queries/mfu.py, waterfall.py), the alert evaluator (pipeline/alerts/queries.py)
and the Grafana boards and alert rules (dashboards/) all build their SQL from these, so a board, an
alert and `gpufleet status` cannot disagree on what they mean. The `usage_hourly` view (migration
0032, immutable once applied) spells the same MFU over signed sums (the outranked claims subtracted);
tests/pipeline/test_formulas.py holds it to this definition.
"""

from __future__ import annotations

from typing import Final

from gpufleet.gpu_facts import POWER_LIMIT_TABLE


def achieved_flop(of: str = "") -> str:
    """Achieved FLOPs of the rollup rows in scope: what jobs measured where they reported, else the
    hardware estimate (tensor activity x peak). `of` prefixes the columns (a table alias and a dot)."""
    return f"sum({of}measured_flop) + sum({of}estimated_unmeasured_flop)"


def peak_flop(of: str = "") -> str:
    """Peak FLOPs (peak FLOP/s x seconds) over the GPU-seconds in the MFU: known peak, known FLOPs."""
    return f"sum({of}peak_capacity_flop)"


def ratio(numerator: str, denominator: str) -> str:
    """`numerator / denominator`, NULL where the denominator is not positive (nothing to divide by).
    Each argument is one operand: a column, a call, or an expression in parentheses."""
    return f"if({denominator} > 0, {numerator} / {denominator}, NULL)"


ACHIEVED_FLOP: Final = f"({achieved_flop()})"
PEAK_FLOP: Final = peak_flop()
MFU: Final = ratio(ACHIEVED_FLOP, PEAK_FLOP)
"""MFU (model FLOPs utilization) of the rollup rows in scope: achieved FLOPs / peak FLOPs, known models
only; NULL where no GPU-second in scope has a known peak and known FLOPs."""

FIRST_START_MS: Final = "toUnixTimestamp64Milli(min(time)) - argMin(interval_ms, time)"
"""Where a series' samples begin (Unix ms): the start of the interval its oldest sample covers."""


def sustained(since_ms: str, cover_ms: str) -> str:
    """"Sustained for D", as an aggregate over one series' samples whose condition is the column `c` (1 or 0).

    True when no sample fails the condition, the samples reach back to `since_ms` (now - D) and
    their claimed time covers at least `cover_ms` (coverage x D): a lost message or two is tolerated,
    a series that stopped reporting is not, a second agent reporting the same seconds adds nothing.
    Both arguments are SQL: bound parameters or macros; the samples must carry `claimed_ms`.
    """
    return (f"countIf(c = 0) = 0\n    AND {FIRST_START_MS} <= {since_ms}\n"
            f"    AND sum(claimed_ms) >= {cover_ms}")


def increase(column: str) -> str:
    """A counter's increase over the samples in scope, in time order; a drop (a reset) counts the new value,
    as Prometheus' `increase()` does. NULL readings are skipped."""
    pairs = f"groupArrayIf((time, assumeNotNull({column})), {column} IS NOT NULL)"
    values = f"arrayMap(p -> toInt64(p.2), arraySort(p -> p.1, {pairs}))"
    return f"arraySum(arrayMap((d, v) -> if(d >= 0, d, v), arrayDifference({values}), {values}))"


def rose(column: str) -> str:
    """Whether `increase(column)` is above 0, from plain aggregates (no per-series array to sort). Its terms
    are never negative, so it is 0 exactly when the readings in time order never rise and only drop to 0:
    one value throughout, or a value then 0 (design notes: pipeline/queries/formulas.py)."""
    flat = (f"min({column}) = max({column}) OR (min({column}) = 0 AND uniqExact({column}) = 2 "
            f"AND maxIf(time, {column} != 0) < minIf(time, {column} = 0))")
    return f"NOT ifNull({flat}, 1)"


def _default_power_limit(model: str) -> str:
    branches = ", ".join(f"positionCaseInsensitive({model}, '{pattern}') > 0, {limit.watts:.1f}"
                         for limit in POWER_LIMIT_TABLE.values() for pattern in limit.patterns)
    return f"multiIf({branches}, CAST(NULL, 'Nullable(Float64)'))"


POWER_LIMIT_W: Final = _default_power_limit("model")
"""The power limit (W) of a `gpu_samples` row: the model's default board power (`gpu_facts.POWER_LIMIT_TABLE`,
matched on the model name as `default_power_limit_w` does), NULL for a model the table does not know. When
samples carry the GPU's enforced limit (issue 14 item 4), it goes first here: `coalesce(<that column>, ...)`."""


def stall_like(util_above: str, tensor_below: str, sm_below: str, power_below_ratio: str,
               flops_below_ratio: str) -> str:
    """A `gpu_samples` row that looks like a hung job: kernels resident (utilization at or above `util_above`),
    no math (tensor activity at or below `tensor_below`; SM activity at or below `sm_below` where the tensor
    counter is missing), power near idle (at or below `power_below_ratio` x `POWER_LIMIT_W`) and, where the
    job reports FLOPs, next to none (at or below `flops_below_ratio` x peak x interval).

    Each argument is SQL (a bound parameter or a literal). NULL where a figure it needs is unknown: wrap
    it in `ifNull(..., 0)`. The ratios are compared in Float32, the columns' type, so a sample sent with
    utilization 0.9 is at or above 0.9.
    """
    return (
        f"util_gpu_ratio >= toFloat32({util_above})"
        f" AND if(tensor_active_ratio IS NOT NULL, tensor_active_ratio <= toFloat32({tensor_below}),"
        f" sm_active_ratio <= toFloat32({sm_below}))"
        f" AND power_w <= {power_below_ratio} * {POWER_LIMIT_W}"
        f" AND (flops_measured IS NULL"
        f" OR flops_measured <= {flops_below_ratio} * ifNull(peak_flops, 0) * interval_ms / 1000)"
    )
