"""The capacity waterfall: where installed GPU-seconds go, from the fleet and per-GPU rollups.

The policy-split sums come from the fleet rollup (per-GPU rollups for a node scope), *installed* from
one row per GPU seen and hour (`rollups.rows`), the stalled step from `stalls`.
Design notes: docs/design-notes.md#pipeline-queries-waterfall-py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from gpufleet.config import StallConfig
from gpufleet.pipeline.queries import formulas, rollups, stalls
from gpufleet.pipeline.queries.policy import IDLE_MS, Policy
from gpufleet.pipeline.queries.window import Window

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

_SCOPE_COLUMNS: Final = ("cluster", "node", "model")
_HEALTHY: Final = "NOT has({excl:Array(String)}, toString(health))"
_SUMS: Final = (
    "SELECT sum(claimed_ms), sumIf(claimed_ms, has({excl:Array(String)}, toString(health))), "
    f"sumIf(claimed_ms, {_HEALTHY} AND tenant = ''), sumIf({IDLE_MS}, {_HEALTHY} AND tenant != ''), "
    f"{formulas.ACHIEVED_FLOP}, sum(mfu_ms), sum(measured_ms) FROM "
)
"""The window's sums with the policy applied (bind `excl` and `idle_pct`); the rollup rows follow."""
_SEEN: Final = (
    "SELECT argMax(model, claimed_ms), sum(claimed_ms), max(model_peak_flop_s) FROM {rows} "
    "GROUP BY cluster, node, gpu_uuid ORDER BY cluster, node, gpu_uuid"
)
"""Each GPU seen in the window: its model, claimed milliseconds and peak FLOP/s."""
_DB: Final = "{db:Identifier}."


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
class Seen:
    """One GPU that reported in the window: what *installed* needs of it."""

    model: str
    claimed_ms: int
    """Time the GPU's samples claimed (each second once per node: docs/aggregations.md, "Claims")."""
    peak_flop_s: float | None


@dataclass(frozen=True)
class Sums:
    """The window's policy-split sums over the scope's GPUs (milliseconds and FLOPs)."""

    unhealthy_ms: int
    unallocated_ms: int
    idle_ms: int
    achieved_flop: float
    mfu_ms: int
    measured_ms: int


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


def assemble(seen: Sequence[Seen], sums: Sums, window_ms: int, stalled_ms: int = 0) -> Waterfall:
    """The waterfall from the GPUs seen, the scope's sums and the stalled milliseconds, a part of their
    busy time (pure)."""
    installed = unknown = 0
    peak = 0.0
    unknown_models: dict[str, int] = {}
    for g in seen:
        gpu_installed = max(window_ms, g.claimed_ms)
        installed += gpu_installed
        unknown += gpu_installed - g.claimed_ms
        if g.peak_flop_s is None:
            unknown_models[g.model] = unknown_models.get(g.model, 0) + gpu_installed * unit
        else:
            peak += g.peak_flop_s * gpu_installed / 1000
    busy = installed - unknown - sums.unhealthy_ms - sums.unallocated_ms - sums.idle_ms - stalled_ms
    return Waterfall(
        window_ms=window_ms, gpus=len(seen), installed_ms=installed, unknown_ms=unknown,
        unhealthy_ms=sums.unhealthy_ms, unallocated_ms=sums.unallocated_ms, idle_allocated_ms=sums.idle_ms,
        stalled_ms=stalled_ms, busy_ms=busy, achieved_flop=sums.achieved_flop, installed_peak_flop=peak,
        achieved_share_of_peak=sums.achieved_flop / peak if peak > 0 else None,
        measured_coverage=sums.measured_ms / sums.mfu_ms if sums.mfu_ms else None,
        unknown_models=[{"model": m, "installed_gpu_seconds": ms / 1000} for m, ms in sorted(unknown_models.items())],
    )


def build(gpus: Sequence[GpuTotals], window_ms: int, stalled_ms: int = 0) -> Waterfall:
    """The waterfall from per-GPU totals and the stalled milliseconds (pure)."""
    sums = Sums(sum(g.unhealthy_ms for g in gpus), sum(g.unallocated_ms for g in gpus), sum(g.idle_ms for g in gpus),
                sum(g.achieved_flop for g in gpus), sum(g.mfu_ms for g in gpus), sum(g.measured_ms for g in gpus))
    return assemble([Seen(g.model, g.claimed_ms, g.peak_flop_s) for g in gpus], sums, window_ms, stalled_ms)


def _rows(levels: rollups.Levels, scope_sql: str) -> str:
    return rollups.rows(levels, rollups.WINDOW_START, rollups.WINDOW_END, where=scope_sql, prefix=_DB)


def scope_sums(store: Store, window: Window, policy: Policy, scope: HardwareScope | None = None) -> Sums:
    """The scope's sums over the window with the policy applied, from the fleet rollup (per-GPU for a node)."""
    scope = scope or HardwareScope()
    scope_sql, scope_params = scope.sql()
    levels = rollups.GPU_USAGE if scope.node is not None else rollups.FLEET
    ((_, unhealthy, unallocated, idle, achieved, mfu_ms, measured),) = store.rows(
        _SUMS + _rows(levels, scope_sql),
        {"excl": list(policy.exclude_states), "idle_pct": policy.idle_util_pct, **window.params(), **scope_params},
    )
    return Sums(int(unhealthy), int(unallocated), int(idle), float(achieved or 0.0), int(mfu_ms), int(measured))


def gpus_seen(store: Store, window: Window, scope: HardwareScope | None = None) -> list[Seen]:
    """Every GPU of the scope that reported in the window, from the per-GPU rollups."""
    scope_sql, scope_params = (scope or HardwareScope()).sql()
    rows = store.rows(_SEEN.format(rows=_rows(rollups.GPU_USAGE, scope_sql)), {**window.params(), **scope_params})
    return [Seen(str(m), int(r), None if p is None else float(p)) for m, r, p in rows]


def waterfall(store: Store, window: Window, policy: Policy, scope: HardwareScope | None = None,
              stall: StallConfig | None = None) -> Waterfall:
    """The capacity waterfall for `scope` over `window`; what a stall is: `stall` (config `jobs.stall`)."""
    scope_sql, scope_params = (scope or HardwareScope()).sql()
    stalled = stalls.stalled_ms(store, window, policy, stall or StallConfig(), scope_sql, scope_params)
    return assemble(gpus_seen(store, window, scope), scope_sums(store, window, policy, scope), window.length_ms,
                    stalled)
