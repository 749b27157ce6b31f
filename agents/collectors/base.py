"""The collector contract: one call per interval returns every GPU's counters, never raising for one GPU.

A backend reads each device once per interval (one snapshot), keeps failures local to the GPU
(a GPU that errors comes back with `error` set and null counters) and reports unsupported
counters as None. Tenant attribution is not the collector's job: the agent stamps it afterwards
from the allocation source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gpufleet.wire import GpuSample

GpuReading = GpuSample
"""A collector returns wire-ready `GpuSample`s with `tenant`, `job` and `flops_measured` unset."""


@runtime_checkable
class Collector(Protocol):
    """A source of per-GPU counters for one node."""

    def collect(self, now_ms: int) -> list[GpuSample]:
        """Read every GPU once. `now_ms` is the interval's end (Unix ms); XIDs since the last call."""
        ...

    def close(self) -> None:
        """Release the backend (NVML shutdown, event sets); idempotent."""
        ...


@dataclass(frozen=True)
class Enumeration:
    """How many GPUs the node should have and which known ones it does not enumerate now.

    A collector that knows it exposes it as its `enumeration` attribute (read after each `collect`);
    the agent carries it in the node's message (`gpus_expected`, `gpus_missing`).
    """

    expected: int | None
    """From `agent.gpus_expected`, else the node's first complete enumeration; None: not known yet."""
    missing: tuple[str, ...] = ()
    """UUIDs enumerated before and not now."""


class NodeDown(Exception):
    """The whole node could not be read this interval (no GPU answered); the agent sends nothing."""


class NodeReleased(NodeDown):
    """The backend let go of the GPUs on the operator's request (driver upgrade, GPU reset): nothing is sent,
    and the agent is healthy, doing what it was asked (its liveness must not get it restarted)."""


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process on a GPU (NVML), with its SM utilization over the interval when NVML gives it."""

    pid: int
    sm_util: float | None = None
    """Sum of the process's SM utilization samples (percent) newer than the previous reading; None unknown."""


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What the last collection saw on one device (a GPU, or a MIG instance), for allocation sources."""

    index: int
    uuid: str
    minor: int | None = None
    """The GPU's /dev/nvidia<minor> number (what cgroup device lists name); None for MIG instances."""
    processes: tuple[GpuProcess, ...] | None = None
    """Compute processes; None when NVML could not list them."""
    parent_uuid: str | None = None
