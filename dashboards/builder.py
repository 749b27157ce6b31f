"""Small builders for Grafana dashboard JSON: frozen specs in, plain dicts out.

A `Board` holds `Panel`s, each with its `Query`s; every query names the columns it returns, so
tests can run it and check the result against what the panel expects. `Board.to_json()` lays the
panels out on Grafana's 24-column grid in reading order and numbers them; the JSON follows the
current dashboard schema (`SCHEMA_VERSION`).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

DS_TYPE: Final = "grafana-clickhouse-datasource"
DS_UID: Final = "gpufleet-clickhouse"
"""Fixed uid of the provisioned ClickHouse datasource (dashboards/provisioning/datasources)."""
DS_NAME: Final = "ClickHouse (gpufleet)"
DS_REF: Final = {"type": DS_TYPE, "uid": "${datasource}"}
"""How panels and query variables point at the datasource: through the `datasource` variable."""
PLUGIN_VERSION: Final = "4.20.0"
"""The plugin version docker-compose installs (GF_INSTALL_PLUGINS); the expander follows its source."""
SCHEMA_VERSION: Final = 41
GRID_COLUMNS: Final = 24

TIME_SERIES: Final = 0
TABLE: Final = 1
"""The plugin's `format` values for SQL queries."""

JSON = dict[str, Any]


_PART = re.compile(r"(?<!\$)\{(\w+)\}")


def sql(text: str, **parts: str) -> str:
    """Dedent and trim a triple-quoted SQL string, then fill its `{name}` parts.

    A multi-line part continues at its line's indentation (the part adds any more it wants), so
    the JSON holds readable SQL. `${var}` references are not parts.
    """
    text = textwrap.dedent(text).strip()
    if not parts:
        return text
    out = []
    for line in text.splitlines():
        indent = "\n" + line[: len(line) - len(line.lstrip())]
        out.append(_PART.sub(lambda m, indent=indent: parts[m.group(1)].replace("\n", indent), line))
    return "\n".join(out)


@dataclass(frozen=True)
class Query:
    """One panel query: its SQL, result format and the columns (in order) the panel expects."""

    sql: str
    columns: tuple[str, ...]
    format: int = TIME_SERIES
    ref_id: str = "A"

    def target(self) -> JSON:
        return {
            "datasource": DS_REF,
            "editorType": "sql",
            "format": self.format,
            "pluginVersion": PLUGIN_VERSION,
            "queryType": "timeseries" if self.format == TIME_SERIES else "table",
            "rawSql": sql(self.sql),
            "refId": self.ref_id,
        }


@dataclass(frozen=True)
class Panel:
    """A panel: its type, queries, size on the grid and display options (plain Grafana JSON)."""

    title: str
    type: str
    queries: tuple[Query, ...]
    description: str = ""
    w: int = 12
    h: int = 8
    unit: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Extra `fieldConfig.defaults` (thresholds, min/max, custom...)."""
    overrides: tuple[JSON, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    transformations: tuple[JSON, ...] = ()
    min_interval: str | None = None
    """Grafana's panel `interval` (lower bound of `$__interval`): "1m" for panels on the minute rollup."""

    def to_json(self, panel_id: int, x: int, y: int) -> JSON:
        defaults: JSON = dict(self.defaults)
        if self.unit:
            defaults["unit"] = self.unit
        extra: JSON = {"interval": self.min_interval} if self.min_interval else {}
        return {
            **extra,
            "datasource": DS_REF,
            "description": self.description,
            "fieldConfig": {"defaults": defaults, "overrides": list(self.overrides)},
            "gridPos": {"h": self.h, "w": self.w, "x": x, "y": y},
            "id": panel_id,
            "options": dict(self.options),
            "targets": [q.target() for q in self.queries],
            "title": self.title,
            "transformations": list(self.transformations),
            "type": self.type,
        }


@dataclass(frozen=True)
class Row:
    """A row header: starts a new line of panels under a title."""

    title: str


@dataclass(frozen=True)
class Board:
    """A dashboard: uid, title, variables (JSON) and panels in reading order."""

    uid: str
    title: str
    description: str
    variables: tuple[JSON, ...]
    panels: tuple[Panel | Row, ...]
    tags: tuple[str, ...] = ("gpufleet",)
    links: tuple[JSON, ...] = ()
    time_from: str = "now-6h"
    refresh: str = "1m"

    def query_panels(self) -> list[tuple[int, Panel]]:
        """(panel id, panel) for every panel with queries, ids as `to_json` assigns them."""
        out = []
        for pid, item in enumerate(self.panels, start=1):
            if isinstance(item, Panel):
                out.append((pid, item))
        return out

    def to_json(self) -> JSON:
        panels: list[JSON] = []
        x = y = row_h = 0
        for pid, item in enumerate(self.panels, start=1):
            if isinstance(item, Row):
                y += row_h
                panels.append(_row(pid, item.title, y))
                x, row_h = 0, 0
                y += 1
                continue
            if x + item.w > GRID_COLUMNS:
                x, y, row_h = 0, y + row_h, 0
            panels.append(item.to_json(pid, x, y))
            x += item.w
            row_h = max(row_h, item.h)
        return {
            "annotations": {"list": [_BUILTIN_ANNOTATION]},
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "id": None,
            "links": list(self.links),
            "panels": panels,
            "refresh": self.refresh,
            "schemaVersion": SCHEMA_VERSION,
            "tags": list(self.tags),
            "templating": {"list": list(self.variables)},
            "time": {"from": self.time_from, "to": "now"},
            "timepicker": {},
            "timezone": "utc",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
            "weekStart": "",
        }


_BUILTIN_ANNOTATION: Final = {
    "builtIn": 1,
    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
    "enable": True,
    "hide": True,
    "iconColor": "rgba(0, 211, 255, 1)",
    "name": "Annotations & Alerts",
    "type": "dashboard",
}


def _row(panel_id: int, title: str, y: int) -> JSON:
    return {
        "collapsed": False,
        "gridPos": {"h": 1, "w": GRID_COLUMNS, "x": 0, "y": y},
        "id": panel_id,
        "panels": [],
        "title": title,
        "type": "row",
    }


# --- variables -----------------------------------------------------------------------------------


def datasource_variable() -> JSON:
    """The `datasource` variable: any ClickHouse datasource, the provisioned one by default."""
    return {
        "current": {"text": DS_NAME, "value": DS_UID},
        "hide": 0,
        "includeAll": False,
        "label": "Data source",
        "multi": False,
        "name": "datasource",
        "options": [],
        "query": DS_TYPE,
        "refresh": 1,
        "regex": "",
        "type": "datasource",
    }


def query_variable(
    name: str, label: str, query: str, *, multi: bool = True, include_all: bool = True, description: str = ""
) -> JSON:
    """A variable filled from ClickHouse, refreshed when the time range changes (`refresh: 2`)."""
    text = sql(query)
    current: JSON = {"text": ["All"], "value": ["$__all"]} if include_all else {}
    return {
        "current": current,
        "datasource": DS_REF,
        "definition": text,
        "description": description,
        "hide": 0,
        "includeAll": include_all,
        "label": label,
        "multi": multi,
        "name": name,
        "options": [],
        "query": {"editorType": "sql", "format": TABLE, "rawSql": text},
        "refresh": 2,
        "regex": "",
        "sort": 1,
        "type": "query",
    }


# --- field config helpers ------------------------------------------------------------------------


def thresholds(*steps: tuple[float | None, str]) -> JSON:
    """Absolute thresholds: `(None, 'green'), (0.5, 'red')` -> Grafana's steps."""
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def rename(column: str, display: str) -> JSON:
    """An override giving `column` a display name (series label or table header)."""
    return {"matcher": {"id": "byName", "options": column}, "properties": [{"id": "displayName", "value": display}]}


def override(column: str, **properties: Any) -> JSON:
    """An override setting properties (`unit='percentunit'`, `custom.width=...`) on one column."""
    props = [{"id": k.replace("__", "."), "value": v} for k, v in properties.items()]
    return {"matcher": {"id": "byName", "options": column}, "properties": props}


def data_link(column: str, title: str, url: str) -> JSON:
    """An override making `column`'s cells links (e.g. to a drill-down board)."""
    return {
        "matcher": {"id": "byName", "options": column},
        "properties": [{"id": "links", "value": [{"title": title, "url": url}]}],
    }


def value_mappings(mapping: Mapping[int, tuple[str, str]]) -> list[JSON]:
    """Numeric value -> (text, color) mappings, e.g. for health states."""
    return [
        {
            "options": {str(k): {"color": color, "index": i, "text": text} for i, (k, (text, color)) in
                        enumerate(sorted(mapping.items()))},
            "type": "value",
        }
    ]


def board_link(title: str, uid: str, keep_vars: bool = True) -> JSON:
    """A link in the board's header to another board, keeping time range and variables."""
    return {
        "asDropdown": False,
        "icon": "dashboard",
        "includeVars": keep_vars,
        "keepTime": True,
        "tags": [],
        "targetBlank": False,
        "title": title,
        "tooltip": "",
        "type": "link",
        "url": f"/d/{uid}",
    }
