"""GPU health and node drill-down: state timeline, XID and ECC events, throttling, temperature, links,
and the nodes' InfiniBand/RoCE ports.

The GPU panels read the per-GPU health rollup (`gpu_health_1m`/`_1h`: whole hours from the hour level)
and the event tables (`gpu_health_events`, `gpu_xid_events`), never raw samples: a week of the
whole fleet reads one row per GPU and hour, and a picked node only its own rows (by key). The port
panels read `network_ports` (no rollup yet): the range's rows, a picked node's by key.
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
    rename,
    sql,
    thresholds,
    value_mappings,
)
from gpufleet.dashboards.definitions import links
from gpufleet.node_facts import IB_PHYS_LINK_UP, IB_STATE_ACTIVE, IB_STATES
from gpufleet.pipeline.queries import health_events, rollups

PORT_FILTERS = ("cluster", "node")
"""`network_ports` has no tenant or GPU model: the board's other variables do not filter it."""
PORT_DOWN = (f"toUInt8(ifNull(state != {IB_STATE_ACTIVE} OR phys_state != {IB_PHYS_LINK_UP}, 0) "
             "AND ifNull(phys_state != 3, 1))")
"""A port that is not up (the `network_port_down` alert's condition; physical state 3, Disabled, is on purpose)."""
PORT_ERRORS = ("ifNull(link_downed, 0) + ifNull(link_error_recovery, 0) + ifNull(symbol_error, 0)"
               " + ifNull(port_rcv_errors, 0)")
STATE_NAME = ("transform(ifNull(state, 0), [{codes}], [{names}], 'unknown')"
              .format(codes=", ".join(map(str, IB_STATES)), names=", ".join(f"'{n}'" for n in IB_STATES.values())))

LAST_HEALTH = (f"{f.HEALTH_STATES}[bitAnd(max(bitOr(bitShiftLeft("
               "toUnixTimestamp64Milli(tupleElement(last, 1)), 2), toInt64(toInt8(tupleElement(last, 2))))), 3) + 1]")
"""The newest sample's state over rollup rows: the state of `max(last)`, from one Int64 maximum instead of a
maximum of (time, state) tuples (ClickHouse compares tuples row by row, generically: on 96,000 hour rows, ~29 ms CPU
against ~6 ms for the Int64; docs/dashboards.md). Time in ms shifted left 2 bits, the state (0-3) in the low bits
orders as the tuples do (migration 0110 packs the same pair), so the maximum's low bits are `max(last)`'s state."""


def _series(*columns: str, where: str = "1") -> str:
    """The health rollup's rows of the range for a time series: whole hours from the hour level when the
    buckets are whole hours."""
    return f.level_rows(rollups.HEALTH, columns, f.HOURLY_BUCKETS, where=where)


def _picked_gpus(having: str, *columns: str) -> str:
    """`GPU_KEY IN (...)`: the GPUs whose hour rows in the hours the range touches meet `having` (an aggregate
    condition over `columns`). A superset of the GPUs that meet it within the range, read at one row per GPU
    and hour; the caller reads the range's rows of those GPUs only."""
    rows = f.touched_hours(rollups.HEALTH, ("cluster", "node", "gpu_uuid", *columns))
    return (f"{f.GPU_KEY} IN (SELECT cluster, node, gpu_uuid FROM {rows} GROUP BY cluster, node, gpu_uuid "
            f"HAVING {having})")


def _buckets() -> str:
    """The time series buckets holding any health rollup row of the range (the variables applied): the
    intervals a fleet-wide series has a point for, read from the time column alone."""
    return f"(SELECT {f.bucket()} AS t FROM {_series()} GROUP BY t)"


THROTTLE_BITS = f.THERMAL_BITS | f.POWER_BRAKE_BITS | f.POWER_CAP_BITS
"""The clock-event bits the throttling panel counts: a GPU without any of them adds nothing to it."""

HEALTH_MAPPINGS = value_mappings(
    {0: ("ok", "green"), 1: ("degraded", "orange"), 2: ("failing", "red"), 3: ("unknown", "gray")}
)
"""Health Enum8 values (pipeline.health.State) -> text and colour."""


def _counter_increase(counters: dict[str, tuple[str, str]], gauges: dict[str, str] | None = None) -> str:
    """Per-interval increase of per-GPU cumulative counters, summed over GPUs (a reset counts as 0).

    `counters` maps an output name to the health rollup columns holding a counter's (maximum, minimum):
    each GPU's counter is taken at its maximum in each interval and compared with the GPU's previous
    interval in the range (its first interval counts 0). `gauges` maps an output name to a rollup column,
    taken at its maximum per GPU and interval and summed over GPUs. Each GPU's intervals are one sorted
    array (a pass per GPU, no window sort over the fleet).

    Only GPUs whose counter changed (maximum above minimum), or whose gauge was above 0, in the hours the
    range touches can add anything: their minute rows are read, every other GPU adds 0 (`_picked_gpus`).
    Every interval with any rollup row has its point (0 when no picked GPU adds to it), as when every
    GPU was read.
    """
    gauges = gauges or {}
    names = [*counters, *gauges]
    inner = ",\n".join(
        [f"toInt64(max({high})) AS {name}" for name, (high, _) in counters.items()]
        + [f"max({column}) AS {name}" for name, column in gauges.items()]
    )
    points = f"arraySort(groupArray((t, {', '.join(names)}))) AS pts"
    joined = ",\n".join(
        ["arrayMap(p -> p.1, pts) AS t"]
        + [f"arrayMap(i -> if(i = 1, 0, greatest(pts[i].{k} - pts[i - 1].{k}, 0)), arrayEnumerate(pts)) AS d_{name}"
           for k, name in enumerate(counters, start=2)]
        + [f"arrayMap(p -> p.{k}, pts) AS g_{name}" for k, name in enumerate(gauges, start=2 + len(counters))]
    )
    outer = ",\n".join([f"sum(d_{name}) AS {name}" for name in counters]
                       + [f"sum(g_{name}) AS {name}" for name in gauges])
    having = " OR ".join([f"max({high}) > min({low})" for high, low in counters.values()]
                         + [f"max({column}) > 0" for column in gauges.values()])
    picked = _picked_gpus(having, *(c for pair in counters.values() for c in pair), *gauges.values())
    return sql(
        """
        SELECT t, {names}
        FROM {buckets} AS buckets
        LEFT JOIN
        (
            SELECT
                t,
                {outer}
            FROM
            (
                SELECT gpu_uuid, {points}
                FROM
                (
                    SELECT
                        {bucket} AS t,
                        gpu_uuid,
                        {inner}
                    FROM {rows}
                    GROUP BY t, gpu_uuid
                )
                GROUP BY gpu_uuid
            )
            ARRAY JOIN
                {joined}
            GROUP BY t
        ) AS changed USING (t)
        ORDER BY t
        """,
        names=", ".join(names), buckets=_buckets(), outer=outer, points=points, inner=inner, joined=joined,
        bucket=f.bucket(),
        rows=_series("gpu_uuid", *(high for high, _ in counters.values()), *gauges.values(), where=picked),
    )


state_timeline = Panel(
    f"Health timeline of the {f.TOP_GPUS} GPUs not ok the longest",
    "state-timeline",
    (Query(
        sql(
            """
            SELECT tupleElement(p, 1) AS t, gpu, tupleElement(p, 2) AS state
            FROM
            (
                SELECT gpu, arraySort(groupArray((t, state))) AS pts
                FROM
                (
                    SELECT
                        {bucket} AS t,
                        concat(node, ' / GPU ', toString(gpu_index)) AS gpu,
                        gpu_uuid,
                        toUInt8(max(worst)) AS state
                    FROM {rows}
                    GROUP BY t, node, gpu_index, gpu_uuid
                )
                GROUP BY gpu_uuid, gpu
                HAVING max(state) > 0
            )
            ARRAY JOIN arrayFilter((x, i) -> i = 1 OR x.2 != pts[i - 1].2, pts, arrayEnumerate(pts)) AS p
            ORDER BY t, gpu
            """,
            bucket=f.bucket(),
            rows=_series("node", "gpu_index", "gpu_uuid", "worst",
                         where=f.top_gpus(rollups.HEALTH, ("failing_ms", "degraded_ms"))),
        ),
        ("t", "gpu", "state"),
    ),),
    description=(
        f"The worst state per interval of the {f.TOP_GPUS} GPUs that were degraded or failing the longest in the "
        "range (ties by cluster, node and GPU UUID; a timeline row per GPU would be unreadable across a fleet); a "
        "point where a GPU's state changes (the timeline holds a state until the next point). Picked from two "
        "columns of every GPU's rows (whole hours from the hour level), then only those GPUs' rows are read."
    ),
    w=24,
    h=9,
    min_interval=f.MINUTE,
    defaults={"mappings": HEALTH_MAPPINGS, "color": {"mode": "thresholds"},
              "thresholds": thresholds((None, "green"), (1, "orange"), (2, "red"))},
    options={"mergeValues": True, "showValue": "never", "rowHeight": 0.8},
)

xids = Panel(
    "XID events",
    "timeseries",
    (Query(
        sql(
            """
            SELECT $__timeInterval(time) AS t, concat('XID ', toString(xid)) AS xid, count() AS events
            FROM gpu_xid_events FINAL
            WHERE {where}
            GROUP BY t, xid
            ORDER BY t, xid
            """,
            where=f.where(),
        ),
        ("t", "xid", "events"),
    ),),
    description=(
        "XID errors the driver raised, by code (e.g. 79 fell off the bus, 48 double-bit ECC, 74 NVLink, "
        "63/64 row remapping; 13, 31, 43 are application errors that do not mark the GPU). One event row per "
        "XID (gpu_xid_events)."
    ),
    w=12,
    defaults={"custom": {"drawStyle": "bars", "fillOpacity": 80}},
)

ecc = Panel(
    "ECC errors",
    "timeseries",
    (Query(
        _counter_increase({"ecc_corrected": ("ecc_corrected_max", "ecc_corrected_min"),
                           "ecc_uncorrected": ("ecc_uncorrected_max", "ecc_uncorrected_min")}),
        ("t", "ecc_corrected", "ecc_uncorrected"),
    ),),
    description=(
        "New volatile ECC errors per interval: single-bit (corrected) and double-bit (uncorrected, "
        "which makes a GPU failing). Only GPUs whose counters changed in the hours the range touches are read."
    ),
    w=12,
    min_interval=f.MINUTE,
    defaults={"custom": {"drawStyle": "bars", "fillOpacity": 80}},
    overrides=(
        rename("ecc_corrected", "corrected (single-bit)"),
        rename("ecc_uncorrected", "uncorrected (double-bit)"),
        override("ecc_uncorrected", color={"fixedColor": "red", "mode": "fixed"}),
    ),
)

throttling = Panel(
    "Throttled GPUs",
    "timeseries",
    (Query(
        sql(
            """
            SELECT t, thermal, power_brake, power_cap
            FROM {buckets} AS buckets
            LEFT JOIN
            (
                SELECT
                    {bucket} AS t,
                    uniqExactIf(gpu_uuid, bitAnd(clock_event_bits, {thermal}) != 0) AS thermal,
                    uniqExactIf(gpu_uuid, bitAnd(clock_event_bits, {brake}) != 0) AS power_brake,
                    uniqExactIf(gpu_uuid, bitAnd(clock_event_bits, {cap}) != 0) AS power_cap
                FROM {rows}
                GROUP BY t
            ) AS throttled USING (t)
            ORDER BY t
            """,
            thermal=f"{f.THERMAL_BITS:#x}", brake=f"{f.POWER_BRAKE_BITS:#x}", cap=f"{f.POWER_CAP_BITS:#x}",
            bucket=f.bucket(), buckets=_buckets(),
            rows=_series("gpu_uuid", "clock_event_bits", where=_picked_gpus(
                f"bitAnd(groupBitOr(clock_event_bits), {THROTTLE_BITS:#x}) != 0", "clock_event_bits")),
        ),
        ("t", "thermal", "power_brake", "power_cap"),
    ),),
    description=(
        "GPUs whose clocks NVML reported lowered in the interval, by reason: thermal slowdown and HW slowdown "
        "or power brake degrade a GPU; the SW power cap is normal under load. Only the rows of GPUs with any of "
        "these bits in the hours the range touches are read (picked from the hour level)."
    ),
    w=12,
    min_interval=f.MINUTE,
    overrides=(
        rename("thermal", "thermal slowdown (SW/HW)"),
        rename("power_brake", "HW slowdown / power brake"),
        rename("power_cap", "SW power cap"),
    ),
)

temperature = Panel(
    f"Hottest GPU of the {f.TOP_NODES} hottest nodes",
    "timeseries",
    (Query(
        sql(
            """
            SELECT {bucket} AS t, node, max(temp_max_c) AS max_temp_c
            FROM {rows}
            GROUP BY t, node
            ORDER BY t, node
            """,
            bucket=f.bucket(),
            rows=_series("node", "temp_max_c",
                         where=f.top_nodes(rollups.HEALTH, ("temp_max_c",), order="max(temp_max_c) DESC")),
        ),
        ("t", "node", "max_temp_c"),
    ),),
    description=(
        f"The hottest GPU's temperature per interval of the {f.TOP_NODES} nodes whose GPUs ran hottest in the hours "
        "the range touches (one line per node would be unreadable across a fleet); a picked node shows its own. "
        f"Lines: {f.HEALTH.temp_degraded_c:g} °C degrades a GPU, {f.HEALTH.temp_failing_c:g} °C makes it failing."
    ),
    w=12,
    unit="celsius",
    min_interval=f.MINUTE,
    defaults={
        "custom": {"thresholdsStyle": {"mode": "line"}},
        "thresholds": thresholds(
            (None, "green"), (f.HEALTH.temp_degraded_c, "orange"), (f.HEALTH.temp_failing_c, "red")
        ),
    },
)

links_errors = Panel(
    "NVLink and PCIe errors",
    "timeseries",
    (Query(
        _counter_increase(
            {"nvlink_errors": ("nvlink_errors_max", "nvlink_errors_min"),
             "pcie_replays": ("pcie_replay_max", "pcie_replay_min")},
            {"nvlink_links_down": "nvlink_down_max"},
        ),
        ("t", "nvlink_errors", "pcie_replays", "nvlink_links_down"),
    ),),
    description=(
        "New NVLink CRC/replay/recovery errors and PCIe replays per interval (growth degrades a GPU), "
        "and NVLinks down (a down link makes it failing). Only GPUs whose counters changed, or with a link down, "
        "in the hours the range touches are read."
    ),
    w=12,
    min_interval=f.MINUTE,
    overrides=(override("nvlink_links_down", color={"fixedColor": "red", "mode": "fixed"}),),
)

worst = Panel(
    "Worst GPUs",
    "table",
    (Query(
        sql(
            """
            SELECT
                gpu_uuid,
                cluster,
                node,
                gpu_index AS gpu,
                any(model) AS gpu_model,
                {last_health} AS last_health,
                sum(failing_ms) / sum(reported_ms) AS failing_share,
                sum(degraded_ms) / sum(reported_ms) AS degraded_share,
                sum(xid_events) AS xid_events,
                arrayStringConcat(arraySort(groupUniqArrayArray(reasons)), ', ') AS reasons,
                max(temp_max_c) AS max_temp_c,
                max(ecc_uncorrected_max) AS ecc_uncorrected,
                max(retired_pages_max) AS retired_pages,
                max(pcie_replay_max) - min(pcie_replay_min) AS pcie_replay_growth,
                hex(gpu_uuid) AS gpu_hex
            FROM {rows}
            GROUP BY gpu_uuid, cluster, node, gpu
            ORDER BY failing_share DESC, degraded_share DESC, xid_events DESC, gpu_uuid
            LIMIT 50
            """,
            last_health=LAST_HEALTH,
            rows=f.level_rows(rollups.HEALTH, (
                "cluster", "node", "gpu_uuid", "gpu_index", "model", "last", "reported_ms", "failing_ms", "degraded_ms",
                "xid_events", "reasons", "temp_max_c", "ecc_uncorrected_max", "retired_pages_max", "pcie_replay_min",
                "pcie_replay_max")),
        ),
        ("gpu_uuid", "cluster", "node", "gpu", "gpu_model", "last_health", "failing_share", "degraded_share",
         "xid_events", "reasons", "max_temp_c", "ecc_uncorrected", "retired_pages", "pcie_replay_growth",
         links.GPU_KEY),
        TABLE,
    ),),
    description=(
        "GPUs ranked by time failing, then degraded, then XIDs, from the per-GPU health rollup (a row per GPU "
        "and hour). Click a UUID for the GPU's own board."
    ),
    w=24,
    h=10,
    overrides=(
        *links.gpu_detail(),
        override("failing_share", unit="percentunit"),
        override("degraded_share", unit="percentunit"),
        override("max_temp_c", unit="celsius"),
    ),
)

events = Panel(
    "Health changes and XIDs",
    "table",
    (Query(
        sql(
            """
            SELECT
                time,
                node,
                gpu_index AS gpu,
                gpu_uuid,
                any(health) AS state,
                argMax(prev_health, is_change) AS prev_state,
                any(reasons_text) AS reasons,
                arrayStringConcat(arrayMap(x -> toString(x), max(codes)), ', ') AS xid_codes,
                hex(gpu_uuid) AS gpu_hex
            FROM
            (
                SELECT time, cluster, node, boot_id, gpu_index, gpu_uuid, health, prev_health,
                    arrayStringConcat(health_reasons, ', ') AS reasons_text, 1 AS is_change,
                    CAST([], 'Array(UInt16)') AS codes
                FROM {changes}
                UNION ALL
                SELECT time, cluster, node, boot_id, gpu_index, gpu_uuid, health, health AS prev_health,
                    arrayStringConcat(health_reasons, ', ') AS reasons_text, 0 AS is_change, xids AS codes
                FROM {xids}
            )
            GROUP BY time, cluster, node, boot_id, gpu_index, gpu_uuid
            ORDER BY time DESC, gpu_uuid
            LIMIT 500
            """,
            changes=health_events.changes(*f.RANGE, where="1" + f.filters()),
            xids=health_events.xid_samples(*f.RANGE, where="1" + f.filters()),
        ),
        ("time", "node", "gpu", "gpu_uuid", "state", "prev_state", "reasons", "xid_codes", links.GPU_KEY),
        TABLE,
    ),),
    description=(
        "Every change of a GPU's health state (from the health event table: the previous state is the GPU's "
        "state before, even before the range) and every XID, newest first."
    ),
    w=24,
    h=10,
    overrides=links.gpu_detail(),
)

network = Panel(
    "Network ports down and link errors",
    "timeseries",
    (Query(
        sql(
            """
            SELECT t, sum(down) AS ports_down, sum(greatest(cur - prev, 0)) AS link_errors
            FROM
            (
                SELECT *, lagInFrame(cur, 1, cur) OVER w AS prev
                FROM
                (
                    SELECT
                        $__timeInterval(time) AS t,
                        node,
                        device,
                        port,
                        max({down}) AS down,
                        toInt64(max({errors})) AS cur
                    FROM network_ports
                    WHERE {where}
                    GROUP BY t, node, device, port
                )
                WINDOW w AS (PARTITION BY node, device, port ORDER BY t ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)
            )
            GROUP BY t
            ORDER BY t
            """,
            down=PORT_DOWN, errors=PORT_ERRORS, where=f.where(names=PORT_FILTERS),
        ),
        ("t", "ports_down", "link_errors"),
    ),),
    description=(
        "InfiniBand/RoCE ports not up (NetworkPortDown), and new link errors per interval: links downed, "
        "error recoveries, symbol and receive errors (NetworkPortDegraded). From sysfs, per node."
    ),
    w=12,
    overrides=(
        rename("ports_down", "ports down"),
        rename("link_errors", "new link errors"),
        override("ports_down", color={"fixedColor": "red", "mode": "fixed"}),
    ),
)

ports = Panel(
    "Network ports",
    "table",
    (Query(
        sql(
            """
            SELECT
                node,
                concat(device, '/', toString(port)) AS port_name,
                argMax(link_layer, time) AS link_layer,
                argMax({state}, time) AS last_state,
                argMax(rate_gbps, time) AS rate_gbps,
                sumIf(interval_ms, {down} = 1) / sum(interval_ms) AS down_share,
                max(ifNull(link_downed, 0)) - min(ifNull(link_downed, 0)) AS link_downed,
                max(ifNull(link_error_recovery, 0)) - min(ifNull(link_error_recovery, 0)) AS recoveries,
                max(ifNull(symbol_error, 0)) - min(ifNull(symbol_error, 0)) AS symbol_errors,
                max(ifNull(port_rcv_errors, 0)) - min(ifNull(port_rcv_errors, 0)) AS rcv_errors,
                max(ifNull(port_xmit_discards, 0)) - min(ifNull(port_xmit_discards, 0)) AS xmit_discards
            FROM network_ports
            WHERE {where}
            GROUP BY node, device, port
            ORDER BY down_share DESC, link_downed DESC, symbol_errors DESC, rcv_errors DESC, node, port_name
            LIMIT 100
            """,
            state=STATE_NAME, down=PORT_DOWN, where=f.where(names=PORT_FILTERS),
        ),
        ("node", "port_name", "link_layer", "last_state", "rate_gbps", "down_share", "link_downed", "recoveries",
         "symbol_errors", "rcv_errors", "xmit_discards"),
        TABLE,
    ),),
    description="Each port in the range: its newest state and rate, the share of time it was down, and its error "
                "counters' growth (a counter cleared in the range shows less).",
    w=12,
    overrides=(override("down_share", unit="percentunit"), rename("rate_gbps", "rate (Gb/s)")),
)

BOARD = Board(
    uid=links.HEALTH,
    title="GPU fleet health",
    description="GPU health and node drill-down: pick a node to see its GPUs' events, errors and temperatures.",
    variables=f.standard_variables(datasource_variable()),
    panels=(state_timeline, xids, ecc, throttling, temperature, links_errors, network, ports, worst, events),
    links=links.nav(links.HEALTH),
)
