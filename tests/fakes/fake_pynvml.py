"""A faithful in-memory fake of the `pynvml` module (nvidia-ml-py 13.x) for the NVML collector's tests.

`FakeNvml()` is used where the real module is: `NvmlCollector(nvml=FakeNvml([...]))`. It mirrors the
real module rather than inventing an API of its own:

* the functions the collector calls, with the real names and parameter names (a test compares
  signatures with `inspect`, so the fake cannot drift from the installed pynvml);
* the real constants, the real `NVMLError` class with its generated subclasses
  (`NVMLError_NotSupported`, `NVMLError_GpuIsLost`, `NVMLError_Timeout`, ...) and the real ctypes
  structs (`c_nvmlMemory_t`, `c_nvmlUtilization_t`, `c_nvmlFieldValue_t`, `c_nvmlEventData_t`,
  `c_nvmlGpmMetricsGet_t`, ...), all re-exported from pynvml itself;
* handles, event sets and GPM samples are real ctypes pointers (`c_nvmlDevice_t`, ...) holding
  made-up addresses that are never dereferenced, as the real library's are opaque;
* NVML's rules: calls before `nvmlInit` raise Uninitialized, `nvmlShutdown` is reference counted,
  an unknown handle or link raises InvalidArgument, `nvmlEventSetWait` blocks up to its timeout and
  raises Timeout, events reach only the sets registered for them, registering an unsupported event
  type raises NotSupported, GPM metrics need two samples of the same GPU taken in order.

What a test controls lives on `FakeGpu` (one per GPU, mutable between intervals): the values each
call returns, `errors` (call name, or call name plus arguments after the handle -> NVML error code,
e.g. `{"nvmlDeviceGetPowerUsage": NVML_ERROR_NOT_SUPPORTED}` or
`{("nvmlDeviceGetNvLinkState", 3): NVML_ERROR_UNKNOWN}`), and `lost` (every call raises GpuIsLost).
The fake counts calls per (function, GPU index) in `calls`, injects XIDs with `inject_xid()`, and
`wait_for_event_consumer()` blocks until a consumer has taken every queued event and is waiting again.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections import Counter, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pynvml
from pynvml import (
    NVML_AGGREGATE_ECC,
    NVML_CLOCK_GRAPHICS,
    NVML_CLOCK_MEM,
    NVML_CLOCK_SM,
    NVML_CLOCK_VIDEO,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNINITIALIZED,
    NVML_FEATURE_DISABLED,
    NVML_FI_DEV_MEMORY_TEMP,
    NVML_GPM_METRIC_MAX,
    NVML_GPM_METRICS_GET_VERSION,
    NVML_GPM_SUPPORT_VERSION,
    NVML_MEMORY_ERROR_TYPE_CORRECTED,
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    NVML_NVLINK_ERROR_DL_CRC_DATA,
    NVML_NVLINK_ERROR_DL_CRC_FLIT,
    NVML_NVLINK_ERROR_DL_ECC_DATA,
    NVML_NVLINK_ERROR_DL_RECOVERY,
    NVML_NVLINK_ERROR_DL_REPLAY,
    NVML_NVLINK_MAX_LINKS,
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
    NVML_SUCCESS,
    NVML_TEMPERATURE_GPU,
    NVML_VALUE_TYPE_UNSIGNED_INT,
    NVML_VOLATILE_ECC,
    NVMLError,
    c_nvmlDevice_t,
    c_nvmlEventData_t,
    c_nvmlEventSet_t,
    c_nvmlFieldValue_t,
    c_nvmlGpmSample_t,
    c_nvmlGpmSupport_t,
    c_nvmlMemory_t,
    c_nvmlMemory_v2_t,
    c_nvmlProcessInfo_v3_t,
    c_nvmlUtilization_t,
    nvmlEventTypeXidCriticalError,
    nvmlMemory_v2,
    nvmlStructToFriendlyObject,
    nvmlTemperature_v1,
)

H100_MEMORY_BYTES = 81559 * 1024 * 1024
"""What NVML reports as total memory on an H100 80GB HBM3 (81559 MiB)."""

ALL_SUPPORTED_EVENTS = (
    pynvml.nvmlEventTypeSingleBitEccError
    | pynvml.nvmlEventTypeDoubleBitEccError
    | pynvml.nvmlEventTypePState
    | nvmlEventTypeXidCriticalError
    | pynvml.nvmlEventTypeClock
)
"""What `nvmlDeviceGetSupportedEventTypes` answers on a data-centre GPU."""

_NO_INSTANCE = 0xFFFFFFFF
_ECC_KEYS = [
    (t, c)
    for t in (NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
    for c in (NVML_VOLATILE_ECC, NVML_AGGREGATE_ECC)
]
_NVLINK_COUNTERS = frozenset(
    {
        NVML_NVLINK_ERROR_DL_REPLAY,
        NVML_NVLINK_ERROR_DL_RECOVERY,
        NVML_NVLINK_ERROR_DL_CRC_FLIT,
        NVML_NVLINK_ERROR_DL_CRC_DATA,
        NVML_NVLINK_ERROR_DL_ECC_DATA,
    }
)


@dataclass
class FakeGpu:
    """One fake GPU: what each NVML call answers, in NVML's own units (mW, mJ, percent, bytes, MHz)."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    util_gpu_pct: int = 0
    util_mem_pct: int = 0
    mem_total: int = H100_MEMORY_BYTES
    mem_reserved: int = 0
    mem_used: int = 0
    """Used memory as the v2 call reports it (excluding `mem_reserved`); v1 reports used + reserved."""
    power_mw: int = 0
    energy_mj: int = 0
    temp_gpu_c: int = 30
    temp_mem_c: int | None = 30
    """None: the NVML_FI_DEV_MEMORY_TEMP field answers NOT_SUPPORTED (consumer GPUs)."""
    clock_sm_mhz: int = 1980
    clock_mem_mhz: int = 2619
    clocks_event_reasons: int = 0
    ecc: dict[tuple[int, int], int] = field(default_factory=lambda: dict.fromkeys(_ECC_KEYS, 0))
    """(NVML_MEMORY_ERROR_TYPE_*, NVML_VOLATILE_ECC | NVML_AGGREGATE_ECC) -> count."""
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)
    """(correctable, uncorrectable, isPending, failureOccurred) as nvmlDeviceGetRemappedRows returns."""
    retired_pages: dict[int, list[int]] = field(
        default_factory=lambda: {
            NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS: [],
            NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR: [],
        }
    )
    """Cause -> retired page addresses."""
    retired_pages_pending: int = NVML_FEATURE_DISABLED
    pcie_replay: int = 0
    nvlink_states: dict[int, int] = field(default_factory=dict)
    """Link -> 1 active / 0 inactive. Empty: no NVLink at all (every link call answers NotSupported)."""
    nvlink_errors: dict[tuple[int, int], int] = field(default_factory=dict)
    """(link, NVML_NVLINK_ERROR_DL_*) -> count; an existing link's counter not listed is 0."""
    process_pids: list[int] = field(default_factory=list)
    supported_events: int = ALL_SUPPORTED_EVENTS
    gpm_supported: bool = False
    gpm_metrics: dict[int, float] = field(default_factory=dict)
    """GPM metric id -> value (percent) over the interval ending at the next `nvmlGpmSampleGet`."""
    gpm_metric_returns: dict[int, int] = field(default_factory=dict)
    """GPM metric id -> the nvmlReturn that metric reports instead of a value."""
    errors: dict[Hashable, int] = field(default_factory=dict)
    """Call name, or (call name, *arguments after the handle) -> NVML error code that call raises."""
    lost: bool = False
    """The GPU has fallen off the bus: every call about it raises NVMLError_GpuIsLost."""


@dataclass
class _EventSet:
    registered: dict[int, int] = field(default_factory=dict)
    queue: deque[tuple[int, int, int]] = field(default_factory=deque)
    waiting: int = 0
    freed: bool = False


@dataclass
class _GpmSample:
    device: int | None = None
    seq: int = 0
    metrics: dict[int, float] = field(default_factory=dict)
    returns: dict[int, int] = field(default_factory=dict)
    freed: bool = False


def _pointer(kind: Any, address: int) -> Any:
    """A ctypes pointer of the real handle type holding a made-up address (never dereferenced)."""
    return ctypes.cast(ctypes.c_void_p(address), kind)


def _address(pointer: Any) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


class FakeNvml:
    """Stands in for the `pynvml` module; one instance per test, no global state."""

    # The real module's error types, structs and constants, so `except nvml.NVMLError_X` and
    # `nvml.c_nvmlGpmMetricsGet_t()` in the collector behave exactly as with pynvml.
    NVMLError = NVMLError
    NVMLLibraryMismatchError = pynvml.NVMLLibraryMismatchError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_ResetRequired = pynvml.NVMLError_ResetRequired
    NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument
    NVMLError_Timeout = pynvml.NVMLError_Timeout
    NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVMLError_NoPermission = pynvml.NVMLError_NoPermission
    NVMLError_LibRmVersionMismatch = pynvml.NVMLError_LibRmVersionMismatch
    NVMLError_Unknown = pynvml.NVMLError_Unknown
    c_nvmlGpmMetricsGet_t = pynvml.c_nvmlGpmMetricsGet_t
    NVML_SUCCESS = NVML_SUCCESS
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
    NVML_FEATURE_DISABLED = NVML_FEATURE_DISABLED
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_FI_DEV_MEMORY_TEMP = NVML_FI_DEV_MEMORY_TEMP
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_CLOCK_MEM = NVML_CLOCK_MEM
    NVML_MEMORY_ERROR_TYPE_CORRECTED = NVML_MEMORY_ERROR_TYPE_CORRECTED
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = NVML_VOLATILE_ECC
    NVML_AGGREGATE_ECC = NVML_AGGREGATE_ECC
    NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = (
        NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
    )
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
    NVML_NVLINK_MAX_LINKS = NVML_NVLINK_MAX_LINKS
    NVML_NVLINK_ERROR_DL_REPLAY = NVML_NVLINK_ERROR_DL_REPLAY
    NVML_NVLINK_ERROR_DL_RECOVERY = NVML_NVLINK_ERROR_DL_RECOVERY
    NVML_NVLINK_ERROR_DL_CRC_FLIT = NVML_NVLINK_ERROR_DL_CRC_FLIT
    NVML_NVLINK_ERROR_DL_CRC_DATA = NVML_NVLINK_ERROR_DL_CRC_DATA
    NVML_GPM_METRIC_SM_UTIL = pynvml.NVML_GPM_METRIC_SM_UTIL
    NVML_GPM_METRIC_ANY_TENSOR_UTIL = pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL
    NVML_GPM_METRIC_DRAM_BW_UTIL = pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL
    NVML_GPM_METRICS_GET_VERSION = NVML_GPM_METRICS_GET_VERSION
    nvmlEventTypeXidCriticalError = nvmlEventTypeXidCriticalError
    nvmlMemory_v2 = nvmlMemory_v2

    def __init__(self, gpus: Sequence[FakeGpu] = (), *, init_error: int | None = None) -> None:
        """`init_error`: the NVML error code `nvmlInit` raises (e.g. NVML_ERROR_LIBRARY_NOT_FOUND)."""
        self.gpus = list(gpus)
        self.init_error = init_error
        self.calls: Counter[tuple[str, int | None]] = Counter()
        """(function name, GPU index or None) -> how many times it was called."""
        self.init_count = 0
        self.shutdown_count = 0
        self._refcount = 0
        self._lock = threading.Lock()
        self._events = threading.Condition(self._lock)
        self._addresses = itertools.count(0x7F0000001000, 0x100)
        self._handles = [_pointer(c_nvmlDevice_t, next(self._addresses)) for _ in self.gpus]
        self._by_address = {_address(h): i for i, h in enumerate(self._handles)}
        self._event_sets: dict[int, _EventSet] = {}
        self._gpm_samples: dict[int, _GpmSample] = {}
        self._gpm_seq = itertools.count(1)

    # -- test controls -----------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        return self._refcount > 0

    def calls_to(self, name: str, gpu: int | None = None) -> int:
        """How many times `name` was called for GPU `gpu` (None: calls not about one GPU)."""
        return self.calls[(name, gpu)]

    def inject_xid(self, gpu: int, xid: int) -> None:
        """The driver raises XID `xid` on GPU `gpu`: every event set registered for XIDs there gets it."""
        address = _address(self._handles[gpu])
        with self._events:
            for es in self._event_sets.values():
                if not es.freed and es.registered.get(address, 0) & nvmlEventTypeXidCriticalError:
                    es.queue.append((address, nvmlEventTypeXidCriticalError, xid))
            self._events.notify_all()

    def wait_for_event_consumer(self, timeout: float = 10.0) -> bool:
        """Block until every live event set is empty and has a thread waiting on it again.

        A consumer loop (wait -> handle -> wait) that is back in `nvmlEventSetWait` with nothing
        queued has finished handling everything injected before; False if that never happens.
        """
        with self._events:
            return self._events.wait_for(
                lambda: all(not es.queue and es.waiting > 0 for es in self._event_sets.values() if not es.freed),
                timeout,
            )

    @property
    def live_event_sets(self) -> int:
        return sum(not es.freed for es in self._event_sets.values())

    @property
    def live_gpm_samples(self) -> int:
        return sum(not s.freed for s in self._gpm_samples.values())

    # -- internals ---------------------------------------------------------------------------

    def _require_init(self, name: str, gpu: int | None = None) -> None:
        with self._lock:
            self.calls[(name, gpu)] += 1
        if self._refcount == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _device(self, name: str, handle: Any, *args: Hashable) -> FakeGpu:
        """Validate the handle, count the call, and raise whatever the test made this call raise."""
        index = self._by_address.get(_address(handle)) if isinstance(handle, c_nvmlDevice_t) else None
        self._require_init(name, index)
        if index is None:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[index]
        self._raise_injected(gpu, name, *args)
        return gpu

    @staticmethod
    def _raise_injected(gpu: FakeGpu, name: str, *args: Hashable) -> None:
        if gpu.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)
        for key in (name, (name, *args)):
            if key in gpu.errors:
                raise NVMLError(gpu.errors[key])

    def _event_set(self, event_set: Any) -> _EventSet:
        es = self._event_sets.get(_address(event_set)) if isinstance(event_set, c_nvmlEventSet_t) else None
        if es is None or es.freed:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return es

    def _gpm_sample(self, gpm_sample: Any) -> _GpmSample:
        sample = self._gpm_samples.get(_address(gpm_sample)) if isinstance(gpm_sample, c_nvmlGpmSample_t) else None
        if sample is None or sample.freed:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return sample

    # -- library -----------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_count += 1
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self._refcount += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_count += 1
        if self._refcount == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self._refcount -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._require_init("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._require_init("nvmlDeviceGetHandleByIndex", index)
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        self._raise_injected(self.gpus[index], "nvmlDeviceGetHandleByIndex")
        return self._handles[index]

    # -- identity and readings ---------------------------------------------------------------

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._device("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._device("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        gpu = self._device("nvmlDeviceGetUtilizationRates", handle)
        return c_nvmlUtilization_t(gpu=gpu.util_gpu_pct, memory=gpu.util_mem_pct)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        gpu = self._device("nvmlDeviceGetMemoryInfo", handle, *(() if not version else (version,)))
        if not version:
            used = gpu.mem_used + gpu.mem_reserved
            return c_nvmlMemory_t(total=gpu.mem_total, free=gpu.mem_total - used, used=used)
        if version != nvmlMemory_v2:
            raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        free = gpu.mem_total - gpu.mem_reserved - gpu.mem_used
        return c_nvmlMemory_v2_t(
            version=version, total=gpu.mem_total, reserved=gpu.mem_reserved, free=free, used=gpu.mem_used
        )

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetTotalEnergyConsumption", handle).energy_mj

    def nvmlDeviceGetTemperatureV(self, handle: Any, sensor: int, version: int = nvmlTemperature_v1) -> int:
        gpu = self._device("nvmlDeviceGetTemperatureV", handle, sensor)
        if version != nvmlTemperature_v1:
            raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temp_gpu_c

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        gpu = self._device("nvmlDeviceGetTemperature", handle, sensor)
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temp_gpu_c

    def nvmlDeviceGetFieldValues(self, handle: Any, fieldIds: Sequence[int | tuple[int, int]]) -> Any:
        gpu = self._device("nvmlDeviceGetFieldValues", handle)
        values = (c_nvmlFieldValue_t * len(fieldIds))()
        for value, requested in zip(values, fieldIds, strict=True):
            # like pynvml: an entry is a field id or a (field id, scope id) pair
            field_id, scope_id = requested if isinstance(requested, tuple) else (requested, 0)
            value.fieldId, value.scopeId = field_id, scope_id
            if field_id == NVML_FI_DEV_MEMORY_TEMP and gpu.temp_mem_c is not None:
                value.valueType = NVML_VALUE_TYPE_UNSIGNED_INT
                value.value.uiVal = gpu.temp_mem_c
                value.nvmlReturn = NVML_SUCCESS
            else:
                value.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceGetClockInfo(self, handle: Any, type: int) -> int:
        gpu = self._device("nvmlDeviceGetClockInfo", handle, type)
        clocks = {
            NVML_CLOCK_GRAPHICS: gpu.clock_sm_mhz,
            NVML_CLOCK_SM: gpu.clock_sm_mhz,
            NVML_CLOCK_MEM: gpu.clock_mem_mhz,
            NVML_CLOCK_VIDEO: gpu.clock_sm_mhz,
        }
        if type not in clocks:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return clocks[type]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetCurrentClocksEventReasons", handle).clocks_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetCurrentClocksThrottleReasons", handle).clocks_event_reasons

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, errorType: int, counterType: int) -> int:
        gpu = self._device("nvmlDeviceGetTotalEccErrors", handle, errorType, counterType)
        if (errorType, counterType) not in gpu.ecc:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.ecc[(errorType, counterType)]

    def nvmlDeviceGetRemappedRows(self, device: Any) -> tuple[int, int, int, int]:
        return tuple(self._device("nvmlDeviceGetRemappedRows", device).remapped_rows)  # type: ignore[return-value]

    def nvmlDeviceGetRetiredPages(self, device: Any, sourceFilter: int) -> list[int]:
        gpu = self._device("nvmlDeviceGetRetiredPages", device, sourceFilter)
        if sourceFilter not in gpu.retired_pages:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return list(gpu.retired_pages[sourceFilter])

    def nvmlDeviceGetRetiredPagesPendingStatus(self, device: Any) -> int:
        return self._device("nvmlDeviceGetRetiredPagesPendingStatus", device).retired_pages_pending

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetPcieReplayCounter", handle).pcie_replay

    def _nvlink(self, name: str, device: Any, link: int, *args: int) -> FakeGpu:
        gpu = self._device(name, device, link, *args)
        if not gpu.nvlink_states:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if link not in gpu.nvlink_states or not 0 <= link < NVML_NVLINK_MAX_LINKS:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu

    def nvmlDeviceGetNvLinkState(self, device: Any, link: int) -> int:
        return self._nvlink("nvmlDeviceGetNvLinkState", device, link).nvlink_states[link]

    def nvmlDeviceGetNvLinkErrorCounter(self, device: Any, link: int, counter: int) -> int:
        gpu = self._nvlink("nvmlDeviceGetNvLinkErrorCounter", device, link, counter)
        if counter not in _NVLINK_COUNTERS:
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return gpu.nvlink_errors.get((link, counter), 0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:
        gpu = self._device("nvmlDeviceGetComputeRunningProcesses", handle)
        return [
            nvmlStructToFriendlyObject(
                c_nvmlProcessInfo_v3_t(
                    pid=pid, usedGpuMemory=0, gpuInstanceId=_NO_INSTANCE, computeInstanceId=_NO_INSTANCE
                )
            )
            for pid in gpu.process_pids
        ]

    # -- events ------------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> Any:
        self._require_init("nvmlEventSetCreate")
        address = next(self._addresses)
        with self._events:
            self._event_sets[address] = _EventSet()
        return _pointer(c_nvmlEventSet_t, address)

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        return self._device("nvmlDeviceGetSupportedEventTypes", handle).supported_events

    def nvmlDeviceRegisterEvents(self, handle: Any, eventTypes: int, eventSet: Any) -> None:
        gpu = self._device("nvmlDeviceRegisterEvents", handle, eventTypes)
        if eventTypes & ~gpu.supported_events:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        with self._events:
            es = self._event_set(eventSet)
            address = _address(handle)
            es.registered[address] = es.registered.get(address, 0) | eventTypes

    def nvmlEventSetWait(self, eventSet: Any, timeoutms: int) -> Any:
        self._require_init("nvmlEventSetWait")
        with self._events:
            es = self._event_set(eventSet)
            es.waiting += 1
            self._events.notify_all()
            try:
                self._events.wait_for(lambda: bool(es.queue) or es.freed, timeoutms / 1000)
            finally:
                es.waiting -= 1
            if es.freed:
                raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
            if not es.queue:
                raise NVMLError(NVML_ERROR_TIMEOUT)
            address, event_type, event_data = es.queue.popleft()
        data = c_nvmlEventData_t()
        data.device = _pointer(c_nvmlDevice_t, address)
        data.eventType = event_type
        data.eventData = event_data
        data.gpuInstanceId = _NO_INSTANCE
        data.computeInstanceId = _NO_INSTANCE
        return data

    def nvmlEventSetFree(self, eventSet: Any) -> None:
        self._require_init("nvmlEventSetFree")
        with self._events:
            self._event_set(eventSet).freed = True
            self._events.notify_all()

    # -- GPM ---------------------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, device: Any) -> Any:
        gpu = self._device("nvmlGpmQueryDeviceSupport", device)
        return c_nvmlGpmSupport_t(version=NVML_GPM_SUPPORT_VERSION, isSupportedDevice=int(gpu.gpm_supported))

    def nvmlGpmSampleAlloc(self) -> Any:
        self._require_init("nvmlGpmSampleAlloc")
        address = next(self._addresses)
        self._gpm_samples[address] = _GpmSample()
        return _pointer(c_nvmlGpmSample_t, address)

    def nvmlGpmSampleFree(self, gpmSample: Any) -> None:
        self._require_init("nvmlGpmSampleFree")
        self._gpm_sample(gpmSample).freed = True

    def nvmlGpmSampleGet(self, device: Any, gpmSample: Any) -> Any:
        gpu = self._device("nvmlGpmSampleGet", device)
        if not gpu.gpm_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        sample = self._gpm_sample(gpmSample)
        sample.device = _address(device)
        sample.seq = next(self._gpm_seq)
        sample.metrics = dict(gpu.gpm_metrics)
        sample.returns = dict(gpu.gpm_metric_returns)
        return gpmSample

    def nvmlGpmMetricsGet(self, metricsGet: Any) -> Any:
        first, second = self._gpm_sample(metricsGet.sample1), self._gpm_sample(metricsGet.sample2)
        index = self._by_address.get(second.device or 0)
        self._require_init("nvmlGpmMetricsGet", index)
        if metricsGet.version != NVML_GPM_METRICS_GET_VERSION:
            raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        if (
            index is None
            or first.device != second.device
            or not 0 < first.seq < second.seq
            or not 0 < metricsGet.numMetrics <= NVML_GPM_METRIC_MAX
        ):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        self._raise_injected(self.gpus[index], "nvmlGpmMetricsGet")
        for i in range(metricsGet.numMetrics):
            metric = metricsGet.metrics[i]
            metric_id = metric.metricId
            if metric_id in second.returns:
                metric.nvmlReturn = second.returns[metric_id]
            elif metric_id in second.metrics:
                metric.nvmlReturn, metric.value = NVML_SUCCESS, second.metrics[metric_id]
            else:
                metric.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
        return metricsGet
