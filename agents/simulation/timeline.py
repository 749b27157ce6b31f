"""One GPU's timeline: piecewise-constant activity segments and the energy counter they integrate to.

Segments come from the GPU's jobs (their phases; no process after a crash), free gaps between
jobs, and the faults that change what runs (held_no_process, idle_allocated, zombie_process,
fell_off_bus, throttling), including a job fault's effect on each GPU of its job (`Effect`). Power
is constant within a segment, so the cumulative energy at any instant is exact: the sum of power x
duration of the segments before it. Built lazily, forward.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Final, NamedTuple

from gpufleet.agents.simulation import faults as fk
from gpufleet.agents.simulation.faults import Fault
from gpufleet.agents.simulation.jobs import Job

FREE, BUSY, IDLE, NOPROC, ZOMBIE, LOST = range(6)
"""Activity kinds: unallocated; busy; idle-but-running; allocated without a process; a process
on an unallocated GPU; fallen off the bus."""

GIB: Final = 1 << 30
IDLE_UTIL_MAX: Final = 0.04
"""The largest utilization an idle-but-running GPU shows (below the usual 0.05 idle threshold)."""
IDLE_ALLOCATED_UTIL_MAX: Final = 0.01
THROTTLE_HW_THERMAL: Final = 0x40
THROTTLE_HW_POWER_BRAKE: Final = 0x80
MAX_POWER_W: Final = 700.0
HUNG: Final = "hung"
SLOW: Final = "slow"
PACED: Final = "paced"
"""Effects of job faults on one GPU: spinning in a hung collective; the straggler; a straggler's peer."""
STRAGGLER_CLOCK_MHZ: Final = 1200
STRAGGLER_TENSOR_SHARE: Final = 0.6
_BUSY_LEVELS: Final = (0.95, 0.45, 0.4)
"""Utilization, tensor and DRAM activity of a straggler's job where its phase was idle (it runs a step loop)."""


class Effect(NamedTuple):
    """What a job fault does to one GPU of its job over `[start_ms, end_ms)` (kind: `HUNG`, `SLOW`, `PACED`)."""

    kind: str
    start_ms: int
    end_ms: int


@dataclass(frozen=True, slots=True)
class Activity:
    """What a GPU does during a segment; `power_w` is the level the energy counter integrates."""

    kind: int
    job: Job | None
    util: float
    """BUSY/ZOMBIE: the utilization level; IDLE: the largest utilization shown; else 0."""
    tensor: float
    dram: float
    mem_bytes: int
    power_w: float
    throttle: int = 0
    clock_cap_mhz: int = 0
    """The SM clock is held at or below this (0: not held; set application clocks, a locked clock)."""


def busy_power(idle_w: float, util: float, tensor: float) -> float:
    """Board power of a busy GPU: idle + a base + a share tracking utilization and tensor work."""
    return min(MAX_POWER_W, idle_w + 90 + 540 * min(1.0, 0.35 * util + 0.65 * tensor / 0.6))


def _held(act: Activity, idle_w: float) -> Activity:
    return dataclasses.replace(act, kind=NOPROC, util=0.0, tensor=0.0, dram=0.0, mem_bytes=0, power_w=idle_w)


def _idle(act: Activity, idle_w: float) -> Activity:
    mem = act.mem_bytes or (act.job.mem_bytes if act.job else 0)
    return dataclasses.replace(
        act, kind=IDLE, util=IDLE_ALLOCATED_UTIL_MAX, tensor=0.0, dram=0.0, mem_bytes=mem, power_w=idle_w + 45
    )


def _zombie(act: Activity, idle_w: float) -> Activity:
    return dataclasses.replace(
        act, kind=ZOMBIE, util=0.25, tensor=0.0, dram=0.05, mem_bytes=24 * GIB, power_w=idle_w + 60
    )


def _lost(act: Activity, idle_w: float) -> Activity:
    return dataclasses.replace(act, kind=LOST, power_w=idle_w)


def _thermal(act: Activity, idle_w: float) -> Activity:
    power = max(idle_w, act.power_w * 0.85)
    return dataclasses.replace(act, throttle=act.throttle | THROTTLE_HW_THERMAL, power_w=power)


def _power_brake(act: Activity, idle_w: float) -> Activity:
    power = min(act.power_w, idle_w + 150)
    return dataclasses.replace(act, throttle=act.throttle | THROTTLE_HW_POWER_BRAKE, power_w=power)


def _running(act: Activity) -> bool:
    return act.kind in (BUSY, IDLE)


def _hung(act: Activity, idle_w: float) -> Activity:
    """A process spinning in a collective that never completes: ~100 % utilization, no math, near-idle power."""
    if not _running(act):
        return act
    return dataclasses.replace(act, kind=BUSY, util=1.0, tensor=0.0, dram=0.01, power_w=idle_w + 25)


def _stepping(act: Activity, idle_w: float) -> Activity:
    """The job in a busy step loop (an idle phase becomes a busy one)."""
    if act.kind != IDLE:
        return act
    util, tensor, dram = _BUSY_LEVELS
    return dataclasses.replace(act, kind=BUSY, util=util, tensor=tensor, dram=dram,
                               power_w=busy_power(idle_w, util, tensor))


def _slow(act: Activity, idle_w: float) -> Activity:
    """The straggler: its SM clock held low with no throttle reason, so its tensor pipes do less."""
    act = _stepping(act, idle_w)
    if act.kind != BUSY:
        return act
    tensor = act.tensor * STRAGGLER_TENSOR_SHARE
    return dataclasses.replace(act, tensor=tensor, power_w=busy_power(idle_w, act.util, tensor),
                               clock_cap_mhz=STRAGGLER_CLOCK_MHZ)


_TRANSFORMS: Final[dict[str, Callable[[Activity, float], Activity]]] = {
    fk.HELD_NO_PROCESS: _held,
    fk.IDLE_ALLOCATED: _idle,
    fk.ZOMBIE_PROCESS: _zombie,
    fk.FELL_OFF_BUS: _lost,
    fk.THERMAL_THROTTLE: _thermal,
    fk.POWER_THROTTLE: _power_brake,
    HUNG: _hung,
    SLOW: _slow,
    PACED: _stepping,
}
"""How each fault that changes what runs on a GPU changes its activity (pure)."""


class GpuTimeline:
    """Segments `[start, end)` covering `[origin, covered)`, each with its activity and energy."""

    def __init__(self, *, idle_power_w: float, origin_ms: int, energy0_j: float,
                 faults: Sequence[Fault | Effect]) -> None:
        self.idle_power_w = idle_power_w
        self.energy0_j = energy0_j
        self._faults = sorted((f for f in faults if f.kind in _TRANSFORMS), key=lambda f: f.start_ms)
        self._free = Activity(FREE, None, 0.0, 0.0, 0.0, 0, idle_power_w)
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._acts: list[Activity] = []
        self._energy: list[float] = []
        self._total_j = 0.0
        self.covered_ms = origin_ms
        self._origin_ms = origin_ms
        self._next_job = 0
        self._cursor = 0

    def extend(self, jobs: Sequence[Job], until_ms: int) -> None:
        """Append segments up to at least `until_ms`; `jobs` are this GPU's jobs in start order,
        complete for every start before `until_ms`."""
        while self._next_job < len(jobs) and jobs[self._next_job].start_ms < until_ms:
            job = jobs[self._next_job]
            self._next_job += 1
            if job.start_ms > self.covered_ms:
                self._overlay(self.covered_ms, job.start_ms, self._free)
            for start, end, act in self._job_pieces(job):
                self._overlay(start, end, act)
            self.covered_ms = job.end_ms
        if self.covered_ms < until_ms:
            self._overlay(self.covered_ms, until_ms, self._free)
            self.covered_ms = until_ms

    def at(self, t_ms: int) -> tuple[Activity, float]:
        """The activity at `t_ms` and the cumulative energy (J) then; `t_ms` < `covered_ms`."""
        if t_ms < self._origin_ms:
            return self._free, self.energy0_j
        starts = self._starts
        i = self._cursor
        if not (starts[i] <= t_ms < self._ends[i]):
            i = bisect.bisect_right(starts, t_ms) - 1
            self._cursor = i
        act = self._acts[i]
        return act, self.energy0_j + self._energy[i] + act.power_w * (t_ms - starts[i]) / 1000

    def _job_pieces(self, job: Job) -> list[tuple[int, int, Activity]]:
        idle_w = self.idle_power_w
        pieces = []
        for ph in job.phases:
            if ph.busy:
                power = busy_power(idle_w, ph.util, ph.tensor)
                act = Activity(BUSY, job, ph.util, ph.tensor, ph.dram, job.mem_bytes, power)
            else:
                act = Activity(IDLE, job, IDLE_UTIL_MAX, 0.0, 0.0, job.mem_bytes, idle_w + 45)
            pieces.append((ph.start_ms, ph.end_ms, act))
        if job.process_end_ms < job.end_ms:
            pieces.append((job.process_end_ms, job.end_ms, Activity(NOPROC, job, 0.0, 0.0, 0.0, 0, idle_w)))
        return pieces

    def _overlay(self, start: int, end: int, act: Activity) -> None:
        """Append `[start, end)`, split where faults begin or end, each piece under its faults."""
        cuts = {start, end}
        for f in self._faults:
            cuts.update(x for x in (f.start_ms, f.end_ms) if start < x < end)
        for a, b in pairwise(sorted(cuts)):
            cur = act
            for f in self._faults:
                if f.start_ms <= a < f.end_ms:
                    cur = _TRANSFORMS[f.kind](cur, self.idle_power_w)
            self._starts.append(a)
            self._ends.append(b)
            self._acts.append(cur)
            self._energy.append(self._total_j)
            self._total_j += cur.power_w * (b - a) / 1000
