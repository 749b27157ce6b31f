"""The collector contract: one call per interval returns every GPU's counters, never raising for one GPU.

A backend reads each device once per interval (one snapshot), keeps failures local to the GPU
(a GPU that errors comes back with `error` set and null counters) and reports unsupported
counters as None. Tenant attribution is not the collector's job: the agent stamps it afterwards
from the allocation source.
"""

from __future__ import annotations

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


class NodeDown(Exception):
    """The whole node could not be read this interval (no GPU answered); the agent sends nothing."""


class NodeReleased(NodeDown):
    """The backend let go of the GPUs on the operator's request (driver upgrade, GPU reset): nothing is sent,
    and the agent is healthy, doing what it was asked (its liveness must not get it restarted)."""
