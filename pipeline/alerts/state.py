"""The alert state store in ClickHouse (`alerts` table, migration 0010): write revisions, read them back.

The evaluator writes one row per alert episode whenever it changes (state, delivery) and at least
every `resend_s` while it is open; `load_open` gives a restarted evaluator every pending and firing
alert and every resolve Alertmanager has not yet acknowledged, so it neither re-fires nor loses one.
`firing_alerts` is the read side for `gpufleet alerts --json` and `gpufleet status --json`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from gpufleet.errors import StoreError, first_line
from gpufleet.pipeline.alerts.lifecycle import AlertRecord
from gpufleet.pipeline.alerts.queries import iso

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

COLUMNS: tuple[str, ...] = (
    "alertname", "fingerprint", "active_at", "severity", "state", "labels", "annotations", "starts_at",
    "ends_at", "last_eval", "value", "sent_state", "last_sent_at", "revision",
)
_TIMES = frozenset({"active_at", "starts_at", "ends_at", "last_eval", "last_sent_at"})
_SELECT = ", ".join(f"toUnixTimestamp64Milli({c}) AS {c}" if c in _TIMES else c for c in COLUMNS)
_SEVERITY_ORDER = "indexOf(['critical', 'warning', 'info'], severity)"
_OPEN: Final = (
    f"SELECT {_SELECT} FROM {{db:Identifier}}.alerts FINAL "
    "WHERE state IN ('pending', 'firing') OR (state = 'resolved' AND sent_state = 'firing') "
    "ORDER BY active_at"
)
_FIRED: Final = (
    f"SELECT {_SELECT} FROM {{db:Identifier}}.alerts AS a FINAL "
    "WHERE a.starts_at IS NOT NULL AND a.starts_at <= fromUnixTimestamp64Milli({until:Int64}, 'UTC') "
    "AND (a.ends_at IS NULL OR a.ends_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')) "
    "ORDER BY starts_at, alertname, fingerprint"
)
"""Episodes that fired and overlap `[since, until]`. The table's columns are qualified (`a.`): the SELECT's
aliases (the times as Unix ms) would otherwise stand in for them in WHERE."""
_FIRING: Final = (
    f"SELECT {_SELECT} FROM {{db:Identifier}}.alerts FINAL WHERE state = 'firing' "
    f"ORDER BY {_SEVERITY_ORDER}, alertname, starts_at, fingerprint"
)


class StateError(StoreError):
    """The alert table cannot be read or written; the message says why and how to fix it."""


def to_row(rec: AlertRecord) -> list[object]:
    return [getattr(rec, c) for c in COLUMNS]


def from_row(row: dict[str, Any]) -> AlertRecord:
    return AlertRecord(**{c: (dict(row[c]) if c in ("labels", "annotations") else row[c]) for c in COLUMNS})


class AlertStore:
    """Reads and writes alert records in the store's `alerts` table."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def write(self, records: Iterable[AlertRecord]) -> int:
        rows = [to_row(r) for r in records]
        if rows:
            self.store.insert("alerts", rows, COLUMNS)
        return len(rows)

    def load_open(self) -> dict[str, AlertRecord]:
        """Open alerts (pending, firing) and undelivered resolves, newest episode per fingerprint."""
        try:
            result = self.store.query(_OPEN)
        except Exception as exc:
            raise StateError(_explain(exc, self.store.database)) from None
        out: dict[str, AlertRecord] = {}
        for row in result.named_results():
            rec = from_row(row)
            out[rec.fingerprint] = rec  # ordered by active_at: the newest episode wins
        return out


def fired_between(store: Store, since_ms: int, until_ms: int) -> list[dict[str, Any]]:
    """Every alert episode that fired (was sent as firing) and was firing at some instant of `[since_ms,
    until_ms]`, in the order they started: `as_dict` each (`ends_at` None while it still fires)."""
    return [as_dict(from_row(r)) for r in store.query(_FIRED, {"since": since_ms, "until": until_ms}).named_results()]


def _explain(exc: Exception, db: str) -> str:
    text = str(exc)
    if "UNKNOWN_TABLE" in text or "UNKNOWN_DATABASE" in text or "doesn't exist" in text or "does not exist" in text:
        return f"table {db}.alerts does not exist: run `gpufleet migrate` first"
    return f"cannot read {db}.alerts: {first_line(exc)}"


def firing_alerts(store: Store) -> list[dict[str, Any]]:
    """Alerts firing now, most severe first: each with alertname, severity, labels, annotations,
    state, starts_at and active_at (ISO 8601 UTC), value and fingerprint."""
    return [as_dict(from_row(r)) for r in store.query(_FIRING).named_results()]


def as_dict(rec: AlertRecord) -> dict[str, Any]:
    """The JSON shape of one alert (`gpufleet alerts --json`)."""
    return {
        "alertname": rec.alertname,
        "severity": rec.severity,
        "state": rec.state,
        "labels": dict(rec.labels),
        "annotations": dict(rec.annotations),
        "starts_at": iso(rec.starts_at) if rec.starts_at is not None else None,
        "active_at": iso(rec.active_at),
        "ends_at": iso(rec.ends_at) if rec.ends_at is not None else None,
        "value": rec.value,
        "fingerprint": rec.fingerprint,
    }
