"""`allocation.source: slurm`: which Slurm job holds each GPU, found from the GPU's processes, no prolog.

NVML's compute processes -> `/proc/<pid>/cgroup` (or `SLURM_JOB_ID`) -> the job -> its account from
`/proc/<pid>/environ`; GPUs held with no process from cgroup v1 device lists; several jobs on a GPU
weighted by utilization. What it can and cannot see: docs/allocation.md. Design notes:
docs/design-notes.md#agents-slurm-py.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gpufleet.agents.allocation import Allocation, Answer, Holder, Key, Shared, Unknown
from gpufleet.agents.collectors.base import DeviceView

log = logging.getLogger(__name__)

_JOB_DIR = re.compile(r"^(.*?/job_(\d+))(?:/|$)")
_DEVICE_LINE = re.compile(r"^c (\d+):(\d+) ")
NVIDIA_MAJOR: Final = 195
_CONTROL_MINORS: Final = frozenset({254, 255})  # nvidia-modeset, nvidiactl
ENV_OF: Final = {"account": "SLURM_JOB_ACCOUNT", "user": "SLURM_JOB_USER", "partition": "SLURM_JOB_PARTITION"}


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A Slurm job as its processes' environment describes it."""

    job: str
    env: Mapping[str, str]

    def tenant(self, field: str) -> str | None:
        return self.env.get(ENV_OF[field]) or None


@dataclass(frozen=True, slots=True)
class ProcJob:
    """The job of one process: its id, and the job's cgroup directory (relative) where the cgroup names it."""

    job: str
    cgroup_dir: str | None


def parse_environ(data: bytes) -> dict[str, str]:
    """`/proc/<pid>/environ` (NUL-separated KEY=VALUE) -> the SLURM_* variables."""
    out = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key.startswith(b"SLURM_"):
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def job_in_cgroup(text: str) -> ProcJob | None:
    """The Slurm job a `/proc/<pid>/cgroup` file places the process in, or None."""
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        m = _JOB_DIR.match(path)
        if m:
            return ProcJob(m.group(2), m.group(1))
    return None


def device_minors(text: str) -> set[int]:
    """GPU minor numbers a cgroup v1 `devices.list` allows (`c 195:N`); `a *:* rwm` says nothing."""
    out = set()
    for line in text.splitlines():
        m = _DEVICE_LINE.match(line)
        if m and int(m.group(1)) == NVIDIA_MAJOR and int(m.group(2)) not in _CONTROL_MINORS:
            out.add(int(m.group(2)))
    return out


class SlurmSource:
    """The `AllocationSource` for Slurm nodes without a prolog (see the module docstring)."""

    def __init__(self, devices: Callable[[], Sequence[DeviceView]], *, proc_root: str | os.PathLike[str] = "/proc",
                 cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup", tenant_field: str = "account",
                 share_by: str = "utilization") -> None:
        self._devices = devices
        self.proc = Path(proc_root)
        self.cgroup = Path(cgroup_root)
        self.tenant_field = tenant_field
        self.share_by = share_by
        self._jobs: dict[str, JobInfo] = {}
        self._warned: set[str] = set()

    def read(self) -> Mapping[Key, Answer]:
        views = self._devices()
        held = self._held_by_device_lists()
        seen: set[str] = set()
        out: dict[Key, Answer] = {}
        for view in views:
            answer = self._answer(view, held, seen)
            if answer is not None:
                out[view.uuid] = answer
        self._jobs = {j: info for j, info in self._jobs.items() if j in seen}
        return out

    # -- one device ----------------------------------------------------------------------------

    def _answer(self, view: DeviceView, held: Mapping[int, list[tuple[str, str]]], seen: set[str]) -> Answer | None:
        if view.processes is None:
            return Unknown(f"NVML could not list the processes on {view.uuid}")
        weights: dict[str, float | None] = {}
        for proc in view.processes:
            job = self._job_of(proc.pid)
            if job is None:
                continue  # not a Slurm process
            weights[job.job] = _add(weights.get(job.job, 0.0), proc.sm_util)
            if not self._learn(job, proc.pid):
                return Unknown(f"the tenant of Slurm job {job.job} on {view.uuid} cannot be read")
        if not weights and view.minor is not None:
            for job_id, job_dir in held.get(view.minor, []):
                weights[job_id] = None
                if not self._learn(ProcJob(job_id, job_dir)):
                    return Unknown(f"the tenant of Slurm job {job_id} holding {view.uuid} cannot be read")
        seen.update(weights)
        return self._holders(weights)

    def _holders(self, weights: Mapping[str, float | None]) -> Answer | None:
        allocations = []
        for job in weights:
            tenant = self._jobs[job].tenant(self.tenant_field)
            if tenant is None:
                return Unknown(f"Slurm job {job} has no {ENV_OF[self.tenant_field]}")
            allocations.append(Allocation(tenant, job))
        if len(allocations) <= 1:
            return allocations[0] if allocations else None
        by_util = self.share_by == "utilization" and all(w is not None for w in weights.values()) and sum(
            w or 0.0 for w in weights.values()) > 0
        return Shared(tuple(Holder(a.tenant, a.job, max(1, round(weights[a.job] or 0)) if by_util else 1)
                            for a in allocations))

    # -- processes and jobs --------------------------------------------------------------------

    def _job_of(self, pid: int) -> ProcJob | None:
        try:
            found = job_in_cgroup((self.proc / str(pid) / "cgroup").read_text(errors="replace"))
        except OSError:
            return None  # the process ended
        if found is not None:
            return found
        env = self._environ(pid)
        job = (env or {}).get("SLURM_JOB_ID")
        return None if job is None else ProcJob(job, None)

    def _environ(self, pid: int) -> dict[str, str] | None:
        try:
            return parse_environ((self.proc / str(pid) / "environ").read_bytes())
        except OSError as exc:
            self._warn_once(f"environ:{exc.errno}", f"cannot read {self.proc}/<pid>/environ ({exc.strerror}): the "
                            "slurm allocation source needs the agent to run as root")
            return None

    def _learn(self, job: ProcJob, pid: int | None = None) -> bool:
        """Know the job's environment (from the cache, `pid`'s, or any of the job's processes'); False if none
        can be read."""
        if job.job in self._jobs:
            return True
        for candidate in [*([] if pid is None else [pid]), *self._job_pids(job)]:
            env = self._environ(candidate)
            if env and env.get("SLURM_JOB_ID", job.job) == job.job:
                self._jobs[job.job] = JobInfo(job.job, env)
                return True
        return False

    def _job_pids(self, job: ProcJob) -> Iterable[int]:
        """Pids in the job's cgroup (every step), the process that named it first."""
        if job.cgroup_dir is None:
            return []
        roots = [self.cgroup / job.cgroup_dir.lstrip("/"), *(self.cgroup / c / job.cgroup_dir.lstrip("/")
                                                             for c in ("devices", "freezer", "cpuset"))]
        pids: list[int] = []
        for root in roots:
            for procs in sorted(root.rglob("cgroup.procs")) if root.is_dir() else []:
                try:
                    pids += [int(x) for x in procs.read_text().split()]
                except (OSError, ValueError):
                    continue
        return pids

    def _held_by_device_lists(self) -> dict[int, list[tuple[str, str]]]:
        """GPU minor -> [(job id, job cgroup dir)] from cgroup v1 device lists (nothing under cgroup v2)."""
        out: dict[int, list[tuple[str, str]]] = {}
        base = self.cgroup / "devices"
        for listing in sorted(base.glob("slurm*/uid_*/job_*/devices.list")):
            try:
                minors = device_minors(listing.read_text())
            except OSError:
                continue
            job_dir = "/" + str(listing.parent.relative_to(base))
            for minor in minors:
                out.setdefault(minor, []).append((listing.parent.name.removeprefix("job_"), job_dir))
        return out

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            log.warning("%s", message)


def _add(total: float | None, value: float | None) -> float | None:
    return None if total is None or value is None else total + value
