"""The job schedule: the fleet is partitioned into slots, and each slot runs tenants' jobs one after another.

Design notes: docs/design-notes.md#agents-simulation-jobs-py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from gpufleet.agents.simulation.faults import BOOKING_KINDS, BOOKING_PAD_MS, FREE_KINDS, JOB_KINDS, Fault
from gpufleet.agents.simulation.rng import key

MINUTE: Final = 60_000
HOUR: Final = 3_600_000
MIB: Final = 1 << 20

_PARTITION: Final = 0xA1
_SLOT: Final = 0xB2
_PHASES: Final = 0xC3


@dataclass(frozen=True, slots=True)
class SlotKind:
    """Job durations (log-uniform, minutes) and the mean gap between jobs (minutes, at noon-ish)."""

    name: str
    min_minutes: float
    max_minutes: float
    gap_minutes: float


SMALL: Final = SlotKind("small", 5, 180, 12)
NODE: Final = SlotKind("node", 20, 480, 20)
POD: Final = SlotKind("pod", 60, 720, 30)
SMALL_SHARE: Final = 0.25
POD_SHARE: Final = 0.3
NEVER_LAUNCHED: Final = 0.02
CRASHED: Final = 0.04


def diurnal(t_ms: int) -> float:
    """-1 at 03:00 UTC, +1 at 15:00 UTC: how much of the working day `t_ms` falls in."""
    return math.cos(2 * math.pi * ((t_ms / HOUR) % 24 - 15) / 24)


def busy_probability(t_ms: int) -> float:
    """Chance that a job phase starting at `t_ms` is busy: 0.95 by day, 0.61 by night (UTC)."""
    return 0.78 + 0.17 * diurnal(t_ms)


@dataclass(frozen=True, slots=True)
class Phase:
    """A stretch of a job: busy (levels set) or idle-but-running (process present, util < 0.05)."""

    start_ms: int
    end_ms: int
    busy: bool
    util: float
    tensor: float
    dram: float


@dataclass(frozen=True, slots=True)
class Job:
    """One job's allocation: GPUs `(node, gpu)` held on `[start_ms, end_ms)`."""

    number: int
    tenant: str
    start_ms: int
    end_ms: int
    gpus: tuple[tuple[int, int], ...]
    mem_bytes: int
    process_end_ms: int
    """Processes run on `[start_ms, process_end_ms)`: `end_ms` normally, earlier if the job
    crashed, `start_ms` if it never launched; the GPUs stay allocated until `end_ms` regardless."""
    phases: tuple[Phase, ...]

    @property
    def id(self) -> str:
        return f"job-{self.number:05d}"


@dataclass(frozen=True, slots=True)
class SlotSpec:
    ident: int
    kind: SlotKind
    gpus: tuple[tuple[int, int], ...]


def partition(seed: int, nodes: int, gpus_per_node: int, split_nodes: set[int],
              solo_nodes: frozenset[int] = frozenset()) -> list[SlotSpec]:
    """Split the fleet into slots: ~25% of nodes into small GPU slots, ~30% into pods of 2-4 nodes
    (fleets of 4+ nodes), the rest whole-node slots; `split_nodes` get one-GPU slots, `solo_nodes` a
    whole-node slot each."""
    rng = random.Random(key(seed, _PARTITION))  # noqa: S311 - simulation, not security
    order = [n for n in range(nodes) if n not in split_nodes]
    rng.shuffle(order)
    solo = [n for n in order if n in solo_nodes]
    order = [n for n in order if n not in solo_nodes]
    n_small = max(1, round(SMALL_SHARE * len(order))) if len(order) >= 2 and gpus_per_node > 1 else 0
    n_pod = round(POD_SHARE * len(order)) if len(order) >= 4 else 0
    groups: list[tuple[SlotKind, tuple[tuple[int, int], ...]]] = []
    for n in sorted(split_nodes):
        groups.extend((SMALL, ((n, g),)) for g in range(gpus_per_node))
    for n in order[:n_small]:
        g = 0
        while g < gpus_per_node:
            size = rng.choice([s for s in (1, 2, 4) if s <= gpus_per_node - g])
            groups.append((SMALL, tuple((n, g + i) for i in range(size))))
            g += size
    pod_nodes = order[n_small : n_small + n_pod]
    while len(pod_nodes) >= 2:
        size = min(len(pod_nodes), rng.randint(2, 4))
        if len(pod_nodes) - size == 1:  # never leave a pod of one
            size = size - 1 if size > 2 else size + 1
        pod, pod_nodes = sorted(pod_nodes[:size]), pod_nodes[size:]
        groups.append((POD, tuple((n, g) for n in pod for g in range(gpus_per_node))))
    for n in pod_nodes + order[n_small + n_pod :] + solo:
        groups.append((NODE, tuple((n, g) for g in range(gpus_per_node))))
    groups.sort(key=lambda kg: kg[1][0])
    return [SlotSpec(i, kind, gpus) for i, (kind, gpus) in enumerate(groups)]


class Slot:
    """One slot's jobs, generated forward on demand."""

    def __init__(
        self,
        spec: SlotSpec,
        *,
        seed: int,
        tenants: Sequence[str],
        origin_ms: int,
        slot_count: int,
        bookings: Sequence[tuple[int, int]] = (),
        keep_free: Sequence[tuple[int, int]] = (),
        keep_running: Sequence[tuple[int, int]] = (),
    ) -> None:
        self.spec = spec
        self._seed = seed
        self._tenants = list(tenants)
        self._weights = [1 / (i + 1) for i in range(len(tenants))]
        self._rng = random.Random(key(seed, _SLOT, spec.ident))  # noqa: S311 - simulation only
        self._slot_count = slot_count
        self._bookings = sorted(bookings)
        self._keep_free = sorted(keep_free)
        self._keep_running = sorted(keep_running)
        """A job overlapping one of these windows neither crashes nor fails to launch."""
        self._t = origin_ms
        self._pending: Job | None = None
        self.jobs: list[Job] = []

    def extend(self, until_ms: int) -> list[Job]:
        """Generate every job that starts before `until_ms`; returns all jobs so far, in order."""
        while True:
            if self._pending is None:
                self._pending = self._next_job()
            if self._pending.start_ms >= until_ms:
                return self.jobs
            self.jobs.append(self._pending)
            self._pending = None

    def _next_job(self) -> Job:
        rng = self._rng
        kind = self.spec.kind
        t = self._t
        gap = round(rng.expovariate(1 / (kind.gap_minutes * MINUTE * (1 - 0.6 * diurnal(t)))))
        duration = round(math.exp(rng.uniform(math.log(kind.min_minutes), math.log(kind.max_minutes))) * MINUTE)
        tenant = rng.choices(self._tenants, weights=self._weights)[0]
        mem = rng.randint(40 * 1024, 78 * 1024) * MIB
        fate, crash_at = rng.random(), rng.uniform(0.1, 0.9)
        start, end = self._constrain(t, t + gap, duration)
        if any(rs < end and start < re for rs, re in self._keep_running):
            process_end = end
        elif fate < NEVER_LAUNCHED:
            process_end = start
        elif fate < NEVER_LAUNCHED + CRASHED:
            process_end = start + round(crash_at * (end - start))
        else:
            process_end = end
        number = len(self.jobs) * self._slot_count + self.spec.ident + 1
        phase_rng = random.Random(key(self._seed, _PHASES, number))  # noqa: S311 - simulation only
        self._t = end
        return Job(number, tenant, start, end, self.spec.gpus, mem, process_end, _phases(phase_rng, start, process_end))

    def _constrain(self, t: int, start: int, duration: int) -> tuple[int, int]:
        """Move the job `[start, start + duration)` (after a gap from `t`) off keep-free windows and
        over booked ones."""
        end = start + duration
        for zs, ze in self._keep_free:
            if start < ze and zs < end:
                start, end = ze, ze + duration
        for bs, be in self._bookings:
            if t <= bs < end and not (start <= bs and be <= end):
                start, end = min(start, bs), max(end, be)
        for zs, _ in self._keep_free:
            if start < zs < end:
                end = zs
        return start, end


class Scheduler:
    """The fleet's slots and their jobs."""

    def __init__(
        self,
        *,
        seed: int,
        nodes: int,
        gpus_per_node: int,
        tenants: Sequence[str],
        origin_ms: int,
        faults: Sequence[Fault] = (),
    ) -> None:
        constrained = [f for f in faults if f.gpu is not None and f.kind in BOOKING_KINDS | FREE_KINDS | JOB_KINDS]
        specs = partition(seed, nodes, gpus_per_node, {f.node for f in constrained if f.kind not in JOB_KINDS},
                          frozenset(f.node for f in constrained if f.kind in JOB_KINDS))
        self._slot_of: dict[tuple[int, int], Slot] = {}
        self.slots: list[Slot] = []
        for spec in specs:
            mine = [f for f in constrained if (f.node, f.gpu) in spec.gpus]
            slot = Slot(
                spec,
                seed=seed,
                tenants=tenants,
                origin_ms=origin_ms,
                slot_count=len(specs),
                bookings=_merge(
                    (max(origin_ms, f.start_ms - BOOKING_PAD_MS), f.end_ms + BOOKING_PAD_MS)
                    for f in mine
                    if f.kind in BOOKING_KINDS | JOB_KINDS
                ),
                keep_free=[(f.start_ms, f.end_ms) for f in mine if f.kind in FREE_KINDS],
                keep_running=[(f.start_ms, f.end_ms) for f in mine if f.kind in JOB_KINDS],
            )
            self.slots.append(slot)
            for g in spec.gpus:
                self._slot_of[g] = slot

    def gpu_jobs(self, node: int, gpu: int, until_ms: int) -> list[Job]:
        """The GPU's jobs in start order, complete for every start before `until_ms`."""
        return self._slot_of[(node, gpu)].extend(until_ms)

    def jobs_between(self, start_ms: int, end_ms: int) -> list[Job]:
        """Every job overlapping `[start_ms, end_ms)`, by start time then number."""
        jobs = [j for slot in self.slots for j in slot.extend(end_ms) if j.start_ms < end_ms and j.end_ms > start_ms]
        return sorted(jobs, key=lambda j: (j.start_ms, j.number))


def _merge(windows: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping windows merged (one job covers both)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(windows):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _phases(rng: random.Random, start: int, end: int) -> tuple[Phase, ...]:
    """Start-up (loading, idle-but-running), then busy stretches broken by idle ones, more idle by night."""
    out: list[Phase] = []
    t = start
    warm = rng.randint(30_000, 180_000)
    if t < end:
        out.append(Phase(t, min(end, t + warm), False, 0.0, 0.0, 0.0))
        t += warm
    while t < end:
        if rng.random() < busy_probability(t):
            length = rng.randint(10 * MINUTE, 60 * MINUTE)
            util, tensor, dram = rng.uniform(0.7, 1.0), rng.uniform(0.15, 0.6), rng.uniform(0.2, 0.55)
            out.append(Phase(t, min(end, t + length), True, util, tensor, dram))
        else:
            length = rng.randint(MINUTE, 10 * MINUTE)
            out.append(Phase(t, min(end, t + length), False, 0.0, 0.0, 0.0))
        t += length
    return tuple(out)
