"""Pure functions: a rule and an evaluation instant -> its SQL; the SQL's rows -> alert candidates.

Design notes: docs/design-notes.md#pipeline-alerts-queries-py.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gpufleet.gpu_facts import (
    THROTTLE_HW_POWER_BRAKE,
    THROTTLE_HW_SLOWDOWN,
    THROTTLE_HW_THERMAL,
    THROTTLE_SW_POWER_CAP,
    THROTTLE_SW_THERMAL,
)
from gpufleet.pipeline.alerts import node_queries
from gpufleet.pipeline.alerts.candidate import (
    Candidate,
    Query,
    clean_labels,
    run_columns,
    run_since,
    sustained_params,
    time_window,
)
from gpufleet.pipeline.alerts.rules import (
    AgentCounterRising,
    AnyRule,
    FabricDegraded,
    GpuBusyUnallocated,
    GpuClaimConflict,
    GpuDegraded,
    GpuFailing,
    GpuHeldNoProcess,
    GpuIdleAllocated,
    GpuRecoveryAction,
    GpuRule,
    JobRule,
    JobStalled,
    JobStraggler,
    MfuBelowTarget,
    NodeRecoveryAction,
    NodeSilent,
    duration_ms,
    format_duration,
)
from gpufleet.pipeline.queries import formulas, job_signals

GIB: Final = float(1 << 30)
THROTTLE_NAMES: Final = {
    THROTTLE_SW_POWER_CAP: "sw_power_cap",
    THROTTLE_HW_SLOWDOWN: "hw_slowdown",
    THROTTLE_SW_THERMAL: "sw_thermal",
    THROTTLE_HW_THERMAL: "hw_thermal",
    THROTTLE_HW_POWER_BRAKE: "hw_power_brake",
}


def _ms(name: str) -> str:
    return f"fromUnixTimestamp64Milli({{{name}:Int64}}, 'UTC')"


_WINDOW: Final = time_window()

# The per-GPU query: the window's samples with the rule's condition `c`, one row per GPU whose
# newest sample is fresh and satisfies it (or, for GpuDegraded, whose counters rose).
_GPU_SQL = """
SELECT cluster, node, gpu_uuid, gpu_index,
       argMax(tenant, time) AS tenant, argMax(job, time) AS job, argMax(model, time) AS model,
       sum(claimed_ms) AS covered_ms,
       {run}{extra}
FROM (
    SELECT cluster, node, gpu_uuid, gpu_index, tenant, job, model, time, interval_ms, claimed_ms{columns},
           toUInt8(ifNull({cond}, 0)) AS c
    FROM {{db:Identifier}}.gpu_samples
    WHERE {window}
      AND (cluster, node, gpu_index) IN (
        SELECT cluster, node, gpu_index FROM {{db:Identifier}}.gpu_health_1m
        WHERE minute >= toDateTime(intDiv({{candidates_from_ms:Int64}}, 60000) * 60, 'UTC')
          AND minute <= toDateTime(intDiv({{now_ms:Int64}}, 1000), 'UTC')
        GROUP BY cluster, node, gpu_index
        HAVING {candidate}
      )
)
GROUP BY cluster, node, gpu_uuid, gpu_index
HAVING last_ms > {{fresh_ms:Int64}} AND ({having})
ORDER BY cluster, node, gpu_index
"""

_SAME_TENANT = "tenant = argMax(tenant, time) OVER (PARTITION BY cluster, node, gpu_uuid)"


@dataclass(frozen=True)
class _GpuShape:
    cond: str
    candidate: str
    """Over a GPU's `gpu_health_1m` rows: true for every GPU whose samples could meet `having`."""
    columns: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    having: str = "last_c = 1"


MAX_INTERVAL_MS: Final = 3_600_000
"""The longest interval a sample may cover (the wire contract's bound): a sample ending in the window may
have started this long before it, in an earlier minute of the rollup."""


def _gpu_shape(rule: GpuRule) -> _GpuShape:
    if isinstance(rule, GpuFailing):
        return _GpuShape(
            "health = 'failing'", _FAILING_CANDIDATE, ("health", "health_reasons"),
            ("arrayDistinct(arrayFlatten(arrayMap(p -> p.2, arraySort(p -> p.1, "
             "groupArrayIf((time, health_reasons), c = 1))))) AS reasons",
             "toUnixTimestamp64Milli(maxIf(time, c = 1)) AS last_true_ms",
             "toUnixTimestamp64Milli(minIf(time, c = 1)) - argMinIf(interval_ms, time, c = 1) AS first_true_ms"),
            "last_c = 1 OR last_true_ms > {keep_ms:Int64}",
        )
    if isinstance(rule, GpuDegraded):
        cond = ("bitAnd(ifNull(clock_event_reasons, 0), {mask:UInt64}) != 0"
                f" OR ifNull(temp_gpu_c >= {_TEMP_LIMIT}, 0)"
                " OR ({remap:UInt8} = 1 AND (ifNull(remap_pending, 0) OR ifNull(retired_pages_pending, 0)))")
        nvlink = "nvlink_errors"
        return _GpuShape(
            cond,
            "bitAnd(groupBitOr(clock_event_bits), {mask:UInt64}) != 0 OR ifNull(max(temp_max_c) >= {temp_c:Float64}, 0)"
            f" OR {_HOT_REASON}"
            " OR ({remap:UInt8} = 1 AND max(remap_pending_max) = 1) OR min(ecc_corrected_min) != max(ecc_corrected_max)"
            " OR min(pcie_replay_min) != max(pcie_replay_max) OR min(nvlink_rr_min) != max(nvlink_rr_max)",
            ("clock_event_reasons", "temp_gpu_c", "temp_slowdown_c", "remap_pending", "retired_pages_pending",
             "ecc_corrected_volatile", "pcie_replay_count",
             "if(nvlink_replay_errors IS NULL AND nvlink_recovery_errors IS NULL, NULL, "
             f"ifNull(nvlink_replay_errors, 0) + ifNull(nvlink_recovery_errors, 0)) AS {nvlink}"),
            ("argMax(ifNull(clock_event_reasons, 0), time) AS throttle_bits",
             "argMax(temp_gpu_c, time) AS temp_c",
             f"argMax({_TEMP_LIMIT}, time) AS temp_limit_c",
             "argMax(ifNull(remap_pending, 0) OR ifNull(retired_pages_pending, 0), time) AS remap",
             f"{formulas.increase('ecc_corrected_volatile')} AS ecc_inc",
             f"{formulas.increase('pcie_replay_count')} AS pcie_inc",
             f"{formulas.increase(nvlink)} AS nvlink_inc"),
            "last_c = 1 OR ecc_inc >= {ecc_min:Int64} OR pcie_inc >= {pcie_min:Int64}"
            " OR nvlink_inc >= {nvlink_min:Int64}",
        )
    if isinstance(rule, GpuIdleAllocated):
        return _GpuShape(
            "tenant != '' AND error = '' AND util_gpu_ratio < {util:Float64}"
            f" AND (compute_processes IS NULL OR compute_processes > 0) AND {_SAME_TENANT}",
            "ifNull(min(idle_util_min) < {util:Float64}, 0)",
            ("error", "util_gpu_ratio", "compute_processes"),
            ("avgIf(util_gpu_ratio, c = 1) AS util",),
        )
    if isinstance(rule, GpuHeldNoProcess):
        return _GpuShape(f"tenant != '' AND error = '' AND compute_processes = 0 AND {_SAME_TENANT}",
                         "sum(held_no_process) > 0", ("error", "compute_processes"))
    if isinstance(rule, GpuBusyUnallocated):
        return _GpuShape(
            "tenant = '' AND error = '' AND (compute_processes > 0 OR mem_used_bytes > {mem_bytes:UInt64})",
            "max(unallocated_processes_max) > 0 OR max(unallocated_mem_max) > {mem_bytes:UInt64}",
            ("error", "compute_processes", "mem_used_bytes"),
            ("argMax(compute_processes, time) AS processes", "argMax(mem_used_bytes, time) AS mem_used"),
        )
    return _signal_shape(rule)


def _signal_shape(rule: GpuRule) -> _GpuShape:
    """The node-side per-GPU kinds: the recovery action (NodeRecoveryAction's rows are merged per node) and
    the fabric."""
    if isinstance(rule, GpuRecoveryAction):
        return _GpuShape("has({actions:Array(UInt8)}, ifNull(recovery_action, 0))", _reason_in_rollup("recovery_"),
                         ("recovery_action",), ("argMax(recovery_action, time) AS action",))
    if isinstance(rule, FabricDegraded):
        return _GpuShape(_FABRIC_REASON, _reason_in_rollup("fabric_"), ("health_reasons", "fabric_clique_id"),
                         ("arrayFilter(r -> startsWith(r, 'fabric_'), argMax(health_reasons, time)) AS reasons",
                          "argMax(fabric_clique_id, time) AS clique"))
    raise TypeError(f"no per-GPU query for {type(rule).__name__}")


_FAILING_CANDIDATE: Final = ("max(failing_ms > 0 AND tupleElement(last, 1) > "
                              "fromUnixTimestamp64Milli({failing_from_ms:Int64}, 'UTC')) = 1")
"""GpuFailing over `gpu_health_1m` (or `_1h`) rows: a row with failing time whose newest sample ends after the
window's start. A failing sample in the window lies in such a row (the row's newest ends no earlier), so
these GPUs include every one the query can return, and not those that failed earlier in the hour read."""
_TEMP_LIMIT: Final = "coalesce(temp_slowdown_c - {temp_margin_c:Float64}, {temp_c:Float64})"
"""GpuDegraded's temperature limit: the GPU's own slowdown temperature less the margin, `temp_c` where unknown."""
_FABRIC_REASON: Final = "arrayExists(r -> startsWith(r, 'fabric_'), health_reasons)"
"""A `fabric_*` health reason (pipeline/ingest/health.py decides them)."""
_HOT_REASON: Final = "max(hasAny(reasons, ['temperature_high', 'temperature_critical'])) = 1"
"""Over `gpu_health_1m` rows: the ingest found the GPU near or past its own limits (`temp_slowdown_c` less
`health.temp_slowdown_margin_c`), which the rollup's `temp_max_c` cannot tell against the fixed `temp_c`."""


def _reason_in_rollup(prefix: str) -> str:
    """Over `gpu_health_1m` rows: a health reason starting with `prefix` in the minutes read (the ingest adds
    `recovery_*` for every recovery action NVML reports and `fabric_*` for every fabric fault)."""
    return f"max(arrayExists(r -> startsWith(r, '{prefix}'), reasons)) = 1"


def _gpu_params(rule: GpuRule, now_ms: int) -> dict[str, Any]:
    if isinstance(rule, GpuFailing):
        return {"keep_ms": now_ms - rule.keep_ms, "failing_from_ms": now_ms - _gpu_span(rule)}
    if isinstance(rule, GpuDegraded):
        return {"mask": rule.throttle_mask, "temp_c": rule.temp_c, "temp_margin_c": rule.temp_slowdown_margin_c,
                "remap": int(rule.remap_pending),
                "ecc_min": rule.ecc_corrected_increase, "pcie_min": rule.pcie_replay_increase,
                "nvlink_min": rule.nvlink_error_increase}
    if isinstance(rule, GpuIdleAllocated):
        return {"util": rule.util_below}
    if isinstance(rule, GpuBusyUnallocated):
        return {"mem_bytes": rule.mem_used_above_bytes}
    if isinstance(rule, GpuRecoveryAction):
        return {"actions": [node_queries.recovery_code(a) for a in rule.actions]}
    return {}


_SUSTAINED: Final = formulas.sustained("{sustained_since_ms:Int64}", "{sustained_cover_ms:Float64}")


def build(  # noqa: PLR0911 - one return per family of rule kinds
        rule: AnyRule, now_ms: int, *, materialized_cte: bool = False) -> Query:
    """The rule's SQL, parameters and settings for an evaluation at `now_ms` (run it through a `Store`);
    `materialized_cte`: the server has materialized CTEs (JobStraggler then reads its window once)."""
    if node_queries.is_node_signal(rule):
        return node_queries.build(rule, now_ms)  # type: ignore[arg-type]
    if isinstance(rule, NodeSilent):
        return _node_silent(rule, now_ms)
    if isinstance(rule, MfuBelowTarget):
        return _mfu(rule, now_ms)
    if isinstance(rule, AgentCounterRising):
        return _agent_counter(rule, now_ms)
    if isinstance(rule, GpuClaimConflict):
        return _claim_conflict(rule, now_ms)
    if isinstance(rule, JobRule):
        return _job(rule, now_ms, materialized_cte)
    shape = _gpu_shape(rule)
    sql = _GPU_SQL.format(
        window=_WINDOW, run=run_columns(_SUSTAINED), cond=shape.cond, having=shape.having, candidate=shape.candidate,
        columns="".join(f", {c}" for c in shape.columns), extra="".join(f",\n       {e}" for e in shape.extra),
    )
    span = _gpu_span(rule)
    params = {**sustained_params(rule, now_ms, span), "candidates_from_ms": now_ms - span - MAX_INTERVAL_MS,
              **_gpu_params(rule, now_ms)}
    return Query(sql, params)


def _gpu_span(rule: GpuRule) -> int:
    return max(rule.for_ms, rule.max_age_ms, rule.keep_ms if isinstance(rule, GpuFailing) else 0)


def is_per_gpu(rule: AnyRule) -> bool:
    """Whether `build` gives `rule` the per-GPU query, whose GPUs come from `gpu_health_1m` (`gpu_candidates`)."""
    return isinstance(rule, GpuRule) and not isinstance(rule, JobRule)


def gpu_candidates(rule: GpuRule, now_ms: int) -> tuple[str, dict[str, Any], int]:
    """A per-GPU rule's candidate condition over one GPU's `gpu_health_1m` rows (its query reads the samples
    of the GPUs that meet it), the condition's parameters, and the first minute (Unix ms) it reads."""
    return _gpu_shape(rule).candidate, _gpu_params(rule, now_ms), now_ms - _gpu_span(rule) - MAX_INTERVAL_MS


def _job(rule: JobRule, now_ms: int, materialized_cte: bool = False) -> Query:
    span = job_signals.Span(_WINDOW, "{fresh_ms:Int64}", "{sustained_since_ms:Int64}", "{sustained_cover_ms:Float64}")
    params = sustained_params(rule, now_ms)
    table = "{db:Identifier}.gpu_samples"
    if isinstance(rule, JobStalled):
        candidates = job_signals.candidates_between(_ms("from_ms"), _ms("now_ms"), "{db:Identifier}.")
        return Query(job_signals.stalled_jobs(table, span, job_signals.STALL_BOUND, candidates),
                     {**params, **job_signals.stall_params(rule)})
    if isinstance(rule, JobStraggler):
        return Query(job_signals.stragglers(table, span, job_signals.STRAGGLER_BOUND, materialize=materialized_cte),
                     {**params, **job_signals.straggler_params(rule)},
                     dict(job_signals.MATERIALIZED_CTE) if materialized_cte else None)
    raise TypeError(f"no job query for {type(rule).__name__}")


# NodeSilent: each node's newest report from `node_latest` (one row per node), never a day of agent
# reports; a node whose newest report is after `now` (an evaluation at an instant in the past, or
# an agent clock ahead) is read from its own agent_reports rows, by key, so every `now` gives the
# same answer as the reports up to it.
_NODE_SILENT_SQL = """
SELECT cluster, node, last_ms FROM (
    SELECT cluster, node, toUnixTimestamp64Milli(max(time)) AS last_ms
    FROM {{db:Identifier}}.node_latest
    GROUP BY cluster, node
    HAVING last_ms <= {{now_ms:Int64}} AND last_ms > {{from_ms:Int64}} AND last_ms <= {{silent_ms:Int64}}
    UNION ALL
    SELECT cluster, node, toUnixTimestamp64Milli(max(time)) AS last_ms
    FROM {{db:Identifier}}.agent_reports
    WHERE (cluster, node) IN (
        SELECT cluster, node FROM {{db:Identifier}}.node_latest
        GROUP BY cluster, node HAVING max(time) > {now}
    ) AND {window}
    GROUP BY cluster, node
    HAVING last_ms <= {{silent_ms:Int64}}
)
ORDER BY cluster, node
"""


def _node_silent(rule: NodeSilent, now_ms: int) -> Query:
    sql = _NODE_SILENT_SQL.format(now=_ms("now_ms"), window=_WINDOW)
    return Query(sql, {"from_ms": now_ms - duration_ms(rule.forget_after), "now_ms": now_ms,
                       "silent_ms": now_ms - duration_ms(rule.silent_after)})


# MfuBelowTarget: the fleet rollup's whole minutes before `now` (`formulas.MFU`, as `gpufleet status`
# and the boards compute it), so a cycle reads a few rows per minute whatever the fleet size. The
# data must reach the window's first minute and be fresh; `gpus` is time-weighted (GPU-seconds in
# the MFU / window seconds).
_MFU_SQL = """
SELECT {keys}{mfu} AS mfu, round(sum(mfu_ms) / {{window_ms:Int64}}, 1) AS gpus,
       min(first_start_ms) AS first_start_ms, max(last_end_ms) AS last_ms
FROM {{db:Identifier}}.fleet_usage_1m
WHERE minute >= toDateTime(intDiv({{start_ms:Int64}}, 1000), 'UTC')
  AND minute < toDateTime(intDiv({{end_ms:Int64}}, 1000), 'UTC'){allocated}
{group}HAVING sum(mfu_ms) > 0 AND last_ms > {{fresh_ms:Int64}}
   AND min(minute) = toDateTime(intDiv({{start_ms:Int64}}, 1000), 'UTC') AND mfu < {{target:Float64}}{order}
"""


def _mfu(rule: MfuBelowTarget, now_ms: int) -> Query:
    keys = ", ".join(rule.by)
    sql = _MFU_SQL.format(
        keys="".join(f"{k}, " for k in rule.by), mfu=formulas.MFU,
        allocated=" AND tenant != ''" if rule.allocated_only else "",
        group=f"GROUP BY {keys}\n" if keys else "", order=f"\nORDER BY {keys}" if keys else "",
    )
    window = duration_ms(rule.window)
    end = now_ms // 60_000 * 60_000
    start = (end - window) // 60_000 * 60_000
    return Query(sql, {"start_ms": start, "end_ms": end, "window_ms": end - start,
                       "fresh_ms": now_ms - duration_ms(rule.max_sample_age), "target": rule.target})


# Per boot_id: the counter in seq order, each step's increase (a fall is a restart: count the new
# value; the first report is the baseline), and when the first rise was reported. Then per node.
_AGENT_COUNTER_SQL = """
SELECT cluster, node, sum(inc) AS increase, minIf(first_rise_ms, inc > 0) AS since_ms, max(newest_ms) AS last_ms
FROM (
    SELECT cluster, node, boot_id,
           arraySort(p -> p.1, groupArray((seq, toInt64({column}), toUnixTimestamp64Milli(time)))) AS points,
           arrayMap(p -> p.2, points) AS vals,
           arrayMap((d, v) -> if(d >= 0, d, v), arrayDifference(vals), vals) AS steps,
           arraySum(steps) AS inc,
           arrayFirst((t, d) -> d > 0, arrayMap(p -> p.3, points), steps) AS first_rise_ms,
           toUnixTimestamp64Milli(max(time)) AS newest_ms
    FROM {{db:Identifier}}.agent_reports
    WHERE {window}
    GROUP BY cluster, node, boot_id
)
GROUP BY cluster, node
HAVING increase >= {{min_increase:Int64}}
ORDER BY cluster, node
"""


def _agent_counter(rule: AgentCounterRising, now_ms: int) -> Query:
    sql = _AGENT_COUNTER_SQL.format(column=rule.COLUMN, window=_WINDOW)
    return Query(sql, {"from_ms": now_ms - duration_ms(rule.window), "now_ms": now_ms,
                       "min_increase": rule.min_increase})


# GPUs whose streams' reported spans overlap (from `gpu_claim_homes`, a few rows per GPU), then their
# streams' samples (`gpu_samples`, over its primary key): each stream's span of reported intervals per
# minute of interval start, compared in every minute both touch. An interval is at most an hour long,
# so the scan reaches an hour and a minute back.
CLAIM_SUSPECTS: Final = """homes AS (
        SELECT gpu_uuid, cluster, node, boot_id, min(first_start_ms) AS lo, max(last_end_ms) AS hi
        FROM {db:Identifier}.gpu_claim_homes
        GROUP BY gpu_uuid, cluster, node, boot_id
        HAVING hi > {scan_ms:Int64} AND lo < {now_ms:Int64}
    ),
    suspects AS (
        SELECT DISTINCT a.gpu_uuid AS gpu_uuid
        FROM homes AS a
        INNER JOIN homes AS b ON a.gpu_uuid = b.gpu_uuid
        WHERE (a.cluster, a.node, a.boot_id) < (b.cluster, b.node, b.boot_id) AND a.lo < b.hi AND b.lo < a.hi
    )"""
"""The CTEs `homes` (each stream's reported span per GPU) and `suspects` (GPUs two streams reported at once)."""
_CLAIM_CONFLICT_SQL = "\nWITH\n    " + CLAIM_SUSPECTS + """,
    spans AS (
        SELECT intDiv(toUnixTimestamp64Milli(time) - interval_ms, 60000) AS minute, gpu_uuid, cluster, node, boot_id,
               min(toUnixTimestamp64Milli(time) - interval_ms) AS lo, max(toUnixTimestamp64Milli(time)) AS hi
        FROM {db:Identifier}.gpu_samples
        WHERE (cluster, node) IN (SELECT cluster, node FROM homes WHERE gpu_uuid IN (SELECT gpu_uuid FROM suspects))
          AND gpu_uuid IN (SELECT gpu_uuid FROM suspects)
          AND time > fromUnixTimestamp64Milli({scan_ms:Int64}, 'UTC')
          AND time <= fromUnixTimestamp64Milli({now_ms:Int64}, 'UTC')
        GROUP BY minute, gpu_uuid, cluster, node, boot_id
    ),
    spread AS (
        SELECT gpu_uuid, cluster, node, boot_id, lo, hi,
               arrayJoin(range(intDiv(lo, 60000), intDiv(hi - 1, 60000) + 1)) AS bucket
        FROM spans
    )
SELECT a.gpu_uuid AS gpu_uuid,
       arraySort(groupUniqArray(concat(a.cluster, '/', a.node, ' (boot ', a.boot_id, ')'))) AS claimers,
       min(greatest(a.lo, b.lo)) AS since_ms,
       max(least(a.hi, b.hi)) AS last_ms
FROM spread AS a
INNER JOIN spread AS b ON a.gpu_uuid = b.gpu_uuid AND a.bucket = b.bucket
WHERE (a.cluster, a.node, a.boot_id) != (b.cluster, b.node, b.boot_id) AND a.lo < b.hi AND b.lo < a.hi
GROUP BY gpu_uuid
HAVING last_ms > {from_ms:Int64}
ORDER BY gpu_uuid
"""


def _claim_conflict(rule: GpuClaimConflict, now_ms: int) -> Query:
    window = duration_ms(rule.window)
    return Query(_CLAIM_CONFLICT_SQL, {"from_ms": now_ms - window, **claim_suspects_params(rule, now_ms)})


def claim_suspects_params(rule: GpuClaimConflict, now_ms: int) -> dict[str, Any]:
    """The parameters `CLAIM_SUSPECTS` names."""
    return {"now_ms": now_ms, "scan_ms": now_ms - duration_ms(rule.window) - 3_660_000}


@functools.lru_cache(maxsize=1 << 16)  # an open alert's active_at, every evaluation
def iso(ms: int) -> str:
    """Unix ms -> `2026-11-18T08:26:40.000Z`."""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def candidates(  # noqa: PLR0911 - one return per family of rule kinds
        rule: AnyRule, rows: list[Mapping[str, Any]], now_ms: int) -> list[Candidate]:
    """The query's rows as candidates: firing or pending, with labels and annotation context."""
    signals = _signal_candidates(rule, rows, now_ms)
    if signals is not None:
        return signals
    if isinstance(rule, NodeSilent):
        return [_silent_candidate(r, now_ms) for r in rows]
    if isinstance(rule, MfuBelowTarget):
        return [_mfu_candidate(rule, r) for r in rows]
    if isinstance(rule, AgentCounterRising):
        return [_agent_candidate(rule, r) for r in rows]
    if isinstance(rule, GpuClaimConflict):
        return [_conflict_candidate(rule, r) for r in rows]
    if isinstance(rule, JobRule):
        return _job_candidates(rule, rows)
    if isinstance(rule, GpuFailing) and rule.for_ms > 0:  # keep_firing_for applies to `for: 0` only
        rows = [r for r in rows if r["last_c"]]
    return [_gpu_candidate(rule, r, now_ms) for r in rows]


def _signal_candidates(rule: AnyRule, rows: list[Mapping[str, Any]], now_ms: int) -> list[Candidate] | None:
    """The node-side kinds built in `node_queries` (and NodeRecoveryAction's GPU rows merged per node); None
    for the other kinds."""
    if node_queries.is_node_signal(rule):
        return node_queries.candidates(rule, rows)  # type: ignore[arg-type]
    if isinstance(rule, NodeRecoveryAction):
        return node_queries.node_recovery_candidates(rule, [_gpu_candidate(rule, r, now_ms) for r in rows])
    return None


def sustained(rule: GpuRule, row: Mapping[str, Any]) -> bool:
    """The newest sample satisfies the condition and, unless `for` is 0, the query found it sustained
    for `for` (`formulas.sustained`)."""
    return bool(row["last_c"]) and (rule.for_ms == 0 or bool(row["sustained"]))


def _gpu_candidate(rule: GpuRule, row: Mapping[str, Any], now_ms: int) -> Candidate:
    firing = sustained(rule, row)
    since = run_since(row)
    labels = {"cluster": row["cluster"], "node": row["node"], "gpu": row["gpu_uuid"],
              "gpu_index": str(row["gpu_index"])}
    ctx: dict[str, Any] = {**labels, "tenant": row["tenant"], "job": row["job"], "model": row["model"],
                           "for": format_duration(rule.for_ms)}
    value: float | None = 1.0
    waste = False
    if isinstance(rule, GpuFailing):
        if rule.for_ms == 0:
            firing = True  # newest sample failing, or a failing one within keep_firing_for
        since = int(row["first_true_ms"])
        reasons = list(row["reasons"])
        ctx["reasons"] = ", ".join(reasons) or "failing"
        value = float(len(reasons))
    elif isinstance(rule, GpuDegraded):
        firing = firing or _rising(rule, row)
        ctx["reasons"] = ", ".join(_degraded_reasons(rule, row)) or "degraded"
        value = float(row["temp_c"]) if row["temp_c"] is not None else None
        ctx["temp_c"] = value if value is not None else float("nan")
    elif isinstance(rule, GpuIdleAllocated):
        util = float(row["util"]) if row["util"] is not None else 0.0
        labels["tenant"] = row["tenant"]
        ctx.update(util_pct=100 * util, threshold_pct=100 * rule.util_below)
        value, waste = util, True
    elif isinstance(rule, GpuHeldNoProcess):
        labels["tenant"] = row["tenant"]
        value, waste = None, True
    elif isinstance(rule, GpuBusyUnallocated):
        mem = int(row["mem_used"] or 0)
        ctx.update(processes=int(row["processes"] or 0), mem_used_gib=mem / GIB)
        value = float(mem)
    elif isinstance(rule, GpuRecoveryAction):
        action = node_queries.recovery_name(int(row["action"]))
        labels["action"] = action
        ctx.update(action=action, remedy=node_queries.remedy(action))
        value = float(row["action"])
    elif isinstance(rule, FabricDegraded):
        ctx.update(reasons=", ".join(row["reasons"]) or "fabric", clique=int(row["clique"] or 0))
    ctx["value"] = value
    return Candidate(_clean(labels), firing, since, int(row["last_ms"]), value, ctx, waste)


def _rising(rule: GpuDegraded, row: Mapping[str, Any]) -> bool:
    return (row["ecc_inc"] >= rule.ecc_corrected_increase or row["pcie_inc"] >= rule.pcie_replay_increase
            or row["nvlink_inc"] >= rule.nvlink_error_increase)


def _degraded_reasons(rule: GpuDegraded, row: Mapping[str, Any]) -> list[str]:
    out = []
    bits = int(row["throttle_bits"]) & rule.throttle_mask
    if bits:
        names = [name for bit, name in THROTTLE_NAMES.items() if bits & bit]
        out.append(f"throttling ({'+'.join(names)})")
    if row["temp_c"] is not None and row["temp_c"] >= row["temp_limit_c"]:
        out.append(f"temperature {row['temp_c']:.0f} C >= {row['temp_limit_c']:.0f} C")
    if rule.remap_pending and row["remap"]:
        out.append("row remap / page retirement pending a reset")
    window = format_duration(max(rule.for_ms, rule.max_age_ms))
    for key, name, limit in (("ecc_inc", "correctable ECC errors", rule.ecc_corrected_increase),
                             ("pcie_inc", "PCIe replays", rule.pcie_replay_increase),
                             ("nvlink_inc", "NVLink replay/recovery errors", rule.nvlink_error_increase)):
        if row[key] >= limit:
            out.append(f"{name} +{row[key]} in {window}")
    return out


def _silent_candidate(row: Mapping[str, Any], now_ms: int) -> Candidate:
    last = int(row["last_ms"])
    labels = {"cluster": row["cluster"], "node": row["node"]}
    ctx = {**labels, "last_seen": iso(last), "silent_for": format_duration(now_ms - last),
           "value": (now_ms - last) / 1000}
    return Candidate(_clean(labels), True, last, last, (now_ms - last) / 1000, ctx)


def _mfu_candidate(rule: MfuBelowTarget, row: Mapping[str, Any]) -> Candidate:
    labels = {k: str(row[k]) for k in rule.by}
    mfu = float(row["mfu"])
    scope = ", ".join(f"{k} {labels[k]}" for k in rule.by) or "fleet"
    gpus = float(row["gpus"])
    ctx = {"cluster": labels.get("cluster", ""), "tenant": labels.get("tenant", ""), "scope": scope,
           "mfu_pct": 100 * mfu, "target_pct": 100 * rule.target, "window": format_duration(duration_ms(rule.window)),
           "gpus": int(gpus) if gpus.is_integer() else gpus, "value": mfu}
    return Candidate(_clean(labels), True, int(row["first_start_ms"]), int(row["last_ms"]), mfu, ctx)


def _agent_candidate(rule: AgentCounterRising, row: Mapping[str, Any]) -> Candidate:
    labels = {"cluster": row["cluster"], "node": row["node"]}
    increase = int(row["increase"])
    ctx = {**labels, rule.COUNT: increase, "window": format_duration(duration_ms(rule.window)),
           "value": float(increase)}
    return Candidate(_clean(labels), True, int(row["since_ms"]), int(row["last_ms"]), float(increase), ctx)


def _conflict_candidate(rule: GpuClaimConflict, row: Mapping[str, Any]) -> Candidate:
    labels = {"gpu": row["gpu_uuid"]}
    claimers = list(row["claimers"])
    ctx = {**labels, "streams": len(claimers), "claimers": ", ".join(claimers),
           "window": format_duration(duration_ms(rule.window)), "value": float(len(claimers))}
    return Candidate(_clean(labels), True, int(row["since_ms"]), int(row["last_ms"]), float(len(claimers)), ctx)


def _job_candidates(rule: JobRule, rows: list[Mapping[str, Any]]) -> list[Candidate]:
    if isinstance(rule, JobStalled):
        return [_stalled_candidate(rule, r) for r in rows]
    if isinstance(rule, JobStraggler):
        return _straggler_candidates(rule, rows)
    raise TypeError(f"no job candidates for {type(rule).__name__}")


def _stalled_candidate(rule: JobStalled, row: Mapping[str, Any]) -> Candidate:
    labels = {"cluster": row["cluster"], "tenant": row["tenant"], "job": row["job"]}
    gpus = int(row["gpus"])
    ctx = {**labels, "for": format_duration(rule.for_ms), "gpus": gpus,
           "nodes": ", ".join(row["nodes"]), "gpu_list": ", ".join(row["gpu_uuids"]),
           "util_pct": 100 * _num(row["util"]), "power_pct": 100 * _num(row["power_ratio"])}
    return Candidate(_clean(labels), bool(row["sustained"]), int(row["since_ms"]), int(row["last_ms"]), None, ctx,
                     tracks_waste=True, gpus=gpus)


def _straggler_candidates(rule: JobStraggler, rows: list[Mapping[str, Any]]) -> list[Candidate]:
    """One candidate per GPU; `scope` says when every GPU the job has on that node lags (a slow node)."""
    slow: dict[tuple[str, str, str, str], int] = {}
    for r in rows:
        key = (r["cluster"], r["tenant"], r["job"], r["node"])
        slow[key] = slow.get(key, 0) + 1
    return [_straggler_candidate(rule, r, slow[(r["cluster"], r["tenant"], r["job"], r["node"])]) for r in rows]


def _straggler_candidate(rule: JobStraggler, row: Mapping[str, Any], slow_on_node: int) -> Candidate:
    labels = {"cluster": row["cluster"], "node": row["node"], "gpu": row["gpu_uuid"],
              "gpu_index": str(row["gpu_index"]), "tenant": row["tenant"], "job": row["job"]}
    on_node, job_gpus = int(row["node_job_gpus"]), int(row["job_gpus"])
    whole_node = slow_on_node == on_node and 2 <= on_node < job_gpus
    scope = f"node {row['node']} (all {on_node} of the job's GPUs on it)" if whole_node else f"GPU {row['gpu_index']}"
    clock, job_clock = row["clock_mhz"], row["job_clock_mhz"]
    value = float(clock) / float(job_clock) if clock is not None and job_clock else None
    ctx = {**labels, "for": format_duration(rule.for_ms),
           "cause": job_signals.CAUSES.get(row["cause"], row["cause"]), "scope": scope, "job_gpus": job_gpus,
           "clock_mhz": _num(clock), "job_clock_mhz": _num(job_clock), "tensor_pct": 100 * _num(row["tensor"]),
           "job_tensor_pct": 100 * _num(row["job_tensor"]), "value": value}
    return Candidate(_clean(labels), bool(row["sustained"]), int(row["since_ms"]), int(row["last_ms"]), value, ctx)


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


_clean = clean_labels
