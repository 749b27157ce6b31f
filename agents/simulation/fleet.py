"""The simulated fleet: nodes of GPUs running a seeded job schedule, with injected faults.

Every value is a pure function of the fleet's arguments and (node, gpu, time): time is an input
(`collect(now_ms)`), nothing reads the wall clock or a global RNG, and the same arguments give
byte-identical output. The schedule and per-GPU timelines are built lazily, forward, one hour of
simulated time at a time, and cached, so a collect costs a lookup and a few hashes per GPU.

Attribution rule (shared by `allocation_source()` and the ground truth): a sample taken at `t`
carries the tenant of the allocation whose half-open interval `[start_ms, end_ms)` contains `t`.
Node-side parts (ports, enumeration, inventory): docs/design-notes.md#agents-simulation-fleet-py.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, Final

from gpufleet.agents.allocation import Allocation
from gpufleet.agents.collectors.base import DeviceView, Enumeration, NodeDown
from gpufleet.agents.simulation import faults as fk
from gpufleet.agents.simulation import truth
from gpufleet.agents.simulation.faults import Fault
from gpufleet.agents.simulation.jobs import HOUR, Job, Scheduler
from gpufleet.agents.simulation.network import node_ports
from gpufleet.agents.simulation.rng import gpu_uuid, key, unit
from gpufleet.agents.simulation.sample import (
    DRIFTED_DRIVER_VERSION,
    DRIVER_VERSION,
    GpuConst,
    Inventory,
    build_sample,
    health_at,
)
from gpufleet.agents.simulation.timeline import GIB, HUNG, PACED, SLOW, Effect, GpuTimeline
from gpufleet.wire import GpuSample, NetworkPort

DEFAULT_MODEL: Final = "NVIDIA H100 80GB HBM3"
CHUNK_MS: Final = HOUR
"""GPU timelines are built in steps of this much simulated time from the origin."""
_NOISE, _TEMP, _MEM_TEMP, _IDLE_POWER, _ENERGY, _SERIAL = 1, 2, 3, 4, 5, 6
INVENTORY_EVERY_MS: Final = 60_000
"""The simulated agents' inventory cadence (the real agent's default is 300 s)."""
GPUS_PER_CLIQUE: Final = 8
"""GPUs per NVLink clique: one HGX board (NVSwitches inside the node)."""


def tenant_name(i: int) -> str:
    """`tenant-a` ... `tenant-z`, then `tenant-aa`, `tenant-ab`, ..."""
    letters = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        letters = chr(ord("a") + r) + letters
    return f"tenant-{letters}"


class SimulatedFleet:
    """`nodes` x `gpus_per_node` simulated GPUs shared by `tenants` tenants, starting at `start_ms`.

    The schedule starts `warmup_ms` before `start_ms` so the fleet is already busy at the start.
    `interval_ms` is the nominal collect interval: the first collect of a node reports the XIDs
    of `(now_ms - interval_ms, now_ms]`, later ones those since the node's previous collect.
    """

    def __init__(
        self,
        *,
        nodes: int = 32,
        gpus_per_node: int = 8,
        tenants: int = 3,
        seed: int = 0,
        start_ms: int,
        cluster: str = "sim",
        model: str = DEFAULT_MODEL,
        faults: Sequence[Fault] | None = None,
        interval_ms: int = 1000,
        mem_total_bytes: int = 80 * GIB,
        warmup_ms: int = 12 * HOUR,
    ) -> None:
        if nodes < 1 or gpus_per_node < 1 or tenants < 1:
            raise ValueError("a simulated fleet needs at least 1 node, 1 GPU per node and 1 tenant")
        if interval_ms < 1 or warmup_ms < 0:
            raise ValueError("interval_ms must be positive and warmup_ms not negative")
        self.seed = seed
        self.cluster = cluster
        self.model = model
        self.gpus_per_node = gpus_per_node
        self.start_ms = start_ms
        self.origin_ms = start_ms - warmup_ms
        self.interval_ms = interval_ms
        self.faults = fk.validate(faults or [], nodes, gpus_per_node)
        self.node_names = [f"{cluster}-node-{i:03d}" for i in range(nodes)]
        self.tenant_names = [tenant_name(i) for i in range(tenants)]
        self._scheduler = Scheduler(
            seed=seed,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            tenants=self.tenant_names,
            origin_ms=self.origin_ms,
            faults=self.faults,
        )
        self._gpu_faults: dict[tuple[int, int], list[Fault]] = defaultdict(list)
        self._silent: dict[int, list[Fault]] = defaultdict(list)
        self._node_faults: dict[int, list[Fault]] = defaultdict(list)
        self._xids: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        self._job_faults = [f for f in self.faults if f.kind in fk.JOB_KINDS]
        self._fault_jobs: dict[Fault, Job | None] = {}
        for f in self.faults:
            if f.gpu is None:
                (self._silent if f.kind == fk.NODE_SILENT else self._node_faults)[f.node].append(f)
                continue
            if f.kind in fk.JOB_KINDS:
                continue
            self._gpu_faults[(f.node, f.gpu)].append(f)
            if f.xid is not None:
                self._xids[(f.node, f.gpu)].append((f.start_ms, f.xid))
        for events in self._xids.values():
            events.sort()
        self._consts = {
            (n, g): GpuConst(
                index=g,
                uuid=gpu_uuid(seed, cluster, n, g),
                model=model,
                mem_total_bytes=mem_total_bytes,
                noise_key=key(seed, n, g, _NOISE),
                temp_offset_c=-2 + 6 * unit(seed, n, g, _TEMP),
                mem_temp_offset_c=2 + int(5 * unit(seed, n, g, _MEM_TEMP)),
                serial=str(1_650_000_000_000 + int(9e11 * unit(seed, n, g, _SERIAL))),
                fabric_clique_id=1 + g // GPUS_PER_CLIQUE,
                fabric_cluster_uuid=str(gpu_uuid(seed, cluster, n, -1)).removeprefix("GPU-"),
            )
            for n in range(nodes)
            for g in range(gpus_per_node)
        }
        self._timelines: dict[tuple[int, int], GpuTimeline] = {}
        self.nodes = [self.make_node(i) for i in range(nodes)]

    def make_node(self, index: int, interval_ms: int | None = None) -> SimulatedNode:
        """A fresh collector for node `index` (its own XID bookkeeping; the schedule is shared)."""
        return SimulatedNode(self, index, interval_ms or self.interval_ms)

    def gpu_const(self, node: int, gpu: int) -> GpuConst:
        return self._consts[(node, gpu)]

    def silent_fault(self, node: int, t_ms: int) -> Fault | None:
        """The node_silent fault covering `t_ms` on `node`, if any."""
        return next((f for f in self._silent.get(node, ()) if f.active(t_ms)), None)

    def sample(self, node: int, gpu: int, t_ms: int, since_ms: int, inventory: bool = False) -> GpuSample:
        """GPU `gpu` of `node` at `t_ms`, with the XIDs raised in `(since_ms, t_ms]` (and the inventory if asked)."""
        act, energy = self._timeline(node, gpu, t_ms).at(t_ms)
        events = self._xids.get((node, gpu))
        xids = [x for ts, x in events if since_ms < ts <= t_ms] if events else []
        health = health_at(self._gpu_faults.get((node, gpu), ()), t_ms)
        inv = self.inventory(node, t_ms) if inventory else None
        return build_sample(self._consts[(node, gpu)], act, energy, t_ms, health, xids, inv)

    def inventory(self, node: int, t_ms: int) -> Inventory:
        """What the node's inventory says at `t_ms` (a driver_drift fault changes its driver version)."""
        drifted = any(f.kind == fk.DRIVER_DRIFT and f.active(t_ms) for f in self._node_faults.get(node, ()))
        return Inventory(DRIFTED_DRIVER_VERSION if drifted else DRIVER_VERSION)

    def inventory_due(self, node: int, t_ms: int, since_ms: int | None) -> bool:
        """Whether the node's samples at `t_ms` carry the inventory: its first collect, every
        `INVENTORY_EVERY_MS` (on the origin's grid), and the first collect after it changed."""
        if since_ms is None or (t_ms - self.origin_ms) // INVENTORY_EVERY_MS != (since_ms - self.origin_ms) // (
                INVENTORY_EVERY_MS):
            return True
        return any(since_ms < edge <= t_ms for f in self._node_faults.get(node, ()) for edge in (f.start_ms, f.end_ms))

    def missing_gpus(self, node: int, t_ms: int) -> list[int]:
        """GPUs of `node` that a gpu_missing fault keeps out of its enumeration at `t_ms`."""
        return sorted(g for g in range(self.gpus_per_node)
                      if any(f.kind == fk.GPU_MISSING and f.active(t_ms) for f in self._gpu_faults.get((node, g), ())))

    def ports(self, node: int, t_ms: int) -> list[NetworkPort]:
        """Node `node`'s InfiniBand ports at `t_ms` (see `simulation.network`)."""
        flaps = {f.gpu: f for g in range(self.gpus_per_node) for f in self._gpu_faults.get((node, g), ())
                 if f.kind in fk.PORT_KINDS and f.gpu is not None}
        return node_ports(self.seed, node, self.gpus_per_node, t_ms, flaps)

    def job_at(self, node: int, gpu: int, t_ms: int) -> Job | None:
        """The job holding the GPU at `t_ms` (allocation interval contains `t_ms`), or None."""
        return self._timeline(node, gpu, t_ms).at(t_ms)[0].job

    def allocations_at(self, node: int, t_ms: int) -> dict[int, Allocation]:
        """Node `node`'s allocations at `t_ms`, by GPU index (absent: unallocated)."""
        out = {}
        for g in range(self.gpus_per_node):
            job = self.job_at(node, g, t_ms)
            if job is not None:
                out[g] = Allocation(job.tenant, job.id)
        return out

    def jobs_between(self, start_ms: int, end_ms: int) -> list[Job]:
        """Every job whose allocation overlaps `[start_ms, end_ms)`, by start time."""
        return self._scheduler.jobs_between(start_ms, end_ms)

    def fault_job(self, fault: Fault) -> Job | None:
        """The job a job fault acts on: the one holding its GPU at its start (the scheduler books one there)."""
        if fault not in self._fault_jobs:
            assert fault.gpu is not None
            jobs = self._scheduler.gpu_jobs(fault.node, fault.gpu, fault.start_ms + 1)
            self._fault_jobs[fault] = next((j for j in jobs if j.start_ms <= fault.start_ms < j.end_ms), None)
        return self._fault_jobs[fault]

    def fault_job_numbers(self) -> frozenset[int]:
        """The numbers of the jobs job faults act on."""
        return frozenset(j.number for j in map(self.fault_job, self._job_faults) if j is not None)

    def hung_windows(self, job: Job) -> list[tuple[int, int]]:
        """When `job` hangs (job_hang faults on it): it executes, and reports, nothing then."""
        return [(f.start_ms, f.end_ms) for f in self._job_faults if f.kind == fk.JOB_HANG and self.fault_job(f) == job]

    def _effects(self, node: int, gpu: int) -> list[Effect]:
        """What the job faults do to this GPU: those whose job it belongs to."""
        out = []
        for f in self._job_faults:
            job = self.fault_job(f)
            if job is None or (node, gpu) not in job.gpus:
                continue
            kind = HUNG if f.kind == fk.JOB_HANG else SLOW if (node, gpu) == (f.node, f.gpu) else PACED
            out.append(Effect(kind, f.start_ms, min(f.end_ms, job.process_end_ms)))
        return out

    def ground_truth(self, start_ms: int, end_ms: int) -> dict[str, Any]:
        """What really happened in `[start_ms, end_ms)`: GPUs, allocations and faults (see truth.py)."""
        return truth.ground_truth(self, start_ms, end_ms)

    def write_ground_truth(self, path: str | os.PathLike[str], start_ms: int, end_ms: int) -> None:
        truth.write(path, self.ground_truth(start_ms, end_ms))

    def _timeline(self, node: int, gpu: int, t_ms: int) -> GpuTimeline:
        tl = self._timelines.get((node, gpu))
        if tl is None:
            tl = self._timelines[(node, gpu)] = GpuTimeline(
                idle_power_w=64 + 14 * unit(self.seed, node, gpu, _IDLE_POWER),
                origin_ms=self.origin_ms,
                energy0_j=float(round(1e7 + 9e8 * unit(self.seed, node, gpu, _ENERGY))),
                faults=[*self._gpu_faults.get((node, gpu), ()), *self._effects(node, gpu)],
            )
        if t_ms >= tl.covered_ms:
            until = self.origin_ms + ((t_ms - self.origin_ms) // CHUNK_MS + 1) * CHUNK_MS
            tl.extend(self._scheduler.gpu_jobs(node, gpu, until), until)
        return tl


class SimulatedNode:
    """One simulated node: a `Collector` over its GPUs, plus the allocation source that matches."""

    def __init__(self, fleet: SimulatedFleet, index: int, interval_ms: int) -> None:
        self.fleet = fleet
        self.index = index
        self.name = fleet.node_names[index]
        self.interval_ms = interval_ms
        self.last_collect_ms: int | None = None
        self.gpu_uuids = [fleet.gpu_const(index, g).uuid for g in range(fleet.gpus_per_node)]
        self.enumeration = Enumeration(fleet.gpus_per_node, ())
        """GPUs expected (all of the node's) and those a gpu_missing fault hid at the last collect."""

    def collect(self, now_ms: int) -> list[GpuSample]:
        """Every GPU at `now_ms` (except those a gpu_missing fault hides); raises `NodeDown` inside a
        node_silent window (XIDs raised meanwhile are reported by the first collect after it)."""
        silent = self.fleet.silent_fault(self.index, now_ms)
        if silent is not None:
            raise NodeDown(f"{self.name} is not answering (simulated node_silent until {silent.end_ms})")
        last = self.last_collect_ms
        since = last if last is not None and last < now_ms else now_ms - self.interval_ms
        inventory = self.fleet.inventory_due(self.index, now_ms, last if last is not None and last < now_ms else None)
        self.last_collect_ms = now_ms
        missing = self.fleet.missing_gpus(self.index, now_ms)
        self.enumeration = Enumeration(self.fleet.gpus_per_node, tuple(self.gpu_uuids[g] for g in missing))
        return [self.fleet.sample(self.index, g, now_ms, since, inventory)
                for g in range(self.fleet.gpus_per_node) if g not in missing]

    def close(self) -> None:
        """Nothing to release."""

    def allocation_at(self, t_ms: int) -> dict[int, Allocation]:
        return self.fleet.allocations_at(self.index, t_ms)

    def devices(self) -> list[DeviceView]:
        """The node's GPUs for allocation sources (`slurm`): UUIDs and minor numbers; the simulator runs no
        real processes, so none are listed (a slurm source sees only cgroup device lists)."""
        return [DeviceView(g, u, g, ()) for g, u in enumerate(self.gpu_uuids)]

    def network_source(self) -> SimulatedPorts:
        """A `NetworkSource` reading the node's ports at its last collect."""
        return SimulatedPorts(self)

    def allocation_source(self, clock: Callable[[], int] | None = None) -> SimulatedAllocationSource:
        """An `AllocationSource` that agrees with the ground truth (see the module docstring)."""
        return SimulatedAllocationSource(self, clock)


class SimulatedAllocationSource:
    """Reads a simulated node's allocations at `clock()`, or, without a clock, at the node's last
    collect time (the agent collects, then reads the allocation to stamp that interval)."""

    def __init__(self, node: SimulatedNode, clock: Callable[[], int] | None = None) -> None:
        self._node = node
        self._clock = clock

    def read(self) -> dict[int, Allocation]:
        t = self._clock() if self._clock is not None else self._node.last_collect_ms
        return {} if t is None else self._node.allocation_at(t)


class SimulatedPorts:
    """The node's InfiniBand ports at its last collect (the agent collects, then reads the ports)."""

    def __init__(self, node: SimulatedNode) -> None:
        self._node = node

    def read(self) -> list[NetworkPort]:
        t = self._node.last_collect_ms
        return [] if t is None else self._node.fleet.ports(self._node.index, t)
