"""Time on the read side: half-open minute windows over the rollups, and exact UTC conversions."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
STATES: Final = ("ok", "degraded", "failing", "unknown")
"""Health states, best to worst (the order of the `health` enum in ClickHouse)."""
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Window:
    """A half-open time window `[start_ms, end_ms)` on whole minutes (the rollups' resolution)."""

    start_ms: int
    end_ms: int

    @classmethod
    def covering(cls, from_ms: int, to_ms: int) -> Window:
        """The smallest whole-minute window containing `[from_ms, to_ms)`."""
        if to_ms <= from_ms:
            raise ValueError(f"empty window: to ({to_ms}) must be after from ({from_ms})")
        return cls(from_ms // MINUTE_MS * MINUTE_MS, -(-to_ms // MINUTE_MS) * MINUTE_MS)

    @property
    def length_ms(self) -> int:
        return self.end_ms - self.start_ms

    def sql(self, column: str = "minute") -> str:
        """A filter on a rollup's time column; bind `params()` with it."""
        return window_sql(column)

    def params(self) -> dict[str, int]:
        return {"w_start": self.start_ms, "w_end": self.end_ms}


def window_sql(column: str = "minute") -> str:
    """A filter on a rollup's time column to a window; bind a `Window`'s `params()` with it."""
    return (f"{column} >= toDateTime(intDiv({{w_start:Int64}}, 1000), 'UTC') "
            f"AND {column} < toDateTime(intDiv({{w_end:Int64}}, 1000), 'UTC')")


WINDOW: Final = window_sql()
"""The filter to a window on the minute rollup's `minute` (bind `Window.params()`)."""
ALL_TIME: Final = "1"
"""The filter that keeps every minute: what a query over no window uses in place of `WINDOW`."""


def ms_datetime(ms: int) -> dt.datetime:
    """Unix milliseconds as an exact UTC datetime (for DateTime64(3) columns)."""
    return _EPOCH + dt.timedelta(milliseconds=ms)


def iso(ts: dt.datetime | int) -> str:
    """UTC ISO-8601 with a `Z`, from a datetime or Unix milliseconds."""
    if isinstance(ts, int):
        ts = ms_datetime(ts)
    elif ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
