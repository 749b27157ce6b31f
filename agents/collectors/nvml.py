"""NVML collector: reads real NVIDIA GPUs through `pynvml`, the one module in gpufleet that imports it.

Design notes: docs/design-notes.md#agents-collectors-nvml-py.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pynvml

from gpufleet.agents.collectors.base import DeviceView, Enumeration, NodeReleased
from gpufleet.agents.collectors.deadline_pool import DeadlinePool
from gpufleet.agents.collectors.enumeration import EnumerationRecord
from gpufleet.agents.collectors.nvml_device import (
    GPM_MIN_GAP_S,
    DeviceReader,
    DeviceState,
    Plan,
    Reading,
    device_views,
    error_samples,
    expand,
)
from gpufleet.agents.collectors.nvml_fields import FieldIds, read_fields
from gpufleet.agents.collectors.nvml_funnel import Counters, Funnel, GpuLost, LibraryDown
from gpufleet.agents.collectors.nvml_session import Backoff, ReleaseSwitch
from gpufleet.agents.collectors.xid_events import XidSettings, XidWatcher
from gpufleet.errors import USAGE, GpufleetError
from gpufleet.wire import GpuSample

__all__ = ["NVML", "CollectorStats", "NvmlCollector", "NvmlUnavailable"]

log = logging.getLogger(__name__)

NVML: Final[Any] = pynvml
"""The real binding, for tools that probe NVML beside the collector (bench/gpu_smoke.py) without importing it."""
EVENT_WAIT_MS: Final = 500
"""One round of event waits over every GPU's set; bounds how long releasing NVML waits for the XID thread."""
SLOW_EVERY_S: Final = 10.0
INVENTORY_EVERY_S: Final = 300.0
CALL_BUDGET_PER_GPU: Final = 16
"""NVML queries per GPU per interval the agent expects to need (event waits excluded)."""
BUDGET_WARN_EVERY_S: Final = 300.0
MIG_CALLS_PER_INSTANCE: Final = 3
"""NVML queries one MIG instance adds to its GPU's interval (memory, processes, utilization)."""
ATTACH_TIMEOUT_S: Final = 10.0
"""How long `open()` waits for the GPUs to be attached (a hung GPU is attached later, or reported in error)."""


class NvmlUnavailable(GpufleetError, RuntimeError):
    """NVML could not start on this node; the message says why and how to fix it."""

    exit_code = USAGE


@dataclass(frozen=True)
class CollectorStats:
    """The collector's own health for the last interval (`AgentHealth` carries it)."""

    nvml_errors: int = 0
    nvml_calls: int = 0
    """NVML queries made this interval (device reads, attaches, event-set management; not event waits)."""
    nvml_call_budget: int = 0
    nvml_deadline_misses: int = 0
    """GPUs that had not answered by the deadline (or were still stuck in an earlier call)."""
    xids_dropped_total: int = 0


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

    `nvml` is the pynvml module (tests pass `tests.fakes.fake_pynvml.FakeNvml()`); `clock` is a
    monotonic clock in seconds (GPM spacing, slow-counter cadence, back-off). `interval_ms` below
    100 refuses GPM (nvml.h: samples must be more than 100 ms apart). `deadline_s` (default 0.8 x
    the interval) bounds how long one interval waits for its GPUs. `kmsg_path` adds the kernel log
    as an XID source, `kmsg_cursor` remembers what it reported across restarts. `gpus_expected` (else
    the first complete enumeration, kept in `enumeration_file`) is how many GPUs the node should have.
    """

    def __init__(
        self,
        nvml: Any = pynvml,
        *,
        event_wait_ms: int = EVENT_WAIT_MS,
        interval_ms: int = 1000,
        deadline_s: float | None = None,
        slow_every_s: float = SLOW_EVERY_S,
        kmsg_path: str | None = None,
        kmsg_cursor: Path | None = None,
        release_file: Path | None = None,
        call_budget_per_gpu: int = CALL_BUDGET_PER_GPU,
        inventory_every_s: float = INVENTORY_EVERY_S,
        gpus_expected: int | None = None,
        enumeration_file: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml = nvml
        self._clock = clock
        self._event_wait_ms = event_wait_ms
        self._deadline_s = deadline_s if deadline_s is not None else max(0.05, 0.8 * interval_ms / 1000)
        self._slow_every_s = slow_every_s
        self._inventory_every_s = inventory_every_s
        self._enumeration = EnumerationRecord(enumeration_file, gpus_expected)
        self._budget_per_gpu = call_budget_per_gpu
        self._gpm_enabled = interval_ms >= GPM_MIN_GAP_S * 1000
        if not self._gpm_enabled:
            log.warning("GPM refused: the interval (%d ms) is under the 100 ms NVML needs between GPM samples; "
                        "SM, tensor and DRAM activity will be null", interval_ms)
        self._funnel = Funnel(nvml)
        self._reader = DeviceReader(self._funnel)
        self._ids = FieldIds.of(nvml)
        self._own = Counters()
        self._xid_counters = Counters()
        self._xid = XidWatcher(nvml, XidSettings(wait_ms=event_wait_ms, kmsg_path=kmsg_path, cursor_path=kmsg_cursor),
                               self._xid_counters)
        self._pool = DeadlinePool("nvml-read")
        self._switch = ReleaseSwitch(release_file)
        self._backoff = Backoff()
        self._devices: list[DeviceState] = []
        self._state = "new"
        """new, up (NVML held), down (NVML failed; retried with back-off), released, closed."""
        self._down_reason = ""
        self._started = False
        self._budget_warned_at: float | None = None
        self._misses = 0
        self._fresh = True
        """The interval attaches GPUs (more calls than the budget counts on): no budget warning."""
        self.stats = CollectorStats()
        self.errors_last_interval = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Start NVML and find the GPUs (idempotent); raises `NvmlUnavailable` when NVML cannot start."""
        if self._state == "closed":
            raise RuntimeError("this NvmlCollector is closed; create a new one")
        if self._state != "new":
            return
        if self._switch.wanted():  # started (or restarted) during maintenance: do not take NVML
            log.warning("NVML release requested (%s): not starting NVML until the request is withdrawn",
                        self._switch.path or "release()")
            self._state = "released"
            self._switch.acknowledge(released=True)
            self._xid.start()
            return
        try:
            self._start(attach_timeout_s=max(self._deadline_s, ATTACH_TIMEOUT_S))
        except self._nvml.NVMLError as exc:
            raise NvmlUnavailable(_init_message(self._nvml, exc)) from exc
        self._xid.start()

    @property
    def gpu_uuids(self) -> list[str]:
        """UUIDs in index order after `open()` (`unknown-gpu-<i>` for a GPU not attached yet); [] before."""
        return [d.uuid for d in self._devices]

    def devices(self) -> list[DeviceView]:
        """Each GPU as the last interval saw it: UUID, minor number, compute processes (allocation sources)."""
        return [v for d in self._devices for v in device_views(d)]

    @property
    def enumeration(self) -> Enumeration:
        """The GPUs expected and those missing, as of the last `collect` (the agent carries it in the message)."""
        return self._enumeration.current

    @property
    def state(self) -> str:
        """new, up, down, released or closed."""
        return self._state

    @property
    def xid_watcher(self) -> XidWatcher:
        return self._xid

    def release(self) -> None:
        """Let go of NVML at the next interval (as the release file does) until `reacquire()`."""
        self._switch.requested_in_code = True

    def reacquire(self) -> None:
        self._switch.requested_in_code = False

    def close(self) -> None:
        """Stop the XID threads, free event sets and GPM samples, shut NVML down; idempotent."""
        if self._state == "closed":
            return
        up = self._state == "up"
        self._state = "closed"
        if not self._xid.close(self._event_wait_ms / 1000 + 5):
            log.warning("NVML event thread did not stop; leaving its event sets allocated")
        if up:
            self._free_gpm()
        self._shutdown()
        self._pool.close()

    def __enter__(self) -> NvmlCollector:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self, attach_timeout_s: float) -> None:
        """nvmlInit, count the GPUs and attach them (each on its worker, for at most `attach_timeout_s`);
        raises NVMLError when NVML cannot start. A GPU not attached in time is attached by its next read."""
        nvml = self._nvml
        self._own.add(calls=1)
        nvml.nvmlInit()
        self._started = True
        try:
            self._own.add(calls=1)
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError:
            self._shutdown()
            raise
        if count == 0:
            log.warning("NVML found no GPUs on this node; reports will carry no GPUs")
        old = {d.index: d for d in self._devices}
        self._devices = [old.get(i) or DeviceState(index=i, uuid=f"unknown-gpu-{i}") for i in range(count)]
        self._pool.ensure(count)
        self._xid.resume()
        for dev in self._devices:
            dev.handle, dev.lost = None, False
            dev.cache.denied.clear()
            dev.forget()
        attaching = [self._pool.submit(d.index, self._attacher(d)) for d in self._devices]
        concurrent.futures.wait([f for f in attaching if f is not None], timeout=attach_timeout_s)
        self._state, self._down_reason = "up", ""
        self._fresh = True
        self._backoff.reset()

    def _attacher(self, dev: DeviceState) -> Callable[[], bool]:
        def run() -> bool:
            try:
                return self._attach(dev, [])
            except LibraryDown:
                return False  # the GPU's first read will find NVML down again and say so
        return run

    def _shutdown(self) -> None:
        if self._started:
            self._started = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.warning("nvmlShutdown failed: %s", exc)

    def _free_gpm(self) -> None:
        for dev in self._devices:
            self._reader.forget(dev)

    def _teardown(self, *, free: bool) -> None:
        """Let go of NVML: the XID thread first (it must not be inside a call), then GPM, then nvmlShutdown."""
        if not self._xid.suspend(self._event_wait_ms / 1000 + 2):
            log.warning("the NVML event thread did not pause in time; shutting NVML down anyway")
        if free:
            self._free_gpm()
        for dev in self._devices:
            dev.handle = None
            dev.base.energy_mj = None
            dev.base.throttle.clear()
            dev.forget()
        self._shutdown()

    # -- attaching GPUs ----------------------------------------------------------------------

    def _attach(self, dev: DeviceState, errors: list[str]) -> bool:
        """Get the GPU's handle, UUID, name, PCI address and NVLink count, and watch its XIDs."""
        f, c = self._funnel, dev.cache
        try:
            handle = f.call(c, errors, "nvmlDeviceGetHandleByIndex", dev.index)
            uuid = f.call(c, errors, "nvmlDeviceGetUUID", handle) if handle is not None else None
            if not uuid:
                return False
            dev.handle, dev.uuid = handle, uuid
            dev.model = f.call(c, errors, "nvmlDeviceGetName", handle)
            pci = f.call(c, errors, "nvmlDeviceGetPciInfo", handle)
            dev.pci = None if pci is None else (int(pci.domain), int(pci.bus), int(pci.device))
            minor = f.call(c, errors, "nvmlDeviceGetMinorNumber", handle)
            dev.minor = None if minor is None else int(minor)
            links = read_fields(f, c, errors, handle, [(self._ids.link_count, 0)]).get((self._ids.link_count, 0))
            dev.links = tuple(range(int(links))) if links else ()
        except GpuLost as exc:
            errors.append(str(exc))
            dev.handle = None
            return False
        self._xid.watch(dev.index, dev.uuid, dev.handle, dev.pci)
        return True

    # -- per-interval reads ------------------------------------------------------------------

    def collect(self, now_ms: int) -> list[GpuSample]:
        """Read every GPU once. `now_ms` (the interval end) is unused: NVML values are current."""
        self.open()
        if self._state == "closed":
            raise RuntimeError("this NvmlCollector is closed; create a new one")
        self._follow_switch()
        xids = self._xid.drain()
        samples = self._read_all(xids) if self._state == "up" else self._all_in_error(xids)
        self._enumeration.observe([d.uuid for d in self._devices])
        self._take_stats()
        return samples

    def _follow_switch(self) -> None:
        """Release or re-acquire NVML as the operator asks; re-initialise after a failure when due."""
        now = self._clock()
        if self._switch.wanted():
            if self._state in ("up", "down"):
                log.warning("releasing NVML as requested (%s): nothing is sent until the request is withdrawn",
                            self._switch.path or "release()")
                self._teardown(free=self._state == "up")
                self._state = "released"
                self._switch.acknowledge(released=True)
            raise NodeReleased("NVML released for maintenance (driver upgrade or GPU reset)")
        if self._state == "released":
            self._switch.acknowledge(released=False)
            self._state, self._down_reason = "down", "NVML released for maintenance"
            self._backoff.reset()
        if self._state == "down" and self._backoff.due(now):
            self._restart(now)

    def _restart(self, now: float) -> None:
        try:
            self._start(attach_timeout_s=self._deadline_s)
            log.warning("NVML is back: %d GPUs attached", len(self._devices))
        except self._nvml.NVMLError as exc:
            delay = self._backoff.failed(now)
            self._down_reason = f"NVML unavailable ({exc}); next attempt in {delay:.0f} s"
            log.warning("%s", self._down_reason)

    def _went_down(self, reason: str) -> None:
        self._teardown(free=False)
        self._state = "down"
        delay = self._backoff.failed(self._clock())
        self._down_reason = f"NVML unavailable ({reason}); next attempt in {delay:.0f} s"
        log.warning("%s: every GPU is reported in error until NVML is back", self._down_reason)

    def _all_in_error(self, xids: dict[int, list[int]]) -> list[GpuSample]:
        return [s for d in self._devices
                for s in error_samples(d, self._down_reason or "NVML unavailable", xids.get(d.index, []))]

    def _plans(self, now: float) -> list[Plan]:
        """Each GPU's plan this interval. Inventory is read at once for a GPU not read since it was attached,
        otherwise for at most one GPU per interval whose `inventory_every_s` is up (spreading the calls)."""
        refresh_taken = False
        plans = []
        for dev in self._devices:
            inventory = dev.inventory_at is None
            if not inventory and not refresh_taken and now - dev.inventory_at >= self._inventory_every_s:
                inventory = refresh_taken = True
            plans.append(self._plan(dev, now, inventory))
        return plans

    def _plan(self, dev: DeviceState, now: float, inventory: bool) -> Plan:
        slow = dev.slow_at is None or now - dev.slow_at >= self._slow_every_s
        gpm = self._gpm_enabled and (dev.gpm.taken_at is None or now - dev.gpm.taken_at >= GPM_MIN_GAP_S)
        return Plan(slow=slow, gpm=gpm, inventory=inventory)

    def _task(self, dev: DeviceState, plan: Plan) -> Callable[[], Reading]:
        def run() -> Reading:
            if dev.handle is None:
                errors: list[str] = []
                try:
                    attached = self._attach(dev, errors)
                except LibraryDown as exc:
                    return Reading(library_down=str(exc))
                if not attached:
                    return Reading(lost=errors[0] if errors else "GPU handle unavailable")
                self._reader.forget(dev)
            return self._reader.read(dev, plan)
        return run

    def _read_all(self, xids: dict[int, list[int]]) -> list[GpuSample]:
        now = self._clock()
        started = time.monotonic()
        futures = {d.index: self._pool.submit(d.index, self._task(d, plan))
                   for d, plan in zip(self._devices, self._plans(now), strict=True)}
        for d in self._devices:
            if futures[d.index] is not None:
                d.inflight, d.inflight_since = futures[d.index], started
        pending = [f for f in futures.values() if f is not None]
        concurrent.futures.wait(pending, timeout=self._deadline_s)
        outcomes = [self._outcome(d, futures[d.index], xids.get(d.index, []), now) for d in self._devices]
        down = next((o for o in outcomes if isinstance(o, str)), None)
        if down is not None:
            self._went_down(down)
            return self._all_in_error(xids)
        return [s for o in outcomes if isinstance(o, list) for s in o]

    def _outcome(self, dev: DeviceState, future: concurrent.futures.Future[Reading] | None, xids: list[int],
                 now: float) -> list[GpuSample] | str:
        """One GPU's samples for this interval (one per MIG instance), or the reason NVML as a whole is down."""
        if future is None or not future.done():
            self._misses += 1
            stuck = dev.cache.current or "its read"
            since = time.monotonic() - dev.inflight_since
            return error_samples(dev, f"NVML did not answer within the deadline ({stuck} blocked for {since:.1f} s)",
                                 xids)
        try:
            reading = future.result()
        except Exception as exc:  # a bug must not cost the other GPUs their interval
            log.error("GPU %d: unexpected failure while reading NVML", dev.index, exc_info=exc)
            return error_samples(dev, f"collector failure: {exc!r}", xids)
        if reading.library_down is not None:
            return reading.library_down
        if reading.lost is not None:
            dev.lost = True
            dev.gpm.prev_valid = False
            return error_samples(dev, reading.lost, xids)
        if dev.lost:
            log.warning("GPU %d (%s) answers again; asking NVML afresh what it supports", dev.index, dev.uuid)
            dev.lost = False
            self._reader.forget(dev)
            self._xid.watch(dev.index, dev.uuid, dev.handle, dev.pci)
        try:
            return expand(dev, self._reader.commit(dev, reading, now, xids), reading)
        except Exception as exc:  # a value NVML should never give (wrong type, out of the wire's range)
            log.error("GPU %d: could not build its sample", dev.index, exc_info=exc)
            return error_samples(dev, f"collector failure: {exc!r}", xids)

    def _take_stats(self) -> None:
        calls, errors = self._own.take()
        for counters in (self._xid_counters, *(d.cache.counters for d in self._devices)):
            c, e = counters.take()
            calls, errors = calls + c, errors + e
        instances = sum(len(d.mig or ()) for d in self._devices if d.mig_on)
        budget = 0
        if self._budget_per_gpu:
            budget = self._budget_per_gpu * len(self._devices) + MIG_CALLS_PER_INSTANCE * instances
        if budget and calls > budget and not self._fresh:
            now = time.monotonic()
            if self._budget_warned_at is None or now - self._budget_warned_at > BUDGET_WARN_EVERY_S:
                self._budget_warned_at = now
                log.warning("%d NVML calls this interval, over the budget of %d (%d per GPU)", calls, budget,
                            self._budget_per_gpu)
        self.stats = CollectorStats(nvml_errors=errors, nvml_calls=calls, nvml_call_budget=budget,
                                    nvml_deadline_misses=self._misses,
                                    xids_dropped_total=self._xid.ledger.dropped_total)
        self.errors_last_interval = errors
        self._misses = 0
        self._fresh = False
