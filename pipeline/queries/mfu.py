"""MFU (model FLOPs utilization) per scope and window, read from the minute rollup `gpu_usage_1m`.

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

from gpufleet.pipeline.queries.window import Window

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

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


def mfu_row(key: str, achieved: float, peak: float, mfu_ms: int, measured_ms: int, reported_ms: int,
            peak_known_ms: int) -> MfuRow:
    """One row from the rollup's sums (pure)."""
    return MfuRow(
        key=key,
        mfu=achieved / peak if peak > 0 else None,
        achieved_flop=achieved,
        peak_flop=peak,
        gpu_seconds=mfu_ms / 1000,
        measured_coverage=measured_ms / mfu_ms if mfu_ms else None,
        source=source_label(mfu_ms, measured_ms),
        unknown_model_gpu_seconds=(reported_ms - peak_known_ms) / 1000,
        no_flops_gpu_seconds=(peak_known_ms - mfu_ms) / 1000,
    )


def mfu_by_scope(client: Client, db: str, scope: Scope, window: Window | None = None) -> MfuReport:
    """MFU for every key of `scope` over `window` (all time when None), keys in order."""
    if scope not in _KEYS:
        raise ValueError(f"unknown MFU scope {scope!r}: use one of {', '.join(SCOPES)}")
    key_expr, row_filter = _KEYS[scope]
    where = f"{row_filter} AND {window.sql() if window else '1'}"
    params = window.params() if window else {}
    rows = client.query(
        f"SELECT {key_expr} AS key, sum(measured_flop) + sum(estimated_unmeasured_flop), sum(peak_capacity_flop), "
        "sum(mfu_ms), sum(measured_ms), sum(reported_ms), sum(peak_known_ms) "
        f"FROM {db}.gpu_usage_1m WHERE {where} GROUP BY key ORDER BY key",
        parameters=params,
    ).result_rows
    unknown = client.query(
        f"SELECT model, sum(reported_ms) - sum(peak_known_ms) AS ms FROM {db}.gpu_usage_1m WHERE {where} "
        "GROUP BY model HAVING ms > 0 ORDER BY model",
        parameters=params,
    ).result_rows
    return MfuReport(
        scope=scope,
        window=window,
        rows=[mfu_row(str(k), float(a), float(p), int(m), int(me), int(r), int(pk)) for k, a, p, m, me, r, pk in rows],
        unknown_models=[{"model": m, "gpu_seconds": int(ms) / 1000} for m, ms in unknown],
    )
