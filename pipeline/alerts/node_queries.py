"""Pure functions for the node-side rule kinds: a rule and an evaluation instant -> SQL; rows -> candidates.

* `node_recovery_action`: the per-GPU recovery-action rows (`queries`' GPU query) merged per node and action;
* `network_port_down` / `network_port_degraded`: `network_ports`, one series per (cluster, node, device,
  port): "sustained for D" as `formulas.sustained` over the reports ending in `(now - D, now]`, counter
  rises as `increase()` does;
* `gpu_missing`: `agent_reports`, the GPUs a node should have against those its reports list;
* `node_config_drift`: each GPU's newest inventory (`gpu_inventory`) against the majority of its model.

As in `queries`, every value is a bound parameter; identifiers come from this module or validated rules,
and only samples with `time <= now` count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from gpufleet.node_facts import IB_PHYS_STATES, IB_STATES, RECOVERY_ACTIONS, recovery_name
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
    GpuMissing,
    NetworkPortDegraded,
    NetworkPortDown,
    NodeConfigDrift,
    NodeRecoveryAction,
    PortRule,
    duration_ms,
    format_duration,
)
from gpufleet.pipeline.queries import formulas

REMEDIES: Final[dict[str, str]] = {
    "gpu_reset": "stop the GPU's processes (drain its jobs), then reset it: nvidia-smi -r -i <index>",
    "node_reboot": "drain the node and reboot it: a GPU reset is not enough",
    "drain_p2p": "stop the peer-to-peer (NVLink) traffic of the GPU's jobs; NVML then names the remedy",
    "drain_and_reset": "the GPU runs at reduced capacity: schedule nothing new on it, let its jobs reach a "
                       "checkpoint, then reset it (nvidia-smi -r -i <index>)",
    "recover_imex_domain": "recover the NVLink (IMEX) domain: restart the IMEX daemons of the domain's nodes",
    "bus_reset": "stop the GPU's processes, then reset its PCIe bus (nvidia-smi -r -i <index>; reboot if refused)",
    "system_reboot": "drain the node and reboot the whole system (a cold boot if a warm reboot does not clear it)",
}
"""What on-call runs for each recovery action (docs/alerts.md, GpuNeedsReset / NodeNeedsReboot)."""

RECOVERY_CODES: Final = {name: code for code, name in RECOVERY_ACTIONS.items()}
_WINDOW: Final = time_window()


def sustained_reports(since_ms: str, cover_ms: str) -> str:
    """"Sustained for D" over a node's reports (a port's, or the node's own) whose condition is the column `c`:
    no report ending in `(since_ms, now]` fails it, they reach back to `since_ms` (now - D) and their intervals
    cover `cover_ms` (coverage x D). As `formulas.sustained`, but over `interval_ms` (a report has no claimed
    GPU time) and only over the reports after `since_ms`: the query reads back further (`max_sample_age`)
    to find the newest report, which must not make `for` longer. Both arguments are SQL (Unix ms): bound
    parameters here, Grafana macros in the mirrored rules (dashboards/alerting.py)."""
    after = f"toUnixTimestamp64Milli(time) > {since_ms}"
    return (f"countIf(c = 0 AND {after}) = 0"
            f" AND toUnixTimestamp64Milli(minIf(time, {after})) - argMinIf(interval_ms, time, {after}) <= {since_ms}"
            f" AND sumIf(interval_ms, {after}) >= {cover_ms}")


_SUSTAINED: Final = sustained_reports("{sustained_since_ms:Int64}", "{sustained_cover_ms:Float64}")
_PORT_KEYS: Final = "cluster, node, device, port"


def remedy(action: str) -> str:
    return REMEDIES.get(action, "see the NVML documentation of this recovery action")


# -- recovery actions, per node ----------------------------------------------------------------


def node_recovery_candidates(rule: NodeRecoveryAction, gpus: Sequence[Candidate]) -> list[Candidate]:
    """The per-GPU candidates of `rule`'s GPU query, one per (cluster, node, action): firing when any GPU's is."""
    groups: dict[tuple[str, str, str], list[Candidate]] = {}
    for c in gpus:
        groups.setdefault((c.labels["cluster"], c.labels["node"], c.context["action"]), []).append(c)
    out = []
    for (cluster, node, action), members in sorted(groups.items()):
        indexes = sorted(int(m.labels["gpu_index"]) for m in members)
        labels = {"cluster": cluster, "node": node, "action": action}
        ctx = {**labels, "remedy": remedy(action), "gpus": len(members),
               "gpu_indexes": ", ".join(map(str, indexes)), "for": format_duration(rule.for_ms),
               "value": float(len(members))}
        out.append(Candidate(clean_labels(labels), any(m.firing for m in members), min(m.since_ms for m in members),
                             max(m.last_ms for m in members), float(len(members)), ctx))
    return out


# -- network ports -----------------------------------------------------------------------------

_PORT_DOWN_SQL: Final = f"""
SELECT {_PORT_KEYS}, argMax(link_layer, time) AS link_layer,
       argMax(state, time) AS last_state, argMax(phys_state, time) AS last_phys,
       {run_columns(_SUSTAINED)}
FROM (
    SELECT {_PORT_KEYS}, link_layer, state, phys_state, time, interval_ms,
           toUInt8(ifNull(state != 4 OR phys_state != 5, 0) AND ifNull(phys_state != 3, 1)) AS c
    FROM {{db:Identifier}}.network_ports
    WHERE {_WINDOW} AND NOT has({{ignore:Array(String)}}, concat(device, '/', toString(port)))
)
GROUP BY {_PORT_KEYS}
HAVING last_ms > {{fresh_ms:Int64}} AND last_c = 1
ORDER BY {_PORT_KEYS}
"""
"""Down: state not ACTIVE (4) or physical state not LinkUp (5); Disabled (3) is an operator's choice."""


def _first_rise(column: str) -> str:
    """When the counter first rose within the window (Unix ms; 0 if it did not)."""
    pairs = f"arraySort(p -> p.1, groupArrayIf((time, assumeNotNull({column})), {column} IS NOT NULL))"
    return (f"toUnixTimestamp64Milli(arrayFirst((p, d) -> d != 0, {pairs}, "
            f"arrayDifference(arrayMap(p -> toInt64(p.2), {pairs}))).1)")


PORT_COUNTERS: Final = ("link_downed", "link_error_recovery", "symbol_error", "port_rcv_errors", "port_xmit_discards")
_PORT_DEGRADED_SQL: Final = f"""
SELECT {_PORT_KEYS}, argMax(link_layer, time) AS link_layer,
       toUnixTimestamp64Milli(max(time)) AS last_ms,
       {", ".join(f"{formulas.increase(c)} AS inc_{c}" for c in PORT_COUNTERS)},
       {", ".join(f"{_first_rise(c)} AS rise_{c}" for c in PORT_COUNTERS)}
FROM {{db:Identifier}}.network_ports
WHERE {_WINDOW} AND NOT has({{ignore:Array(String)}}, concat(device, '/', toString(port)))
GROUP BY {_PORT_KEYS}
HAVING last_ms > {{fresh_ms:Int64}}
   AND ({" OR ".join(f"inc_{c} >= {{min_{c}:Int64}}" for c in PORT_COUNTERS)})
ORDER BY {_PORT_KEYS}
"""


def _port_down(rule: NetworkPortDown, now_ms: int) -> Query:
    return Query(_PORT_DOWN_SQL, {**sustained_params(rule, now_ms), "ignore": rule.ignore_ports})


def _port_degraded(rule: NetworkPortDegraded, now_ms: int) -> Query:
    params: dict[str, Any] = {"from_ms": now_ms - duration_ms(rule.window), "now_ms": now_ms,
                              "fresh_ms": now_ms - rule.max_age_ms, "ignore": rule.ignore_ports}
    params.update({f"min_{c}": n for c, n in rule.thresholds.items()})
    return Query(_PORT_DEGRADED_SQL, params)


def _port_context(row: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    labels = {"cluster": row["cluster"], "node": row["node"], "device": row["device"], "port": str(row["port"])}
    ctx = {**labels, "port_name": f"{row['device']}/{row['port']}", "link_layer": row["link_layer"] or "unknown"}
    return labels, ctx


def _port_down_candidate(rule: NetworkPortDown, row: Mapping[str, Any]) -> Candidate:
    labels, ctx = _port_context(row)
    state, phys = row["last_state"], row["last_phys"]
    ctx.update(state=IB_STATES.get(state, "unknown") if state is not None else "unknown",
               phys_state=IB_PHYS_STATES.get(phys, "unknown") if phys is not None else "unknown",
               **{"for": format_duration(rule.for_ms)})
    since = run_since(row)
    firing = rule.for_ms == 0 or bool(row["sustained"])
    value = float(state) if state is not None else None
    ctx["value"] = value
    return Candidate(clean_labels(labels), firing, since, int(row["last_ms"]), value, ctx)


def _port_degraded_candidate(rule: NetworkPortDegraded, row: Mapping[str, Any]) -> Candidate:
    labels, ctx = _port_context(row)
    window = format_duration(duration_ms(rule.window))
    risen = [(c, int(row[f"inc_{c}"])) for c in PORT_COUNTERS if row[f"inc_{c}"] >= rule.thresholds[c]]
    ctx.update(reasons=", ".join(f"{c} +{n} in {window}" for c, n in risen), window=window)
    since = min(int(row[f"rise_{c}"]) for c, _ in risen)
    value = float(sum(n for _, n in risen))
    ctx["value"] = value
    return Candidate(clean_labels(labels), True, since, int(row["last_ms"]), value, ctx)


# -- missing GPUs ------------------------------------------------------------------------------

_MISSING_SQL: Final = f"""
SELECT cluster, node,
       argMax(gpus_expected, time) AS expected, argMax(gpus_enumerated, time) AS enumerated,
       argMax(gpus_missing, time) AS missing,
       {run_columns(_SUSTAINED)}
FROM (
    SELECT cluster, node, time, interval_ms, gpus_enumerated, gpus_expected, gpus_missing,
           toUInt8(ifNull(gpus_enumerated < gpus_expected, 0)) AS c
    FROM {{db:Identifier}}.agent_reports
    WHERE {_WINDOW}
)
GROUP BY cluster, node
HAVING last_ms > {{fresh_ms:Int64}} AND last_c = 1
ORDER BY cluster, node
"""


def _missing(rule: GpuMissing, now_ms: int) -> Query:
    return Query(_MISSING_SQL, sustained_params(rule, now_ms))


def _missing_candidates(rule: GpuMissing, row: Mapping[str, Any]) -> list[Candidate]:
    expected, enumerated = int(row["expected"]), int(row["enumerated"])
    named = list(row["missing"]) or [""]  # GPUs it cannot name: one alert for the node
    since = run_since(row)
    firing = rule.for_ms == 0 or bool(row["sustained"])
    out = []
    for gpu in named:
        labels = {"cluster": row["cluster"], "node": row["node"], "gpu": gpu}
        ctx = {**labels, "gpu": gpu or "unknown", "expected": expected, "enumerated": enumerated,
               "missing": ", ".join(n for n in named if n) or f"{expected - enumerated} unnamed",
               "for": format_duration(rule.for_ms), "value": float(expected - enumerated)}
        out.append(Candidate(clean_labels(labels), firing, since, int(row["last_ms"]), float(expected - enumerated),
                             ctx))
    return out


# -- configuration drift -----------------------------------------------------------------------

_DRIFT_SQL: Final = f"""
WITH latest AS (
    SELECT gpu_uuid, argMax(at_cluster, time) AS cluster, argMax(at_node, time) AS node,
           argMax(of_model, time) AS model, field,
           argMax(found, time) AS found, toUnixTimestamp64Milli(max(time)) AS seen_ms
    FROM (
        SELECT cluster AS at_cluster, node AS at_node, gpu_uuid, model AS of_model, time,
               arrayJoin(arrayFilter(p -> p.2 IS NOT NULL AND has({{fields:Array(String)}}, p.1), [
                   ('driver_version', driver_version), ('vbios_version', vbios_version),
                   ('ecc_mode', if(ecc_mode IS NULL, NULL, toString(ecc_mode))),
                   ('persistence_mode', if(persistence_mode IS NULL, NULL, toString(persistence_mode)))])) AS pair,
               pair.1 AS field, assumeNotNull(pair.2) AS found
        FROM {{db:Identifier}}.gpu_inventory
        WHERE {_WINDOW}
    )
    GROUP BY gpu_uuid, field
),
majority AS (
    SELECT model, field, argMax(found, n) AS common, max(n) AS common_n, sum(n) AS total
    FROM (SELECT model, field, found, count() AS n FROM latest GROUP BY model, field, found)
    GROUP BY model, field
    HAVING total >= {{min_gpus:Int64}} AND common_n * 2 > total
)
SELECT l.cluster AS cluster, l.node AS node, l.field AS field, l.model AS model,
       arrayStringConcat(arraySort(groupUniqArray(l.found)), ', ') AS found, any(m.common) AS majority,
       count() AS gpus, min(l.seen_ms) AS since_ms, max(l.seen_ms) AS last_ms
FROM latest AS l
INNER JOIN majority AS m ON m.model = l.model AND m.field = l.field
WHERE l.found != m.common
GROUP BY cluster, node, field, model
ORDER BY cluster, node, field, model
"""
"""Each GPU's newest value of each field in the window (from `gpu_inventory`, the inventory reads only: a
row per GPU and read, not every sample), the majority value per model and field (more than half of that
model's GPUs), and per node the fields whose GPUs differ from it. A GPU counts once, on its newest node."""


def _drift(rule: NodeConfigDrift, now_ms: int) -> Query:
    return Query(_DRIFT_SQL, {"from_ms": now_ms - duration_ms(rule.window), "now_ms": now_ms,
                              "fields": list(rule.fields), "min_gpus": rule.min_gpus})


def _drift_candidate(rule: NodeConfigDrift, row: Mapping[str, Any]) -> Candidate:
    labels = {"cluster": row["cluster"], "node": row["node"], "field": row["field"], "model": row["model"]}
    ctx = {**labels, "found": row["found"], "majority": row["majority"], "gpus": int(row["gpus"]),
           "window": format_duration(duration_ms(rule.window)), "value": float(row["gpus"])}
    return Candidate(clean_labels(labels), True, int(row["since_ms"]), int(row["last_ms"]), float(row["gpus"]), ctx)


# -- dispatch ----------------------------------------------------------------------------------

NodeSignalRule = NetworkPortDown | NetworkPortDegraded | GpuMissing | NodeConfigDrift


def build(rule: NodeSignalRule, now_ms: int) -> Query:
    if isinstance(rule, NetworkPortDown):
        return _port_down(rule, now_ms)
    if isinstance(rule, NetworkPortDegraded):
        return _port_degraded(rule, now_ms)
    if isinstance(rule, GpuMissing):
        return _missing(rule, now_ms)
    return _drift(rule, now_ms)


def candidates(rule: NodeSignalRule, rows: Sequence[Mapping[str, Any]]) -> list[Candidate]:
    if isinstance(rule, NetworkPortDown):
        return [_port_down_candidate(rule, r) for r in rows]
    if isinstance(rule, NetworkPortDegraded):
        return [_port_degraded_candidate(rule, r) for r in rows]
    if isinstance(rule, GpuMissing):
        return [c for r in rows for c in _missing_candidates(rule, r)]
    return [_drift_candidate(rule, r) for r in rows]


def is_node_signal(rule: object) -> bool:
    """Whether `rule` is one of the kinds this module builds (`PortRule`, `GpuMissing`, `NodeConfigDrift`)."""
    return isinstance(rule, PortRule | GpuMissing | NodeConfigDrift)


def recovery_code(name: str) -> int:
    return RECOVERY_CODES[name]


__all__ = ["REMEDIES", "build", "candidates", "is_node_signal", "node_recovery_candidates", "recovery_code",
           "recovery_name", "remedy"]
