"""What a rule's query is and what it finds: the `Query` (SQL and bound parameters) and the `Candidate`s the
evaluator turns into alerts. Shared by the query builders (`queries`, `node_queries`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpufleet.pipeline.alerts.rules import Sustained


@dataclass(frozen=True)
class Query:
    sql: str
    parameters: dict[str, Any]
    settings: dict[str, Any] | None = None
    """ClickHouse settings the query needs (none for most)."""


@dataclass(frozen=True)
class Candidate:
    """One series (GPU, node, port, tenant or fleet) whose condition holds at `now`."""

    labels: dict[str, str]
    """The series' own labels (cluster, node, gpu, gpu_index, tenant...); empty values are dropped."""
    firing: bool
    """True: sustained (or a `for: 0` rule); False: pending."""
    since_ms: int
    last_ms: int
    value: float | None
    """The number the alert is about (see docs/alerts.md); None: the GPU-hours wasted, known to the evaluator."""
    context: dict[str, Any]
    tracks_waste: bool = False
    """The evaluator adds `gpu_hours_wasted` (from the alert's active_at to `last_ms`, times `gpus`)."""
    gpus: int = 1
    """GPUs the alert holds (a job's): what `gpu_hours_wasted` multiplies."""


def clean_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels without empty values (as Prometheus drops them)."""
    return {k: v for k, v in labels.items() if v != ""}


def time_window(column: str = "time") -> str:
    """`column` in `(from_ms, now_ms]`, both bound parameters (Int64 Unix ms)."""
    return (f"{column} > fromUnixTimestamp64Milli({{from_ms:Int64}}, 'UTC') "
            f"AND {column} <= fromUnixTimestamp64Milli({{now_ms:Int64}}, 'UTC')")


def sustained_params(rule: Sustained, now_ms: int, span_ms: int | None = None) -> dict[str, Any]:
    """The bound parameters of a sustained rule's query: its window `(from_ms, now_ms]` (`span_ms`, by
    default the longer of `for` and `max_sample_age`), the fresh-data bound and the `for`/coverage of the
    shared "sustained for D" formula (`{sustained_since_ms:Int64}`, `{sustained_cover_ms:Float64}`)."""
    span = max(rule.for_ms, rule.max_age_ms) if span_ms is None else span_ms
    return {"from_ms": now_ms - span, "now_ms": now_ms, "fresh_ms": now_ms - rule.max_age_ms,
            "sustained_since_ms": now_ms - rule.for_ms, "sustained_cover_ms": rule.coverage * rule.for_ms}


def run_columns(sustained: str) -> str:
    """The aggregate columns a sustained rule's query reads per series whose condition is the column `c`:
    the newest time, the first sample's interval start, the newest `c`, how many samples failed `c` and when
    the last did, and `sustained` (the SQL `sustained`, a "sustained for D" formula). `run_since` reads them."""
    return ("toUnixTimestamp64Milli(max(time)) AS last_ms,\n"
            "       toUnixTimestamp64Milli(min(time)) - argMin(interval_ms, time) AS first_start_ms,\n"
            "       argMax(c, time) AS last_c,\n"
            "       countIf(c = 0) AS n_false,\n"
            "       toUnixTimestamp64Milli(maxIf(time, c = 0)) AS last_false_ms,\n"
            f"       toUInt8({sustained}) AS sustained")


def run_since(row: Mapping[str, Any]) -> int:
    """When the series' current run of its condition began (`run_columns`): at its last failing sample, or
    at the start of its first sample in the window when none failed."""
    return int(row["last_false_ms"]) if row["n_false"] else int(row["first_start_ms"])
