"""Grafana-managed alert rules that mirror the gpufleet evaluator's rules, for teams alerting from Grafana.

Design notes: docs/design-notes.md#dashboards-alerting-py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from gpufleet.dashboards import fragments as f
from gpufleet.dashboards.builder import DS_TYPE, DS_UID, JSON, TABLE, sql
from gpufleet.node_facts import RECOVERY_ACTIONS
from gpufleet.pipeline.alerts.node_queries import sustained_reports
from gpufleet.pipeline.alerts.rules import (
    DEFAULT_RULES,
    AgentAllocationUnknown,
    AgentCounterRising,
    AgentSendErrors,
    AgentSpoolDropping,
    AnyRule,
    FabricDegraded,
    GpuBusyUnallocated,
    GpuClaimConflict,
    GpuDegraded,
    GpuFailing,
    GpuHeldNoProcess,
    GpuIdleAllocated,
    GpuMissing,
    GpuRecoveryAction,
    GpuRule,
    JobRule,
    JobStalled,
    JobStraggler,
    MfuBelowTarget,
    NetworkPortDegraded,
    NetworkPortDown,
    NodeConfigDrift,
    NodeRecoveryAction,
    NodeSilent,
    duration_ms,
    packaged_rules,
    runbook_link,
)
from gpufleet.pipeline.queries import formulas, job_signals

FOLDER_TITLE: Final = "GPU fleet"
FOLDER_UID: Final = "gpufleet"
GROUP: Final = "gpufleet"
GROUP_INTERVAL: Final = "30s"
ORG_ID: Final = 1
EXPR_UID: Final = "__expr__"


@dataclass(frozen=True)
class AlertQuery:
    """A rule's ClickHouse query, the window it looks back over, and how its value is judged."""

    sql: str
    window_s: int
    labels: tuple[str, ...]
    value: str
    evaluator: str = "gt"
    threshold: float = 0.0


def _fresh(rule: GpuRule) -> str:
    return f"max(time) > $__toTime - INTERVAL {duration_ms(rule.max_sample_age) // 1000} SECOND"


def _sustained(rule: GpuRule) -> str:
    """`formulas.sustained` for the rule's `for` D, ending at the evaluation's `$__toTime`."""
    since = f"toUnixTimestamp64Milli($__toTime_ms) - {rule.for_ms}"
    return formulas.sustained(since, f"{rule.coverage} * {rule.for_ms}")


def _sustained_reports(rule: NetworkPortDown | GpuMissing) -> str:
    """`node_queries.sustained_reports` (a port's or a node's reports) for `for` D, ending at `$__toTime`."""
    since = f"(toUnixTimestamp64Milli($__toTime_ms) - {rule.for_ms})"
    return sustained_reports(since, f"{rule.coverage} * {rule.for_ms}")


_GPU_LABELS: Final = ("cluster", "node", "gpu", "gpu_index", "tenant")


def _gpu_query(rule: GpuRule, cond: str, having: str, value: str, columns: Sequence[str] = ()) -> AlertQuery:
    """One row per GPU whose newest sample is fresh and that meets `having` over the window."""
    window_ms = max(rule.for_ms, duration_ms(rule.max_sample_age),
                    rule.keep_ms if isinstance(rule, GpuFailing) else 0)
    text = sql(
        """
        SELECT
            cluster,
            node,
            gpu_uuid AS gpu,
            toString(gpu_index) AS gpu_index,
            argMax(held_by, time) AS tenant,
            {value} AS value
        FROM
        (
            SELECT cluster, node, gpu_uuid, gpu_index, tenant AS held_by, time, interval_ms, claimed_ms{columns},
                toUInt8(ifNull({cond}, 0)) AS c
            FROM gpu_samples
            WHERE $__timeFilter(time)
        )
        GROUP BY cluster, node, gpu_uuid, gpu_index
        HAVING {fresh}
            AND ({having})
        ORDER BY cluster, node, gpu_index
        """,
        value=value, columns="".join(f", {c}" for c in columns), cond=cond, fresh=_fresh(rule), having=having,
    )
    return AlertQuery(text, window_ms // 1000, _GPU_LABELS, "value")


def _failing(rule: GpuFailing) -> AlertQuery:
    return _gpu_query(
        rule, "health = 'failing'",
        f"argMax(c, time) = 1 OR maxIf(time, c = 1) > $__toTime - INTERVAL {rule.keep_ms // 1000} SECOND",
        "greatest(length(argMaxIf(health_reasons, time, c = 1)), 1)",
        columns=("health", "health_reasons"),
    )


def _degraded(rule: GpuDegraded) -> AlertQuery:
    cond = (
        f"bitAnd(ifNull(clock_event_reasons, 0), {rule.throttle_mask:#x}) != 0"
        f" OR ifNull(temp_gpu_c >= coalesce(temp_slowdown_c - {rule.temp_slowdown_margin_c}, {rule.temp_c}), 0)"
        + (" OR ifNull(remap_pending, 0) OR ifNull(retired_pages_pending, 0)" if rule.remap_pending else "")
    )
    nvlink = ("if(nvlink_replay_errors IS NULL AND nvlink_recovery_errors IS NULL, NULL, "
              "ifNull(nvlink_replay_errors, 0) + ifNull(nvlink_recovery_errors, 0)) AS nvlink_errors")
    rising = (
        f"{formulas.increase('ecc_corrected_volatile')} >= {rule.ecc_corrected_increase}"
        f"\n    OR {formulas.increase('pcie_replay_count')} >= {rule.pcie_replay_increase}"
        f"\n    OR {formulas.increase('nvlink_errors')} >= {rule.nvlink_error_increase}"
    )
    return _gpu_query(
        rule, cond, f"argMax(c, time) = 1 AND {_sustained(rule)}\n    OR {rising}", "1",
        columns=("clock_event_reasons", "temp_gpu_c", "temp_slowdown_c", "remap_pending", "retired_pages_pending",
                 "ecc_corrected_volatile", "pcie_replay_count", nvlink),
    )


def _idle(rule: GpuIdleAllocated) -> AlertQuery:
    return _gpu_query(
        rule,
        f"tenant != '' AND error = '' AND util_gpu_ratio < {rule.util_below}"
        " AND (compute_processes IS NULL OR compute_processes > 0)",
        f"argMax(c, time) = 1 AND uniqExact(held_by) = 1 AND {_sustained(rule)}",
        f"sum(claimed_ms) / {f.HOUR_MS}",
        columns=("error", "util_gpu_ratio", "compute_processes"),
    )


def _held(rule: GpuHeldNoProcess) -> AlertQuery:
    return _gpu_query(
        rule, "tenant != '' AND error = '' AND compute_processes = 0",
        f"argMax(c, time) = 1 AND uniqExact(held_by) = 1 AND {_sustained(rule)}",
        f"sum(claimed_ms) / {f.HOUR_MS}",
        columns=("error", "compute_processes"),
    )


def _busy(rule: GpuBusyUnallocated) -> AlertQuery:
    return _gpu_query(
        rule,
        f"tenant = '' AND error = '' AND (compute_processes > 0 OR mem_used_bytes > {rule.mem_used_above_bytes})",
        f"argMax(c, time) = 1 AND {_sustained(rule)}",
        "greatest(argMax(ifNull(compute_processes, 0), time), 1)",
        columns=("error", "compute_processes", "mem_used_bytes"),
    )


def _job_span(rule: JobRule) -> job_signals.Span:
    """The evaluator's window, freshness and "sustained for D", ending at the evaluation's `$__toTime`."""
    to = "toUnixTimestamp64Milli($__toTime_ms)"
    return job_signals.Span("$__timeFilter(time)", f"{to} - {rule.max_age_ms}", f"{to} - {rule.for_ms}",
                            f"{rule.coverage} * {rule.for_ms}")


def _window_s(rule: JobRule) -> int:
    return max(rule.for_ms, rule.max_age_ms) // 1000


def _stalled(rule: JobStalled) -> AlertQuery:
    """One row per job every fresh GPU of which has been stall-like for `for` (`job_signals.stalled_jobs`)."""
    inner = job_signals.stalled_jobs("gpu_samples", _job_span(rule), job_signals.stall_literal(rule))
    text = sql("""
        SELECT cluster, tenant, job, gpus
        FROM
        ({inner})
        WHERE sustained = 1
        """, inner=inner.strip())
    return AlertQuery(text, _window_s(rule), ("cluster", "tenant", "job"), "gpus")


def _straggler(rule: JobStraggler) -> AlertQuery:
    """One row per straggling GPU, sustained for `for` (`job_signals.stragglers`); its value is 1."""
    inner = job_signals.stragglers("gpu_samples", _job_span(rule), job_signals.straggler_literal(rule))
    text = sql("""
        SELECT cluster, node, gpu_uuid AS gpu, toString(gpu_index) AS gpu_index, tenant, job, toUInt8(1) AS value
        FROM
        ({inner})
        WHERE sustained = 1
        """, inner=inner.strip())
    return AlertQuery(text, _window_s(rule), ("cluster", "node", "gpu", "gpu_index", "tenant", "job"), "value")


def _silent(rule: NodeSilent) -> AlertQuery:
    """Each node's newest report from `node_latest`; a node with reports after the range's end from its own
    agent_reports rows (the evaluator's query, pipeline/alerts/queries.py)."""
    silent_s = duration_ms(rule.silent_after) // 1000
    text = sql(
        """
        SELECT cluster, node, dateDiff('second', last, $__toTime) AS silent_s
        FROM
        (
            SELECT cluster, node, max(time) AS last
            FROM node_latest
            GROUP BY cluster, node
            HAVING last >= $__fromTime AND last <= $__toTime
            UNION ALL
            SELECT cluster, node, max(time) AS last
            FROM agent_reports
            WHERE (cluster, node) IN (SELECT cluster, node FROM node_latest GROUP BY cluster, node
                                      HAVING max(time) > $__toTime)
                AND $__timeFilter(time)
            GROUP BY cluster, node
        )
        WHERE last <= $__toTime - INTERVAL {silent} SECOND
        ORDER BY cluster, node
        """,
        silent=str(silent_s),
    )
    return AlertQuery(text, duration_ms(rule.forget_after) // 1000, ("cluster", "node"), "silent_s")


def _mfu(rule: MfuBelowTarget) -> AlertQuery:
    keys = list(rule.by)
    allocated = "\n    AND tenant != ''" if rule.allocated_only else ""
    text = sql(
        """
        SELECT {keys}{mfu} AS mfu
        FROM fleet_usage_1m
        WHERE $__timeFilter(minute){allocated}
        {group}HAVING max(last_end_ms) > toUnixTimestamp64Milli($__toTime_ms) - {fresh_ms}
            AND min(first_start_ms) <= toUnixTimestamp64Milli($__fromTime_ms)
            AND sum(peak_capacity_flop) > 0
        """,
        keys="".join(f"{k}, " for k in keys), mfu=f.MFU, allocated=allocated,
        group=f"GROUP BY {', '.join(keys)}\n" if keys else "", fresh_ms=str(duration_ms(rule.max_sample_age)),
    )
    return AlertQuery(text, duration_ms(rule.window) // 1000, tuple(keys), "mfu", "lt", rule.target)


def _agent_counter(rule: AgentCounterRising) -> AlertQuery:
    """The counter's rises over the window in seq order, per boot_id (a fall counts the new value), per node."""
    text = sql(
        """
        SELECT cluster, node, sum(rise) AS {count}
        FROM
        (
            SELECT cluster, node, boot_id,
                arrayMap(p -> p.2, arraySort(p -> p.1, groupArray((seq, toInt64({column}))))) AS vals,
                arraySum(arrayMap((d, v) -> if(d >= 0, d, v), arrayDifference(vals), vals)) AS rise
            FROM agent_reports
            WHERE $__timeFilter(time)
            GROUP BY cluster, node, boot_id
        )
        GROUP BY cluster, node
        HAVING {count} >= {min}
        ORDER BY cluster, node
        """,
        count=rule.COUNT, column=rule.COLUMN, min=str(rule.min_increase),
    )
    return AlertQuery(text, duration_ms(rule.window) // 1000, ("cluster", "node"), rule.COUNT)


def _claim_conflict(rule: GpuClaimConflict) -> AlertQuery:
    """GPUs whose streams' reported spans overlap (`gpu_claim_homes` first, then their samples' spans per minute,
    compared in every minute both touch), as the evaluator decides it; an interval is at most an hour long."""
    text = sql(
        """
        WITH
            homes AS
            (
                SELECT gpu_uuid, cluster, node, boot_id, min(first_start_ms) AS lo, max(last_end_ms) AS hi
                FROM gpu_claim_homes
                GROUP BY gpu_uuid, cluster, node, boot_id
                HAVING hi > toUnixTimestamp64Milli($__fromTime_ms) - 3660000
                    AND lo < toUnixTimestamp64Milli($__toTime_ms)
            ),
            suspects AS
            (
                SELECT DISTINCT a.gpu_uuid AS gpu_uuid
                FROM homes AS a
                INNER JOIN homes AS b ON a.gpu_uuid = b.gpu_uuid
                WHERE (a.cluster, a.node, a.boot_id) < (b.cluster, b.node, b.boot_id) AND a.lo < b.hi AND b.lo < a.hi
            ),
            spans AS
            (
                SELECT intDiv(toUnixTimestamp64Milli(time) - interval_ms, 60000) AS minute,
                    gpu_uuid, cluster, node, boot_id,
                    min(toUnixTimestamp64Milli(time) - interval_ms) AS lo, max(toUnixTimestamp64Milli(time)) AS hi
                FROM gpu_samples
                WHERE (cluster, node) IN
                    (SELECT cluster, node FROM homes WHERE gpu_uuid IN (SELECT gpu_uuid FROM suspects))
                    AND gpu_uuid IN (SELECT gpu_uuid FROM suspects)
                    AND time > $__fromTime_ms - INTERVAL 61 MINUTE AND time <= $__toTime_ms
                GROUP BY minute, gpu_uuid, cluster, node, boot_id
            ),
            spread AS
            (
                SELECT gpu_uuid, cluster, node, boot_id, lo, hi,
                    arrayJoin(range(intDiv(lo, 60000), intDiv(hi - 1, 60000) + 1)) AS bucket
                FROM spans
            )
        SELECT a.gpu_uuid AS gpu, toFloat64(uniqExact(a.cluster, a.node, a.boot_id)) AS streams
        FROM spread AS a
        INNER JOIN spread AS b ON a.gpu_uuid = b.gpu_uuid AND a.bucket = b.bucket
        WHERE (a.cluster, a.node, a.boot_id) != (b.cluster, b.node, b.boot_id) AND a.lo < b.hi AND b.lo < a.hi
        GROUP BY gpu
        HAVING max(least(a.hi, b.hi)) > toUnixTimestamp64Milli($__fromTime_ms)
        ORDER BY gpu
        """
    )
    return AlertQuery(text, duration_ms(rule.window) // 1000, ("gpu",), "streams")


def _codes(rule: GpuRecoveryAction) -> str:
    codes = {name: code for code, name in RECOVERY_ACTIONS.items()}
    return "[" + ", ".join(str(codes[a]) for a in rule.actions) + "]"


def _recovery(rule: GpuRecoveryAction) -> AlertQuery:
    return _gpu_query(rule, f"has({_codes(rule)}, ifNull(recovery_action, 0))",
                      f"argMax(c, time) = 1 AND ({_sustained(rule)} OR {rule.for_ms} = 0)",
                      "argMax(recovery_action, time)", columns=("recovery_action",))


def _node_recovery(rule: NodeRecoveryAction) -> AlertQuery:
    text = sql(
        """
        SELECT cluster, node, toFloat64(count()) AS gpus
        FROM
        (
            SELECT cluster, node, gpu_uuid, argMax(recovery_action, time) AS action
            FROM gpu_samples
            WHERE $__timeFilter(time)
            GROUP BY cluster, node, gpu_uuid
            HAVING {fresh}
                AND has({codes}, ifNull(action, 0))
        )
        GROUP BY cluster, node
        ORDER BY cluster, node
        """,
        fresh=_fresh(rule), codes=_codes(rule),
    )
    return AlertQuery(text, max(rule.for_ms, duration_ms(rule.max_sample_age)) // 1000, ("cluster", "node"), "gpus")


def _fabric(rule: FabricDegraded) -> AlertQuery:
    return _gpu_query(rule, "arrayExists(r -> startsWith(r, 'fabric_'), health_reasons)",
                      f"argMax(c, time) = 1 AND {_sustained(rule)}", "1", columns=("health_reasons",))


_PORT_LABELS: Final = ("cluster", "node", "device", "port")


def _ignored(rule: NetworkPortDown | NetworkPortDegraded) -> str:
    names = ", ".join("'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'" for name in rule.ignore_ports)
    return f"NOT has(CAST([{names}] AS Array(String)), concat(device, '/', toString(port)))"


def _port_down(rule: NetworkPortDown) -> AlertQuery:
    text = sql(
        """
        SELECT cluster, node, device, toString(port) AS port, toFloat64(argMax(ifNull(state, 0), time)) AS state
        FROM
        (
            SELECT cluster, node, device, port, state, time, interval_ms,
                toUInt8(ifNull(state != 4 OR phys_state != 5, 0) AND ifNull(phys_state != 3, 1)) AS c
            FROM network_ports
            WHERE $__timeFilter(time)
                AND {ignored}
        )
        GROUP BY cluster, node, device, port
        HAVING max(time) > $__toTime - INTERVAL {age} SECOND
            AND argMax(c, time) = 1
            AND ({sustained} OR {for_ms} = 0)
        ORDER BY cluster, node, device, port
        """,
        ignored=_ignored(rule), age=str(rule.max_age_ms // 1000), sustained=_sustained_reports(rule),
        for_ms=str(rule.for_ms),
    )
    # The value is the state (1 DOWN ... 3 ARMED; 4 when only the physical link is down): any row fires.
    return AlertQuery(text, max(rule.for_ms, rule.max_age_ms) // 1000, _PORT_LABELS, "state", "gt", -1.0)


def _port_degraded(rule: NetworkPortDegraded) -> AlertQuery:
    rises = " OR ".join(f"{formulas.increase(c)} >= {n}" for c, n in rule.thresholds.items())
    text = sql(
        """
        SELECT cluster, node, device, toString(port) AS port,
            toFloat64({total}) AS errors
        FROM network_ports
        WHERE $__timeFilter(time)
            AND {ignored}
        GROUP BY cluster, node, device, port
        HAVING max(time) > $__toTime - INTERVAL {age} SECOND
            AND ({rises})
        ORDER BY cluster, node, device, port
        """,
        total=" + ".join(formulas.increase(c) for c in rule.thresholds), ignored=_ignored(rule),
        age=str(rule.max_age_ms // 1000), rises=rises,
    )
    return AlertQuery(text, duration_ms(rule.window) // 1000, _PORT_LABELS, "errors")


def _missing(rule: GpuMissing) -> AlertQuery:
    text = sql(
        """
        SELECT cluster, node, gpu, toFloat64(any(deficit)) AS missing
        FROM
        (
            SELECT cluster, node,
                argMax(gpus_expected, time) - argMax(gpus_enumerated, time) AS deficit,
                argMax(gpus_missing, time) AS named
            FROM
            (
                SELECT cluster, node, time, interval_ms, gpus_enumerated, gpus_expected, gpus_missing,
                    toUInt8(ifNull(gpus_enumerated < gpus_expected, 0)) AS c
                FROM agent_reports
                WHERE $__timeFilter(time)
            )
            GROUP BY cluster, node
            HAVING max(time) > $__toTime - INTERVAL {age} SECOND
                AND argMax(c, time) = 1
                AND ({sustained} OR {for_ms} = 0)
        )
        ARRAY JOIN if(empty(named), [''], named) AS gpu
        GROUP BY cluster, node, gpu
        ORDER BY cluster, node, gpu
        """,
        age=str(rule.max_age_ms // 1000), sustained=_sustained_reports(rule), for_ms=str(rule.for_ms),
    )
    return AlertQuery(text, max(rule.for_ms, rule.max_age_ms) // 1000, ("cluster", "node", "gpu"), "missing")


def _drift(rule: NodeConfigDrift) -> AlertQuery:
    fields = ", ".join(f"'{f}'" for f in rule.fields)
    text = sql(
        """
        WITH latest AS
        (
            SELECT gpu_uuid, argMax(at_cluster, time) AS cluster, argMax(at_node, time) AS node,
                argMax(of_model, time) AS model, field, argMax(found, time) AS found
            FROM
            (
                SELECT cluster AS at_cluster, node AS at_node, gpu_uuid, model AS of_model, time,
                    arrayJoin(arrayFilter(p -> p.2 IS NOT NULL AND has([{fields}], p.1), [
                        ('driver_version', driver_version), ('vbios_version', vbios_version),
                        ('ecc_mode', if(ecc_mode IS NULL, NULL, toString(ecc_mode))),
                        ('persistence_mode', if(persistence_mode IS NULL, NULL, toString(persistence_mode)))
                    ])) AS pair,
                    pair.1 AS field, assumeNotNull(pair.2) AS found
                FROM gpu_inventory
                WHERE $__timeFilter(time)
            )
            GROUP BY gpu_uuid, field
        ),
        majority AS
        (
            SELECT model, field, argMax(found, n) AS common, max(n) AS common_n, sum(n) AS total
            FROM (SELECT model, field, found, count() AS n FROM latest GROUP BY model, field, found)
            GROUP BY model, field
            HAVING total >= {min_gpus} AND common_n * 2 > total
        )
        SELECT l.cluster AS cluster, l.node AS node, l.field AS field, l.model AS model, toFloat64(count()) AS gpus
        FROM latest AS l
        INNER JOIN majority AS m ON m.model = l.model AND m.field = l.field
        WHERE l.found != m.common
        GROUP BY cluster, node, field, model
        ORDER BY cluster, node, field, model
        """,
        fields=fields, min_gpus=str(rule.min_gpus),
    )
    return AlertQuery(text, duration_ms(rule.window) // 1000, ("cluster", "node", "field", "model"), "gpus")


_BUILDERS: Final[dict[type, Callable[[Any], AlertQuery]]] = {
    AgentSpoolDropping: _agent_counter,
    AgentSendErrors: _agent_counter,
    GpuClaimConflict: _claim_conflict,
    AgentAllocationUnknown: _agent_counter,
    GpuFailing: _failing,
    GpuDegraded: _degraded,
    GpuIdleAllocated: _idle,
    GpuHeldNoProcess: _held,
    GpuBusyUnallocated: _busy,
    NodeSilent: _silent,
    MfuBelowTarget: _mfu,
    JobStalled: _stalled,
    JobStraggler: _straggler,
    GpuRecoveryAction: _recovery,
    NodeRecoveryAction: _node_recovery,
    FabricDegraded: _fabric,
    NetworkPortDown: _port_down,
    NetworkPortDegraded: _port_degraded,
    GpuMissing: _missing,
    NodeConfigDrift: _drift,
}

_SUMMARIES: Final[dict[type, str]] = {
    AgentSpoolDropping: (
        "The agent on {{ $labels.node }} ({{ $labels.cluster }}) dropped {{ $values.A.Value }} unsent messages "
        "in the window: its spool was full, those samples are lost"
    ),
    AgentSendErrors: (
        "The agent on {{ $labels.node }} ({{ $labels.cluster }}) failed {{ $values.A.Value }} sends to Kafka "
        "in the window"
    ),
    GpuClaimConflict: (
        "GPU {{ $labels.gpu }} is reported by {{ $values.A.Value }} streams (cluster/node/boot id) for the same "
        "time: billed once, the other streams' overlapping time is not billed"
    ),
    AgentAllocationUnknown: (
        "The agent on {{ $labels.node }} ({{ $labels.cluster }}) could not attribute {{ $values.A.Value }} "
        "GPU-intervals in the window: billed to nobody"
    ),
    GpuFailing: "GPU {{ $labels.gpu_index }} on {{ $labels.node }} ({{ $labels.cluster }}) is failing",
    GpuDegraded: "GPU {{ $labels.gpu_index }} on {{ $labels.node }} ({{ $labels.cluster }}) is degraded",
    GpuIdleAllocated: (
        "Tenant {{ $labels.tenant }} holds GPU {{ $labels.gpu_index }} on {{ $labels.node }} idle: "
        "{{ humanize $values.A.Value }} GPU-hours in the window"
    ),
    GpuHeldNoProcess: (
        "Tenant {{ $labels.tenant }} holds GPU {{ $labels.gpu_index }} on {{ $labels.node }} with no process: "
        "{{ humanize $values.A.Value }} GPU-hours in the window"
    ),
    GpuBusyUnallocated: "GPU {{ $labels.gpu_index }} on {{ $labels.node }} is allocated to no one but busy",
    NodeSilent: "Node {{ $labels.node }} ({{ $labels.cluster }}) has sent nothing for {{ $values.A.Value }} s",
    MfuBelowTarget: "MFU {{ humanizePercentage $values.A.Value }} over the window, under the target",
    JobStalled: (
        "Job {{ $labels.job }} of tenant {{ $labels.tenant }} looks hung: {{ $values.A.Value }} GPU(s) busy "
        "with no tensor work at near-idle power"
    ),
    JobStraggler: (
        "Job {{ $labels.job }} ({{ $labels.tenant }}) is held back by GPU {{ $labels.gpu_index }} on "
        "{{ $labels.node }}"
    ),
    GpuRecoveryAction: (
        "GPU {{ $labels.gpu_index }} on {{ $labels.node }} ({{ $labels.cluster }}) needs a remedy: NVML recovery "
        "action {{ $values.A.Value }}"
    ),
    NodeRecoveryAction: (
        "Node {{ $labels.node }} ({{ $labels.cluster }}) needs a reboot: {{ $values.A.Value }} GPU(s) ask for it"
    ),
    FabricDegraded: (
        "GPU {{ $labels.gpu_index }} on {{ $labels.node }} ({{ $labels.cluster }}): NVSwitch fabric unhealthy"
    ),
    NetworkPortDown: (
        "Port {{ $labels.device }}/{{ $labels.port }} on {{ $labels.node }} ({{ $labels.cluster }}) is down"
    ),
    NetworkPortDegraded: (
        "Port {{ $labels.device }}/{{ $labels.port }} on {{ $labels.node }} ({{ $labels.cluster }}): "
        "{{ $values.A.Value }} new errors in the window"
    ),
    GpuMissing: (
        "Node {{ $labels.node }} ({{ $labels.cluster }}) misses {{ $values.A.Value }} GPU(s) ({{ $labels.gpu }})"
    ),
    NodeConfigDrift: (
        "Node {{ $labels.node }} ({{ $labels.cluster }}): {{ $labels.field }} of {{ $values.A.Value }} "
        "{{ $labels.model }} GPU(s) differs from the fleet's majority"
    ),
}


def query_for(rule: AnyRule) -> AlertQuery:
    """The Grafana query mirroring one evaluator rule."""
    return _BUILDERS[type(rule)](rule)


def _uid(name: str) -> str:
    out = "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-")
    return f"gpufleet-{out}"[:40]


def grafana_rule(rule: AnyRule, runbook_base: str | None = None) -> JSON:
    """One rule in Grafana's file-provisioning shape (also what its provisioning API takes); a relative
    `runbook_url` goes under `runbook_base` (`alerts.runbook_base_url`), as in the evaluator's alerts."""
    q = query_for(rule)
    summary = _SUMMARIES[type(rule)]
    if isinstance(rule, MfuBelowTarget) and "tenant" in rule.by:
        summary = "Tenant {{ $labels.tenant }}: " + summary
    annotations = {"summary": summary, "description": (type(rule).__doc__ or "").strip()}
    if runbook := rule.annotations.get("runbook_url"):
        annotations["runbook_url"] = runbook_link(runbook, runbook_base)
    return {
        "uid": _uid(rule.name),
        "title": rule.name,
        "condition": "B",
        "data": [
            {
                "refId": "A",
                "relativeTimeRange": {"from": q.window_s, "to": 0},
                "datasourceUid": DS_UID,
                "model": {
                    "datasource": {"type": DS_TYPE, "uid": DS_UID},
                    "editorType": "sql",
                    "format": TABLE,
                    "intervalMs": 1000,
                    "maxDataPoints": 43200,
                    "queryType": "table",
                    "rawSql": q.sql,
                    "refId": "A",
                },
            },
            {
                "refId": "B",
                "datasourceUid": EXPR_UID,
                "model": {
                    "conditions": [{"evaluator": {"params": [q.threshold], "type": q.evaluator}}],
                    "datasource": {"type": EXPR_UID, "uid": EXPR_UID},
                    "expression": "A",
                    "refId": "B",
                    "type": "threshold",
                },
            },
        ],
        "noDataState": "OK",
        "execErrState": "Error",
        "for": "0s",
        "labels": {"severity": rule.severity, **rule.labels},
        "annotations": annotations,
        "isPaused": False,
    }


def rules() -> list[AnyRule]:
    """The evaluator's shipped rules, the ones mirrored here."""
    return list(packaged_rules(DEFAULT_RULES).rules)


def provisioning(runbook_base: str | None = None) -> JSON:
    """The whole `provisioning/alerting/gpufleet-rules.yaml` document (committed with repository-relative
    runbook links; `gpufleet dashboards deploy` puts them under `alerts.runbook_base_url`)."""
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": ORG_ID,
                "name": GROUP,
                "folder": FOLDER_TITLE,
                "interval": GROUP_INTERVAL,
                "rules": [grafana_rule(r, runbook_base) for r in rules()],
            }
        ],
    }


def labels_of(rule: JSON) -> tuple[str, ...]:
    """The label columns a generated rule's query returns (for checks)."""
    for r in rules():
        if r.name == rule["title"]:
            return query_for(r).labels
    raise KeyError(rule["title"])
