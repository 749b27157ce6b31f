"""Liveness: named heartbeats, each with a bound; a process is healthy while every one is fresh.

The loop that does the work calls `beat(name)` each time it completes a step (the ingester after a
poll and after a commit, the evaluator after an evaluation, the agent after a collection);
`/healthz` asks `check()`. A heartbeat never beaten counts from when it was declared, so a process
gets one bound of grace at start-up and no more; readiness (`check(ready=True)`) also wants each
heartbeat to have come once. Time is `time.monotonic` unless a clock is
injected (tests move it by hand). One writer per name, any number of readers: a float assignment
is atomic under the GIL, so no lock is needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Health", "Liveness"]


@dataclass(frozen=True)
class Health:
    """The answer `/healthz` serves: `ok`, and each heartbeat's age and bound in seconds."""

    ok: bool
    ages_s: Mapping[str, float]
    bounds_s: Mapping[str, float]

    @property
    def stale(self) -> list[str]:
        """Names of the heartbeats older than their bound, in declaration order."""
        return [n for n, age in self.ages_s.items() if age > self.bounds_s[n]]

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "stale": self.stale,
            "checks": {n: {"age_s": round(age, 3), "bound_s": self.bounds_s[n]} for n, age in self.ages_s.items()},
        }


class Liveness:
    """Heartbeats declared with `expect(name, within_s)`, refreshed with `beat(name)`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._bounds: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._beaten: set[str] = set()

    def expect(self, name: str, within_s: float) -> Liveness:
        """Declare a heartbeat that must come at least every `within_s` seconds (counted from now)."""
        if within_s <= 0:
            raise ValueError(f"the bound of heartbeat {name!r} must be positive, not {within_s}")
        self._bounds[name] = float(within_s)
        self._last[name] = self._clock()
        return self

    def beat(self, name: str) -> None:
        """Record that `name` just happened; a name never declared is ignored (the check does not know it)."""
        if name in self._bounds:
            self._last[name] = self._clock()
            self._beaten.add(name)

    def check(self, *, ready: bool = False) -> Health:
        """Every heartbeat's age now; `ok` when none is older than its bound.

        `ready` (readiness) also requires every heartbeat to have come at least once.
        """
        now = self._clock()
        ages = {n: max(0.0, now - self._last[n]) for n in self._bounds}
        fresh = all(ages[n] <= b for n, b in self._bounds.items())
        return Health(fresh and (not ready or self._beaten >= self._bounds.keys()), ages, dict(self._bounds))
