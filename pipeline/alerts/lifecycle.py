"""Pure alert lifecycle: one alert's record and how one evaluation moves it.

    (none) --condition holds, not sustained--> pending --sustained--> firing --condition gone--> resolved
    pending --condition gone--> cleared (never notified)

A firing alert stays firing while the condition holds at its newest sample, even if a blip broke
the sustained window (as in Prometheus, `for` gates only the start). `active_at` is when the
condition began in the data, `starts_at` the evaluation that made it fire (the `startsAt` sent to
Alertmanager, never changed afterwards), `ends_at` the evaluation that saw it gone. Which alerts
are due for a notification is decided here too: new and resolved ones at once, firing ones again
every `resend_ms` (Alertmanager forgets an alert not re-sent before its `endsAt`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

State = Literal["pending", "firing", "resolved", "cleared"]
Sent = Literal["none", "firing", "resolved"]
OPEN: Final = frozenset({"pending", "firing"})


def fingerprint(labels: Mapping[str, str]) -> str:
    """A stable id of a label set (the alert's identity, as in Alertmanager)."""
    return _fingerprint(tuple(sorted(labels.items())))


@functools.lru_cache(maxsize=1 << 16)  # the same label sets come back every evaluation
def _fingerprint(items: tuple[tuple[str, str], ...]) -> str:
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AlertRecord:
    """One alert episode, as stored in the `alerts` table (one row per revision)."""

    alertname: str
    fingerprint: str
    active_at: int
    severity: str
    state: State
    labels: dict[str, str]
    annotations: dict[str, str] = field(default_factory=dict)
    starts_at: int | None = None
    ends_at: int | None = None
    last_eval: int = 0
    value: float | None = None
    sent_state: Sent = "none"
    last_sent_at: int | None = None
    revision: int = 0
    generator_url: str = ""
    """Not stored: re-rendered each evaluation the alert's condition holds."""

    @property
    def open(self) -> bool:
        return self.state in OPEN

    @property
    def undelivered_resolve(self) -> bool:
        """Resolved, but Alertmanager was last told it fires."""
        return self.state == "resolved" and self.sent_state == "firing"


_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(AlertRecord))


def replace(rec: AlertRecord, **changes: object) -> AlertRecord:
    """`replace(rec, **changes)` for an `AlertRecord` (a copy with those fields changed), without
    its per-call introspection: every evaluation makes a few per open alert."""
    unknown = changes.keys() - _FIELDS
    if unknown:
        raise TypeError(f"AlertRecord has no field {sorted(unknown)}")
    new = object.__new__(AlertRecord)
    new.__dict__.update(rec.__dict__)
    new.__dict__.update(changes)
    return new


def next_revision(rec: AlertRecord | None, now_ms: int) -> int:
    """Revisions grow with evaluation time, so a new episode always outranks older rows."""
    return max(now_ms * 1000, (rec.revision + 1) if rec else 0)


def observe(
    rec: AlertRecord | None, *, alertname: str, severity: str, labels: dict[str, str],
    firing: bool, since_ms: int, now_ms: int,
) -> AlertRecord:
    """The record after an evaluation in which the condition holds (`firing`: sustained)."""
    if rec is None or not rec.open:
        active_at = min(since_ms, now_ms)
        if rec is not None and active_at <= rec.active_at:
            active_at = rec.active_at + 1  # a new episode never shares its key with the last one
        return AlertRecord(
            alertname=alertname, fingerprint=fingerprint(labels), active_at=active_at, severity=severity,
            state="firing" if firing else "pending", labels=labels, starts_at=now_ms if firing else None,
            last_eval=now_ms, revision=next_revision(rec, now_ms),
        )
    if rec.state == "pending" and firing:
        return replace(rec, state="firing", starts_at=now_ms, last_eval=now_ms, severity=severity,
                                   revision=next_revision(rec, now_ms))
    return replace(rec, last_eval=now_ms, severity=severity, revision=next_revision(rec, now_ms))


def close(rec: AlertRecord, now_ms: int) -> AlertRecord:
    """The record after an evaluation in which the condition no longer holds (or its rule is gone)."""
    if rec.state == "pending":
        state: State = "cleared"
    elif rec.state == "firing":
        state = "resolved"
    else:
        return rec
    ends = max(now_ms, (rec.starts_at or rec.active_at) + 1)
    return replace(rec, state=state, ends_at=ends, last_eval=now_ms, revision=next_revision(rec, now_ms))


def due(rec: AlertRecord, now_ms: int, resend_ms: int) -> bool:
    """Whether Alertmanager should hear about this record now."""
    if rec.state == "firing":
        return (rec.sent_state != "firing" or rec.last_sent_at is None
                or now_ms - rec.last_sent_at >= resend_ms)
    return rec.undelivered_resolve


def delivered(rec: AlertRecord, now_ms: int) -> AlertRecord:
    """The record after Alertmanager accepted its current state."""
    sent: Sent = "firing" if rec.state == "firing" else "resolved"
    return replace(rec, sent_state=sent, last_sent_at=now_ms)
