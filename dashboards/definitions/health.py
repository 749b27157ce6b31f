"""GPU health and node drill-down: state timeline, XID and ECC events, throttling, temperature, links,
and the nodes' InfiniBand/RoCE ports.

The state timeline reads the minute rollup; the rest reads raw samples (`gpu_samples`, `network_ports`),
because no rollup keeps XIDs, error counters, temperatures, clock-event bits or port states (pick a node
to keep those scans small).
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

PORT_FILTERS = ("cluster", "node")
"""`network_ports` has no tenant or GPU model: the board's other variables do not filter it."""
PORT_DOWN = (f"toUInt8(ifNull(state != {IB_STATE_ACTIVE} OR phys_state != {IB_PHYS_LINK_UP}, 0) "
             "AND ifNull(phys_state != 3, 1))")
"""A port that is not up (the `network_port_down` alert's condition; physical state 3, Disabled, is on purpose)."""
PORT_ERRORS = ("ifNull(link_downed, 0) + ifNull(link_error_recovery, 0) + ifNull(symbol_error, 0)"
               " + ifNull(port_rcv_errors, 0)")
STATE_NAME = ("transform(ifNull(state, 0), [{codes}], [{names}], 'unknown')"
              .format(codes=", ".join(map(str, IB_STATES)), names=", ".join(f"'{n}'" for n in IB_STATES.values())))

HEALTH_MAPPINGS = value_mappings(
    {0: ("ok", "green"), 1: ("degraded", "orange"), 2: ("failing", "red"), 3: ("unknown", "gray")}
)
"""Health Enum8 values (pipeline.health.State) -> text and colour."""


def _counter_increase(counters: dict[str, str], gauges: dict[str, tuple[str, str]] | None = None) -> str:
    """Per-interval increase of per-GPU cumulative counters, summed over GPUs (a reset counts as 0).

    `counters` maps an output name to a per-sample counter expression: each GPU's counter is taken
    at its maximum in each interval and compared with the GPU's previous interval. `gauges` maps an
    output name to (per-GPU aggregate, aggregate over GPUs with `{}` for the per-GPU value).
    """
    gauges = gauges or {}
    inner = ",\n".join(
        [f"toInt64(max({expr})) AS cur_{name}" for name, expr in counters.items()]
        + [f"{per_gpu} AS gpu_{name}" for name, (per_gpu, _) in gauges.items()]
    )
    lags = ",\n".join(f"lagInFrame(cur_{name}, 1, cur_{name}) OVER w AS prev_{name}" for name in counters)
    outer = ",\n".join(
        [f"sum(greatest(cur_{name} - prev_{name}, 0)) AS {name}" for name in counters]
        + [f"{over_gpus.format(f'gpu_{name}')} AS {name}" for name, (_, over_gpus) in gauges.items()]
    )
    return sql(
        """
        SELECT
            t,
            {outer}
        FROM
        (
            SELECT
                *,
                {lags}
            FROM
            (
                SELECT
                    $__timeInterval(time) AS t,
                    gpu_uuid,
                    {inner}
                FROM gpu_samples
                WHERE {where}
                GROUP BY t, gpu_uuid
            )
            WINDOW w AS (PARTITION BY gpu_uuid ORDER BY t ROWS BETWEEN 1 PRECEDING AND CURRENT ROW)
        )
        GROUP BY t
        ORDER BY t
        """,
        outer=outer, lags=lags, inner=inner, where=f.where(),
    )


state_timeline = Panel(
    "Health timeline of GPUs that were not ok",
    "state-timeline",
    (Query(
        sql(
            """
            SELECT t, concat(node, ' / GPU ', toString(gpu_index)) AS gpu, state
            FROM
            (
                SELECT $__timeInterval(minute) AS t, node, gpu_uuid, toUInt8(max(health)) AS state
                FROM gpu_usage_1m
                WHERE {where}
                    AND gpu_uuid IN (
                        SELECT gpu_uuid FROM gpu_usage_1m
                        WHERE {where} AND health != 'ok'
                    )
                GROUP BY t, node, gpu_uuid
            ) AS s
            LEFT JOIN (SELECT gpu_uuid, any(gpu_index) AS gpu_index FROM gpu_latest GROUP BY gpu_uuid) AS g
                USING gpu_uuid
            ORDER BY t, gpu
            """,
            where=f.where("minute"),
        ),
        ("t", "gpu", "state"),
    ),),
    description="The worst state of each GPU per interval, for GPUs that were degraded or failing in the range.",
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
            SELECT $__timeInterval(time) AS t, concat('XID ', toString(code)) AS xid, count() AS events
            FROM gpu_samples
            ARRAY JOIN xids AS code
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
        "63/64 row remapping; 13, 31, 43 are application errors that do not mark the GPU)."
    ),
    w=12,
    defaults={"custom": {"drawStyle": "bars", "fillOpacity": 80}},
)

ecc = Panel(
    "ECC errors",
    "timeseries",
    (Query(
        _counter_increase({
            "ecc_corrected": "ifNull(ecc_corrected_volatile, 0)",
            "ecc_uncorrected": "ifNull(ecc_uncorrected_volatile, 0)",
        }),
        ("t", "ecc_corrected", "ecc_uncorrected"),
    ),),
    description=(
        "New volatile ECC errors per interval: single-bit (corrected) and double-bit (uncorrected, "
        "which makes a GPU failing)."
    ),
    w=12,
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
            SELECT
                $__timeInterval(time) AS t,
                uniqExactIf(gpu_uuid, bitAnd(ifNull(clock_event_reasons, 0), {thermal}) != 0) AS thermal,
                uniqExactIf(gpu_uuid, bitAnd(ifNull(clock_event_reasons, 0), {brake}) != 0) AS power_brake,
                uniqExactIf(gpu_uuid, bitAnd(ifNull(clock_event_reasons, 0), {cap}) != 0) AS power_cap
            FROM gpu_samples
            WHERE {where}
            GROUP BY t
            ORDER BY t
            """,
            thermal=f"{f.THERMAL_BITS:#x}", brake=f"{f.POWER_BRAKE_BITS:#x}", cap=f"{f.POWER_CAP_BITS:#x}",
            where=f.where(),
        ),
        ("t", "thermal", "power_brake", "power_cap"),
    ),),
    description=(
        "GPUs whose clocks NVML reported lowered, by reason: thermal slowdown and HW slowdown or "
        "power brake degrade a GPU; the SW power cap is normal under load."
    ),
    w=12,
    overrides=(
        rename("thermal", "thermal slowdown (SW/HW)"),
        rename("power_brake", "HW slowdown / power brake"),
        rename("power_cap", "SW power cap"),
    ),
)

temperature = Panel(
    "Hottest GPU per node",
    "timeseries",
    (Query(
        sql(
            """
            SELECT $__timeInterval(time) AS t, node, max(temp_gpu_c) AS max_temp_c
            FROM gpu_samples
            WHERE {where}
            GROUP BY t, node
            ORDER BY t, node
            """,
            where=f.where(),
        ),
        ("t", "node", "max_temp_c"),
    ),),
    description=(
        f"Lines: {f.HEALTH.temp_degraded_c:g} °C degrades a GPU, {f.HEALTH.temp_failing_c:g} °C makes it failing."
    ),
    w=12,
    unit="celsius",
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
            {
                "nvlink_errors": "ifNull(nvlink_crc_errors, 0) + ifNull(nvlink_replay_errors, 0)"
                                 " + ifNull(nvlink_recovery_errors, 0)",
                "pcie_replays": "ifNull(pcie_replay_count, 0)",
            },
            {"nvlink_links_down": ("max(ifNull(nvlink_links_down, 0))", "sum({})")},
        ),
        ("t", "nvlink_errors", "pcie_replays", "nvlink_links_down"),
    ),),
    description=(
        "New NVLink CRC/replay/recovery errors and PCIe replays per interval (growth degrades a GPU), "
        "and NVLinks down (a down link makes it failing)."
    ),
    w=12,
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
                toString(argMax(health, time)) AS last_health,
                sumIf(interval_ms, health = 'failing') / sum(interval_ms) AS failing_share,
                sumIf(interval_ms, health = 'degraded') / sum(interval_ms) AS degraded_share,
                sum(length(xids)) AS xid_events,
                arrayStringConcat(arraySort(groupUniqArrayArray(health_reasons)), ', ') AS reasons,
                max(temp_gpu_c) AS max_temp_c,
                max(ifNull(ecc_uncorrected_volatile, 0)) AS ecc_uncorrected,
                max(ifNull(retired_pages, 0)) AS retired_pages,
                max(ifNull(pcie_replay_count, 0)) - min(ifNull(pcie_replay_count, 0)) AS pcie_replay_growth,
                hex(gpu_uuid) AS gpu_hex
            FROM gpu_samples
            WHERE {where}
            GROUP BY gpu_uuid, cluster, node, gpu
            ORDER BY failing_share DESC, degraded_share DESC, xid_events DESC, gpu_uuid
            LIMIT 50
            """,
            where=f.where(),
        ),
        ("gpu_uuid", "cluster", "node", "gpu", "gpu_model", "last_health", "failing_share", "degraded_share",
         "xid_events", "reasons", "max_temp_c", "ecc_uncorrected", "retired_pages", "pcie_replay_growth",
         links.GPU_KEY),
        TABLE,
    ),),
    description="GPUs ranked by time failing, then degraded, then XIDs. Click a UUID for the GPU's own board.",
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
                toString(health) AS state,
                prev_state,
                arrayStringConcat(health_reasons, ', ') AS reasons,
                arrayStringConcat(arrayMap(x -> toString(x), xids), ', ') AS xid_codes,
                hex(gpu_uuid) AS gpu_hex
            FROM
            (
                SELECT
                    time, node, gpu_index, gpu_uuid, health, health_reasons, xids,
                    lagInFrame(toString(health), 1, 'ok') OVER (
                        PARTITION BY gpu_uuid ORDER BY time ROWS BETWEEN 1 PRECEDING AND CURRENT ROW
                    ) AS prev_state
                FROM gpu_samples
                WHERE {where}
            )
            WHERE toString(health) != prev_state OR notEmpty(xids)
            ORDER BY time DESC, gpu_uuid
            LIMIT 500
            """,
            where=f.where(),
        ),
        ("time", "node", "gpu", "gpu_uuid", "state", "prev_state", "reasons", "xid_codes", links.GPU_KEY),
        TABLE,
    ),),
    description="Every change of a GPU's health state and every XID, newest first.",
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
