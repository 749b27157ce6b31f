"""NVML collector: reads real NVIDIA GPUs through `pynvml`, the one module in gpufleet that talks to NVML.

Every device read goes through one funnel (`NvmlCollector._query`, after nvitop's `nvmlQuery`):

* NotSupported / FunctionNotFound -> None, remembered per (GPU, counter) so it is never asked again;
* GpuIsLost / ResetRequired -> the GPU is reported this interval with `error` set and null counters;
* any other NVML error -> None for that counter and one more in `errors_last_interval`.

Each value lands in the wire's base unit (mW -> W, mJ -> J, percent -> 0..1 ratio, bytes, MHz).
XIDs are event-driven: a background thread waits on an NVML event set and queues each XID per GPU;
`collect()` drains the queues, so every XID is reported exactly once. GPM metrics (Hopper and newer)
are computed between the previous interval's sample and this one's, so the first interval has none.

NVML is started lazily (first `open()` or `collect()`) and shut down by `close()`.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Final

import pynvml

from gpufleet.errors import USAGE, GpufleetError
from gpufleet.wire import GpuSample

__all__ = ["NvmlCollector", "NvmlUnavailable"]

log = logging.getLogger(__name__)

EVENT_WAIT_MS: Final = 500
"""How long one `nvmlEventSetWait` blocks; bounds how long `close()` waits for the XID thread."""

MAX_XID: Final = 65535
"""Largest XID the wire accepts; anything above is logged and dropped rather than poison a message."""

_ERROR_TEXT_MAX: Final = 1024


class NvmlUnavailable(GpufleetError, RuntimeError):
    """NVML could not start on this node; the message says why and how to fix it."""

    exit_code = USAGE


class _GpuLost(Exception):
    """Raised inside the funnel when the GPU itself is gone; abandons that GPU for the interval."""


@dataclass
class _Gpm:
    """One GPU's GPM state: two sample buffers used alternately, and whether the previous is valid."""

    supported: bool
    samples: list[Any] = field(default_factory=list)
    cur: int = 0
    prev_valid: bool = False


@dataclass
class _Device:
    """What the collector keeps per GPU between intervals."""

    index: int
    uuid: str
    """NVML's UUID once read; `unknown-gpu-<index>` until then (a GPU unreachable since start-up)."""
    handle: Any = None
    model: str | None = None
    unsupported: set[Hashable] = field(default_factory=set)
    """Funnel keys that answered NotSupported: never asked again."""
    errors: list[str] = field(default_factory=list)
    """NVML errors seen while reading this GPU in the current interval."""
    xids: deque[int] = field(default_factory=deque)
    gpm: _Gpm | None = None
    events_registered: bool = False


@dataclass
class _NvLink:
    crc: int | None = None
    replay: int | None = None
    recovery: int | None = None
    down: int | None = None


def _address(pointer: Any) -> int | None:
    """The address a ctypes handle points at: how an event's `device` is matched to a GPU."""
    return ctypes.cast(pointer, ctypes.c_void_p).value


def _ratio(percent: float | None) -> float | None:
    """NVML percent (0..100) -> wire ratio clamped to 0..1; None and non-finite stay None."""
    if percent is None or not math.isfinite(percent):
        return None
    return min(1.0, max(0.0, percent / 100))


def _per_1000(value: int | None) -> float | None:
    """mW -> W, mJ -> J."""
    return None if value is None else value / 1000


_VALUE_MEMBERS: Final = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")
"""`c_nvmlValue_t` union member for each NVML_VALUE_TYPE_* (0..6)."""

_IDENTITY_FIELDS: Final = frozenset({"index", "uuid", "model", "error", "tenant", "job", "xids", "flops_measured"})
"""GpuSample fields that are not readings: a GPU whose readings are all null after errors is in error."""


def _init_message(nvml: Any, exc: Exception) -> str:
    """The operator-facing text for an `nvmlInit` failure."""
    if isinstance(exc, nvml.NVMLError_LibraryNotFound | nvml.NVMLError_DriverNotLoaded):
        why = (
            f"no NVIDIA driver was found on this node (NVML: {exc}); "
            "install or load the NVIDIA driver (check with `nvidia-smi`)"
        )
    elif isinstance(exc, nvml.NVMLError_NoPermission):
        why = f"NVML refused access ({exc}); run the agent as a user that can open /dev/nvidia*"
    elif isinstance(exc, nvml.NVMLError_LibRmVersionMismatch):
        why = f"the NVIDIA driver library and kernel module differ ({exc}); reboot after a driver upgrade"
    else:
        why = f"NVML failed to start ({exc}); check the NVIDIA driver with `nvidia-smi`"
    return f"{why}, or run the agent with --backend simulated on a node without GPUs"


class NvmlCollector:
    """The `Collector` for real NVIDIA GPUs.

    `nvml` is the pynvml module (tests pass `tests.fakes.fake_pynvml.FakeNvml()`). `event_wait_ms`
    is one `nvmlEventSetWait` timeout. After each `collect()`, `errors_last_interval` holds how many
    NVML calls failed (NotSupported excluded) since the previous `collect()`: the agent's `nvml_errors`.
    """

    def __init__(self, nvml: Any = pynvml, *, event_wait_ms: int = EVENT_WAIT_MS) -> None:
        self._nvml = nvml
        self._event_wait_ms = event_wait_ms
        self._absent: tuple[type[BaseException], ...] = (
            nvml.NVMLError_NotSupported,
            nvml.NVMLError_FunctionNotFound,
            nvml.NVMLLibraryMismatchError,
        )
        self._lost: tuple[type[BaseException], ...] = (nvml.NVMLError_GpuIsLost, nvml.NVMLError_ResetRequired)
        self._devices: list[_Device] | None = None
        self._by_address: dict[int, _Device] = {}
        self._lock = threading.Lock()
        self._errors = 0
        self.errors_last_interval = 0
        self._event_set: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._started = False
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Start NVML and find the GPUs (idempotent); raises `NvmlUnavailable` when NVML cannot start."""
        if self._closed:
            raise RuntimeError("this NvmlCollector is closed; create a new one")
        if self._devices is not None:
            return
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise NvmlUnavailable(_init_message(nvml, exc)) from exc
        self._started = True
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            self._shutdown()
            raise NvmlUnavailable(
                f"NVML started but could not count the GPUs ({exc}); check `nvidia-smi`, "
                "or run the agent with --backend simulated"
            ) from exc
        if count == 0:
            log.warning("NVML found no GPUs on this node; reports will carry no GPUs")
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            self._count_error()
            log.warning("NVML events unavailable (%s): XIDs will not be reported", exc)
        self._devices = [_Device(index=i, uuid=f"unknown-gpu-{i}") for i in range(count)]
        for dev in self._devices:
            self._attach(dev)

    @property
    def gpu_uuids(self) -> list[str]:
        """UUIDs in index order after `open()` (`unknown-gpu-<i>` for a GPU not attached yet); [] before."""
        return [d.uuid for d in self._devices or []]

    def close(self) -> None:
        """Stop the XID thread, free the event set and GPM samples, shut NVML down; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        thread_stopped = True
        if self._thread is not None:
            self._thread.join(timeout=self._event_wait_ms / 1000 + 5)
            thread_stopped = not self._thread.is_alive()
        nvml = self._nvml
        if self._event_set is not None:
            if thread_stopped:
                try:
                    nvml.nvmlEventSetFree(self._event_set)
                except nvml.NVMLError as exc:
                    log.warning("nvmlEventSetFree failed: %s", exc)
            else:
                log.warning("NVML event thread did not stop; leaving its event set allocated")
            self._event_set = None
        for dev in self._devices or []:
            for sample in dev.gpm.samples if dev.gpm else []:
                try:
                    nvml.nvmlGpmSampleFree(sample)
                except nvml.NVMLError as exc:
                    log.warning("nvmlGpmSampleFree failed for GPU %d: %s", dev.index, exc)
        self._shutdown()

    def __enter__(self) -> NvmlCollector:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _shutdown(self) -> None:
        if self._started:
            self._started = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.warning("nvmlShutdown failed: %s", exc)

    # -- the funnel --------------------------------------------------------------------------

    def _query(
        self,
        dev: _Device,
        func: str | Callable[..., Any],
        *args: Any,
        key: Hashable | None = None,
        absent: tuple[type[BaseException], ...] = (),
    ) -> Any:
        """Call one NVML function for `dev`; the only place device reads meet NVML errors.

        `func` is a pynvml function name (missing from an older binding -> unsupported) or a callable.
        `key` names the counter for the NotSupported cache; by default the function name plus every
        argument after the first (the device handle). `absent` adds error types that also mean
        "this does not exist here" (e.g. InvalidArgument for an NVLink index beyond the GPU's links).
        """
        name = func if isinstance(func, str) else func.__name__
        if key is None:
            key = (name, *args[1:])
        if key in dev.unsupported:
            return None
        fn = getattr(self._nvml, func, None) if isinstance(func, str) else func
        if fn is None:
            dev.unsupported.add(key)
            return None
        try:
            return fn(*args)
        except self._absent + absent:
            dev.unsupported.add(key)
            return None
        except self._lost as exc:
            self._count_error()
            raise _GpuLost(f"{exc} ({name})") from exc
        except self._nvml.NVMLError as exc:
            self._count_error()
            dev.errors.append(f"{name}: {exc}")
            log.debug("GPU %d: %s failed: %s", dev.index, name, exc)
            return None

    def _first(self, dev: _Device, *calls: tuple[Any, ...]) -> Any:
        """The first of several equivalent calls (newest API first) that this GPU and driver support."""
        for func, *args in calls:
            value = self._query(dev, func, *args)
            if (func, *args[1:]) not in dev.unsupported:
                return value
        return None

    def _count_error(self) -> None:
        with self._lock:
            self._errors += 1

    # -- per-interval reads ------------------------------------------------------------------

    def collect(self, now_ms: int) -> list[GpuSample]:
        """Read every GPU once. `now_ms` (the interval end) is unused: NVML values are current."""
        self.open()
        assert self._devices is not None
        samples = [self._read_device(dev) for dev in self._devices]
        with self._lock:
            self.errors_last_interval, self._errors = self._errors, 0
        return samples

    def _read_device(self, dev: _Device) -> GpuSample:
        dev.errors.clear()
        try:
            if dev.handle is None and not self._attach(dev):
                return self._error_sample(dev, dev.errors[0] if dev.errors else "GPU handle unavailable")
            sample = self._read_counters(dev)
        except _GpuLost as exc:
            if dev.gpm is not None:
                dev.gpm.prev_valid = False
            return self._error_sample(dev, str(exc))
        except Exception as exc:  # a bug must not cost the other GPUs their interval
            log.exception("GPU %d: unexpected failure while reading NVML", dev.index)
            return self._error_sample(dev, f"collector failure: {exc!r}")
        readings = (getattr(sample, f) for f in GpuSample.__struct_fields__ if f not in _IDENTITY_FIELDS)
        if dev.errors and all(v is None for v in readings):
            more = f" (and {len(dev.errors) - 1} more)" if len(dev.errors) > 1 else ""
            return self._error_sample(dev, dev.errors[0] + more, xids=sample.xids)
        return sample

    def _error_sample(self, dev: _Device, error: str, xids: list[int] | None = None) -> GpuSample:
        return GpuSample(
            index=dev.index,
            uuid=dev.uuid,
            model=dev.model,
            error=error[:_ERROR_TEXT_MAX],
            xids=self._drain_xids(dev) if xids is None else xids,
        )

    def _attach(self, dev: _Device) -> bool:
        """Get the GPU's handle, UUID and name, and register it for XID events; False if unreachable."""
        nvml = self._nvml
        try:
            handle = self._query(dev, "nvmlDeviceGetHandleByIndex", dev.index)
            if handle is None:
                return False
            uuid = self._query(dev, "nvmlDeviceGetUUID", handle)
            if not uuid:
                return False
            dev.handle, dev.uuid = handle, uuid
            dev.model = self._query(dev, "nvmlDeviceGetName", handle)
        except _GpuLost as exc:
            dev.errors.append(str(exc))
            return False
        address = _address(handle)
        if address is not None:
            self._by_address[address] = dev
        if self._event_set is None:
            return True
        try:
            supported = self._query(dev, "nvmlDeviceGetSupportedEventTypes", handle) or 0
            mask = nvml.nvmlEventTypeXidCriticalError & supported
            if mask:
                errors_before = len(dev.errors)
                self._query(dev, "nvmlDeviceRegisterEvents", handle, mask, self._event_set, key="register")
                dev.events_registered = "register" not in dev.unsupported and len(dev.errors) == errors_before
        except _GpuLost as exc:
            dev.errors.append(str(exc))
        if dev.events_registered and self._thread is None:
            self._thread = threading.Thread(target=self._watch_events, name="nvml-xid-events", daemon=True)
            self._thread.start()
        return True

    def _read_counters(self, dev: _Device) -> GpuSample:
        nvml, h, q = self._nvml, dev.handle, self._query
        util = q(dev, "nvmlDeviceGetUtilizationRates", h)
        mem = self._first(dev, ("nvmlDeviceGetMemoryInfo", h, nvml.nvmlMemory_v2), ("nvmlDeviceGetMemoryInfo", h))
        temp = self._first(
            dev,
            ("nvmlDeviceGetTemperatureV", h, nvml.NVML_TEMPERATURE_GPU),
            ("nvmlDeviceGetTemperature", h, nvml.NVML_TEMPERATURE_GPU),
        )
        temp_mem = q(dev, self._read_field, h, nvml.NVML_FI_DEV_MEMORY_TEMP)
        reasons = self._first(
            dev,
            ("nvmlDeviceGetCurrentClocksEventReasons", h),
            ("nvmlDeviceGetCurrentClocksThrottleReasons", h),
        )
        corrected, uncorrected = nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        volatile, aggregate = nvml.NVML_VOLATILE_ECC, nvml.NVML_AGGREGATE_ECC
        rows = q(dev, "nvmlDeviceGetRemappedRows", h)
        sbe, dbe = (
            nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
            nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
        )
        sbe_pages = q(dev, "nvmlDeviceGetRetiredPages", h, sbe)
        dbe_pages = q(dev, "nvmlDeviceGetRetiredPages", h, dbe)
        pages_pending = q(dev, "nvmlDeviceGetRetiredPagesPendingStatus", h)
        processes = q(dev, "nvmlDeviceGetComputeRunningProcesses", h)
        link = self._read_nvlink(dev)
        sm_active, tensor_active, dram_active = self._read_gpm(dev)
        return GpuSample(
            index=dev.index,
            uuid=dev.uuid,
            model=dev.model,
            util_gpu_ratio=_ratio(util.gpu) if util is not None else None,
            util_mem_ratio=_ratio(util.memory) if util is not None else None,
            mem_used_bytes=mem.used if mem is not None else None,
            mem_total_bytes=mem.total if mem is not None else None,
            power_w=_per_1000(q(dev, "nvmlDeviceGetPowerUsage", h)),
            energy_j=_per_1000(q(dev, "nvmlDeviceGetTotalEnergyConsumption", h)),
            temp_gpu_c=float(temp) if temp is not None else None,
            temp_mem_c=float(temp_mem) if temp_mem is not None else None,
            clock_sm_mhz=q(dev, "nvmlDeviceGetClockInfo", h, nvml.NVML_CLOCK_SM),
            clock_mem_mhz=q(dev, "nvmlDeviceGetClockInfo", h, nvml.NVML_CLOCK_MEM),
            clock_event_reasons=reasons,
            ecc_corrected_volatile=q(dev, "nvmlDeviceGetTotalEccErrors", h, corrected, volatile),
            ecc_uncorrected_volatile=q(dev, "nvmlDeviceGetTotalEccErrors", h, uncorrected, volatile),
            ecc_corrected_aggregate=q(dev, "nvmlDeviceGetTotalEccErrors", h, corrected, aggregate),
            ecc_uncorrected_aggregate=q(dev, "nvmlDeviceGetTotalEccErrors", h, uncorrected, aggregate),
            remapped_rows_correctable=rows[0] if rows is not None else None,
            remapped_rows_uncorrectable=rows[1] if rows is not None else None,
            remap_pending=bool(rows[2]) if rows is not None else None,
            remap_failure=bool(rows[3]) if rows is not None else None,
            retired_pages=(
                len(sbe_pages) + len(dbe_pages) if sbe_pages is not None and dbe_pages is not None else None
            ),
            retired_pages_pending=(pages_pending == nvml.NVML_FEATURE_ENABLED if pages_pending is not None else None),
            pcie_replay_count=q(dev, "nvmlDeviceGetPcieReplayCounter", h),
            nvlink_crc_errors=link.crc,
            nvlink_replay_errors=link.replay,
            nvlink_recovery_errors=link.recovery,
            nvlink_links_down=link.down,
            xids=self._drain_xids(dev),
            compute_processes=len(processes) if processes is not None else None,
            sm_active_ratio=sm_active,
            tensor_active_ratio=tensor_active,
            dram_active_ratio=dram_active,
        )

    def _read_field(self, handle: Any, field_id: int) -> float | int:
        """One `nvmlDeviceGetFieldValues` entry; its own `nvmlReturn` raised as the matching NVMLError."""
        nvml = self._nvml
        value = nvml.nvmlDeviceGetFieldValues(handle, (field_id,))[0]
        if value.nvmlReturn != nvml.NVML_SUCCESS:
            raise nvml.NVMLError(value.nvmlReturn)
        if not 0 <= value.valueType < len(_VALUE_MEMBERS):
            raise nvml.NVMLError(nvml.NVML_ERROR_UNKNOWN)
        return getattr(value.value, _VALUE_MEMBERS[value.valueType])

    def _read_nvlink(self, dev: _Device) -> _NvLink:
        """NVLink error counters summed over the GPU's links, and how many of its links are down.

        A link exists unless its state answers NotSupported or InvalidArgument. A sum is None when
        any existing link's read failed (a partial sum would look like a counter reset).
        """
        nvml, h = self._nvml, dev.handle
        invalid = (nvml.NVMLError_InvalidArgument,)
        links, down, state_failed = [], 0, False
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            state = self._query(dev, "nvmlDeviceGetNvLinkState", h, link, absent=invalid)
            if ("nvmlDeviceGetNvLinkState", link) in dev.unsupported:
                continue
            links.append(link)
            if state is None:
                state_failed = True
            elif state == nvml.NVML_FEATURE_DISABLED:
                down += 1
        if not links:
            return _NvLink()

        def total(*counters: int) -> int | None:
            values = []
            for link in links:
                for counter in counters:
                    value = self._query(dev, "nvmlDeviceGetNvLinkErrorCounter", h, link, counter, absent=invalid)
                    if value is None and ("nvmlDeviceGetNvLinkErrorCounter", link, counter) not in dev.unsupported:
                        return None
                    if value is not None:
                        values.append(value)
            return sum(values) if values else None

        return _NvLink(
            crc=total(nvml.NVML_NVLINK_ERROR_DL_CRC_FLIT, nvml.NVML_NVLINK_ERROR_DL_CRC_DATA),
            replay=total(nvml.NVML_NVLINK_ERROR_DL_REPLAY),
            recovery=total(nvml.NVML_NVLINK_ERROR_DL_RECOVERY),
            down=None if state_failed else down,
        )

    def _read_gpm(self, dev: _Device) -> tuple[float | None, float | None, float | None]:
        """GPM SM, tensor and DRAM activity over the interval since the previous GPM sample."""
        pair = self._gpm_sample(dev)
        if pair is None:
            return (None, None, None)
        nvml = self._nvml
        ids = (nvml.NVML_GPM_METRIC_SM_UTIL, nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, nvml.NVML_GPM_METRIC_DRAM_BW_UTIL)
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(ids)
        request.sample1, request.sample2 = pair
        for i, metric_id in enumerate(ids):
            request.metrics[i].metricId = metric_id
        result = self._query(dev, "nvmlGpmMetricsGet", request, key="nvmlGpmMetricsGet")
        if result is None:
            return (None, None, None)
        ratios: list[float | None] = []
        for i in range(len(ids)):
            metric = result.metrics[i]
            ok = metric.nvmlReturn == nvml.NVML_SUCCESS
            ratios.append(_ratio(metric.value) if ok else None)
            if not ok and metric.nvmlReturn != nvml.NVML_ERROR_NOT_SUPPORTED:
                self._count_error()
        return ratios[0], ratios[1], ratios[2]

    def _gpm_sample(self, dev: _Device) -> tuple[Any, Any] | None:
        """Take this interval's GPM sample; (previous, current) when both exist, else None."""
        h = dev.handle
        if dev.gpm is None:
            support = self._query(dev, "nvmlGpmQueryDeviceSupport", h)
            if support is None and ("nvmlGpmQueryDeviceSupport",) not in dev.unsupported:
                return None  # transient failure: ask again next interval
            dev.gpm = _Gpm(supported=support is not None and bool(support.isSupportedDevice))
        gpm = dev.gpm
        if not gpm.supported:
            return None
        while len(gpm.samples) < 2:
            sample = self._query(dev, "nvmlGpmSampleAlloc", key="nvmlGpmSampleAlloc")
            if sample is None:
                return None
            gpm.samples.append(sample)
        current, previous = gpm.samples[gpm.cur], gpm.samples[1 - gpm.cur]
        if self._query(dev, "nvmlGpmSampleGet", h, current, key="nvmlGpmSampleGet") is None:
            gpm.prev_valid = False
            return None
        had_previous, gpm.prev_valid, gpm.cur = gpm.prev_valid, True, 1 - gpm.cur
        return (previous, current) if had_previous else None

    # -- XID events --------------------------------------------------------------------------

    def _drain_xids(self, dev: _Device) -> list[int]:
        with self._lock:
            xids = list(dev.xids)
            dev.xids.clear()
        return xids

    def _watch_events(self) -> None:
        """Background loop: wait on the event set and queue each XID on its GPU until `close()`."""
        nvml, failing = self._nvml, False
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait(self._event_set, self._event_wait_ms)
            except nvml.NVMLError_Timeout:
                failing = False
                continue
            except nvml.NVMLError as exc:
                self._count_error()
                log.log(logging.DEBUG if failing else logging.WARNING, "nvmlEventSetWait failed: %s", exc)
                failing = True
                self._stop.wait(self._event_wait_ms / 1000)
                continue
            failing = False
            if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            xid, dev = int(data.eventData), self._by_address.get(_address(data.device) or 0)
            if dev is None or xid > MAX_XID:
                log.warning("dropping XID %d from an unknown GPU or out of range", xid)
                continue
            with self._lock:
                dev.xids.append(xid)
