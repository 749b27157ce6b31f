"""The gate: one cheap query, run before the rules', saying which rules can find nothing this evaluation.

A gated rule's query returns no rows whenever its gate count is 0, so the evaluator skips it: per-GPU
rules (no GPU meets the rule's candidate condition over `gpu_health_1m`, checked for all of them in one
scan of the `gpu_health_1h` hours holding the widest window any reads: their aggregates cover those
minutes and more, and each condition that holds on some rows holds on more, so this only adds
candidates), GpuClaimConflict (no GPU two streams reported at once in `gpu_claim_homes`) and JobStalled
(no stall-like sample of a job in the fresh-data window: each GPU of a stalled job has one, its newest).
Rules not gated always run, and so does a rule holding open alerts (the evaluator's choice: its query
closes them or, failing, keeps them); the rules that do run read exactly what they read without the gate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from gpufleet.pipeline.alerts.candidate import Query, time_window
from gpufleet.pipeline.alerts.queries import (
    CLAIM_SUSPECTS,
    claim_suspects_params,
    gpu_candidates,
    is_per_gpu,
)
from gpufleet.pipeline.alerts.rules import AnyRule, GpuClaimConflict, GpuRule, JobStalled
from gpufleet.pipeline.queries import job_signals

_PLACEHOLDER: Final = re.compile(r"\{(\w+):")
_GPU_FLAGS: Final = """
    SELECT {flags}
    FROM {{db:Identifier}}.gpu_health_1h
    WHERE hour >= toStartOfHour(toDateTime(intDiv({{gate_from_ms:Int64}}, 1000), 'UTC'))
      AND hour <= toDateTime(intDiv({{gate_now_ms:Int64}}, 1000), 'UTC')
    GROUP BY cluster, node, gpu_index
"""


def _scoped(sql: str, params: Mapping[str, Any], prefix: str) -> tuple[str, dict[str, Any]]:
    """`sql` with each placeholder named in `params` renamed `prefix` + name (so rules' parameters never clash)."""
    out = _PLACEHOLDER.sub(lambda m: "{" + prefix + m[1] + ":" if m[1] in params else m[0], sql)
    return out, {prefix + k: v for k, v in params.items()}


def gate(rules: Sequence[AnyRule], now_ms: int) -> tuple[Query, dict[str, int]] | None:
    """The gate query at `now_ms` (one row) and which column is which rule's count (by position in `rules`);
    None when no rule is gated."""
    params: dict[str, Any] = {}
    flags: list[str] = []
    scalars: list[str] = []
    columns: dict[str, int] = {}
    gpu_from = now_ms
    for i, rule in enumerate(rules):
        name = f"g{i}"
        if is_per_gpu(rule):
            assert isinstance(rule, GpuRule)
            cond, cond_params, from_ms = gpu_candidates(rule, now_ms)
            cond, scoped = _scoped(cond, cond_params, f"{name}_")
            flags.append(f"ifNull({cond}, 0) AS {name}")
            scalars.append(f"countIf({name}) AS {name}")
            gpu_from = min(gpu_from, from_ms)
        elif isinstance(rule, GpuClaimConflict):
            sql, scoped = _scoped(f"WITH {CLAIM_SUSPECTS} SELECT count() FROM suspects",
                                  claim_suspects_params(rule, now_ms), f"{name}_")
            scalars.append(f"({sql}) AS {name}")
        elif isinstance(rule, JobStalled):
            sql = job_signals.stall_like_count("{db:Identifier}.gpu_samples", time_window(), job_signals.STALL_BOUND)
            sql, scoped = _scoped(sql, {"from_ms": now_ms - rule.max_age_ms, "now_ms": now_ms,
                                        **job_signals.stall_params(rule)}, f"{name}_")
            scalars.append(f"({sql}) AS {name}")
        else:
            continue
        params.update(scoped)
        columns[name] = i
    if not columns:
        return None
    source = "system.one"
    if flags:
        source = "(" + _GPU_FLAGS.format(flags=",\n           ".join(flags)) + ")"
        params.update(gate_from_ms=gpu_from, gate_now_ms=now_ms)
    return Query(f"SELECT {', '.join(scalars)} FROM {source}", params), columns


def quiet(columns: Mapping[str, int], row: Mapping[str, Any]) -> set[int]:
    """The positions of the rules whose gate count is 0: their queries would return no rows."""
    return {i for name, i in columns.items() if int(row[name]) == 0}
