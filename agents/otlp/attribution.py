"""Turn received counter points into per-GPU amounts per agent interval (pure: the caller passes the time).

Counter semantics, per series (OTel stream identity, see agents.otlp.points):
- Cumulative: the increment is the value minus the previous value. A changed
  `start_time_unix_nano`, or a value below the previous one, is a counter reset (the job
  restarted): the new value counts from zero, so nothing goes negative and nothing counts twice.
  A repeated or older point (an exporter retry) adds nothing.
- First point of a cumulative series: counted in full when the counter started after this agent
  did and within `series_ttl_ms` of the point (a job that started while we listened);
  otherwise it is only the baseline (the counter ran before we listened, or we forgot it after
  the TTL: counting it could count FLOPs twice, so we lose at most one report's worth instead).
- Delta: each value counts once; an exact repeat of the series' last window is a retry and
  adds nothing.

Proration: an increment covers a span of the job's time (from the previous point, or from the
counter's start, to this point; capped at `max_spread_ms`). The agent cannot amend intervals it
already sent, so it releases the increment at a constant rate over an equally long span of its
own clock starting when the report arrived. A job reporting every P seconds therefore shows a
smooth rate, one report period late. Totals are exact: amounts are kept as exact fractions,
each `take` returns what became due since the last one, a finished span releases exactly its
remainder, and a time gap between takes is absorbed by the next.

Splitting: an increment tied to n GPUs gives each GPU 1/n of it. A GPU is in `take`'s result
(possibly with 0.0) while some span covers it; a job that stops reporting drains what it
reported and then contributes nothing (no extrapolation). Series state expires `series_ttl_ms`
after its last report; at most `max_series` series are kept (points of further new series are
dropped and counted).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from fractions import Fraction

from gpufleet.agents.otlp.points import Point

_NS_PER_MS = 1_000_000


@dataclass(frozen=True, slots=True)
class AttributionSettings:
    series_ttl_ms: int = 600_000
    """Forget a series this long after its last report."""
    max_series: int = 10_000
    """Series kept at most; points of new series beyond it are dropped (a flood of distinct attributes)."""
    max_spread_ms: int = 600_000
    """Longest span one increment is spread over (a long silence is not smeared for hours)."""


@dataclass(slots=True)
class _Series:
    start_ns: int
    time_ns: int
    value: Fraction
    last_arrival_ms: int


@dataclass(slots=True)
class _Span:
    gpus: tuple[str, ...]
    amount: Fraction
    begin_ns: int
    length_ns: int
    released: Fraction = Fraction(0)


@dataclass(frozen=True, slots=True)
class AttributionStats:
    series: int
    spans: int
    duplicates_total: int
    dropped_total: int


class Attribution:
    """Per-metric counter state and pending spans; not thread-safe (one caller feeds and takes)."""

    def __init__(self, counted_since_ms: int, settings: AttributionSettings | None = None) -> None:
        """`counted_since_ms`: when this agent started listening; older counters are baselines, not counted."""
        self._settings = settings or AttributionSettings()
        self._since_ns = counted_since_ms * _NS_PER_MS
        self._series: dict[Hashable, _Series] = {}
        self._spans: list[_Span] = []
        self._duplicates = 0
        self._dropped = 0

    def add(self, points: Iterable[Point]) -> int:
        """Apply points in arrival order; returns how many were dropped (series limit)."""
        dropped = 0
        for p in points:
            if p.series not in self._series and len(self._series) >= self._settings.max_series:
                dropped += 1
                continue
            value = Fraction(p.value)
            found = self._delta(p, value) if p.delta else self._cumulative(p, value)
            if found is None:
                continue
            amount, span_ns = found
            length = max(0, min(span_ns, self._settings.max_spread_ms * _NS_PER_MS))
            self._spans.append(_Span(p.gpus, amount, p.arrival_ms * _NS_PER_MS, length))
        self._dropped += dropped
        return dropped

    def take(self, now_ms: int) -> dict[str, float]:
        """Per GPU uuid, the amount that became due since the last take (0.0 for a covered GPU with none)."""
        now_ns = now_ms * _NS_PER_MS
        due: dict[str, Fraction] = {}
        kept: list[_Span] = []
        for span in self._spans:
            elapsed = now_ns - span.begin_ns
            done = elapsed >= span.length_ns
            target = span.amount if done else span.amount * max(elapsed, 0) / span.length_ns
            new = max(target - span.released, Fraction(0))
            span.released += new
            share = new / len(span.gpus)
            for gpu in span.gpus:
                due[gpu] = due.get(gpu, Fraction(0)) + share
            if not done:
                kept.append(span)
        self._spans = kept
        self._expire(now_ms)
        return {gpu: float(v) for gpu, v in due.items()}

    def stats(self) -> AttributionStats:
        return AttributionStats(len(self._series), len(self._spans), self._duplicates, self._dropped)

    def _expire(self, now_ms: int) -> None:
        ttl = self._settings.series_ttl_ms
        stale = [k for k, s in self._series.items() if now_ms - s.last_arrival_ms > ttl]
        for key in stale:
            del self._series[key]

    def _cumulative(self, p: Point, value: Fraction) -> tuple[Fraction, int] | None:
        """(increment, span of job time in ns) for a cumulative point, or None when it adds nothing."""
        s = self._series.get(p.series)
        if s is None:
            self._series[p.series] = _Series(p.start_ns, p.time_ns, value, p.arrival_ms)
            ttl_ns = self._settings.series_ttl_ms * _NS_PER_MS
            fresh = p.start_ns > 0 and p.start_ns >= self._since_ns and p.time_ns - p.start_ns <= ttl_ns
            return (value, p.time_ns - p.start_ns) if fresh else None
        s.last_arrival_ms = max(s.last_arrival_ms, p.arrival_ms)
        if p.time_ns <= s.time_ns:
            self._duplicates += 1
            return None
        if p.start_ns and s.start_ns and p.start_ns != s.start_ns:
            found: tuple[Fraction, int] = (value, p.time_ns - p.start_ns)
        elif value < s.value:
            found = (value, p.time_ns - s.time_ns)
        else:
            found = (value - s.value, p.time_ns - s.time_ns)
        s.start_ns, s.time_ns, s.value = p.start_ns, p.time_ns, value
        return found

    def _delta(self, p: Point, value: Fraction) -> tuple[Fraction, int] | None:
        """(increment, span of job time in ns) for a delta point, or None for a repeated window."""
        s = self._series.get(p.series)
        if s is None:
            self._series[p.series] = _Series(p.start_ns, p.time_ns, value, p.arrival_ms)
        elif (s.start_ns, s.time_ns) == (p.start_ns, p.time_ns):
            s.last_arrival_ms = max(s.last_arrival_ms, p.arrival_ms)
            self._duplicates += 1
            return None
        else:
            s.start_ns, s.time_ns, s.value = p.start_ns, p.time_ns, value
            s.last_arrival_ms = max(s.last_arrival_ms, p.arrival_ms)
        span = p.time_ns - p.start_ns if 0 < p.start_ns < p.time_ns else 0
        return value, span

