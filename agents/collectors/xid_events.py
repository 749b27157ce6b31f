"""XIDs per GPU from NVML events and the kernel log, each reported exactly once.

Design notes: docs/design-notes.md#agents-collectors-xid-events-py.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from gpufleet.agents.collectors.kmsg import (
    Cursor,
    KmsgReader,
    NewRecords,
    kernel_boot_id,
    load_cursor,
    parse,
    save_cursor,
)
from gpufleet.agents.collectors.nvml_funnel import Counters

log = logging.getLogger(__name__)

MAX_XID: Final = 65535
"""Largest XID the wire accepts; anything above is logged and dropped rather than poison a message."""
MAX_XIDS_PER_GPU: Final = 256
MATCH_WINDOW_S: Final = 10.0
MAX_SIGHTINGS: Final = 4096
BACKOFF_MAX_S: Final = 60.0
KMSG_BACKLOG_S: Final = 600.0
LIVE_RECORD_S: Final = 60.0
"""A kernel-log record stamped less than this before it was read counts as live (matched by arrival)."""


def address(pointer: Any) -> int:
    """The address a ctypes handle points at: how an event's `device` is matched to a GPU."""
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


@dataclass
class _Sighting:
    source: str
    key: int
    xid: int
    t: float


class XidLedger:
    """XIDs per GPU (by key) from two sources; each XID is handed out once (see the module text)."""

    def __init__(self, window_s: float = MATCH_WINDOW_S, max_per_gpu: int = MAX_XIDS_PER_GPU) -> None:
        self._window = window_s
        self._max = max_per_gpu
        self._lock = threading.Lock()
        self._ready: dict[int, deque[int]] = {}
        self._unmatched: deque[_Sighting] = deque(maxlen=MAX_SIGHTINGS)
        self._seq: int | None = None
        self.dropped_total = 0
        self.counts: Counter[str] = Counter()
        """"event", "kmsg": sightings per source; "twin": sightings that matched the other source's."""

    def add(self, source: str, key: int, xid: int, t: float, seq: int | None = None) -> bool:
        """One sighting; True if it is new (queued for the GPU), False if it was the other source's twin."""
        with self._lock:
            self.counts[source] += 1
            if seq is not None:
                self._seq = seq if self._seq is None else max(self._seq, seq)
            while self._unmatched and self._unmatched[0].t < t - self._window:
                self._unmatched.popleft()
            for s in self._unmatched:
                if s.source != source and s.key == key and s.xid == xid and abs(s.t - t) <= self._window:
                    self._unmatched.remove(s)
                    self.counts["twin"] += 1
                    return False
            self._unmatched.append(_Sighting(source, key, xid, t))
            ready = self._ready.setdefault(key, deque())
            if len(ready) >= self._max:
                self.dropped_total += 1
                return True
            ready.append(xid)
            return True

    def note_seq(self, seq: int) -> None:
        """A kernel-log record was handled (whatever it said): the cursor may move past it."""
        with self._lock:
            self._seq = seq if self._seq is None else max(self._seq, seq)

    def drain(self) -> tuple[dict[int, list[int]], int | None]:
        """Every queued XID per GPU, and the newest kernel-log record handled up to now."""
        with self._lock:
            out = {k: list(q) for k, q in self._ready.items() if q}
            for q in self._ready.values():
                q.clear()
            return out, self._seq


@dataclass
class _Watched:
    """One GPU's event registration."""

    key: int
    uuid: str
    handle: Any
    event_set: Any = None
    status: str = "pending"
    """pending, registered, unsupported (no XID events), lost, failed."""
    retry_at: float = 0.0
    backoff_s: float = 1.0


@dataclass
class XidSettings:
    """How the watcher waits and where the kernel log is."""

    wait_ms: int = 500
    """One round of waits over every GPU's set takes about this long (bounds `suspend`)."""
    kmsg_path: str | None = None
    cursor_path: Path | None = None
    poll_s: float = 0.25
    backlog_s: float = KMSG_BACKLOG_S
    monotonic: Callable[[], float] = time.monotonic
    """Kernel-log timestamps are CLOCK_MONOTONIC seconds; event sightings are stamped with this."""


class XidWatcher:
    """The event thread and the kernel-log thread, feeding one `XidLedger`."""

    def __init__(self, nvml: Any, settings: XidSettings, counters: Counters) -> None:
        self._nvml = nvml
        self._s = settings
        self._counters = counters
        self.ledger = XidLedger()
        self._lock = threading.Lock()
        self._watched: dict[int, _Watched] = {}
        self._pci: dict[tuple[int, int, int], int] = {}
        self._to_free: list[Any] = []
        self._stop = threading.Event()
        self._suspend = threading.Event()
        self._suspended = threading.Event()
        self._nvml_down = False
        self._events_thread: threading.Thread | None = None
        self._kmsg_thread: threading.Thread | None = None
        self._reader = KmsgReader(settings.kmsg_path) if settings.kmsg_path else None
        self._boot_id = kernel_boot_id()
        self._pending_cursor: int | None = None
        self.event_waits = 0
        self.unmatched_pci: set[tuple[int, int, int]] = set()

    # -- control (collector thread) ------------------------------------------------------------

    def start(self) -> None:
        if self._events_thread is None:
            self._events_thread = threading.Thread(target=self._events_loop, name="nvml-xid-events", daemon=True)
            self._events_thread.start()
        if self._reader is not None and self._kmsg_thread is None:
            self._kmsg_thread = threading.Thread(target=self._kmsg_loop, name="xid-kmsg", daemon=True)
            self._kmsg_thread.start()

    def watch(self, key: int, uuid: str, handle: Any, pci: tuple[int, int, int] | None) -> None:
        """(Re-)register GPU `key`'s XID events with this handle; its old set, if any, is freed."""
        with self._lock:
            old = self._watched.get(key)
            if old is not None and old.event_set is not None:
                self._to_free.append(old.event_set)
            self._watched[key] = _Watched(key, uuid, handle)
            if pci is not None:
                self._pci[pci] = key
            self._nvml_down = False

    def suspend(self, timeout_s: float) -> bool:
        """Free every event set and stop calling NVML (before NVML is shut down); False if the thread
        did not answer in time (stuck in a call): the sets are then abandoned, not freed."""
        self._suspended.clear()
        self._suspend.set()
        if self._events_thread is None or not self._events_thread.is_alive():
            return True
        return self._suspended.wait(timeout_s)

    def resume(self) -> None:
        """NVML is back: GPUs watched from now on register again."""
        with self._lock:
            self._watched.clear()
            self._to_free.clear()
            self._nvml_down = False
        self._suspend.clear()

    def drain(self) -> dict[int, list[int]]:
        """Every XID per GPU since the last drain. The kernel-log cursor is saved at the next `drain`
        (after the caller has stored these XIDs in the interval's message)."""
        self._save_cursor()
        out, seq = self.ledger.drain()
        self._pending_cursor = seq
        return out

    def status(self) -> dict[int, str]:
        with self._lock:
            return {k: w.status for k, w in self._watched.items()}

    @property
    def kmsg_unavailable(self) -> str | None:
        return None if self._reader is None else self._reader.unavailable

    def close(self, timeout_s: float) -> bool:
        """Stop both threads and free the sets; False if the event thread did not stop in time."""
        self._stop.set()
        stopped = True
        for thread in (self._events_thread, self._kmsg_thread):
            if thread is not None:
                thread.join(timeout_s)
                stopped &= not thread.is_alive()
        if self._reader is not None:
            self._reader.close()
        return stopped

    def _save_cursor(self) -> None:
        if self._pending_cursor is None or self._s.cursor_path is None:
            return
        try:
            save_cursor(self._s.cursor_path, Cursor(self._boot_id, self._pending_cursor))
        except OSError as exc:
            log.warning("cannot save the XID cursor %s (%s): XIDs may repeat after a restart",
                        self._s.cursor_path, exc)
            self._s.cursor_path = None

    # -- event thread --------------------------------------------------------------------------

    def _events_loop(self) -> None:
        while not self._stop.is_set():
            self._free_pending()
            if self._suspend.is_set():
                self._release_all()
                self._suspended.set()
                self._stop.wait(self._s.wait_ms / 1000)
                continue
            self._register_due()
            with self._lock:
                ready = [w for w in self._watched.values() if w.event_set is not None]
            if not ready:
                self._stop.wait(self._s.wait_ms / 1000)
                continue
            per_set = max(1, self._s.wait_ms // len(ready))
            for w in ready:
                if self._stop.is_set() or self._suspend.is_set():
                    break
                self._wait_one(w, per_set)
        self._release_all()

    def _nvml_call(self, name: str, *args: Any) -> Any:
        self._counters.add(calls=1)
        return getattr(self._nvml, name)(*args)

    def _free(self, event_set: Any) -> None:
        try:
            self._nvml_call("nvmlEventSetFree", event_set)
        except self._nvml.NVMLError as exc:
            log.debug("nvmlEventSetFree failed: %s", exc)

    def _free_pending(self) -> None:
        with self._lock:
            sets, self._to_free = self._to_free, []
        for es in sets:
            self._free(es)

    def _release_all(self) -> None:
        with self._lock:
            sets = [w.event_set for w in self._watched.values() if w.event_set is not None] + self._to_free
            self._to_free = []
            for w in self._watched.values():
                w.event_set, w.status = None, "pending"
            down = self._nvml_down
        if not down:
            for es in sets:
                self._free(es)

    def _backoff(self, w: _Watched, status: str) -> None:
        w.status, w.retry_at = status, self._s.monotonic() + w.backoff_s
        w.backoff_s = min(BACKOFF_MAX_S, w.backoff_s * 2)

    def _register_due(self) -> None:
        now = self._s.monotonic()
        with self._lock:
            due = [w for w in self._watched.values()
                   if w.event_set is None and w.status in ("pending", "lost", "failed") and w.retry_at <= now
                   and not self._nvml_down]
        for w in due:
            self._register(w)

    def _register(self, w: _Watched) -> None:
        """A fresh set with this GPU's XID events, or a recorded reason why not."""
        nvml = self._nvml
        try:
            es = self._nvml_call("nvmlEventSetCreate")
        except nvml.NVMLError as exc:
            self._on_error(w, exc, None, "nvmlEventSetCreate")
            return
        try:
            supported = self._nvml_call("nvmlDeviceGetSupportedEventTypes", w.handle)
            mask = nvml.nvmlEventTypeXidCriticalError & supported
            if mask:
                self._nvml_call("nvmlDeviceRegisterEvents", w.handle, mask, es)
        except nvml.NVMLError as exc:
            self._on_error(w, exc, es, "nvmlDeviceRegisterEvents")
            return
        if not mask:
            self._free(es)
            w.status = "unsupported"
            return
        with self._lock:
            current = self._watched.get(w.key) is w
            if current:
                w.event_set, w.status = es, "registered"
        if not current:  # re-watched meanwhile
            self._free(es)

    def _on_error(self, w: _Watched, exc: Exception, es: Any, where: str) -> None:
        """A registration or wait failed: free the set (never reuse it) and decide when to try again."""
        nvml = self._nvml
        library = (nvml.NVMLError_Uninitialized, nvml.NVMLError_DriverNotLoaded, nvml.NVMLError_LibRmVersionMismatch)
        if isinstance(exc, library):
            with self._lock:
                self._nvml_down = True
                for other in self._watched.values():
                    other.event_set, other.status = None, "failed"
            log.warning("NVML is down (%s in %s): XID events pause until NVML is back", exc, where)
            return
        if es is not None:
            self._free(es)
        w.event_set = None
        if isinstance(exc, nvml.NVMLError_NotSupported):
            w.status = "unsupported"
            return
        lost = isinstance(exc, nvml.NVMLError_GpuIsLost)
        if not lost:
            self._counters.add(errors=1)
        self._backoff(w, "lost" if lost else "failed")
        log.log(logging.INFO if lost else logging.WARNING, "GPU %d: XID events %s (%s in %s); retrying in %.0f s",
                w.key, "paused, a GPU is lost" if lost else "failed", exc, where, w.retry_at - self._s.monotonic())

    def _wait_one(self, w: _Watched, timeout_ms: int) -> None:
        nvml = self._nvml
        self.event_waits += 1
        try:
            data = nvml.nvmlEventSetWait(w.event_set, timeout_ms)
        except nvml.NVMLError_Timeout:
            w.backoff_s = 1.0
            return
        except nvml.NVMLError as exc:
            self._on_error(w, exc, w.event_set, "nvmlEventSetWait")
            return
        w.backoff_s = 1.0
        if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
            return
        xid, key = int(data.eventData), self._owner(w, data.device)
        if xid > MAX_XID:
            log.warning("dropping XID %d on GPU %d: out of the wire's range", xid, key)
            return
        self.ledger.add("event", key, xid, self._s.monotonic())

    def _owner(self, w: _Watched, device: Any) -> int:
        """The GPU an event is about: by handle, else by the UUID of the event's handle, else the set's GPU."""
        with self._lock:
            by_address = {address(x.handle): x.key for x in self._watched.values()}
            by_uuid = {x.uuid: x.key for x in self._watched.values()}
        key = by_address.get(address(device))
        if key is not None:
            return key
        with contextlib.suppress(self._nvml.NVMLError):
            uuid = self._nvml_call("nvmlDeviceGetUUID", device)
            if uuid in by_uuid:
                return by_uuid[uuid]
        log.debug("XID event with an unknown handle: attributed to GPU %d, whose set delivered it", w.key)
        return w.key

    # -- kernel-log thread ---------------------------------------------------------------------

    def _kmsg_loop(self) -> None:
        assert self._reader is not None
        new = NewRecords(self._boot_id, load_cursor(self._s.cursor_path), self._s.monotonic() - self._s.backlog_s)
        while not self._stop.is_set():
            try:
                lines = self._reader.poll()
            except OSError as exc:
                log.warning("reading the kernel log failed (%s); XIDs from it stop", exc)
                return
            for line in lines:
                self._kmsg_line(line, new)
            if self._reader.unavailable is not None:
                return
            self._stop.wait(self._s.poll_s)

    def _kmsg_line(self, line: str, new: NewRecords) -> None:
        rec = parse(line)
        if rec is None:
            return
        if rec.xid is None or not new.admits(rec):
            if rec.seq is not None:
                self.ledger.note_seq(rec.seq)
            return
        with self._lock:
            key = self._pci.get(rec.xid.pci)
        if key is None or rec.xid.xid > MAX_XID:
            if rec.xid.pci not in self.unmatched_pci:
                self.unmatched_pci.add(rec.xid.pci)
                log.warning("kernel log XID %d on PCI %s matches no GPU of this agent", rec.xid.xid, rec.xid.pci)
            if rec.seq is not None:
                self.ledger.note_seq(rec.seq)
            return
        self.ledger.add("kmsg", key, rec.xid.xid, self._sighting_time(rec.ts_s), rec.seq)

    def _sighting_time(self, kernel_ts: float | None) -> float:
        """When a kernel-log XID was seen, on the clock event sightings use.

        A live record is stamped when read, like an event (the kernel's printk clock may drift from
        CLOCK_MONOTONIC); a backlog record keeps its own, older time, so no event can be its twin.
        """
        now = self._s.monotonic()
        if kernel_ts is None or now - kernel_ts <= LIVE_RECORD_S:
            return now
        return kernel_ts
