"""The OTLP receiver's own counters: points accepted / rejected / ignored, requests by outcome.

Handler threads add, the agent reads `snapshot()` once per interval and puts the two totals the
wire carries (`AgentHealth.otlp_points_accepted_total`, `otlp_points_rejected_total`) into its
report, from where the agent's meter exports them through its OpenTelemetry pipeline. The other
figures are for `stats()` and logs. All totals are monotonic for the receiver's lifetime.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OtlpStats:
    points_accepted_total: int
    """Contract points taken into attribution (counted when their request is answered)."""
    points_rejected_total: int
    """Contract points refused for good (bad kind/unit/value, unknown or another job's GPU, series limits,
    more FLOPs than the GPUs' peak), each answered as partial success."""
    points_ignored_total: int
    """Points of metrics outside the contract, and points flagged as having no recorded value."""
    requests_total: int
    requests_by_status: dict[int, int]
    """HTTP status -> requests answered with it (429/503: throttled; the client retries)."""


class OtlpCounters:
    """Thread-safe running totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accepted = 0
        self._rejected = 0
        self._ignored = 0
        self._status: Counter[int] = Counter()

    def request(self, status: int) -> None:
        """Record one answered request."""
        with self._lock:
            self._status[status] += 1

    def counted(self, accepted: int, rejected: int, ignored: int) -> None:
        """Record what a request's points came to (never for a request refused whole, which is retried)."""
        with self._lock:
            self._accepted += accepted
            self._rejected += rejected
            self._ignored += ignored

    def snapshot(self) -> OtlpStats:
        with self._lock:
            return OtlpStats(
                self._accepted, self._rejected, self._ignored, sum(self._status.values()), dict(self._status)
            )
