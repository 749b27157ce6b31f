"""The capacity waterfall: where installed GPU-seconds go, from the rollups.

Whole GPUs: the policy-split sums from the fleet rollup, *installed* from one row per GPU seen and hour
(`rollups.rows`); with MIG instances in scope, every sum per device from `gpu_usage_1m` (shares).
Design notes: docs/design-notes.md#pipeline-queries-waterfall-py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from gpufleet.config import StallConfig
from gpufleet.pipeline.queries import formulas, rollups, stalls
from gpufleet.pipeline.queries.policy import IDLE_MS, Policy
from gpufleet.pipeline.queries.window import WINDOW, Window

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

_SCOPE_COLUMNS: Final = ("cluster", "node", "model")
_HEALTHY: Final = "NOT has({excl:Array(String)}, toString(health))"
_GPU_SUMS: Final = (
    "SELECT argMax(model, claimed_ms), sum(claimed_ms), "
    "sumIf(claimed_ms, has({excl:Array(String)}, toString(health))), "
    f"sumIf(claimed_ms, {_HEALTHY} AND tenant = ''), "
    f"sumIf({IDLE_MS}, {_HEALTHY} AND tenant != ''), "
    f"{formulas.ACHIEVED_FLOP}, sum(mfu_ms), sum(measured_ms), max(model_peak_flop_s), max(share_num), max(share_den)"
)
"""Per-GPU sums with the policy applied (bind `excl` and `idle_pct`)."""
_SUMS: Final = (
    "SELECT sumIf(claimed_ms, has({excl:Array(String)}, toString(health))), "
    f"sumIf(claimed_ms, {_HEALTHY} AND tenant = ''), sumIf({IDLE_MS}, {_HEALTHY} AND tenant != ''), "
    f"{formulas.ACHIEVED_FLOP}, sum(mfu_ms), sum(measured_ms) FROM "
)
"""The scope's sums with the policy applied (bind `excl` and `idle_pct`); the rollup rows follow."""
_SEEN: Final = (
    "SELECT argMax(model, claimed_ms), sum(claimed_ms), max(model_peak_flop_s), max(share_num), max(share_den) "
    "FROM {rows} GROUP BY cluster, node, gpu_uuid ORDER BY cluster, node, gpu_uuid"
)
"""Each device seen in the window: its model, claimed milliseconds, peak FLOP/s and share of its GPU."""
_DB: Final = "{db:Identifier}."
_SEEN_COLUMNS: Final = ("cluster", "node", "gpu_uuid", "model", "claimed_ms", "model_peak_flop_s", "share_num",
                        "share_den")


@dataclass(frozen=True)
class HardwareScope:
    """Which GPUs: all of them when every field is None."""

    cluster: str | None = None
    node: str | None = None
    model: str | None = None

    def sql(self) -> tuple[str, dict[str, str]]:
        parts, params = ["1"], {}
        for name in _SCOPE_COLUMNS:
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name} = {{s_{name}:String}}")
                params[f"s_{name}"] = value
        return " AND ".join(parts), params


@dataclass(frozen=True)
class GpuTotals:
    """One GPU's rollup sums over the window (milliseconds and FLOPs)."""

    model: str
    claimed_ms: int
    """Time the GPU's samples claimed (each second once per node: docs/aggregations.md, "Claims")."""
    unhealthy_ms: int
    unallocated_ms: int
    idle_ms: int
    achieved_flop: float
    mfu_ms: int
    measured_ms: int
    peak_flop_s: float | None
    share: tuple[int, int] = (1, 1)
    """The device's share of its GPU (a MIG instance: compute slices held, the GPU's); its milliseconds count
    as GPU-milliseconds x share. `peak_flop_s` is already the share's (the ingester scales it)."""


SHARE_UNIT: Final = 840
"""Time is summed in 1/840 ms: a multiple of every GPU's compute slice count (1 to 8), so MIG shares stay exact."""


def _gpu_ms(units: int) -> int | float:
    """GPU-milliseconds from 1/840 ms units: an int when whole (always, without MIG)."""
    return units // SHARE_UNIT if units % SHARE_UNIT == 0 else units / SHARE_UNIT


@dataclass(frozen=True)
class Waterfall:
    window_ms: int
    gpus: int
    """Devices that reported (a MIG instance is one)."""
    installed_ms: int | float
    unknown_ms: int | float
    unhealthy_ms: int | float
    unallocated_ms: int | float
    idle_allocated_ms: int | float
    busy_ms: int | float
    achieved_flop: float
    installed_peak_flop: float
    """Peak FLOP/s x installed seconds, over GPUs of known models."""
    achieved_share_of_peak: float | None
    measured_coverage: float | None
    unknown_models: list[dict[str, Any]] = field(default_factory=list)
    stalled_ms: int = 0
    """Allocated, healthy, not idle, but in a job's stall (still billed)."""

    def steps(self) -> list[tuple[str, float]]:
        """The waterfall as (label, GPU-seconds), installed first and busy last."""
        return [
            ("installed", self.installed_ms / 1000),
            ("unknown (not reporting)", -self.unknown_ms / 1000),
            ("unhealthy", -self.unhealthy_ms / 1000),
            ("unallocated", -self.unallocated_ms / 1000),
            ("allocated but idle", -self.idle_allocated_ms / 1000),
            ("stalled (hung jobs, billed)", -self.stalled_ms / 1000),
            ("busy", self.busy_ms / 1000),
        ]

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["steps"] = [{"step": s, "gpu_seconds": v} for s, v in self.steps()]
        return out


def build(gpus: Sequence[GpuTotals], window_ms: int, stalled_ms: int = 0) -> Waterfall:
    """The waterfall from per-GPU totals and the stalled milliseconds, a part of their busy time (pure). Time in
    1/840 ms (`SHARE_UNIT`, so MIG shares stay exact) until the end."""
    installed = unknown = unhealthy = unallocated = idle = mfu_ms = measured = 0
    achieved = peak = 0.0
    unknown_models: dict[str, int] = {}
    for g in gpus:
        unit = g.share[0] * (SHARE_UNIT // max(1, g.share[1]))
        gpu_installed = max(window_ms, g.claimed_ms)
        installed += gpu_installed * unit
        unknown += (gpu_installed - g.claimed_ms) * unit
        unhealthy += g.unhealthy_ms * unit
        unallocated += g.unallocated_ms * unit
        idle += g.idle_ms * unit
        achieved += g.achieved_flop
        mfu_ms += g.mfu_ms
        measured += g.measured_ms
        if g.peak_flop_s is None:
            unknown_models[g.model] = unknown_models.get(g.model, 0) + gpu_installed * unit
        else:
            peak += g.peak_flop_s * gpu_installed / 1000
    busy = installed - unknown - unhealthy - unallocated - idle - stalled_ms * SHARE_UNIT
    return Waterfall(
        window_ms=window_ms, gpus=len(gpus), installed_ms=_gpu_ms(installed), unknown_ms=_gpu_ms(unknown),
        unhealthy_ms=_gpu_ms(unhealthy), unallocated_ms=_gpu_ms(unallocated), idle_allocated_ms=_gpu_ms(idle),
        stalled_ms=stalled_ms, busy_ms=_gpu_ms(busy), achieved_flop=achieved,
        installed_peak_flop=peak, achieved_share_of_peak=achieved / peak if peak > 0 else None,
        measured_coverage=measured / mfu_ms if mfu_ms else None,
        unknown_models=[{"model": m, "installed_gpu_seconds": _gpu_ms(x) / 1000}
                        for m, x in sorted(unknown_models.items())],
    )


def gpu_totals(store: Store, window: Window, policy: Policy, scope: HardwareScope | None = None) -> list[GpuTotals]:
    """Per-GPU sums over the window, with the policy applied (unhealthy states, idle threshold)."""
    scope_sql, scope_params = (scope or HardwareScope()).sql()
    rows = store.rows(
        f"{_GPU_SUMS} FROM {{db:Identifier}}.gpu_usage_1m WHERE {WINDOW} AND {scope_sql} "
        "GROUP BY cluster, node, gpu_uuid ORDER BY cluster, node, gpu_uuid",
        {"excl": list(policy.exclude_states), "idle_pct": policy.idle_util_pct, **window.params(), **scope_params},
    )
    return [
        GpuTotals(str(m), int(r), int(u), int(ua), int(i), float(a), int(mm), int(me), None if p is None else float(p),
                  (int(sn or 1), int(sd or 1)))
        for m, r, u, ua, i, a, mm, me, p, sn, sd in rows
    ]


def _rows(levels: rollups.Levels, scope_sql: str, columns: Sequence[str] | None = None) -> str:
    return rollups.rows(levels, rollups.WINDOW_START, rollups.WINDOW_END, where=scope_sql, prefix=_DB,
                        columns=columns)


def gpus_seen(store: Store, window: Window, scope: HardwareScope | None = None) -> list[GpuTotals]:
    """Every device of the scope that reported in the window (model, claimed ms, peak, share; no sums), from
    the per-GPU rollups: whole hours from the hour level."""
    scope_sql, scope_params = (scope or HardwareScope()).sql()
    rows = store.rows(_SEEN.format(rows=_rows(rollups.GPU_USAGE, scope_sql, _SEEN_COLUMNS)),
                      {**window.params(), **scope_params})
    return [GpuTotals(str(m), int(c), 0, 0, 0, 0.0, 0, 0, None if p is None else float(p), (int(sn or 1), int(sd or 1)))
            for m, c, p, sn, sd in rows]


def with_scope_sums(store: Store, window: Window, policy: Policy, scope: HardwareScope | None,
                    seen: list[GpuTotals]) -> list[GpuTotals]:
    """`seen` with the scope's policy-split sums from the fleet rollup (per-GPU rollups for a node) added to its
    first device: for whole GPUs (every share 1/1) `build` adds them up alike, so the waterfall is the same."""
    if not seen:
        return seen
    scope = scope or HardwareScope()
    scope_sql, scope_params = scope.sql()
    levels = rollups.GPU_USAGE if scope.node is not None else rollups.FLEET
    ((unhealthy, unallocated, idle, achieved, mfu_ms, measured),) = store.rows(
        _SUMS + _rows(levels, scope_sql),
        {"excl": list(policy.exclude_states), "idle_pct": policy.idle_util_pct, **window.params(), **scope_params},
    )
    first = seen[0]
    summed = GpuTotals(first.model, first.claimed_ms, int(unhealthy), int(unallocated), int(idle),
                       float(achieved or 0.0), int(mfu_ms), int(measured), first.peak_flop_s, first.share)
    return [summed, *seen[1:]]


def waterfall(store: Store, window: Window, policy: Policy, scope: HardwareScope | None = None,
              stall: StallConfig | None = None) -> Waterfall:
    """The capacity waterfall for `scope` over `window`; what a stall is: `stall` (config `jobs.stall`)."""
    seen = gpus_seen(store, window, scope)
    if all(g.share == (1, 1) for g in seen):
        totals = with_scope_sums(store, window, policy, scope, seen)  # whole GPUs: the fleet rollup's sums
    else:
        totals = gpu_totals(store, window, policy, scope)  # MIG instances: each device's time x its share
    scope_sql, scope_params = (scope or HardwareScope()).sql()
    stalled = stalls.stalled_ms(store, window, policy, stall or StallConfig(), scope_sql, scope_params)
    return build(totals, window.length_ms, stalled)
