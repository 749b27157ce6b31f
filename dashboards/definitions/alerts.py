"""Alerts board: what fires now and what fired in the range, from the evaluator's `alerts` table.

Each row of `alerts` is one write of one alert episode; `FINAL` keeps an episode's newest revision
(pipeline/store/migrations/0010_alerts.sql). The cluster, node and tenant variables match the alerts'
labels; the GPU model is not a label, so that variable does not apply here.
"""

from __future__ import annotations

from gpufleet.dashboards import fragments as f
from gpufleet.dashboards.builder import (
    TABLE,
    Board,
    Panel,
    Query,
    datasource_variable,
    override,
    sql,
)
from gpufleet.dashboards.definitions import links

_LABELS = {"cluster": "labels['cluster']", "node": "labels['node']", "tenant": "labels['tenant']"}
_FILTERS = f.filters(("cluster", "node", "tenant"), _LABELS)
_SEVERITY_ORDER = "indexOf(['critical', 'warning', 'info'], severity)"

firing_by_name = Panel(
    "Firing now",
    "bargauge",
    (Query(
        sql(
            """
            SELECT alertname, count() AS firing
            FROM alerts FINAL
            WHERE state = 'firing'{filters}
            GROUP BY alertname
            ORDER BY firing DESC, alertname
            """,
            filters=_FILTERS,
        ),
        ("alertname", "firing"),
        TABLE,
    ),),
    description="Alerts firing at the evaluator's last evaluation, by rule.",
    w=8,
    options={"displayMode": "basic", "orientation": "horizontal",
             "reduceOptions": {"calcs": [], "fields": "/^firing$/", "values": True}},
    defaults={"min": 0, "color": {"fixedColor": "red", "mode": "fixed"}},
)

started = Panel(
    "Alerts started",
    "timeseries",
    (Query(
        sql(
            """
            SELECT $__timeInterval(active_at) AS t, alertname, count() AS alerts
            FROM alerts FINAL
            WHERE $__timeFilter(active_at) AND state IN ('firing', 'resolved'){filters}
            GROUP BY t, alertname
            ORDER BY t, alertname
            """,
            filters=_FILTERS,
        ),
        ("t", "alertname", "alerts"),
    ),),
    description="Episodes that fired, by the time their condition began.",
    w=16,
    defaults={"custom": {"drawStyle": "bars", "fillOpacity": 70, "stacking": {"group": "A", "mode": "normal"}}},
)

firing = Panel(
    "Firing alerts",
    "table",
    (Query(
        sql(
            """
            SELECT
                alertname,
                severity,
                labels['cluster'] AS cluster,
                labels['node'] AS node,
                labels['gpu'] AS gpu_uuid,
                labels['gpu_index'] AS gpu,
                labels['tenant'] AS tenant,
                annotations['summary'] AS summary,
                starts_at,
                value,
                hex(labels['gpu']) AS gpu_hex
            FROM alerts FINAL
            WHERE state = 'firing'{filters}
            ORDER BY {severity}, starts_at, alertname
            """,
            filters=_FILTERS, severity=_SEVERITY_ORDER,
        ),
        ("alertname", "severity", "cluster", "node", "gpu_uuid", "gpu", "tenant", "summary", "starts_at", "value",
         links.GPU_KEY),
        TABLE,
    ),),
    description="Every alert firing now, most severe first, with the summary sent to Alertmanager.",
    w=24,
    h=9,
    overrides=(
        *links.gpu_detail(),
        override("summary", custom__width=520),
    ),
)

history = Panel(
    "Alert history",
    "table",
    (Query(
        sql(
            """
            SELECT
                alertname,
                severity,
                toString(state) AS state,
                labels['cluster'] AS cluster,
                labels['node'] AS node,
                labels['gpu'] AS gpu_uuid,
                labels['tenant'] AS tenant,
                active_at,
                starts_at,
                ends_at,
                dateDiff('second', active_at, coalesce(ends_at, last_eval)) AS duration_s,
                annotations['summary'] AS summary,
                hex(labels['gpu']) AS gpu_hex
            FROM alerts FINAL
            WHERE active_at <= $__toTime AND (ends_at IS NULL OR ends_at >= $__fromTime){filters}
            ORDER BY active_at DESC, alertname
            LIMIT 500
            """,
            filters=_FILTERS,
        ),
        ("alertname", "severity", "state", "cluster", "node", "gpu_uuid", "tenant", "active_at", "starts_at",
         "ends_at", "duration_s", "summary", links.GPU_KEY),
        TABLE,
    ),),
    description=(
        "Episodes active at any time in the range: pending (condition holds, `for` not met), firing, "
        "resolved (fired, then cleared) or cleared (never fired)."
    ),
    w=24,
    h=10,
    overrides=(
        override("duration_s", unit="s"),
        *links.gpu_detail(),
    ),
)

BOARD = Board(
    uid=links.ALERTS,
    title="GPU fleet alerts",
    description="Alerts firing now and alert history, as the gpufleet evaluator stored them.",
    variables=f.standard_variables(datasource_variable()),
    panels=(firing_by_name, started, firing, history),
    links=links.nav(links.ALERTS),
    time_from="now-24h",
)
