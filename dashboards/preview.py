"""Render every board's panels to one self-contained offline HTML page, from the queries Grafana runs.

A preview, not a second Grafana: variables at All (a board without All takes its first option),
panels as inline SVG (lines, bars, heat and state strips) or small tables, no external file, one
few-line script that marks the page ready. `collect` runs the queries (one failing panel shows its
error, the rest still render); `render` is a pure function from the results to the page.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.dashboards import svg
from gpufleet.dashboards.macros import TimeRange
from gpufleet.dashboards.macros import render as render_sql
from gpufleet.dashboards.queries import panel_queries, panel_range, resolve_variables, run

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

TABLE_ROWS = 12
_SCRIPT = (
    "(function(){var p=document.querySelectorAll('.panel');"
    "document.body.setAttribute('data-panels',String(p.length));"
    "document.body.setAttribute('data-ready','1');})();"
)
_CSS = (
    "body{font:13px system-ui,sans-serif;margin:16px;background:#f4f5f8;color:#222}"
    "h2{margin:24px 0 8px}.grid{display:grid;grid-template-columns:repeat(24,1fr);gap:8px}"
    ".panel{background:#fff;border:1px solid #ddd;border-radius:4px;padding:8px;overflow:auto}"
    ".panel h3{font-size:13px;margin:0 0 6px}.err{color:#c00}.stat{display:inline-block;margin:4px 16px 4px 0}"
    ".stat b{display:block;font-size:22px}table{border-collapse:collapse;font-size:11px}"
    "td,th{border-bottom:1px solid #eee;padding:2px 6px;text-align:left}svg{width:100%;height:auto}"
    ".legend{font-size:11px}"
)


@dataclass
class PanelView:
    """One panel's results (or error), with what rendering needs from its JSON."""

    panel: Mapping[str, Any]
    columns: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    error: str | None = None


@dataclass
class BoardView:
    uid: str
    title: str
    panels: list[PanelView]
    error: str | None = None


def collect(client: Client, boards: Sequence[Mapping[str, Any]], from_ms: int, to_ms: int) -> list[BoardView]:
    """Run every panel query of every board over `[from_ms, to_ms]` with the variables at All."""
    views = []
    for board in boards:
        try:
            values = resolve_variables(client, board, TimeRange(from_ms, to_ms, 60_000))
        except Exception as exc:
            views.append(BoardView(board["uid"], board["title"], [], f"variables: {exc}"))
            continue
        panels = {p["id"]: p for p in board["panels"]}
        out = []
        for q in panel_queries(board):
            view = PanelView(panels[q.panel_id])
            try:
                r = run(client, render_sql(q.raw_sql, values, panel_range(from_ms, to_ms, q.min_interval)))
                view.columns, view.types, view.rows = r.columns, r.types, r.rows
            except Exception as exc:  # one broken panel must not hide the others
                view.error = str(exc).splitlines()[0][:400]
            out.append(view)
        views.append(BoardView(board["uid"], board["title"], out))
    return views


# --- rendering (pure) ----------------------------------------------------------------------------


def _ms(value: Any) -> float:
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return stamp.timestamp() * 1000
    return float(value)


def _text(value: Any, unit: str | None = None) -> str:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return "–" if value is None else str(value)
    if isinstance(value, int | float):
        return svg.number(float(value), unit)
    return str(value)


def _overrides(panel: Mapping[str, Any], prop: str) -> dict[str, Any]:
    out = {}
    for o in panel.get("fieldConfig", {}).get("overrides", []):
        for p in o.get("properties", []):
            if p.get("id") == prop:
                out[o["matcher"]["options"]] = p["value"]
    return out


def _numeric(type_name: str) -> bool:
    return type_name.removeprefix("Nullable(").startswith(("Int", "UInt", "Float", "Decimal"))


def _series(view: PanelView, names: Mapping[str, str], colors: Mapping[str, Any]) -> list[svg.Series]:
    """Long-format rows (time, labels..., numbers...) as one series per label set and number column,
    named and coloured as the panel's overrides say."""
    labels = [i for i, t in enumerate(view.types) if i and not _numeric(t)]
    metrics = [i for i, t in enumerate(view.types) if i and _numeric(t)]
    series: dict[str, list[svg.Point]] = {}
    for row in view.rows:
        key = " ".join(str(row[i]) for i in labels)
        for i in metrics:
            name = names.get(key, key) if key and len(metrics) == 1 else " ".join(
                filter(None, [key, names.get(view.columns[i], view.columns[i])]))
            series.setdefault(name, []).append((_ms(row[0]), None if row[i] is None else float(row[i])))
    by_display = {names.get(k, k): v for k, v in colors.items()}
    return [(name, svg.color(by_display.get(name, {}).get("fixedColor"), i), pts)
            for i, (name, pts) in enumerate(series.items())]


def _legend(series: Sequence[svg.Series]) -> str:
    return '<div class="legend">' + "".join(
        f'<span style="color:{c}">&#9632; {html.escape(n)}</span> ' for n, c, _ in series) + "</div>"


def _table(view: PanelView, names: Mapping[str, str], units: Mapping[str, str], unit: str | None) -> str:
    hidden = {c for c, h in _overrides(view.panel, "custom.hidden").items() if h}
    shown = [(i, c) for i, c in enumerate(view.columns) if c not in hidden]  # hidden columns feed links only
    cell_units = {c: units.get(c, unit if _numeric(view.types[i]) else None) for i, c in shown}
    head = "".join(f"<th>{html.escape(names.get(c, c))}</th>" for _, c in shown)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_text(row[i], cell_units[c]))}</td>" for i, c in shown) + "</tr>"
        for row in view.rows[:TABLE_ROWS]
    )
    more = f"<p>{len(view.rows) - TABLE_ROWS} more rows</p>" if len(view.rows) > TABLE_ROWS else ""
    return f"<table><tr>{head}</tr>{body}</table>{more}"


def _chart(view: PanelView) -> str:
    panel = view.panel
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    unit = defaults.get("unit")
    names, units, colors = (_overrides(panel, p) for p in ("displayName", "unit", "color"))
    kind = panel["type"]
    custom = defaults.get("custom", {})
    if not view.rows:
        return "<p>no data</p>"
    if kind == "timeseries":
        marks = []
        if custom.get("thresholdsStyle", {}).get("mode") == "line":
            marks = [s["value"] for s in defaults.get("thresholds", {}).get("steps", []) if s["value"] is not None]
        series = _series(view, names, colors)
        return svg.lines(series, unit, marks, bars=custom.get("drawStyle") == "bars") + _legend(series)
    if kind in ("heatmap", "state-timeline"):
        return svg.heat(_series(view, names, colors), unit, states=kind == "state-timeline")
    numbers = [i for i, t in enumerate(view.types) if _numeric(t)]
    if kind == "stat":
        first = view.rows[0]
        return "".join(
            f'<span class="stat">{html.escape(names.get(view.columns[i], view.columns[i]))}'
            f"<b>{html.escape(_text(first[i], units.get(view.columns[i], unit)))}</b></span>"
            for i in numbers)
    if kind in ("bargauge", "barchart", "piechart"):
        label = next((i for i, t in enumerate(view.types) if not _numeric(t)), None)
        items = [("" if label is None else str(row[label]), [None if row[i] is None else float(row[i])
                                                              for i in numbers]) for row in view.rows]
        columns = [view.columns[i] for i in numbers]
        hues = [svg.color(colors.get(c, {}).get("fixedColor"), k) for k, c in enumerate(columns)]
        return svg.bars(items, [names.get(c, c) for c in columns], hues, unit)
    return _table(view, names, units, unit)


def _panel_html(view: PanelView) -> str:
    panel = view.panel
    width = panel.get("gridPos", {}).get("w", 12)
    body = f'<p class="err">{html.escape(view.error)}</p>' if view.error else _chart(view)
    return (f'<div class="panel" style="grid-column:span {width}" title="{html.escape(panel.get("description", ""))}">'
            f"<h3>{html.escape(panel['title'])}</h3>{body}</div>")


def render(views: Sequence[BoardView], from_ms: int, to_ms: int, source: str) -> str:
    """The whole page."""
    def stamp(ms: int) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    nav = " · ".join(f'<a href="#{html.escape(v.uid)}">{html.escape(v.title)}</a>' for v in views)
    sections = "".join(
        f'<section id="{html.escape(v.uid)}"><h2>{html.escape(v.title)}</h2>'
        + (f'<p class="err">{html.escape(v.error)}</p>' if v.error else "")
        + f'<div class="grid">{"".join(_panel_html(p) for p in v.panels)}</div></section>'
        for v in views
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>gpufleet dashboards preview</title><style>{_CSS}</style></head><body>"
        f"<h1>gpufleet dashboards preview</h1><p>{html.escape(source)}, {stamp(from_ms)} to {stamp(to_ms)}; "
        f"variables at All. Not Grafana: the same queries, drawn simply.</p><nav>{nav}</nav>{sections}"
        f"<script>{_SCRIPT}</script></body></html>"
    )


def write(client: Client, boards: Sequence[Mapping[str, Any]], out_dir: Path, from_ms: int, to_ms: int,
          source: str) -> Path:
    """Collect and render into `out_dir/index.html`; returns its path."""
    page = render(collect(client, boards, from_ms, to_ms), from_ms, to_ms, source)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
