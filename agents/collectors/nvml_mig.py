"""MIG instances of one GPU: found through NVML, read each interval, reported as samples of their own.

A MIG-enabled GPU is one sample per MIG device (GPU instance + compute instance), never the whole GPU
(docs/wire-format.md, "MIG instances"). `list_instances` finds them (every slow interval, and after a
MIG mode change): MIG UUID, GPU/compute instance ids, profile (from the MIG device's name, e.g.
`NVIDIA H100 80GB HBM3 MIG 1g.10gb`) and compute slices (`nvmlDeviceGetAttributes_v2`), out of the GPU's
slices (its largest GPU instance profile). `read_instance` reads memory and processes per interval;
utilization where NVML answers it for a MIG device. `instance_sample` turns the parent's sample into an
instance's: the GPU-wide readings (temperature, clocks, errors, XIDs) stay the parent's, so its health
applies to every instance; power and energy are apportioned by the share; GPM activity is not per
instance. Every call goes through the funnel under a key of its own (`("mig", ...)`), so a MIG device
that refuses a call never marks the parent as refusing it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from gpufleet.agents.collectors.base import GpuProcess
from gpufleet.agents.collectors.nvml_funnel import NOT_FOUND, CallCache, Funnel
from gpufleet.wire import GpuSample

_PROFILE = re.compile(r"\bMIG\s+(\S+)\s*$")
_SLICES = re.compile(r"^(\d+)g\.")
PROFILE_IDS: Final = ("NVML_GPU_INSTANCE_PROFILE_8_SLICE", "NVML_GPU_INSTANCE_PROFILE_7_SLICE",
                      "NVML_GPU_INSTANCE_PROFILE_6_SLICE", "NVML_GPU_INSTANCE_PROFILE_4_SLICE",
                      "NVML_GPU_INSTANCE_PROFILE_3_SLICE", "NVML_GPU_INSTANCE_PROFILE_2_SLICE",
                      "NVML_GPU_INSTANCE_PROFILE_1_SLICE")
"""GPU instance profiles, most slices first: the first one a GPU offers is the whole GPU."""
_NOT_PER_INSTANCE: Final = {"sm_active_ratio": None, "tensor_active_ratio": None, "dram_active_ratio": None,
                            "energy_j": None, "util_mem_ratio": None}


@dataclass(frozen=True)
class MigInstance:
    """One MIG device as listed: its handle and what does not change while it exists."""

    handle: Any
    uuid: str
    gpu_instance_id: int | None
    compute_instance_id: int | None
    profile: str | None
    slices: int


@dataclass(frozen=True)
class MigReading:
    """One interval of one MIG device."""

    instance: MigInstance
    mem_used_bytes: int | None
    mem_total_bytes: int | None
    util_gpu_ratio: float | None
    processes: tuple[GpuProcess, ...] | None


def profile_of(name: str | None) -> str | None:
    """`NVIDIA H100 80GB HBM3 MIG 1g.10gb` -> `1g.10gb`."""
    m = _PROFILE.search(name or "")
    return m.group(1) if m else None


class MigReader:
    """Lists and reads the MIG devices of GPUs through one funnel (worker side: no state of its own)."""

    def __init__(self, funnel: Funnel) -> None:
        self.funnel = funnel
        self.nvml = funnel.nvml

    def _call(self, cache: CallCache, errors: list[str], func: str, *args: Any, key: tuple[Any, ...],
              expected: tuple[type[BaseException], ...] = ()) -> Any:
        return self.funnel.call(cache, errors, func, *args, key=("mig", *key), expected=expected)

    def total_slices(self, handle: Any, cache: CallCache, errors: list[str]) -> int | None:
        """The GPU's compute slices: the slice count of the largest GPU instance profile it offers."""
        for name in PROFILE_IDS:
            profile = getattr(self.nvml, name, None)
            if profile is None:
                continue
            info = self._call(cache, errors, "nvmlDeviceGetGpuInstanceProfileInfo", handle, profile,
                              key=("profile", profile))
            if info is not None and int(info.sliceCount) > 0:
                return int(info.sliceCount)
        return None

    def list_instances(self, handle: Any, cache: CallCache, errors: list[str]) -> list[MigInstance]:
        """Every MIG device of the GPU now (an index NVML answers NotFound for holds none)."""
        count = self._call(cache, errors, "nvmlDeviceGetMaxMigDeviceCount", handle, key=("max",)) or 0
        out = []
        for i in range(int(count)):
            mh = self._call(cache, errors, "nvmlDeviceGetMigDeviceHandleByIndex", handle, i, key=("handle", i),
                            expected=(self.nvml.NVMLError_NotFound,))
            if mh is None or mh is NOT_FOUND:
                continue
            instance = self._describe(mh, i, cache, errors)
            if instance is not None:
                out.append(instance)
        return out

    def _describe(self, mh: Any, i: int, cache: CallCache, errors: list[str]) -> MigInstance | None:
        uuid = self._call(cache, errors, "nvmlDeviceGetUUID", mh, key=("uuid", i))
        if not uuid:
            return None
        gi = self._call(cache, errors, "nvmlDeviceGetGpuInstanceId", mh, key=("gi", i))
        ci = self._call(cache, errors, "nvmlDeviceGetComputeInstanceId", mh, key=("ci", i))
        profile = profile_of(self._call(cache, errors, "nvmlDeviceGetName", mh, key=("name", i)))
        attrs = self._call(cache, errors, "nvmlDeviceGetAttributes_v2", mh, key=("attributes", i))
        slices = int(attrs.computeInstanceSliceCount) if attrs is not None else 0
        if slices <= 0 and profile and (m := _SLICES.match(profile)):
            slices = int(m.group(1))
        if slices <= 0:
            return None
        return MigInstance(mh, str(uuid), None if gi is None else int(gi), None if ci is None else int(ci), profile,
                           slices)

    def read_instance(self, inst: MigInstance, cache: CallCache, errors: list[str]) -> MigReading:
        """One interval's memory, processes and (where NVML gives it) utilization of one MIG device."""
        mem = self._call(cache, errors, "nvmlDeviceGetMemoryInfo", inst.handle, key=("memory",))
        procs = self._call(cache, errors, "nvmlDeviceGetComputeRunningProcesses", inst.handle, key=("processes",))
        rates = self._call(cache, errors, "nvmlDeviceGetUtilizationRates", inst.handle, key=("utilization",))
        return MigReading(
            inst, None if mem is None else int(mem.used), None if mem is None else int(mem.total),
            None if rates is None else min(1.0, max(0.0, rates.gpu / 100)),
            None if procs is None else tuple(GpuProcess(int(p.pid)) for p in procs))


def instance_sample(parent: GpuSample, reading: MigReading, total: int) -> GpuSample:
    """The parent GPU's sample as one MIG instance's (see the module docstring)."""
    inst = reading.instance
    share = inst.slices / total
    return msgspec.structs.replace(
        parent, uuid=inst.uuid, parent_uuid=parent.uuid, gpu_instance_id=inst.gpu_instance_id,
        compute_instance_id=inst.compute_instance_id, mig_profile=inst.profile, slices=inst.slices,
        slices_total=total, mem_used_bytes=reading.mem_used_bytes, mem_total_bytes=reading.mem_total_bytes,
        compute_processes=None if reading.processes is None else len(reading.processes),
        util_gpu_ratio=reading.util_gpu_ratio,
        power_w=None if parent.power_w is None else parent.power_w * share,
        energy_interval_j=None if parent.energy_interval_j is None else parent.energy_interval_j * share,
        **_NOT_PER_INSTANCE)


def instance_error(parent_uuid: str, index: int, model: str | None, inst: MigInstance, total: int, error: str,
                   xids: list[int]) -> GpuSample:
    """A MIG instance of a GPU that could not be read: its identity, the reason, the parent's XIDs."""
    return GpuSample(index=index, uuid=inst.uuid, model=model, error=error, xids=xids, parent_uuid=parent_uuid,
                     gpu_instance_id=inst.gpu_instance_id, compute_instance_id=inst.compute_instance_id,
                     mig_profile=inst.profile, slices=inst.slices, slices_total=total)
