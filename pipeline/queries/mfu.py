"""MFU (model FLOPs utilization) per scope and window, from the rollups.

The fleet, tenant and model scopes read the fleet rollup (`rollups.rows`: no GPU in its key), the job
and node scopes `gpu_usage_1m`; both give the same sums (the fleet rollup is fed from it).
MFU = sum of achieved FLOPs / sum of (peak FLOP/s x seconds), over the GPU-seconds in scope whose
model has a known peak and whose achieved FLOPs are known. Achieved FLOPs are the job's own
**measured** figure where it reported one, else the hardware **estimate** (tensor-pipe activity x
peak); every row says which (`source`) and how much was measured (`measured_coverage`, the share
of its GPU-seconds with measured FLOPs). GPU-seconds of unknown models are excluded and listed in
`unknown_models`, never counted as zero; GPU-seconds of known models with neither figure (no
tensor activity counter and nothing reported) are excluded and counted in `no_flops_gpu_seconds`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from gpufleet.pipeline.queries import formulas, rollups
from gpufleet.pipeline.queries.window import WINDOW, Window

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

Scope = Literal["fleet", "fleet_allocated", "tenant", "job", "node", "model"]

_KEYS: Final[dict[str, tuple[str, str]]] = {
    # scope -> (key expression, row filter)
    "fleet": ("'fleet'", "1"),
    "fleet_allocated": ("'allocated'", "tenant != ''"),
    "tenant": ("tenant", "tenant != ''"),
    "job": ("concat(tenant, '/', job)", "tenant != '' AND job != ''"),
    "node": ("concat(cluster, '/', node)", "1"),
    "model": ("model", "1"),
}
SCOPES: Final = tuple(_KEYS)
FLEET_SCOPES: Final = frozenset({"fleet", "fleet_allocated", "tenant", "model"})
"""Scopes the fleet rollup answers (no node or job in its key)."""
_DB: Final = "{db:Identifier}."


def _source(scope: str, rows: str, windowed: bool) -> str:
    """The rollup rows of the scope's filter, over the window or all time."""
    if scope in FLEET_SCOPES:
        if windowed:
            return rollups.rows(rollups.FLEET, rollups.WINDOW_START, rollups.WINDOW_END, where=rows, prefix=_DB)
        return rollups.all_rows(rollups.FLEET, where=rows, prefix=_DB)
    return f"{_DB}gpu_usage_1m WHERE {rows}" + (f" AND {WINDOW}" if windowed else "")


def _by_key(key: str, source: str) -> str:
    return (f"SELECT {key} AS key, {formulas.ACHIEVED_FLOP}, {formulas.PEAK_FLOP}, {formulas.MFU}, "
            "sum(mfu_ms), sum(measured_ms), sum(claimed_ms), sum(peak_known_ms) "
            f"FROM {source} GROUP BY key ORDER BY key")


def _unknown_models(source: str) -> str:
    return (f"SELECT model, sum(claimed_ms) - sum(peak_known_ms) AS ms FROM {source} "
            "GROUP BY model HAVING ms > 0 ORDER BY model")


_QUERIES: Final = {
    # (scope, windowed?) -> (MFU per key, GPU-seconds of models without a peak); bind `Window.params()`
    (scope, windowed): (_by_key(key, _source(scope, rows, windowed)), _unknown_models(_source(scope, rows, windowed)))
    for scope, (key, rows) in _KEYS.items()
    for windowed in (False, True)
}


@dataclass(frozen=True)
class MfuRow:
    """MFU of one key of a scope (a tenant, a `tenant/job`, a `cluster/node`, a model...)."""

    key: str
    mfu: float | None
    """None when no GPU-second in scope has a known peak and known FLOPs."""
    achieved_flop: float
    peak_flop: float
    gpu_seconds: float
    """GPU-seconds in the MFU (known peak and known FLOPs)."""
    measured_coverage: float | None
    source: str
    """`measured`, `estimated` (hardware tensor-activity estimate), `mixed`, or `none`."""
    unknown_model_gpu_seconds: float
    no_flops_gpu_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class MfuReport:
    scope: str
    window: Window | None
    rows: list[MfuRow]
    unknown_models: list[dict[str, Any]] = field(default_factory=list)
    """`{"model": name, "gpu_seconds": s}` for models without a peak FLOP/s, excluded from MFU."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "window": {"start_ms": self.window.start_ms, "end_ms": self.window.end_ms} if self.window else None,
            "rows": [r.to_dict() for r in self.rows],
            "unknown_models": self.unknown_models,
        }


def source_label(mfu_ms: int, measured_ms: int) -> str:
    """Where the achieved FLOPs came from."""
    if mfu_ms == 0:
        return "none"
    if measured_ms == mfu_ms:
        return "measured"
    return "estimated" if measured_ms == 0 else "mixed"


def mfu_row(key: str, achieved: float, peak: float, mfu: float | None, mfu_ms: int, measured_ms: int,
            claimed_ms: int, peak_known_ms: int) -> MfuRow:
    """One row from the rollup's sums and its MFU (`formulas.MFU`) (pure)."""
    return MfuRow(
        key=key,
        mfu=mfu,
        achieved_flop=achieved,
        peak_flop=peak,
        gpu_seconds=mfu_ms / 1000,
        measured_coverage=measured_ms / mfu_ms if mfu_ms else None,
        source=source_label(mfu_ms, measured_ms),
        unknown_model_gpu_seconds=(claimed_ms - peak_known_ms) / 1000,
        no_flops_gpu_seconds=(peak_known_ms - mfu_ms) / 1000,
    )


def mfu_by_scope(store: Store, scope: Scope, window: Window | None = None) -> MfuReport:
    """MFU for every key of `scope` over `window` (all time when None), keys in order."""
    if scope not in _KEYS:
        raise ValueError(f"unknown MFU scope {scope!r}: use one of {', '.join(SCOPES)}")
    by_key, unknown_models = _QUERIES[(scope, window is not None)]
    params = window.params() if window else {}
    rows = store.rows(by_key, params)
    unknown = store.rows(unknown_models, params)
    return MfuReport(
        scope=scope,
        window=window,
        rows=[mfu_row(str(k), float(a), float(p), None if m is None else float(m), int(ms), int(me), int(r), int(pk))
              for k, a, p, m, ms, me, r, pk in rows],
        unknown_models=[{"model": m, "gpu_seconds": int(ms) / 1000} for m, ms in unknown],
    )
