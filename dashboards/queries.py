"""Every query of every board, read from the dashboard JSON and expanded as Grafana would run it.

The tests, the preview and the benchmarks all go through here: `panel_queries` lists the panel
targets of a board, `resolve_variables` fills the board's query variables from ClickHouse the way
Grafana does (in order, each with the values of those before it), `panel_range` gives the time
range and `$__interval` Grafana would compute for a panel, and `run` executes the expanded SQL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpufleet.dashboards.macros import TimeRange, Var, all_of, go_duration_seconds, render

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

DEFAULT_MAX_DATA_POINTS = 300
"""Grafana's resolution is the panel's width in pixels; a typical half-width panel is about this."""


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel, as the dashboard JSON has it."""

    board_uid: str
    panel_id: int
    panel_title: str
    panel_type: str
    ref_id: str
    raw_sql: str
    format: int
    min_interval: str | None

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.board_uid, self.panel_id, self.ref_id)


@dataclass(frozen=True)
class Result:
    columns: tuple[str, ...]
    types: tuple[str, ...]
    rows: list[tuple[Any, ...]]


def panel_queries(board: Mapping[str, Any]) -> list[PanelQuery]:
    """Every panel target of a dashboard (rows and text panels have none)."""
    out = []
    for panel in board.get("panels", []):
        for target in panel.get("targets", []):
            out.append(PanelQuery(
                board["uid"], panel["id"], panel["title"], panel["type"], target["refId"], target["rawSql"],
                int(target.get("format", 1)), panel.get("interval"),
            ))
    return out


def round_interval(ms: float) -> int:
    """Grafana's `rangeutil.roundInterval`: a raw interval rounded to a 'nice' one, in ms."""
    steps = (
        (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000),
        (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000),
        (450000, 300000), (900000, 600000), (2700000, 1800000), (5400000, 3600000), (9000000, 7200000),
        (16200000, 10800000), (32400000, 21600000), (86400000, 43200000), (604800000, 86400000),
        (1814400000, 604800000), (3628800000, 2592000000),
    )
    for below, nice in steps:
        if ms < below:
            return nice
    return 31536000000


def panel_range(from_ms: int, to_ms: int, min_interval: str | None,
                max_data_points: int = DEFAULT_MAX_DATA_POINTS) -> TimeRange:
    """The range and `$__interval` Grafana computes for a panel (`rangeutil.calculateInterval`)."""
    interval = round_interval((to_ms - from_ms) / max_data_points)
    if min_interval:
        interval = max(interval, int(go_duration_seconds(min_interval) * 1000))
    return TimeRange(from_ms, to_ms, interval)


def run(client: Client, sql: str) -> Result:
    """Execute one expanded query; the client's default database is the one the boards read."""
    r = client.query(sql)
    return Result(tuple(r.column_names), tuple(t.name for t in r.column_types), list(r.result_rows))


def _js_order(text: str) -> bytes:
    """Sort key of JavaScript's string comparison (UTF-16 code units), which lodash `sortBy` uses."""
    return text.encode("utf-16-be", "surrogatepass")


def variable_options(rows: list[tuple[Any, ...]], sort: int) -> list[tuple[str, str]]:
    """(value, text) options from a variable query's rows, as the plugin and Grafana build them.

    The plugin (`CHDatasource.metricFindQuery`): one column is both value and text; with more, the
    first is the value and the second the text. Grafana (`metricNamesToVariableValues`): the first
    option of each value is kept, then `sort` 1 orders by text (2 descending, 0 keeps the query's order).
    """
    seen: dict[str, str] = {}
    for row in rows:
        text = row[1] if len(row) > 1 and row[1] is not None else row[0]  # `item.text ?? item.value`
        value = row[0] if row[0] is not None else text
        seen.setdefault(str(value), str(text))
    options = list(seen.items())
    if sort == 0:
        return options
    if sort not in (1, 2):
        raise ValueError(f"variable sort {sort} is not supported here; use 0 (query order) or 1/2 (by text)")
    return sorted(options, key=lambda o: _js_order(o[1]), reverse=sort == 2)


def resolve_variables(
    client: Client, board: Mapping[str, Any], time_range: TimeRange, chosen: Mapping[str, str] | None = None
) -> dict[str, Var]:
    """Fill the board's query variables in order, as Grafana does on load.

    A variable named in `chosen` takes the option whose text (what the drop-down shows) is that
    string, a one-element selection when multi-value; the others are All when they include All,
    else their first option. The text must be one of the options, or `ValueError` lists them.
    """
    chosen = chosen or {}
    values: dict[str, Var] = {}
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        name = variable["name"]
        sql = render(variable["query"]["rawSql"], values, time_range)
        found = variable_options(run(client, sql).rows, int(variable.get("sort", 0)))
        options = tuple(v for v, _ in found)
        multi = bool(variable.get("multi"))
        if name in chosen:
            picked = [(v, t) for v, t in found if t == chosen[name]]
            if not picked:
                raise ValueError(f"variable {name}: {chosen[name]!r} is not among its options {[t for _, t in found]}")
            value, text = picked[0]
        elif variable.get("includeAll"):
            values[name] = all_of(options, multi)
            continue
        elif found:
            value, text = found[0]
        else:
            values[name] = Var(() if multi else "", options)
            continue
        values[name] = Var((value,) if multi else value, options, label=(text,) if multi else text)
    return values
