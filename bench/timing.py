"""Bounded latency measurement: every loop stops by count and by time, whatever the query costs.

`measure` collects garbage, runs warm-up calls (`WARM_UPS`), then timed calls until `runs` are done
or `budget_s` has passed (at least one timed call). A warm-up slower than `slow_s` is kept as a sample: for a query of
seconds the first call's cache misses are noise against its cost, and running it again would
spend the run's time on one figure. The figures say how many runs each came from (20 for a query
within the 200 ms target at issue 12's sizes; fewer, and p95 close to the maximum, for slower ones).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from bench.common import percentile

T = TypeVar("T")


WARM_UPS = 4
"""Untimed calls before a fast question's timed ones: ClickHouse compiles a query shape's expressions, aggregates
and sort once it has run `min_count_to_compile_expression` (3) times, inside the next execution (+12-32 ms measured
for usage's refresh query; +340 ms CPU in the capacity waterfall's 4th execution, its compile spike that 3
warm-ups left in the first timed run), then reuses the code for any parameter values: a steady-state server has
paid it."""


@dataclass(frozen=True)
class Limits:
    """How many timed runs at most, and the wall-clock budget for one question's runs."""

    runs: int = 5
    budget_s: float = 3.0
    slow_s: float = 1.0


def measure(fn: Callable[[], T], limits: Limits) -> tuple[dict[str, Any], T]:
    """Latency figures of `fn` (ms) and its last result."""
    gc.collect()  # the garbage of what ran before (a history's generation, the previous question) is not fn's
    started = time.perf_counter()
    result = fn()
    first_ms = (time.perf_counter() - started) * 1000
    times = [first_ms] if first_ms > limits.slow_s * 1000 else []
    if not times:
        for _ in range(WARM_UPS - 1):  # ClickHouse JIT-compiles a query's expressions at its 4th execution
            result = fn()
    while len(times) < limits.runs and (not times or time.perf_counter() - started < limits.budget_s):
        t = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t) * 1000)
    return summary(times), result


def summary(times_ms: list[float]) -> dict[str, Any]:
    return {"p50_ms": round(statistics.median(times_ms), 2), "p95_ms": round(percentile(times_ms, 95), 2),
            "runs": len(times_ms)}
