"""SQL fragments every board shares: rollup sources by range, variable filters, MFU and policy expressions, thresholds.

Boards read the rollups (docs/aggregations.md): fleet and tenant panels the fleet rollup
(`fleet_usage_1m`/`_1h`, no GPU in its key), or the per-GPU rollups when a node is picked; health
panels the per-GPU health rollup (`gpu_health_1m`/`_1h`) and the event tables; billing panels
`usage_hourly`; raw `gpu_samples` only for one GPU's detail, through its primary key. Every range
reads its whole hours from the hour level and its ragged ends from the minute level
(`pipeline/queries/rollups.py`, the split the read side uses too). The SLA policy (excluded health
states, idle threshold) is read from `billing_policy`, the table billing itself reads, so a board's
"billable" or "idle" is billing's. Fixed thresholds come from the pipeline's own defaults
(`gpufleet.config`, `gpufleet.gpu_facts`), so they mean what the health rules mean.
"""

from __future__ import annotations

from typing import Final

from gpufleet.config import BillingConfig, HealthConfig, StallConfig, StragglerConfig
from gpufleet.dashboards.builder import JSON, query_variable, sql
from gpufleet.gpu_facts import (
    THROTTLE_HW_POWER_BRAKE,
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_SW_POWER_CAP,
    THROTTLE_THERMAL_MASK,
)
from gpufleet.pipeline.ingest.health import State
from gpufleet.pipeline.queries import formulas, job_signals, rollups

HEALTH_STATES: Final = "[" + ", ".join(f"'{s.name.lower()}'" for s in State) + "]"
"""The health states as a ClickHouse array literal in `health` Enum8 code order: element code + 1 is that code's
name, and `indexOf` over it orders states by severity."""

HEALTH: Final = HealthConfig()
BILLING: Final = BillingConfig()

MFU_TARGET: Final = 0.5
"""The fleet MFU target the boards draw (the FleetMfuBelowTarget rule's default)."""
SILENT_MS: Final = int(HEALTH.silent_after_s * 1000)
"""A GPU with no report for longer than this is `unknown` (health.silent_after_s)."""

THERMAL_BITS: Final = THROTTLE_THERMAL_MASK
POWER_BRAKE_BITS: Final = THROTTLE_HW_SLOWDOWN | THROTTLE_HW_POWER_BRAKE
POWER_CAP_BITS: Final = THROTTLE_SW_POWER_CAP

HOUR_MS: Final = "3600000"
MINUTE: Final = "1m"
"""Min interval of panels on the minute rollup: `$__interval` never goes below its resolution."""

# --- the rollup (gpu_usage_1m / gpu_usage_1h) ----------------------------------------------------

ACHIEVED: Final = formulas.ACHIEVED_FLOP
"""Achieved FLOPs: what jobs measured where they report, else the hardware estimate."""
MFU: Final = formulas.MFU
"""MFU as `gpufleet status` and usage_hourly compute it: achieved / (peak FLOP/s x seconds), known models only."""
MFU_MEASURED: Final = "sum(measured_flop) / nullIf(sum(measured_peak_flop), 0)"
"""MFU over the GPU-seconds whose jobs reported FLOPs (rows of `rollups` levels: they carry `measured_peak_flop`)."""
MFU_ESTIMATED: Final = "sum(estimated_unmeasured_flop) / nullIf(sum(unmeasured_peak_flop), 0)"
"""MFU over the GPU-seconds with no measured FLOPs, from the hardware estimate (tensor activity x peak)."""
COVERAGE: Final = "sum(measured_ms) / nullIf(sum(mfu_ms), 0)"
"""Share of GPU-seconds in the MFU whose FLOPs were measured."""

POLICY: Final = sql(
    """
    WITH
        (SELECT argMax(exclude_states, updated_at) FROM billing_policy) AS excluded,
        (SELECT argMax(idle_util_pct, updated_at) FROM billing_policy) AS idle_pct
    """
)
"""The SLA policy in force, as usage_hourly reads it (`excluded` states, `idle_pct`)."""
HEALTHY: Final = "NOT has(excluded, toString(health))"
IDLE_MS: Final = "held_no_process_ms + arraySum(mapValues(mapFilter((k, v) -> k < idle_pct, active_ms_by_util_pct)))"
"""Idle milliseconds of an allocated rollup row: no compute process, or utilization below the policy."""

# --- rollup rows by range ------------------------------------------------------------------------

RANGE: Final = ("$__fromTime", "$__toTime + 1")
"""The dashboard range as `[start, end)` whole seconds: the minutes `$__timeFilter(minute)` keeps."""
BUCKET_S: Final = "if($__interval_s >= 1800, intDiv($__interval_s + 3599, 3600) * 3600, $__interval_s)"
"""A time series' bucket in seconds: Grafana's interval, rounded up to whole hours from 30 minutes on,
so week- and month-long series read the hour level."""
HOURLY_BUCKETS: Final = f"{BUCKET_S} % 3600 = 0"
"""True when a time series' buckets are whole hours: then whole hours come from the hour level."""
ALL_NODES: Final = "$__conditionalAll(0, $node)"
"""True (`1=1`) when the node variable is All or empty, false when nodes are picked."""


def bucket(column: str = "at") -> str:
    """The time series bucket a rollup row falls in (`at`: the row's minute or hour)."""
    return f"toStartOfInterval({column}, INTERVAL {BUCKET_S} second)"


def fleet_rows(columns: tuple[str, ...], hourly: str = "1") -> str:
    """Fleet rollup rows of the range (`at` and `columns`), filtered by the variables: from
    `fleet_usage_1m`/`_1h`, or from the per-GPU rollups when nodes are picked (the fleet rollup has no
    node). `hourly`: whether whole hours may come from the hour level (`HOURLY_BUCKETS` in time series)."""
    fleet = rollups.rows(rollups.FLEET, *RANGE, where=ALL_NODES + filters(("cluster", "tenant", "model")),
                         hourly=hourly, columns=columns)
    gpus = rollups.rows(rollups.FLEET_FROM_GPUS, *RANGE, where=f"NOT ({ALL_NODES})" + filters(), hourly=hourly,
                        columns=columns)
    return f"(SELECT * FROM {fleet}\n UNION ALL\n SELECT * FROM {gpus})"


def level_rows(levels: rollups.Levels, columns: tuple[str, ...], hourly: str = "1",
               names: tuple[str, ...] = ("cluster", "node", "tenant", "model"), where: str = "1") -> str:
    """Rows of a per-GPU (or per-job) rollup over the range (`at` and `columns`), filtered by the variables `names`."""
    return rollups.rows(levels, *RANGE, where=where + filters(names), hourly=hourly, columns=columns)


def touched_hours(levels: rollups.Levels, columns: tuple[str, ...],
                  names: tuple[str, ...] = ("cluster", "node", "tenant", "model"), where: str = "1") -> str:
    """Hour-level rows of the hours the range touches (a superset of the range), filtered by the variables
    `names`: where a panel picks the GPUs or nodes whose rows of the range it then reads."""
    return rollups.touched_hours(levels, *RANGE, where=where + filters(names), columns=columns)


TOP_NODES: Final = 20
"""How many nodes a per-node panel draws: one line (or row) per node is unreadable at thousands of nodes."""


def top_nodes(levels: rollups.Levels, columns: tuple[str, ...], order: str, having: str | None = None) -> str:
    """`node IN (...)`: the `TOP_NODES` nodes first by `order` (an aggregate over `columns`, ties by node name;
    only those meeting `having`, when given) over the hour-level rows of the hours the range touches, for a
    per-node panel that then reads only their rows of the range."""
    hours = touched_hours(levels, ("node", *columns))
    cond = f" HAVING {having}" if having else ""
    return f"node IN (SELECT node FROM {hours} GROUP BY node{cond} ORDER BY {order}, node LIMIT {TOP_NODES})"


TOP_GPUS: Final = 20
"""How many GPUs a per-GPU panel over the fleet draws: one row per GPU is unreadable at thousands of GPUs."""

GPU_KEY: Final = "(cluster, node, gpu_uuid)"
"""A GPU's identity in the per-GPU rollups: the prefix of their `by_gpu` projections, so picked GPUs are read by key."""


def top_gpus(levels: rollups.Levels, score: tuple[str, ...]) -> str:
    """`GPU_KEY IN (...)`: the `TOP_GPUS` GPUs with the highest score over the range, exactly: the sum of the
    `score` columns (e.g. failing and degraded milliseconds); ties by cluster, node and GPU UUID; only GPUs whose
    score is above 0. Reads those columns of every GPU's rows of the range (whole hours from the hour level, the
    ragged ends from the minute level), for a per-GPU panel that then reads only the picked GPUs' rows, by key."""
    key = "cluster, node, gpu_uuid"
    total = " + ".join(f"sum({c})" for c in score)
    rows = level_rows(levels, ("cluster", "node", "gpu_uuid", *score))
    return (f"{GPU_KEY} IN (SELECT {key} FROM {rows} GROUP BY {key} HAVING {total} > 0 "
            f"ORDER BY {total} DESC, {key} LIMIT {TOP_GPUS})")


MFU_COLUMNS: Final = ("measured_flop", "estimated_unmeasured_flop", "peak_capacity_flop", "measured_peak_flop",
                      "unmeasured_peak_flop")
"""What `MFU`, `MFU_MEASURED` and `MFU_ESTIMATED` read."""
IDLE_COLUMNS: Final = ("held_no_process_ms", "active_ms_by_util_pct")
"""What `IDLE_MS` reads."""


# --- variable filters ----------------------------------------------------------------------------
#
# No variable value may change a query's structure, whatever its characters. Grafana's
# `${v:singlequote}` escapes `'` as `\'` but leaves backslashes, so a value ending in `\` (or
# holding `\'`) closes the literal early: `x\') OR 1=1 --` selects every tenant. And a value
# need not come from the variable's query: Grafana keeps one set in the URL (`var-tenant=...`) or
# typed as a custom value. So:
#
# - each query variable's value is the hex of the string (`hex(tenant)`), its text the string
#   itself: a list of hex values joined with ',' splits back exactly, whatever the strings hold;
# - panels read the selection through `${v:percentencode}`, whose output (`A-Z a-z 0-9 - _ . ~ %`)
#   can neither close a quoted literal nor hold a `$` for the plugin's macros, decode it in
#   ClickHouse and compare the column with `unhex` of each value: a constant set, so the primary
#   key still prunes (a filter on `hex(column)` would read every granule).
#
# A value that is not hex (a custom or hand-written URL value) unhexes to arbitrary bytes: it
# matches what it matches, and never alters the query.

SAMPLE_FILTERS: Final = ("cluster", "node", "tenant", "model")
AGENT_FILTERS: Final = ("cluster", "node")
"""`agent_reports` has no tenant or model: per-node panels filter by cluster and node only."""
USAGE_FILTERS: Final = ("tenant", "model")
"""`usage_hourly` and the billing tables are per tenant and GPU model: no cluster or node."""


def selected(variable: str) -> str:
    """The variable's selected strings as a ClickHouse `Array(String)`, safe for any value.

    `${v:percentencode}` is `{hex1,hex2}` for a list, `hex1` for a single value, percent-encoded;
    decoded, stripped of the braces, split on ',' and unhexed, it is the strings themselves.
    """
    encoded = f"decodeURLComponent('${{{variable}:percentencode}}')"
    return f"arrayMap(v -> unhex(v), splitByChar(',', trim(BOTH '{{}}' FROM {encoded})))"


def condition(variable: str, column: str | None = None) -> str:
    """`column` is one of the variable's selected values, or `1=1` when the variable is All or empty."""
    return f"$__conditionalAll(has({selected(variable)}, {column or variable}), ${variable})"


def filters(names: tuple[str, ...] = SAMPLE_FILTERS, columns: dict[str, str] | None = None) -> str:
    """The variable filters, each on its own line starting with AND; `columns` renames a column."""
    columns = columns or {}
    return "".join(f"\n    AND {condition(n, columns.get(n))}" for n in names)


def where(time_column: str = "time", names: tuple[str, ...] = SAMPLE_FILTERS,
          columns: dict[str, str] | None = None) -> str:
    """`$__timeFilter(time)` AND the variable filters (a `{part}` for `builder.sql`)."""
    return f"$__timeFilter({time_column})" + filters(names, columns)


def options(column: str, source: str, conditions: str) -> str:
    """A variable query: the distinct values of `column`, hex as the value, the string as the text.

    The ClickHouse plugin takes the first column as each option's value and the second as its
    text (`CHDatasource.metricFindQuery`); the names `__value`/`__text` only say so.
    """
    return sql(
        """
        SELECT DISTINCT hex({column}) AS __value, {column} AS __text
        FROM {source}
        WHERE {conditions}
        ORDER BY __text
        """,
        column=column, source=source, conditions=conditions,
    )


def standard_variables(datasource: JSON) -> tuple[JSON, ...]:
    """The variables every board has: datasource, cluster, node, tenant and GPU model.

    Filled from `gpu_latest` (one row per GPU), `agent_reports` (one row per node and interval) and the hourly
    fleet rollup (tenants: no GPU in its key), never from a scan of raw samples.
    """
    return (
        datasource,
        query_variable("cluster", "Cluster", options("cluster", "agent_reports", "$__timeFilter(time)")),
        query_variable("node", "Node", options("node", "agent_reports", where(names=("cluster",)))),
        query_variable(
            "tenant", "Tenant",
            options(
                "tenant", "fleet_usage_1h",
                "hour >= toStartOfHour($__fromTime) AND hour <= $__toTime AND tenant != ''" + filters(("cluster",)),
            ),
            description=("Tenants holding GPUs in the time range (the hourly fleet rollup: one row per cluster, "
                         "tenant, model and state, so the list costs the same whatever the fleet size); All also "
                         "includes unallocated GPUs."),
        ),
        query_variable("model", "GPU model", options("model", "gpu_latest", "model != ''" + filters(("cluster",)))),
    )


# --- job-level detectors (raw samples; pipeline/queries/job_signals.py) --------------------------------

STALL: Final = StallConfig()
STRAGGLER: Final = StragglerConfig()
JOB_FILTERS: Final = ("cluster", "tenant", "model")
"""A job spans nodes, and its stragglers are judged against all its GPUs: job panels never filter by node."""
STALLED_IN_RANGE: Final = "$__timeFilter(toDateTime(intDiv(claim_ms, 60000) * 60, 'UTC'))"
"""A stalled sample counts (its `claimed_ms`) in the range holding the minute of its claim start, as the rollups
file it."""


def stalled_samples(names: tuple[str, ...] = JOB_FILTERS) -> str:
    """The samples in a run of stall-like samples lasting `jobs.stall.for_s` (the config defaults), read
    `for_s` and the gap beyond both ends of the range so a run crossing an edge is judged whole; count
    them with `STALLED_IN_RANGE`. Columns: see `job_signals.stalled_samples`. The candidate GPUs are picked
    by the range alone: the raw read applies the board's filters, so a wider pick is still exact, and each
    filter spelled once more per read would grow the query by every selected value (a selection of many
    tenants would pass the server's `max_query_size`)."""
    pad_s = int(STALL.for_s + STALL.max_gap_s)
    start, end = f"$__fromTime - INTERVAL {pad_s} SECOND", f"$__toTime + INTERVAL {pad_s} SECOND"
    read = f"time > {start} AND time <= {end}"
    candidates = job_signals.candidates_between(start, end)
    return job_signals.stalled_samples("gpu_samples", read + filters(names), job_signals.stall_literal(STALL),
                                       str(int(STALL.for_s * 1000)), str(int(STALL.max_gap_s * 1000)),
                                       candidates)


def stragglers(names: tuple[str, ...] = JOB_FILTERS) -> str:
    """GPUs that lag their job at the end of the range, sustained over the last `jobs.straggler.for_s` (the
    config defaults; fresh: a sample within the last minute): `job_signals.stragglers`' columns."""
    for_ms = int(STRAGGLER.for_s * 1000)
    to = "toUnixTimestamp64Milli($__toTime_ms)"
    span = job_signals.Span(
        f"time > $__toTime - INTERVAL {for_ms // 1000} SECOND AND time <= $__toTime" + filters(names),
        f"{to} - 60000", f"{to} - {for_ms}", f"{0.9 * for_ms:.0f}",
    )
    return job_signals.stragglers("gpu_samples", span, job_signals.straggler_literal(STRAGGLER))

STALLED_BUSY: Final = (
    "NOT has(excluded, toString(health)) AND NOT ifNull(compute_processes = 0, 0) "
    "AND least(floor(ifNull(util_gpu_ratio, 0) * 100 + 0.0001), 100) >= idle_pct"
)
"""A stalled sample the policy (`POLICY`) counts as busy: the waterfall's `stalled` is a part of its busy time,
as `pipeline/queries/stalls.BUSY_BY_POLICY` says with bound parameters."""
