"""Exactly-once checks on what is stored: run by `gpufleet billing verify`, and by `billing close` before it freezes.

Design notes: docs/design-notes.md#pipeline-queries-integrity-py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from gpufleet.pipeline.queries import usage
from gpufleet.pipeline.queries.window import HOUR_MS, MINUTE_MS, iso

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

DAY_MS: Final = 86_400_000
LIMIT: Final = 100
"""Most findings each check reports."""
_RANGE: Final = ("time >= fromUnixTimestamp64Milli({lo:Int64}) "
                 "AND time < fromUnixTimestamp64Milli({hi:Int64}) + INTERVAL 1 DAY")
_OLDEST_RAW: Final = ("SELECT toUnixTimestamp(toStartOfDay(min(time))) * 1000, count() "
                      "FROM {db:Identifier}.gpu_samples")
_DUPLICATES: Final = (
    "SELECT cluster, node, gpu_index, count() AS stored, uniqExact(boot_id, seq) AS samples "
    "FROM {db:Identifier}.gpu_samples "
    "WHERE time >= fromUnixTimestamp64Milli({lo:Int64}) AND time < fromUnixTimestamp64Milli({hi:Int64}) "
    "GROUP BY cluster, node, gpu_index HAVING stored != samples ORDER BY cluster, node, gpu_index "
    "LIMIT {limit:UInt32} SETTINGS optimize_aggregation_in_order = 1"
)
_MINUTE_OF: Final = "toDateTime(intDiv(toUnixTimestamp64Milli(claim_start), 60000) * 60, 'UTC')"
"""The minute the rollups file a sample under: that of its claim start (migration 0031), which is
`time - interval_ms` unless an earlier sample of the GPU claimed the start of its interval."""
_RAW_VS_MINUTE: Final = (
    "SELECT toUnixTimestamp(minute) * 1000 AS m, raw_samples, raw_ms, rollup_samples, rollup_ms FROM ("
    f"SELECT {_MINUTE_OF} AS minute, count() AS raw_samples, sum(toUInt64(interval_ms)) AS raw_ms "
    f"FROM {{db:Identifier}}.gpu_samples WHERE {_RANGE} GROUP BY minute"
    ") AS r FULL OUTER JOIN ("
    "SELECT minute, sum(samples) AS rollup_samples, sum(reported_ms) AS rollup_ms FROM {db:Identifier}.gpu_usage_1m "
    "WHERE minute >= toDateTime(intDiv({lo:Int64}, 1000), 'UTC') AND minute < toDateTime(intDiv({hi:Int64}, 1000), "
    "'UTC') GROUP BY minute"
    ") AS u USING minute "
    "WHERE minute >= toDateTime(intDiv({lo:Int64}, 1000), 'UTC') AND minute < toDateTime(intDiv({hi:Int64}, 1000), "
    "'UTC') AND (raw_samples != rollup_samples OR raw_ms != rollup_ms) "
    "ORDER BY minute LIMIT {limit:UInt32} SETTINGS join_use_nulls = 0"
)
_MINUTE_VS_HOUR: Final = (
    "SELECT toUnixTimestamp(hour) * 1000 AS h, m_samples, m_ms, h_samples, h_ms FROM ("
    "SELECT toStartOfHour(minute) AS hour, sum(samples) AS m_samples, sum(reported_ms) AS m_ms "
    "FROM {db:Identifier}.gpu_usage_1m WHERE minute >= toDateTime(intDiv({lo:Int64}, 1000), 'UTC') "
    "AND minute < toDateTime(intDiv({hi:Int64}, 1000), 'UTC') GROUP BY hour"
    ") AS m FULL OUTER JOIN ("
    "SELECT hour, sum(samples) AS h_samples, sum(reported_ms) AS h_ms FROM {db:Identifier}.gpu_usage_1h "
    "WHERE hour >= toDateTime(intDiv({lo:Int64}, 1000), 'UTC') AND hour < toDateTime(intDiv({hi:Int64}, 1000), "
    "'UTC') GROUP BY hour"
    ") AS u USING hour WHERE m_samples != h_samples OR m_ms != h_ms ORDER BY hour LIMIT {limit:UInt32} "
    "SETTINGS join_use_nulls = 0"
)


@dataclass(frozen=True)
class Finding:
    """One thing a check found: which check, where, and the numbers that disagree."""

    check: str
    where: str
    detail: str

    def describe(self) -> str:
        return f"{self.check}: {self.where}: {self.detail}"


def raw_start(store: Store, start_ms: int) -> int | None:
    """Where the raw checks may start within a range starting at `start_ms`: the later of it and the oldest day
    `gpu_samples` holds (that day is whole; an older one may be partly dropped by the TTL). None: no raw rows."""
    oldest, rows = store.rows(_OLDEST_RAW)[0]
    if not int(rows):
        return None
    return max(start_ms, int(oldest))


def findings(store: Store, start_ms: int, end_ms: int, limit: int = LIMIT) -> list[Finding]:
    """Everything the checks find over `[start_ms, end_ms)` (whole minutes and hours inside it)."""
    lo_minute, hi_minute = -(-start_ms // MINUTE_MS) * MINUTE_MS, end_ms // MINUTE_MS * MINUTE_MS
    out: list[Finding] = []
    raw_lo = raw_start(store, lo_minute)
    if raw_lo is not None and raw_lo < hi_minute:
        out += duplicates(store, raw_lo, hi_minute, limit)
        out += raw_vs_minute(store, raw_lo, hi_minute, limit)
    lo_hour, hi_hour = -(-start_ms // HOUR_MS) * HOUR_MS, end_ms // HOUR_MS * HOUR_MS
    if lo_hour < hi_hour:
        out += minute_vs_hour(store, lo_hour, hi_hour, limit)
        out += stored_usage(store, lo_hour, hi_hour, limit)
    return out


def duplicates(store: Store, lo: int, hi: int, limit: int = LIMIT) -> list[Finding]:
    rows = store.rows(_DUPLICATES, {"lo": lo, "hi": hi, "limit": limit})
    return [Finding("duplicate samples", f"{c}/{n} GPU {g}", f"{stored} rows for {samples} samples "
                    f"between {iso(lo)} and {iso(hi)}") for c, n, g, stored, samples in rows]


def raw_vs_minute(store: Store, lo: int, hi: int, limit: int = LIMIT) -> list[Finding]:
    rows = store.rows(_RAW_VS_MINUTE, {"lo": lo, "hi": hi, "limit": limit})
    return [Finding("raw vs minute rollup", f"minute {iso(int(m))}", f"raw {rs} samples / {rm} ms, gpu_usage_1m "
                    f"{us} samples / {um} ms") for m, rs, rm, us, um in rows]


def minute_vs_hour(store: Store, lo: int, hi: int, limit: int = LIMIT) -> list[Finding]:
    rows = store.rows(_MINUTE_VS_HOUR, {"lo": lo, "hi": hi, "limit": limit})
    return [Finding("minute vs hour rollup", f"hour {iso(int(h))}", f"gpu_usage_1m {ms} samples / {mm} ms, "
                    f"gpu_usage_1h {hs} samples / {hm} ms") for h, ms, mm, hs, hm in rows]


def stored_usage(store: Store, lo: int, hi: int, limit: int = LIMIT) -> list[Finding]:
    """Hours whose stored usage rows claim to be current but differ from `usage_hourly` of the rollups
    (`usage.stale_hours`); the repair: docs/reliability.md, "Repairing what the checks find"."""
    stale = sorted(usage.stale_hours(store, lo, hi).items())[:limit]
    return [Finding("stored usage vs usage_hourly", f"hour {iso(h)}", detail) for h, detail in stale]
