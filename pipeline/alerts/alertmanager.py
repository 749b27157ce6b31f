"""The one adapter to Prometheus Alertmanager: its v2 HTTP API (`POST/GET /api/v2/alerts`).

`payload` (pure) turns an alert record into Alertmanager's `postableAlert`: labels, annotations,
`startsAt` (when it started firing, never changed), `endsAt` and `generatorURL`. A firing alert's
`endsAt` lies `valid_ms` ahead (as Prometheus does: 4 x the resend interval), so Alertmanager
resolves it by itself if the evaluator dies; a resolved alert's `endsAt` is its resolve time.
Alertmanager deduplicates by label set and merges a re-sent alert into the one it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import requests

from gpufleet.errors import ServiceError
from gpufleet.pipeline.alerts.lifecycle import AlertRecord
from gpufleet.pipeline.alerts.queries import iso
from gpufleet.pipeline.store.client import redact

MAX_BATCH: Final = 500
"""Alerts per POST: keeps one request small when a whole rack fails at once."""


class AlertmanagerError(ServiceError):
    """Alertmanager did not accept the alerts; `retryable` says whether sending again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def payload(rec: AlertRecord, now_ms: int, valid_ms: int) -> dict[str, Any]:
    """Alertmanager's postableAlert for a firing or resolved record."""
    if rec.starts_at is None:
        raise ValueError(f"alert {rec.alertname} {rec.fingerprint} never fired; only firing or resolved ones are sent")
    if rec.state == "firing":
        ends = max(now_ms, rec.starts_at) + valid_ms
    elif rec.state == "resolved" and rec.ends_at is not None:
        ends = rec.ends_at
    else:
        raise ValueError(f"alert {rec.alertname} {rec.fingerprint} is {rec.state}; only firing or resolved are sent")
    out: dict[str, Any] = {
        "labels": dict(rec.labels),
        "annotations": dict(rec.annotations),
        "startsAt": iso(rec.starts_at),
        "endsAt": iso(ends),
    }
    if rec.generator_url:
        out["generatorURL"] = rec.generator_url
    return out


class AlertmanagerClient:
    """Posts alerts to one Alertmanager (`http(s)://host:9093`); credentials in the URL stay out of errors."""

    def __init__(self, url: str, timeout_s: float = 5.0, session: requests.Session | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Alertmanager URL {redact(url)!r} is not http(s)://host:port (e.g. http://127.0.0.1:9093)")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()

    def __repr__(self) -> str:
        return f"AlertmanagerClient({redact(self.url)!r})"

    def post(self, alerts: Sequence[dict[str, Any]]) -> None:
        """Send alerts (in batches); raises `AlertmanagerError` if any batch is refused or unreachable."""
        for i in range(0, len(alerts), MAX_BATCH):
            self._post(list(alerts[i:i + MAX_BATCH]))

    def _post(self, batch: list[dict[str, Any]]) -> None:
        try:
            resp = self.session.post(f"{self.url}/api/v2/alerts", json=batch, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise AlertmanagerError(
                f"Alertmanager at {redact(self.url)} unreachable: {type(exc).__name__}", retryable=True
            ) from None
        if resp.status_code >= 500:
            raise AlertmanagerError(f"Alertmanager at {redact(self.url)} answered {resp.status_code}: "
                                    f"{resp.text[:200]}", retryable=True)
        if resp.status_code >= 400:
            raise AlertmanagerError(f"Alertmanager at {redact(self.url)} refused {len(batch)} alert(s) "
                                    f"({resp.status_code}): {resp.text[:200]}", retryable=False)

    def alerts(self, *, active: bool = True, silenced: bool = True, inhibited: bool = True,
               filters: Sequence[str] = ()) -> list[dict[str, Any]]:
        """`GET /api/v2/alerts`: the alerts Alertmanager holds (resolved ones are not listed)."""
        params: list[tuple[str, str]] = [("active", str(active).lower()), ("silenced", str(silenced).lower()),
                                         ("inhibited", str(inhibited).lower())]
        params += [("filter", f) for f in filters]
        try:
            resp = self.session.get(f"{self.url}/api/v2/alerts", params=params, timeout=self.timeout_s)
            resp.raise_for_status()
        except requests.RequestException as exc:
            raise AlertmanagerError(f"cannot list alerts at {redact(self.url)}: {type(exc).__name__}",
                                    retryable=True) from None
        result: list[dict[str, Any]] = resp.json()
        return result

    def ready(self) -> bool:
        """Whether Alertmanager answers `/-/ready`."""
        try:
            return self.session.get(f"{self.url}/-/ready", timeout=self.timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def close(self) -> None:
        self.session.close()
