"""The demo's simulated training jobs that report model FLOPs through the real OTLP path.

Design notes: docs/design-notes.md#agents-flops-jobs-py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Protocol

import msgspec

from gpufleet.agents.simulation.faults import default_faults
from gpufleet.agents.simulation.fleet import SimulatedFleet
from gpufleet.agents.simulation.jobs import Job

log = logging.getLogger(__name__)

MODEL_FLOPS_SHARE: Final = 0.8
"""Model FLOPs per unit of tensor-pipe activity x peak (see the module docstring)."""
TOKEN_FLOPS: Final = 6 * 7e9
"""Model FLOPs per token of the simulated jobs' model: 6 x parameters (PaLM appendix B), 7B parameters."""
SAMPLE_TOKENS: Final = 4096
"""Tokens per sample (sequence length)."""
STOP_TIMEOUT_S: Final = 10.0
"""How long `stop_process` waits for the jobs to flush and exit before killing them."""


class FleetSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The simulated fleet's arguments: the agent and its jobs build the same fleet from them."""

    cluster: str
    nodes: int
    gpus: int
    tenants: int
    seed: int
    faults: str
    """`default` (the demo's faults) or `none`."""
    start_ms: int
    interval_ms: int

    def build(self) -> SimulatedFleet:
        """The `SimulatedFleet` (its faults included; none, with a warning, when the fleet is too small)."""
        fault_list = []
        if self.faults == "default":
            try:
                fault_list = default_faults(self.start_ms, nodes=self.nodes, gpus_per_node=self.gpus)
            except ValueError as exc:
                log.warning("no faults injected: %s", exc)
        return SimulatedFleet(nodes=self.nodes, gpus_per_node=self.gpus, tenants=self.tenants, seed=self.seed,
                              start_ms=self.start_ms, cluster=self.cluster, faults=fault_list,
                              interval_ms=self.interval_ms)


class JobsSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What the jobs process needs: the fleet, each node's receiver, how many jobs and how they report."""

    fleet: FleetSpec
    endpoints: dict[str, str]
    """Node name -> base URL of that node's OTLP receiver."""
    jobs: int
    peak_flop_s: float
    """Peak FLOP/s of one simulated GPU (the fleet's model, config overrides applied)."""
    step_ms: int
    """How often the jobs add the FLOPs they executed to their counters."""
    export_interval_ms: int
    """How often each job's OpenTelemetry reader exports to the agent."""
    parent_pid: int | None = None
    """The agent's pid: the jobs stop when it is gone."""


def gpu_flops(job: Job, start_ms: int, end_ms: int, peak_flop_s: float, share: float = MODEL_FLOPS_SHARE,
              hung: Sequence[tuple[int, int]] = ()) -> float:
    """Model FLOPs one GPU of `job` executed in `[start_ms, end_ms)`: busy phases only, nothing while it
    hangs (`hung` windows) (pure)."""
    total = 0.0
    for ph in job.phases:
        if not ph.busy:
            continue
        for a, b in _minus(max(start_ms, ph.start_ms), min(end_ms, ph.end_ms), hung):
            total += share * ph.tensor * peak_flop_s * (b - a) / 1000
    return total


def _minus(start: int, end: int, holes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """`[start, end)` without the `holes`, as disjoint pieces in order."""
    pieces = [(start, end)] if end > start else []
    for hs, he in holes:
        pieces = [p for a, b in pieces for p in ((a, min(b, hs)), (max(a, he), b)) if p[1] > p[0]]
    return pieces


def gpus_by_node(job: Job) -> dict[int, list[int]]:
    """The job's GPU indices on each node index it runs on."""
    out: dict[int, list[int]] = {}
    for node, gpu in job.gpus:
        out.setdefault(node, []).append(gpu)
    return out


def running_at(jobs: Iterable[Job], t_ms: int) -> list[Job]:
    """The jobs whose processes run at `t_ms` (allocated, launched, not yet ended or crashed)."""
    return [j for j in jobs if j.start_ms <= t_ms < j.process_end_ms]


class Selection:
    """Which jobs report: up to `size` at a time, each from when it is picked until its processes end;
    `preferred` job numbers first, then the lowest numbers."""

    def __init__(self, size: int, preferred: frozenset[int] = frozenset()) -> None:
        self.size = size
        self.preferred = preferred
        self.active: dict[int, Job] = {}

    def update(self, running: Iterable[Job], t_ms: int) -> tuple[list[Job], list[Job]]:
        """(picked now, ended now) at `t_ms`, given the jobs running then."""
        ended = [j for j in self.active.values() if t_ms >= j.process_end_ms]
        for j in ended:
            del self.active[j.number]
        started = []
        for j in sorted(running_at(running, t_ms), key=lambda j: (j.number not in self.preferred, j.number)):
            if len(self.active) >= self.size:
                break
            if j.number not in self.active:
                self.active[j.number] = j
                started.append(j)
        return started, ended


class FlopsReporter(Protocol):
    """`gpufleet.report_flops.Reporter`, as far as a simulated job uses it."""

    def report_flops(self, n: float) -> None: ...

    def report_tokens(self, n: float) -> None: ...

    def report_samples(self, n: float) -> None: ...

    def shutdown(self) -> None: ...


MakeReporter = Callable[[str, Sequence[str], str], FlopsReporter]
"""(job id, GPU uuids on one node, that node's receiver endpoint) -> a reporter."""


class ReportingJob:
    """One picked job: a reporter per node it runs on, fed the FLOPs it executed since the last step."""

    def __init__(self, job: Job, fleet: SimulatedFleet, spec: JobsSpec, since_ms: int, make: MakeReporter) -> None:
        self.job = job
        self._peak = spec.peak_flop_s
        self._hung = fleet.hung_windows(job)
        self.reported_ms = since_ms
        self.parts: list[tuple[int, FlopsReporter]] = []
        for node, gpus in sorted(gpus_by_node(job).items()):
            name = fleet.node_names[node]
            endpoint = spec.endpoints.get(name)
            if endpoint is None:
                log.warning("no OTLP receiver for node %s: job %s does not report there", name, job.id)
                continue
            uuids = [fleet.gpu_const(node, g).uuid for g in gpus]
            self.parts.append((len(gpus), make(job.id, uuids, endpoint)))

    def advance(self, t_ms: int) -> None:
        """Add what each node's GPUs executed in `[reported_ms, min(t_ms, process end))`."""
        end = min(t_ms, self.job.process_end_ms)
        if end <= self.reported_ms:
            return
        per_gpu = gpu_flops(self.job, self.reported_ms, end, self._peak, hung=self._hung)
        for n, reporter in self.parts:
            reporter.report_flops(per_gpu * n)
            reporter.report_tokens(per_gpu * n / TOKEN_FLOPS)
            reporter.report_samples(per_gpu * n / TOKEN_FLOPS / SAMPLE_TOKENS)
        self.reported_ms = end

    def close(self) -> None:
        """Flush and stop every reporter (a failing one never keeps the others from closing)."""
        for _, reporter in self.parts:
            try:
                reporter.shutdown()
            except Exception:
                log.exception("closing the reporter of job %s failed", self.job.id)


def otel_reporter(export_interval_ms: int) -> MakeReporter:
    """The real thing: `gpufleet.report_flops.Reporter` over OTLP/HTTP to the node's receiver."""
    from gpufleet.report_flops import Reporter

    def make(job_id: str, uuids: Sequence[str], endpoint: str) -> FlopsReporter:
        return Reporter(job_id, gpus=list(uuids), endpoint=endpoint, export_interval_ms=export_interval_ms,
                        environ={})

    return make


def run(
    spec: JobsSpec,
    stop: threading.Event,
    *,
    clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    make: MakeReporter | None = None,
    parent_alive: Callable[[], bool] = lambda: True,
) -> None:
    """Play the jobs every `step_ms` until `stop` is set (or the parent is gone), then flush them."""
    fleet = spec.fleet.build()
    make = make or otel_reporter(spec.export_interval_ms)
    selection = Selection(spec.jobs, fleet.fault_job_numbers())
    playing: dict[int, ReportingJob] = {}
    try:
        while not stop.is_set() and parent_alive():
            try:
                step(fleet, spec, selection, playing, clock(), make)
            except Exception:  # a demo job's bug costs one step, never the other jobs
                log.exception("simulated FLOPs jobs: a step failed")
            stop.wait(spec.step_ms / 1000)
    finally:
        now = clock()
        for rj in playing.values():
            rj.advance(now)
            rj.close()
        playing.clear()


def step(fleet: SimulatedFleet, spec: JobsSpec, selection: Selection, playing: dict[int, ReportingJob], now: int,
         make: MakeReporter) -> None:
    """One step at `now`: end the jobs that ended, pick new ones, add everyone's FLOPs."""
    jobs = fleet.jobs_between(now, now + 1)
    started, ended = selection.update(jobs, now)
    for job in ended:
        rj = playing.pop(job.number)
        rj.advance(job.process_end_ms)
        rj.close()
        log.info("job %s ended: stopped reporting FLOPs", job.id)
    for job in started:
        playing[job.number] = ReportingJob(job, fleet, spec, now, make)
        log.info("job %s (%s) reports FLOPs from %d GPU(s) on %d node(s)", job.id, job.tenant, len(job.gpus),
                 len(gpus_by_node(job)))
    for rj in playing.values():
        rj.advance(now)


def start_process(spec: JobsSpec) -> subprocess.Popen[bytes]:
    """Start the jobs in a child process (same process group, stderr shared with the agent)."""
    return subprocess.Popen([sys.executable, "-m", "gpufleet.agents.flops_jobs", msgspec.json.encode(spec).decode()])


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM the jobs, wait for them to flush and exit, kill them after `timeout_s`; their exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("simulated FLOPs jobs (pid %d) did not stop in %.0f s: killed", proc.pid, timeout_s)
            proc.kill()
            proc.wait(5)
    return proc.returncode


def main(argv: Sequence[str]) -> int:
    """`python -m gpufleet.agents.flops_jobs SPEC_JSON`: run until SIGTERM/SIGINT or until the agent is gone."""
    if len(argv) != 1:
        print("usage: python -m gpufleet.agents.flops_jobs SPEC_JSON (started by gpufleet agent --flops-jobs)",
              file=sys.stderr)
        return 2
    try:
        spec = msgspec.json.decode(argv[0], type=JobsSpec)
    except msgspec.DecodeError as exc:
        print(f"flops-jobs: bad spec: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s flops-jobs: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = spec.parent_pid
    run(spec, stop, parent_alive=lambda: parent is None or os.getppid() == parent)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
