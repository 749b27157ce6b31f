"""One GPU's read: what the collector keeps per GPU, the NVML calls of one interval, and the sample.

Design notes: docs/design-notes.md#agents-collectors-nvml-device-py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

from gpufleet.agents.collectors.base import DeviceView, GpuProcess
from gpufleet.agents.collectors.nvml_fields import (
    FieldIds,
    FieldReading,
    link_sum,
    links_down,
    read_fields,
)
from gpufleet.agents.collectors.nvml_funnel import NOT_FOUND, CallCache, Funnel, GpuLost, LibraryDown, first_supported
from gpufleet.agents.collectors.nvml_inventory import (
    INVENTORY_FIELDS,
    LIMIT_FIELDS,
    power_limit_fallbacks,
    read_fabric,
    read_inventory,
)
from gpufleet.agents.collectors.nvml_mig import MigInstance, MigReader, MigReading, instance_error, instance_sample
from gpufleet.wire import GpuSample

log = logging.getLogger(__name__)

GPM_MIN_GAP_S: Final = 0.1
"""nvml.h: two GPM samples must be more than 100 ms apart ("internal sample refresh rate")."""
ERROR_TEXT_MAX: Final = 1024
_SAMPLE_MEMBERS: Final = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
_IDENTITY_FIELDS: Final = frozenset({"index", "uuid", "model", "error", "tenant", "job", "xids", "flops_measured",
                                     "tokens_measured", "samples_measured", "allocation_unknown", "shares",
                                     "parent_uuid", "gpu_instance_id", "compute_instance_id", "mig_profile", "slices",
                                     "slices_total", *LIMIT_FIELDS, *INVENTORY_FIELDS})
"""Not this interval's readings: a sample whose readings all failed becomes an error sample despite them."""


def ratio(percent: float | None) -> float | None:
    """NVML percent (0..100) -> wire ratio clamped to 0..1; None and non-finite stay None."""
    if percent is None or not math.isfinite(percent):
        return None
    return min(1.0, max(0.0, percent / 100))


def per_1000(value: float | None) -> float | None:
    """mW -> W, mJ -> J."""
    return None if value is None else value / 1000


@dataclass
class Gpm:
    """One GPU's GPM state: two sample buffers used alternately, and when the committed one was taken."""

    supported: bool | None = None
    samples: list[Any] = field(default_factory=list)
    cur: int = 0
    prev_valid: bool = False
    taken_at: float | None = None
    """Collector clock (s) of the last committed sample: the next is taken only 100 ms after it."""


@dataclass
class Baselines:
    """Counter values the last committed reading left, against which the next reading is differenced."""

    energy_mj: int | None = None
    throttle: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Throttle field id -> (ns, NVML timestamp in us)."""
    util_ts: dict[int, int] = field(default_factory=dict)
    """Sampling type -> the newest sample timestamp already averaged (0: take only the newest)."""
    util_last: dict[int, float | None] = field(default_factory=dict)
    process_util_ts: int = 0
    """Newest per-process utilization sample already counted (0: take only what is newest)."""


@dataclass
class DeviceState:
    """What the collector keeps per GPU between intervals."""

    index: int
    uuid: str
    """NVML's UUID once read; `unknown-gpu-<index>` until then (a GPU unreachable since start-up)."""
    handle: Any = None
    model: str | None = None
    pci: tuple[int, int, int] | None = None
    links: tuple[int, ...] = ()
    minor: int | None = None
    processes: tuple[GpuProcess, ...] | None = None
    """The compute processes the last committed reading saw (None: not readable)."""
    mig_current: int | None = None
    mig_on: bool = False
    mig: list[MigInstance] | None = None
    """The MIG devices last listed (None: not listed since MIG was turned on, or the GPU came back)."""
    mig_total: int | None = None
    """The GPU's compute slices (the denominator of every instance's share)."""
    mig_processes: dict[str, tuple[GpuProcess, ...] | None] = field(default_factory=dict)
    cache: CallCache = field(default_factory=CallCache)
    gpm: Gpm = field(default_factory=Gpm)
    base: Baselines = field(default_factory=Baselines)
    slow: dict[str, Any] = field(default_factory=dict)
    slow_at: float | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    """The temperature thresholds of the last inventory read, repeated in every sample."""
    inventory_at: float | None = None
    """Collector clock (s) of the last committed inventory read; None: read it at the next interval."""
    lost: bool = False
    inflight: Future[Reading] | None = None
    inflight_since: float = 0.0

    def forget(self) -> None:
        """After a GPU came back or NVML restarted: ask everything again, restart GPM and the sampler."""
        self.cache.forget_unsupported()
        self.gpm = Gpm()
        self.base.util_ts.clear()
        self.mig = None
        self.mig_total = None
        self.inventory_at = None


@dataclass(frozen=True)
class Plan:
    """What this interval's read of one GPU includes."""

    slow: bool
    gpm: bool
    inventory: bool = False


@dataclass
class Reading:
    """What one worker read of one GPU produced; nothing in it has been committed yet."""

    values: dict[str, Any] = field(default_factory=dict)
    energy_mj: int | None = None
    throttle: dict[int, tuple[int, int]] = field(default_factory=dict)
    util: dict[int, Any] = field(default_factory=dict)
    """Sampling type -> ratio, None (unreadable) or NOT_FOUND (no new sample: the last value still holds)."""
    util_ts: dict[int, int] = field(default_factory=dict)
    slow: dict[str, Any] | None = None
    processes: tuple[GpuProcess, ...] | None = None
    process_util_ts: int | None = None
    mig_listed: list[MigInstance] | None = None
    mig_total: int | None = None
    mig: list[MigReading] | None = None
    inventory: dict[str, Any] | None = None
    gpm_taken: bool = False
    errors: list[str] = field(default_factory=list)
    lost: str | None = None
    library_down: str | None = None


class DeviceReader:
    """Reads GPUs through one funnel; `read` on worker threads, `commit` on the collector's thread."""

    def __init__(self, funnel: Funnel) -> None:
        self.funnel = funnel
        self.nvml = funnel.nvml
        self.ids = FieldIds.of(funnel.nvml)
        self.mig = MigReader(funnel)

    # -- worker side ---------------------------------------------------------------------------

    def read(self, dev: DeviceState, plan: Plan) -> Reading:
        """Every NVML call of one interval for `dev`; never raises for an NVML error."""
        r = Reading()
        try:
            self._check_mig(dev, r)
            if dev.mig_on:
                self._read_mig(dev, r, plan)
            fast = read_fields(self.funnel, dev.cache, r.errors, dev.handle, self.ids.fast(dev.links))
            self._fast_values(dev, fast, r)
            if plan.slow:
                r.slow = self._slow(dev, r)
            if plan.inventory:
                r.inventory = read_inventory(self.funnel, dev.cache, r.errors, dev.handle)
            self._utilization(dev, r)
            self._point_values(dev, r)
            if plan.gpm:
                self._gpm(dev, r)
        except GpuLost as exc:
            r.lost = str(exc)
        except LibraryDown as exc:
            r.library_down = str(exc)
        return r

    def _call(self, dev: DeviceState, r: Reading, func: str, *args: Any, **kw: Any) -> Any:
        return self.funnel.call(dev.cache, r.errors, func, *args, **kw)

    def _check_mig(self, dev: DeviceState, r: Reading) -> None:
        """A changed MIG mode changes what the GPU supports: clear its caches and restart GPM/sampling."""
        mode = self._call(dev, r, "nvmlDeviceGetMigMode", dev.handle)
        if mode is None:
            return
        current = int(mode[0])
        if dev.mig_current is not None and current != dev.mig_current:
            log.info("GPU %d: MIG mode changed to %d; asking NVML afresh what it supports", dev.index, current)
            self.forget(dev)
        dev.mig_current = current
        dev.mig_on = current == getattr(self.nvml, "NVML_DEVICE_MIG_ENABLE", 1)

    def _read_mig(self, dev: DeviceState, r: Reading, plan: Plan) -> None:
        """List the MIG devices (every slow interval, or when not known), then read each."""
        instances = dev.mig
        if plan.slow or instances is None:
            r.mig_total = dev.mig_total or self.mig.total_slices(dev.handle, dev.cache, r.errors)
            instances = r.mig_listed = self.mig.list_instances(dev.handle, dev.cache, r.errors)
        if instances:
            r.mig = [self.mig.read_instance(i, dev.cache, r.errors) for i in instances]

    def forget(self, dev: DeviceState) -> None:
        """`dev.forget()`, freeing its GPM buffers first (best effort: NVML may be the reason)."""
        for sample in dev.gpm.samples:
            try:
                self.nvml.nvmlGpmSampleFree(sample)
            except self.nvml.NVMLError as exc:
                log.debug("nvmlGpmSampleFree failed for GPU %d: %s", dev.index, exc)
        dev.gpm.samples = []
        dev.forget()

    def _fast_values(self, dev: DeviceState, fast: FieldReading, r: Reading) -> None:
        ids = self.ids
        energy = fast.get((ids.energy, 0))
        r.energy_mj = None if energy is None else int(energy)
        for fid in (ids.throttle_power, ids.throttle_thermal):
            if (fid, 0) in fast.values:
                r.throttle[fid] = (int(fast.values[(fid, 0)]), fast.stamps[(fid, 0)])
        power = fast.get((ids.power, 0))
        if power is None and dev.cache.skip(("field", ids.power, 0)):
            power = self._call(dev, r, "nvmlDeviceGetPowerUsage", dev.handle)
        temp_mem = fast.get((ids.mem_temp, 0))
        action = fast.get((ids.recovery_action, 0))
        r.values.update(
            energy_j=per_1000(energy), power_w=per_1000(power),
            temp_mem_c=None if temp_mem is None else float(temp_mem),
            nvlink_links_down=links_down(fast, ids, dev.links),
            recovery_action=None if action is None else int(action))

    def _slow(self, dev: DeviceState, r: Reading) -> dict[str, Any]:
        """The slow field batch (error counters, power limits) and the fabric, as wire fields."""
        f, c, ids = self.funnel, dev.cache, self.ids
        slow = read_fields(f, c, r.errors, dev.handle, ids.slow(dev.links))
        values = self._slow_values(slow, dev.links)
        limits = {"power_limit_w": per_1000(slow.get((ids.power_limit, 0))),
                  "power_limit_default_w": per_1000(slow.get((ids.power_default_limit, 0)))}
        unsupported = {"power_limit_w": c.skip(("field", ids.power_limit, 0)),
                       "power_limit_default_w": c.skip(("field", ids.power_default_limit, 0))}
        values.update(power_limit_fallbacks(f, c, r.errors, dev.handle, limits, unsupported))
        values.update(read_fabric(f, c, r.errors, dev.handle))
        return values

    def _slow_values(self, slow: FieldReading, links: Sequence[int]) -> dict[str, Any]:
        ids = self.ids

        def num(fid: int) -> int | None:
            value = slow.get((fid, 0))
            return None if value is None else int(value)

        sbe_v, dbe_v, sbe_a, dbe_a = (num(f) for f in ids.ecc)
        cor, unc, pending, failure = (num(f) for f in ids.remapped)
        r_sbe, r_dbe, r_pending = (num(f) for f in ids.retired)
        recovery = link_sum(slow, ids.dl[1], links)
        return {
            "ecc_corrected_volatile": sbe_v, "ecc_uncorrected_volatile": dbe_v,
            "ecc_corrected_aggregate": sbe_a, "ecc_uncorrected_aggregate": dbe_a,
            "remapped_rows_correctable": cor, "remapped_rows_uncorrectable": unc,
            "remap_pending": None if pending is None else bool(pending),
            "remap_failure": None if failure is None else bool(failure),
            "retired_pages": None if r_sbe is None or r_dbe is None else r_sbe + r_dbe,
            "retired_pages_pending": None if r_pending is None else bool(r_pending),
            "pcie_replay_count": num(ids.pcie_replay),
            "nvlink_crc_errors": link_sum(slow, ids.dl[2], links),
            "nvlink_replay_errors": link_sum(slow, ids.dl[0], links),
            "nvlink_recovery_errors": recovery if recovery is not None else link_sum(slow, ids.nvlink5[2], links),
            "nvlink_symbol_errors": link_sum(slow, ids.nvlink5[0], links),
            "nvlink_effective_errors": link_sum(slow, ids.nvlink5[1], links),
        }

    def _utilization(self, dev: DeviceState, r: Reading) -> None:
        """Mean of the driver's utilization samples since the last committed read (an interval average)."""
        nvml = self.nvml
        kinds = (nvml.NVML_GPU_UTILIZATION_SAMPLES, nvml.NVML_MEMORY_UTILIZATION_SAMPLES)
        for kind in kinds:
            r.util[kind] = self._samples(dev, r, kind)
        if all(dev.cache.skip(("nvmlDeviceGetSamples", k)) for k in kinds):  # MIG, vGPU: point reading
            rates = self._call(dev, r, "nvmlDeviceGetUtilizationRates", dev.handle)
            r.util = dict(zip(kinds, (None, None) if rates is None else (ratio(rates.gpu), ratio(rates.memory)),
                              strict=True))

    def _samples(self, dev: DeviceState, r: Reading, kind: int) -> Any:
        last = dev.base.util_ts.get(kind, 0)
        got = self._call(dev, r, "nvmlDeviceGetSamples", dev.handle, kind, last,
                         key=("nvmlDeviceGetSamples", kind), expected=(self.nvml.NVMLError_NotFound,))
        if got is None or got is NOT_FOUND:
            return got
        value_type, samples = got
        member = _SAMPLE_MEMBERS[value_type] if 0 <= value_type < len(_SAMPLE_MEMBERS) else "uiVal"
        points = [(int(s.timeStamp), getattr(s.sampleValue, member)) for s in samples]
        if not points:
            return NOT_FOUND
        chosen = points if last else points[-1:]  # first read: the newest sample only
        r.util_ts[kind] = max(ts for ts, _ in points)
        return ratio(sum(v for _, v in chosen) / len(chosen))

    def _point_values(self, dev: DeviceState, r: Reading) -> None:
        nvml, h, f, c = self.nvml, dev.handle, self.funnel, dev.cache
        mem = first_supported(f, c, r.errors, ("nvmlDeviceGetMemoryInfo", h, nvml.nvmlMemory_v2),
                              ("nvmlDeviceGetMemoryInfo", h))
        temp = first_supported(f, c, r.errors, ("nvmlDeviceGetTemperatureV", h, nvml.NVML_TEMPERATURE_GPU),
                               ("nvmlDeviceGetTemperature", h, nvml.NVML_TEMPERATURE_GPU))
        reasons = first_supported(f, c, r.errors, ("nvmlDeviceGetCurrentClocksEventReasons", h),
                                  ("nvmlDeviceGetCurrentClocksThrottleReasons", h))
        processes = self._call(dev, r, "nvmlDeviceGetComputeRunningProcesses", h)
        if processes is not None:
            pids = [int(p.pid) for p in processes]
            util = self._process_util(dev, r) if len(pids) > 1 else {}
            r.processes = tuple(GpuProcess(pid, util.get(pid)) for pid in pids)
        r.values.update(
            mem_used_bytes=mem.used if mem is not None else None,
            mem_total_bytes=mem.total if mem is not None else None,
            temp_gpu_c=float(temp) if temp is not None else None,
            clock_sm_mhz=self._call(dev, r, "nvmlDeviceGetClockInfo", h, nvml.NVML_CLOCK_SM),
            clock_mem_mhz=self._call(dev, r, "nvmlDeviceGetClockInfo", h, nvml.NVML_CLOCK_MEM),
            clock_event_reasons=reasons,
            compute_processes=len(processes) if processes is not None else None)

    def _process_util(self, dev: DeviceState, r: Reading) -> dict[int, float]:
        """Per process, the SM utilization samples since the last committed reading, summed (a GPU several
        processes share: the weights of `allocation.share_by: utilization`). {} when NVML has none."""
        last = dev.base.process_util_ts
        got = self._call(dev, r, "nvmlDeviceGetProcessUtilization", dev.handle, last,
                         key="nvmlDeviceGetProcessUtilization", expected=(self.nvml.NVMLError_NotFound,))
        if got is None or got is NOT_FOUND or not got:
            return {}
        newest = max(int(s.timeStamp) for s in got)
        chosen = [s for s in got if int(s.timeStamp) == newest] if not last else list(got)
        r.process_util_ts = newest
        out: dict[int, float] = {}
        for s in chosen:
            out[int(s.pid)] = out.get(int(s.pid), 0.0) + float(s.smUtil)
        return out

    def _gpm(self, dev: DeviceState, r: Reading) -> None:
        """Take this interval's GPM sample; SM/tensor/DRAM activity since the committed previous one."""
        gpm = dev.gpm
        if gpm.supported is None:
            support = self._call(dev, r, "nvmlGpmQueryDeviceSupport", dev.handle)
            if support is None and not dev.cache.skip(("nvmlGpmQueryDeviceSupport",)):
                return  # transient failure: ask again next interval
            gpm.supported = support is not None and bool(support.isSupportedDevice)
        if not gpm.supported:
            return
        while len(gpm.samples) < 2:
            sample = self._call(dev, r, "nvmlGpmSampleAlloc", key="nvmlGpmSampleAlloc")
            if sample is None:
                return
            gpm.samples.append(sample)
        current, previous = gpm.samples[gpm.cur], gpm.samples[1 - gpm.cur]
        if self._call(dev, r, "nvmlGpmSampleGet", dev.handle, current, key="nvmlGpmSampleGet") is None:
            return
        r.gpm_taken = True
        if gpm.prev_valid:
            self._gpm_metrics(dev, r, previous, current)

    def _gpm_metrics(self, dev: DeviceState, r: Reading, previous: Any, current: Any) -> None:
        nvml = self.nvml
        ids = (nvml.NVML_GPM_METRIC_SM_UTIL, nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, nvml.NVML_GPM_METRIC_DRAM_BW_UTIL)
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(ids)
        request.sample1, request.sample2 = previous, current
        for i, metric_id in enumerate(ids):
            request.metrics[i].metricId = metric_id
        result = self._call(dev, r, "nvmlGpmMetricsGet", request, key="nvmlGpmMetricsGet")
        if result is None:
            return
        names = ("sm_active_ratio", "tensor_active_ratio", "dram_active_ratio")
        for i, name in enumerate(names):
            metric = result.metrics[i]
            ok = metric.nvmlReturn == nvml.NVML_SUCCESS
            r.values[name] = ratio(metric.value) if ok else None
            if not ok and metric.nvmlReturn != nvml.NVML_ERROR_NOT_SUPPORTED:
                dev.cache.counters.add(errors=1)

    # -- collector side ------------------------------------------------------------------------

    def commit(self, dev: DeviceState, r: Reading, now_s: float, xids: list[int]) -> GpuSample:
        """Interval figures from `r` against `dev`'s baselines; the baselines move to `r`."""
        values = dict(r.values)
        values["energy_interval_j"] = self._energy_delta(dev, r)
        values["throttle_power_ratio"] = self._throttle_share(dev, r, self.ids.throttle_power)
        values["throttle_thermal_ratio"] = self._throttle_share(dev, r, self.ids.throttle_thermal)
        self._commit_util(dev, r, values, self.nvml)
        if r.slow is not None:
            dev.slow, dev.slow_at = r.slow, now_s
        values.update(dev.slow)
        if r.inventory is not None:
            dev.limits = {k: r.inventory[k] for k in LIMIT_FIELDS}
            dev.inventory_at = now_s
            values.update(r.inventory)
        values.update(dev.limits)
        if r.gpm_taken:
            dev.gpm.cur, dev.gpm.prev_valid, dev.gpm.taken_at = 1 - dev.gpm.cur, True, now_s
        dev.processes = r.processes
        if r.mig_listed is not None:
            dev.mig, dev.mig_total = r.mig_listed, r.mig_total or dev.mig_total
        dev.mig_processes = {m.instance.uuid: m.processes for m in r.mig or []}
        if r.process_util_ts is not None:
            dev.base.process_util_ts = r.process_util_ts
        sample = GpuSample(index=dev.index, uuid=dev.uuid, model=dev.model, xids=xids, **values)
        readings = (getattr(sample, f) for f in GpuSample.__struct_fields__ if f not in _IDENTITY_FIELDS)
        if r.errors and all(v is None for v in readings):
            more = f" (and {len(r.errors) - 1} more)" if len(r.errors) > 1 else ""
            return error_sample(dev, r.errors[0] + more, xids)
        return sample

    @staticmethod
    def _energy_delta(dev: DeviceState, r: Reading) -> float | None:
        """mJ since the committed reading, in J: the counter restarts at 0 when the driver reloads, so a
        smaller value than the baseline is the energy since the reload."""
        now, base = r.energy_mj, dev.base.energy_mj
        if now is None:
            return None
        dev.base.energy_mj = now
        if base is None:
            return None
        return (now - base if now >= base else now) / 1000

    @staticmethod
    def _throttle_share(dev: DeviceState, r: Reading, fid: int) -> float | None:
        """Share of the time between two NVML timestamps that the cumulative throttle counter grew."""
        now, base = r.throttle.get(fid), dev.base.throttle.get(fid)
        if now is None:
            return None
        dev.base.throttle[fid] = now
        if base is None or now[1] <= base[1] or now[0] < base[0]:
            return None
        return min(1.0, (now[0] - base[0]) / ((now[1] - base[1]) * 1000))

    @staticmethod
    def _commit_util(dev: DeviceState, r: Reading, values: dict[str, Any], nvml: Any) -> None:
        kinds = (nvml.NVML_GPU_UTILIZATION_SAMPLES, nvml.NVML_MEMORY_UTILIZATION_SAMPLES)
        for kind, name in zip(kinds, ("util_gpu_ratio", "util_mem_ratio"), strict=True):
            if kind not in r.util:
                continue
            value = r.util[kind]
            if value is NOT_FOUND:
                value = dev.base.util_last.get(kind)
            else:
                dev.base.util_last[kind] = value
            values[name] = value
        dev.base.util_ts.update(r.util_ts)


def error_sample(dev: DeviceState, error: str, xids: list[int]) -> GpuSample:
    """The sample of a GPU that could not be read this interval: identity, the reason, and its XIDs."""
    return GpuSample(index=dev.index, uuid=dev.uuid, model=dev.model, error=error[:ERROR_TEXT_MAX], xids=xids)


def expand(dev: DeviceState, sample: GpuSample, r: Reading) -> list[GpuSample]:
    """The interval's samples of `dev`: one per MIG instance on a MIG GPU with instances, else `sample`."""
    if r.mig and dev.mig_total and sample.error is None:
        return [instance_sample(sample, m, dev.mig_total) for m in r.mig]
    return [sample]


def error_samples(dev: DeviceState, error: str, xids: list[int]) -> list[GpuSample]:
    """A GPU that could not be read: each of its known MIG instances in error, else the GPU."""
    if dev.mig_on and dev.mig and dev.mig_total:
        return [instance_error(dev.uuid, dev.index, dev.model, inst, dev.mig_total, error[:ERROR_TEXT_MAX], xids)
                for inst in dev.mig]
    return [error_sample(dev, error, xids)]


def device_views(dev: DeviceState) -> list[DeviceView]:
    """What allocation sources may know of `dev` after the last interval: the GPU, or its MIG instances."""
    if dev.mig_on and dev.mig:
        return [DeviceView(index=dev.index, uuid=m.uuid, processes=None if dev.lost else dev.mig_processes.get(m.uuid),
                           parent_uuid=dev.uuid) for m in dev.mig]
    return [DeviceView(index=dev.index, uuid=dev.uuid, minor=dev.minor, processes=None if dev.lost else dev.processes)]
