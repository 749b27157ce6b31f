"""Closing a billing period: frozen per-tenant statements, and late usage booked as adjustments.

Design notes: docs/design-notes.md#pipeline-queries-billing-py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from typing import TYPE_CHECKING, Any, Final

from gpufleet.errors import GpufleetError
from gpufleet.pipeline.queries import integrity, usage
from gpufleet.pipeline.queries.policy import Policy, read_policy
from gpufleet.pipeline.queries.window import iso, ms_datetime

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

_PERIOD = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
HOUR_MS: Final = 3_600_000
MJ_PER_KWH: Final = 3_600_000_000
Key = tuple[str, str]
"""(tenant, gpu_model)."""


class BillingError(GpufleetError, RuntimeError):
    """A close that must not happen (period open, already closed, out of order); the text says why."""


def period_bounds(period: str) -> tuple[int, int]:
    """`[start_ms, end_ms)` of a `YYYY-MM` period (calendar month, UTC)."""
    m = _PERIOD.match(period)
    if not m:
        raise BillingError(f"period {period!r} is not a month: write it as YYYY-MM, e.g. 2026-11")
    year, month = int(m.group(1)), int(m.group(2))
    start = dt.datetime(year, month, 1, tzinfo=dt.UTC)
    end = dt.datetime(year + month // 12, month % 12 + 1, 1, tzinfo=dt.UTC)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


@dataclass(frozen=True)
class Totals:
    """Usage of one (tenant, model) over a period: integer milliseconds and millijoules, so sums are exact."""

    allocated_ms: int = 0
    unhealthy_ms: int = 0
    billable_ms: int = 0
    idle_allocated_ms: int = 0
    gap_ms: int = 0
    energy_mj: int = 0

    def minus(self, other: Totals) -> Totals:
        return Totals(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def plus(self, other: Totals) -> Totals:
        return Totals(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def is_zero(self) -> bool:
        return not any(astuple(self))


@dataclass(frozen=True)
class StatementRow:
    period: str
    tenant: str
    gpu_model: str
    allocated_ms: int
    unhealthy_ms: int
    billable_ms: int
    idle_allocated_ms: int
    gap_ms: int
    energy_mj: int
    energy_kwh: float
    billable_gpu_hours: float
    exclude_states: tuple[str, ...]
    idle_util_pct: int
    closed_at_ms: int
    checksum: str = ""


@dataclass(frozen=True)
class AdjustmentRow:
    booked_period: str
    usage_period: str
    tenant: str
    gpu_model: str
    delta_allocated_ms: int
    delta_unhealthy_ms: int
    delta_billable_ms: int
    delta_idle_allocated_ms: int
    delta_gap_ms: int
    delta_energy_mj: int
    delta_energy_kwh: float
    delta_billable_gpu_hours: float
    closed_at_ms: int
    checksum: str = ""


@dataclass(frozen=True)
class CloseResult:
    period: str
    closed_at_ms: int
    statements: list[StatementRow]
    adjustments: list[AdjustmentRow]
    checksum: str


def canonical(row: StatementRow | AdjustmentRow) -> str:
    """The row's canonical text (every field but the checksum, `|`-separated, floats as repr)."""
    parts = []
    for f in fields(row):
        if f.name == "checksum":
            continue
        value = getattr(row, f.name)
        parts.append(",".join(value) if isinstance(value, tuple) else repr(value))
    return "|".join(parts)


def sealed(row: Any) -> Any:
    """The row with its checksum set: sha256 of its canonical text."""
    return type(row)(**{**row.__dict__, "checksum": hashlib.sha256(canonical(row).encode()).hexdigest()})


def statement_rows(period: str, totals: Mapping[Key, Totals], policy: Policy, closed_at_ms: int) -> list[StatementRow]:
    """One sealed statement row per (tenant, model), in key order (pure)."""
    return [
        sealed(StatementRow(
            period, tenant, model, t.allocated_ms, t.unhealthy_ms, t.billable_ms, t.idle_allocated_ms, t.gap_ms,
            t.energy_mj, t.energy_mj / MJ_PER_KWH, t.billable_ms / HOUR_MS, policy.exclude_states,
            policy.idle_util_pct, closed_at_ms,
        ))
        for (tenant, model), t in sorted(totals.items())
    ]


def deltas(current: Mapping[Key, Totals], covered: Mapping[Key, Totals]) -> dict[Key, Totals]:
    """Current usage minus what statements and adjustments already cover, non-zero keys only (pure)."""
    out = {}
    for key in sorted(set(current) | set(covered)):
        d = current.get(key, Totals()).minus(covered.get(key, Totals()))
        if not d.is_zero():
            out[key] = d
    return out


def adjustment_rows(
    booked: str, usage_period: str, delta: Mapping[Key, Totals], closed_at_ms: int
) -> list[AdjustmentRow]:
    """Sealed adjustment rows for one earlier period's deltas (pure)."""
    return [
        sealed(AdjustmentRow(
            booked, usage_period, tenant, model, d.allocated_ms, d.unhealthy_ms, d.billable_ms, d.idle_allocated_ms,
            d.gap_ms, d.energy_mj, d.energy_mj / MJ_PER_KWH, d.billable_ms / HOUR_MS, closed_at_ms,
        ))
        for (tenant, model), d in sorted(delta.items())
    ]


def combined_checksum(statements: Sequence[StatementRow], adjustments: Sequence[AdjustmentRow]) -> str:
    h = hashlib.sha256()
    for row in [*statements, *adjustments]:
        h.update(row.checksum.encode())
    return h.hexdigest()


# --- reading ---------------------------------------------------------------------------------------

_CURRENT: Final = (
    "SELECT tenant, gpu_model, "
    "sum(toUInt64(round(allocated_gpu_seconds * 1000))), sum(toUInt64(round(unhealthy_gpu_seconds * 1000))), "
    "sum(toUInt64(round(billable_gpu_seconds * 1000))), sum(toUInt64(round(idle_allocated_gpu_hours * 3600000))), "
    "sum(toUInt64(round(gap_gpu_seconds * 1000))), sum(toUInt64(round(energy_kwh * 3600000000))) "
    f"FROM {usage.STORED} "
    "WHERE hour >= toDateTime(intDiv({start:Int64}, 1000), 'UTC') "
    "AND hour < toDateTime(intDiv({end:Int64}, 1000), 'UTC') "
    "GROUP BY tenant, gpu_model"
)
_CLOSED: Final = (
    "SELECT period, toUnixTimestamp64Milli(min(closed_at)) FROM {db:Identifier}.billing_periods GROUP BY period"
)
_STATEMENT_TOTALS: Final = (
    "SELECT tenant, gpu_model, allocated_ms, unhealthy_ms, billable_ms, idle_allocated_ms, gap_ms, energy_mj "
    "FROM {db:Identifier}.billing_statements WHERE period = {p:String}"
)
_ADJUSTMENT_TOTALS: Final = (
    "SELECT tenant, gpu_model, delta_allocated_ms, delta_unhealthy_ms, delta_billable_ms, delta_idle_allocated_ms, "
    "delta_gap_ms, delta_energy_mj FROM {db:Identifier}.billing_adjustments WHERE usage_period = {p:String}"
)
_STATEMENTS: Final = (
    "SELECT period, tenant, gpu_model, allocated_ms, unhealthy_ms, billable_ms, idle_allocated_ms, gap_ms, "
    "energy_mj, energy_kwh, billable_gpu_hours, exclude_states, idle_util_pct, toUnixTimestamp64Milli(closed_at), "
    "checksum "
    "FROM {db:Identifier}.billing_statements WHERE period = {p:String} ORDER BY tenant, gpu_model"
)
_ADJUSTMENTS: Final = (
    "SELECT booked_period, usage_period, tenant, gpu_model, delta_allocated_ms, delta_unhealthy_ms, "
    "delta_billable_ms, delta_idle_allocated_ms, delta_gap_ms, delta_energy_mj, delta_energy_kwh, "
    "delta_billable_gpu_hours, "
    "toUnixTimestamp64Milli(closed_at), checksum FROM {db:Identifier}.billing_adjustments "
    "WHERE booked_period = {p:String} ORDER BY usage_period, tenant, gpu_model"
)


def current_totals(store: Store, period: str) -> dict[Key, Totals]:
    """Usage per (tenant, model) of the period, as `usage_hourly` shows it now: its stored rows, refreshed."""
    start, end = period_bounds(period)
    usage.refresh(store, start, end)
    rows = store.rows(_CURRENT, {"start": start, "end": end})
    return {(t, m): Totals(int(a), int(u), int(b), int(i), int(g), int(e)) for t, m, a, u, b, i, g, e in rows}


def closed_periods(store: Store) -> dict[str, int]:
    """Closed period -> closed_at (Unix ms)."""
    return {p: int(t) for p, t in store.rows(_CLOSED)}


def covered_totals(store: Store, period: str) -> dict[Key, Totals]:
    """What the statement of a closed period plus the adjustments booked for it since add up to."""
    stmt = store.rows(_STATEMENT_TOTALS, {"p": period})
    adj = store.rows(_ADJUSTMENT_TOTALS, {"p": period})
    out: dict[Key, Totals] = {}
    for t, m, *vals in [*stmt, *adj]:
        row = Totals(*(int(v) for v in vals))
        out[(t, m)] = out.get((t, m), Totals()).plus(row)
    return out


def pending_adjustments(store: Store) -> dict[str, dict[Key, Totals]]:
    """Closed period -> (tenant, model) -> usage that arrived after its close and is not yet booked."""
    out = {}
    for period in sorted(closed_periods(store)):
        d = deltas(current_totals(store, period), covered_totals(store, period))
        if d:
            out[period] = d
    return out


def statements(store: Store, period: str) -> tuple[list[StatementRow], list[AdjustmentRow]]:
    """The frozen statement of a period and the adjustments booked when it closed."""
    s = store.rows(_STATEMENTS, {"p": period})
    a = store.rows(_ADJUSTMENTS, {"p": period})
    stmts = [
        StatementRow(r[0], r[1], r[2], *(int(v) for v in r[3:9]), float(r[9]), float(r[10]), tuple(r[11]),
                     int(r[12]), int(r[13]), r[14])
        for r in s
    ]
    adjs = [AdjustmentRow(*r[:4], *(int(v) for v in r[4:10]), float(r[10]), float(r[11]), int(r[12]), r[13]) for r in a]
    return stmts, adjs


def verify(store: Store) -> list[str]:
    """Every stored statement or adjustment row whose checksum no longer matches its content."""
    problems = []
    for period in sorted(closed_periods(store)):
        stmts, adjs = statements(store, period)
        for row in [*stmts, *adjs]:
            if sealed(row).checksum != row.checksum:
                problems.append(f"{type(row).__name__} {period} {row.tenant}/{row.gpu_model}: checksum mismatch")
    return problems


def integrity_findings(store: Store, period: str | None, now_ms: int) -> list[integrity.Finding]:
    """What the exactly-once checks find in `period` (YYYY-MM), or in everything stored up to now."""
    start, end = period_bounds(period) if period else (0, now_ms)
    return integrity.findings(store, start, min(end, now_ms))


def blocked(period: str, found: list[integrity.Finding]) -> str:
    """Why `period` cannot close: the first findings and where the repair is described."""
    shown = "; ".join(f.describe() for f in found[:3])
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return (f"period {period} cannot close: {len(found)} exactly-once check(s) failed on its stored data: "
            f"{shown}{more}. "
            "Its statements would bill these numbers; repair them as docs/reliability.md (\"Repairing what the "
            f"checks find\") says, then run `gpufleet billing verify --period {period}` and close again")


# --- closing ---------------------------------------------------------------------------------------

def close_period(store: Store, period: str, now_ms: int) -> CloseResult:
    """Close `period` (see the module docstring); raises `BillingError` when it must not be closed."""
    _, end = period_bounds(period)
    if now_ms < end:
        raise BillingError(f"period {period} has not ended (it ends at {iso(end)}): close it after that")
    closed = closed_periods(store)
    if period in closed:
        raise BillingError(
            f"period {period} was already closed at {iso(closed[period])}; closed statements are immutable, "
            "and usage that arrives late is booked as adjustments when the next period closes"
        )
    later = sorted(p for p in closed if p > period)
    if later:
        raise BillingError(
            f"period {later[-1]} is already closed: periods close in order, so {period} cannot close now"
        )
    found = integrity.findings(store, *period_bounds(period))
    if found:
        raise BillingError(blocked(period, found))
    policy = read_policy(store)
    # A close that crashed part-way left whole row sets (each insert is one atomic block): keep them.
    stored_stmts, stored_adjs = statements(store, period)
    adjustments = stored_adjs or [
        row
        for earlier in sorted(closed)
        for row in adjustment_rows(
            period, earlier, deltas(current_totals(store, earlier), covered_totals(store, earlier)), now_ms
        )
    ]
    if not stored_adjs:
        _insert(store, "billing_adjustments", _adjustment_columns(adjustments), f"adjustments:{period}")
    stmts = stored_stmts or statement_rows(period, current_totals(store, period), policy, now_ms)
    if not stored_stmts:
        _insert(store, "billing_statements", _statement_columns(stmts), f"statements:{period}")
    checksum = combined_checksum(stmts, adjustments)
    _insert(store, "billing_periods", {
        "period": [period], "closed_at": [ms_datetime(now_ms)], "statement_rows": [len(stmts)],
        "adjustment_rows": [len(adjustments)], "exclude_states": [list(policy.exclude_states)],
        "idle_util_pct": [policy.idle_util_pct], "checksum": [checksum],
    }, f"period:{period}")
    return CloseResult(period, now_ms, stmts, adjustments, checksum)


def _statement_columns(rows: Iterable[StatementRow]) -> dict[str, list[Any]]:
    rows = list(rows)
    cols: dict[str, list[Any]] = {f.name: [getattr(r, f.name) for r in rows] for f in fields(StatementRow)}
    cols["exclude_states"] = [list(v) for v in cols["exclude_states"]]
    cols["closed_at"] = [ms_datetime(ms) for ms in cols.pop("closed_at_ms")]
    return cols


def _adjustment_columns(rows: Iterable[AdjustmentRow]) -> dict[str, list[Any]]:
    rows = list(rows)
    cols: dict[str, list[Any]] = {f.name: [getattr(r, f.name) for r in rows] for f in fields(AdjustmentRow)}
    cols["closed_at"] = [ms_datetime(ms) for ms in cols.pop("closed_at_ms")]
    return cols


def _insert(store: Store, table: str, cols: dict[str, list[Any]], token: str) -> None:
    if not next(iter(cols.values())):
        return
    store.insert(table, list(cols.values()), list(cols), column_oriented=True,
                 settings={"insert_deduplication_token": token})
