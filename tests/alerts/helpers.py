"""Helpers for the alert tests: a time base near the wall clock, hand-built reports, and a reader
of Alertmanager's API that does not use the code under test."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from gpufleet.wire import GpuSample, NodeReport
from tests.builders import report

MIN = 60_000


def base_ms() -> int:
    """A whole minute about 70 minutes before now: scenario instants stay before the wall clock."""
    return (int(time.time()) // 60 - 70) * MIN


def iso(ms: int) -> str:
    """Unix ms -> the ISO form Alertmanager returns (`2026-11-29T03:48:00.000Z`)."""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def minute_reports(node: str, base: int, ks: Sequence[int], gpus: Callable[[int], list[GpuSample]],
                   cluster: str = "c1") -> list[NodeReport]:
    """One report per minute k (its interval is (base + (k-1) min, base + k min])."""
    return [report(node=node, seq=k, time_ms=base + k * MIN, interval_ms=MIN, gpus=gpus(k), cluster=cluster)
            for k in ks]


def am_alerts(url: str) -> list[dict[str, Any]]:
    """Alertmanager's active alerts (`GET /api/v2/alerts`), read with the standard library."""
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=10) as resp:
        return json.loads(resp.read())


def am_labels(url: str) -> list[dict[str, str]]:
    """The label sets of Alertmanager's active alerts, sorted for comparison."""
    return sorted((a["labels"] for a in am_alerts(url)), key=lambda lab: sorted(lab.items()))


def by_name(alerts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {a["labels"]["alertname"]: a for a in alerts}


class Recording:
    """Wraps a real notifier and records every batch it posts."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.posts: list[list[dict[str, Any]]] = []

    def post(self, alerts: Sequence[dict[str, Any]]) -> None:
        self.posts.append(list(alerts))
        self.inner.post(alerts)
