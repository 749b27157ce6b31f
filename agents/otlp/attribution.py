"""Turn received counter points into per-GPU amounts per agent interval (pure: the caller passes the time).

Design notes: docs/design-notes.md#agents-otlp-attribution-py.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Final

from gpufleet.agents.otlp.points import Point
from gpufleet.wire import MAX_FLOP_RATE

_NS_PER_MS: Final = 1_000_000
_NS_PER_S: Final = 1_000_000_000
_ZERO: Final = Fraction(0)


@dataclass(frozen=True, slots=True)
class AttributionSettings:
    series_ttl_ms: int = 600_000
    """Forget a series this long after its last report."""
    max_series: int = 10_000
    """Series kept at most; points of new series beyond it are rejected (a flood of distinct attributes)."""
    max_series_per_job: int = 1_000
    """Series of one job id (points without one count as one job) kept at most."""
    max_spread_ms: int = 600_000
    """Longest span one increment is spread over (a long silence is not smeared for hours)."""
    max_changes: int = 1_024
    """Rate-change instants kept per GPU at full precision; beyond, spans are rounded to `coarse_ms`."""
    coarse_ms: int = 1_000


@dataclass(frozen=True, slots=True)
class Rejection:
    """A point refused by attribution: `reason` groups rejections, `message` says why and what to change."""

    reason: str
    message: str


@dataclass(slots=True)
class _Series:
    start_ns: int
    time_ns: int
    value: Fraction
    last_arrival_ms: int
    job: str | None


@dataclass(slots=True)
class _Lane:
    """One GPU's pending amounts: the rate released now, and the instants (ns) it changes at."""

    rate: Fraction = _ZERO
    """Amount per ns released now."""
    active: int = 0
    lump: Fraction = _ZERO
    """Amounts due at the next take at once (spans of no length)."""
    lumps: int = 0
    backlog: Fraction = _ZERO
    """Amounts due that were over the GPU's ceiling at an earlier take: due again at the next."""
    changes: dict[int, list[Fraction | int]] = field(default_factory=dict)
    """Instant -> [rate change, active-span change]."""
    instants: list[int] = field(default_factory=list)
    """Heap of `changes`' keys."""

    def covered(self) -> bool:
        return self.active > 0 or self.lumps > 0 or self.backlog > 0 or bool(self.changes)

    def add(self, amount: Fraction, begin_ns: int, length_ns: int, floor_ns: int | None,
            settings: AttributionSettings) -> None:
        """Release `amount` at a constant rate over [begin, begin + length), or at the next take if length is 0.

        The part before `floor_ns` (the last take: intervals already sent) is due at the next take.
        """
        end_ns = begin_ns + length_ns
        if floor_ns is not None and begin_ns < floor_ns < end_ns:
            past = amount * (floor_ns - begin_ns) / length_ns
            self._lump(past)
            amount, begin_ns = amount - past, floor_ns
        elif length_ns <= 0 or (floor_ns is not None and end_ns <= floor_ns):
            self._lump(amount)
            return
        if len(self.changes) >= settings.max_changes:
            coarse = settings.coarse_ms * _NS_PER_MS
            begin_ns = -(-begin_ns // coarse) * coarse
            end_ns = max(-(-end_ns // coarse) * coarse, begin_ns + coarse)
        rate = amount / (end_ns - begin_ns)
        self._change(begin_ns, rate, 1)
        self._change(end_ns, -rate, -1)

    def release(self, since_ns: int, now_ns: int) -> Fraction:
        """The amount due in (since, now]: the lump plus the rate integrated over the changes passed."""
        due = self.lump + self.backlog
        self.lump, self.lumps, self.backlog = _ZERO, 0, _ZERO
        t = since_ns
        while self.instants and self.instants[0] <= now_ns:
            at = heapq.heappop(self.instants)
            rate_change, active_change = self.changes.pop(at)
            if at > t:
                due += self.rate * (at - t)
                t = at
            self.rate += rate_change  # type: ignore[assignment]
            self.active += active_change  # type: ignore[assignment]
        if now_ns > t:
            due += self.rate * (now_ns - t)
        if self.active == 0:
            self.rate = _ZERO
        return due

    def _lump(self, amount: Fraction) -> None:
        self.lump += amount
        self.lumps += 1

    def _change(self, at_ns: int, rate: Fraction, active: int) -> None:
        entry = self.changes.get(at_ns)
        if entry is None:
            self.changes[at_ns] = [rate, active]
            heapq.heappush(self.instants, at_ns)
        else:
            entry[0] += rate
            entry[1] += active


@dataclass(frozen=True, slots=True)
class AttributionStats:
    series: int
    lanes: int
    """GPUs with pending amounts."""
    changes: int
    """Rate-change instants pending over all lanes (what `take` may have to walk)."""
    duplicates_total: int
    dropped_total: int
    """Points rejected for good (series limits, rate bound)."""
    clamped_total: int = 0
    """GPU-takes whose amount was clamped at the GPU's ceiling x interval."""
    clamp_dropped: float = 0.0
    """Amount dropped because a GPU's backlog over its ceiling was full."""


class Attribution:
    """Per-metric counter state and per-GPU lanes; not thread-safe (the caller serializes `add` and `take`)."""

    def __init__(self, counted_since_ms: int, settings: AttributionSettings | None = None) -> None:
        """`counted_since_ms`: when this agent started listening; older counters are baselines, not counted."""
        self._settings = settings or AttributionSettings()
        self._since_ns = counted_since_ms * _NS_PER_MS
        self._series: OrderedDict[object, _Series] = OrderedDict()
        self._per_job: Counter[str | None] = Counter()
        self._lanes: dict[str, _Lane] = {}
        self._last_take_ns: int | None = None
        self._duplicates = 0
        self._dropped = 0
        self._clamped = 0
        self._clamp_dropped = _ZERO

    def add(self, points: Iterable[Point], ceilings: Mapping[str, float] | None = None) -> list[Rejection]:
        """Apply points in arrival order; returns the rejected ones' reasons (series limits, rate bound).

        `ceilings`: FLOP/s per GPU uuid for the rate bound (None: no bound, for counts other than FLOPs).
        """
        out: list[Rejection] = []
        for p in points:
            rejection = self._add_one(p, ceilings)
            if rejection is not None:
                out.append(rejection)
        self._dropped += len(out)
        return out

    def take(
        self, now_ms: int, interval_ms: int | None = None, ceilings: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Per GPU uuid, the amount that became due since the last take (0.0 for a covered GPU with none).

        With `interval_ms` and `ceilings` (FLOP/s per GPU), a GPU's amount is clamped at ceiling x interval:
        the excess stays due for later takes, up to `max_spread_ms` of the ceiling; beyond that it is dropped.
        Both are counted (`AttributionStats.clamped_total`, `clamp_dropped`).
        """
        now_ns = now_ms * _NS_PER_MS
        due: dict[str, float] = {}
        for gpu, lane in list(self._lanes.items()):
            covered = lane.covered()
            since = self._last_take_ns
            if since is None:
                since = lane.instants[0] if lane.instants else now_ns
            amount = lane.release(since, now_ns)
            if interval_ms is not None and ceilings is not None:
                amount = self._clamp(lane, amount, Fraction(ceilings.get(gpu, MAX_FLOP_RATE)), interval_ms)
            if covered:
                due[gpu] = _floor_float(amount)
            if not lane.covered():
                del self._lanes[gpu]
        if self._last_take_ns is None or now_ns > self._last_take_ns:
            self._last_take_ns = now_ns
        self._expire(now_ms)
        return due

    def _clamp(self, lane: _Lane, amount: Fraction, ceiling: Fraction, interval_ms: int) -> Fraction:
        """`amount` at most ceiling x interval; the excess goes to the lane's backlog (bounded), the rest is dropped."""
        limit = ceiling * interval_ms / 1000
        if amount <= limit:
            return amount
        self._clamped += 1
        excess = amount - limit
        lane.backlog = min(excess, ceiling * self._settings.max_spread_ms / 1000)
        self._clamp_dropped += excess - lane.backlog
        return limit

    def stats(self) -> AttributionStats:
        changes = sum(len(lane.changes) for lane in self._lanes.values())
        return AttributionStats(len(self._series), len(self._lanes), changes, self._duplicates, self._dropped,
                                self._clamped, _floor_float(self._clamp_dropped))

    def _add_one(self, p: Point, ceilings: Mapping[str, float] | None) -> Rejection | None:
        admitted = self._admit(p)
        if admitted is not None:
            return admitted
        value = Fraction(p.value)
        found = self._delta(p, value) if p.delta else self._cumulative(p, value)
        if found is None:
            return None
        amount, span_ns = found
        if ceilings is not None:
            over = _over_ceiling(p, amount, span_ns, ceilings, self._settings.max_spread_ms)
            if over is not None:
                return over
        self._spread(p, amount, span_ns)
        return None

    def _admit(self, p: Point) -> Rejection | None:
        """None when the point's series is kept (known, or room for it); else why not."""
        if p.series in self._series:
            self._series.move_to_end(p.series)
            return None
        s = self._settings
        if len(self._series) >= s.max_series:
            self._expire(p.arrival_ms)
        if len(self._series) >= s.max_series:
            return Rejection("series", f"{p.metric}: this agent already tracks {s.max_series} series (distinct "
                             "attribute sets); drop attributes that vary (step, timestamp) from the counter")
        if self._per_job[p.job] >= s.max_series_per_job:
            who = f"job {p.job!r}" if p.job is not None else "points without a job id"
            return Rejection("series", f"{p.metric}: {who} already has {s.max_series_per_job} series (distinct "
                             "attribute sets); drop attributes that vary (step, timestamp) from the counter")
        return None

    def _spread(self, p: Point, amount: Fraction, span_ns: int) -> None:
        length = max(0, min(span_ns, self._settings.max_spread_ms * _NS_PER_MS))
        begin = p.arrival_ms * _NS_PER_MS
        share = amount / len(p.gpus)
        for gpu in p.gpus:
            lane = self._lanes.get(gpu)
            if lane is None:
                lane = self._lanes[gpu] = _Lane()
            lane.add(share, begin, length, self._last_take_ns, self._settings)

    def _expire(self, now_ms: int) -> None:
        ttl = self._settings.series_ttl_ms
        while self._series:
            key, oldest = next(iter(self._series.items()))
            if now_ms - oldest.last_arrival_ms <= ttl:
                break
            del self._series[key]
            self._per_job[oldest.job] -= 1
            if self._per_job[oldest.job] <= 0:
                del self._per_job[oldest.job]

    def _remember(self, p: Point, value: Fraction) -> None:
        self._series[p.series] = _Series(p.start_ns, p.time_ns, value, p.arrival_ms, p.job)
        self._per_job[p.job] += 1

    def _cumulative(self, p: Point, value: Fraction) -> tuple[Fraction, int] | None:
        """(increment, span of job time in ns) for a cumulative point, or None when it adds nothing."""
        s = self._series.get(p.series)
        if s is None:
            self._remember(p, value)
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
            self._remember(p, value)
        elif (s.start_ns, s.time_ns) == (p.start_ns, p.time_ns):
            s.last_arrival_ms = max(s.last_arrival_ms, p.arrival_ms)
            self._duplicates += 1
            return None
        else:
            s.start_ns, s.time_ns, s.value = p.start_ns, p.time_ns, value
            s.last_arrival_ms = max(s.last_arrival_ms, p.arrival_ms)
        span = p.time_ns - p.start_ns if 0 < p.start_ns < p.time_ns else 0
        return value, span


def _over_ceiling(
    p: Point, amount: Fraction, span_ns: int, ceilings: Mapping[str, float], max_spread_ms: int
) -> Rejection | None:
    """A rejection when `amount` is more than the point's GPUs execute at their ceilings over its span, or over
    `max_spread_ms` if longer (a job whose steps outlast its export interval reports in lumps)."""
    span = max(span_ns, max_spread_ms * _NS_PER_MS)
    rates = [ceilings.get(g, MAX_FLOP_RATE) for g in p.gpus]
    rough = _floor_float(amount) / (sum(rates) * span / _NS_PER_S)  # decides all but a hair's breadth
    if rough < 0.999_999:
        return None
    limit = sum((Fraction(r) for r in rates), _ZERO) * span / _NS_PER_S
    if amount <= limit:
        return None
    return Rejection("ceiling", f"{p.metric}: {float(amount):.4g} over {span / _NS_PER_S:.4g} s of job time is "
                     f"more than its {len(p.gpus)} GPU(s) can execute at peak ({float(limit):.4g}); not counted: "
                     "report plain model FLOPs executed (not FLOP/s), on the job's own GPUs")


def _floor_float(amount: Fraction) -> float:
    """The largest float <= `amount` (so a clamped amount never rounds above its bound); never inf."""
    try:
        f = float(amount)
    except OverflowError:
        return math.nextafter(math.inf, 0.0)
    return math.nextafter(f, -math.inf) if Fraction(f) > amount else f
