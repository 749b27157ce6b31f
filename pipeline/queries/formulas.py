"""Formulas several readers share, written once as SQL: MFU over the rollups, and "sustained for D" over samples.

The read side (pipeline/queries/mfu.py, waterfall.py), the alert evaluator (pipeline/alerts/queries.py)
and the Grafana boards and alert rules (dashboards/) all build their SQL from these, so a board, an
alert and `gpufleet status` cannot disagree on what they mean. The `usage_hourly` view (migration
0032, immutable once applied) spells the same MFU over signed sums (the outranked claims subtracted);
tests/pipeline/test_formulas.py holds it to this definition.
"""

from __future__ import annotations

from typing import Final


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
