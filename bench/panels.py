"""Every panel of every committed board, expanded as Grafana would run it, ready to time.

Boards are read from `dashboards/boards/*.json` at run time, so the figures follow whatever panels
the boards hold. Variables are filled the way Grafana fills them on load (All where offered, else
the first option: the GPU board shows one GPU), and each panel's SQL goes through the same macro
expansion the dashboard tests use (`gpufleet.dashboards.queries`). A panel on the GPU board is a
*one-GPU* question; every other board's panels are fleet- or tenant-level.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench.timing import Limits, measure

BOARDS = Path(__file__).resolve().parent.parent / "dashboards" / "boards"
ONE_GPU_BOARDS = frozenset({"gpufleet-gpu"})
DAY_MS = 86_400_000
SETTINGS = {"max_execution_time": 300, "max_memory_usage": 8_000_000_000, "use_query_condition_cache": 0}
"""Every timed run pays what a dashboard refresh pays. The query condition cache remembers, per part and filter,
the granules where no row matched; a refresh's range has moved, so its filter (time bounds included) is new and
misses. Repeating the identical SQL would hit it: the capacity waterfall over 7 days read as 102 ms p50 while a
refresh costs ~8 s CPU (its stalled step scans every raw sample of the range; docs/design-notes.md)."""

Scope = Literal["fleet", "one_gpu"]


@dataclass(frozen=True)
class Panel:
    board: str
    title: str
    ref: str
    range_ms: int
    sql: str
    min_interval: str | None = None

    @property
    def scope(self) -> Scope:
        return "one_gpu" if self.board in ONE_GPU_BOARDS else "fleet"

    @property
    def key(self) -> str:
        return f"{self.board}/{self.title}/{self.ref}"


def boards() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(BOARDS.glob("*.json"))]


def default_span_ms(board: dict[str, Any]) -> int:
    """The board's default time range (`now-6h`, `now-7d`...) in ms."""
    from gpufleet.dashboards.macros import go_duration_seconds

    text = board.get("time", {}).get("from", "now-6h").removeprefix("now-")
    if text.endswith("d") and text[:-1].isdigit():  # Grafana's range syntax has days, Go's durations not
        return int(text[:-1]) * DAY_MS
    return int(go_duration_seconds(text) * 1000)


def expanded(client: Any, end_ms: int, span_ms: int | None) -> Iterator[Panel]:
    """Every panel target of every board over [end - span, end] (each board's default span when None)."""
    from gpufleet.dashboards.macros import TimeRange, render
    from gpufleet.dashboards.queries import panel_queries, panel_range, resolve_variables

    for board in boards():
        span = default_span_ms(board) if span_ms is None else span_ms
        variables = resolve_variables(client, board, TimeRange(end_ms - span, end_ms, 60_000))
        for q in panel_queries(board):
            sql = render(q.raw_sql, variables, panel_range(end_ms - span, end_ms, q.min_interval))
            yield Panel(board["uid"], q.panel_title, q.ref_id, span, sql, q.min_interval)


def time_panels(client: Any, panels: list[Panel], limits: Limits) -> list[dict[str, Any]]:
    """p50/p95 of each panel; a panel whose query fails is reported with its error, not timed."""
    out = []
    for p in panels:
        row: dict[str, Any] = {"board": p.board, "panel": p.title, "ref": p.ref, "scope": p.scope,
                               "range_h": round(p.range_ms / 3_600_000, 2)}
        try:
            figures, rows = measure(lambda p=p: client.query(p.sql, settings=SETTINGS).result_rows, limits)
        except Exception as exc:
            row["error"] = str(exc).splitlines()[0][:300]
        else:
            row.update(figures, rows=len(rows))
        out.append(row)
    return out
