"""The agent's disk spool: a bounded, crash-safe FIFO of encoded messages, and the node's message identity.

Design notes: docs/design-notes.md#agents-spool-py.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import crc32c

from gpufleet.errors import USAGE, GpufleetError

log = logging.getLogger(__name__)

MAGIC = b"GFS1"
RECORD_OVERHEAD = 8
"""Bytes a record adds to its payload on disk (magic + CRC32C), counted against `max_bytes`."""
_SUFFIX = ".msg"


class SpoolError(GpufleetError, RuntimeError):
    """The spool directory cannot be used; the message says why and what to do."""

    exit_code = USAGE


@dataclass(frozen=True, slots=True)
class Entry:
    """One spooled message."""

    seq: int
    data: bytes
    spooled_ms: int
    """When it was spooled (Unix ms; file mtime for records found on open)."""


@dataclass(slots=True)
class _Meta:
    size: int
    spooled_ms: int


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class Spool:
    """A bounded on-disk FIFO of one node's messages; thread-safe (one writer, one reader)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_bytes: int,
        *,
        fsync: bool = True,
        clock_ms: Callable[[], int] = _wall_ms,
        warn_every_s: float = 30.0,
    ) -> None:
        if max_bytes <= RECORD_OVERHEAD:
            raise SpoolError(f"spool max_bytes {max_bytes} is too small; use at least a few megabytes")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._fsync = fsync
        self._clock_ms = clock_ms
        self._warn_every_s = warn_every_s
        self._queue = self.directory / "queue"
        try:
            self._queue.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(
                f"cannot create spool directory {self._queue}: {exc.strerror}; "
                "set agent.spool_dir (or --spool-dir) to a writable directory"
            ) from None
        self._lock_fd = self._take_lock()
        self._mutex = threading.Lock()
        self._state_lock = threading.Lock()
        self._seqs: list[int] = []
        """Spooled seqs in order from `_head`; entries no longer in `_meta` are gone (lazy deletion)."""
        self._head = 0
        self._meta: dict[int, _Meta] = {}
        self._bytes = 0
        self.dropped_total = 0
        self._drops_unwarned = 0
        self._last_warn = -float("inf")
        self.boot_id, recorded_next = self._read_state()
        self._load_queue()
        self._next_seq = max(recorded_next, (self._seqs[-1] + 1) if self._seqs else 0)
        self._persisted_next = recorded_next
        if self._next_seq != recorded_next or not (self.directory / "state.json").exists():
            with self._state_lock:
                self._write_state()
        self._closed = False

    # -- identity ---------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        """The seq the next appended message must carry (at least)."""
        return self._next_seq

    # -- writer side --------------------------------------------------------------------------
    def append(self, seq: int, data: bytes) -> bool:
        """Spool one encoded message under `seq`; True once it is on disk, False if it was dropped.

        Raises `ValueError` if `seq` is below `next_seq` (that would reuse an identity) and
        `OSError` if the disk refuses the write (nothing is spooled then and the seq stays free).
        """
        if seq < self._next_seq:
            raise ValueError(f"seq {seq} is below the spool's next_seq {self._next_seq}; seqs are never reused")
        size = len(data) + RECORD_OVERHEAD
        if size > self.max_bytes:
            with self._mutex:
                self._next_seq = seq + 1
                self._count_drops(1)
            log.error("message seq %d is %d bytes, larger than the whole spool (%d bytes); dropped it. "
                      "Raise agent.spool_max_bytes", seq, size, self.max_bytes)
            self._persist_next()
            return False
        name = f"{seq:020d}{_SUFFIX}"
        tmp = self._queue / f".{name}.tmp"
        record = MAGIC + crc32c.crc32c(data).to_bytes(4, "big") + data
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view):]
            if self._fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, self._queue / name)  # the record now exists whole; the sender sees it once indexed
        dropped: list[int] = []
        with self._mutex:
            while self._bytes + size > self.max_bytes:
                old = self._pop_oldest_locked()
                if old is None:
                    break
                dropped.append(old)
            self._seqs.append(seq)
            self._meta[seq] = _Meta(size, self._clock_ms())
            self._bytes += size
            self._next_seq = seq + 1
            if dropped:
                self._count_drops(len(dropped))
        if dropped:
            self._persist_next()
            for old in dropped:
                self._unlink(old)
        if self._fsync:
            self._fsync_dir(self._queue)
        return True

    # -- reader side --------------------------------------------------------------------------
    def peek(self, after: int = -1, limit: int = 500, max_bytes: int = 8 * 1024 * 1024) -> list[Entry]:
        """Up to `limit` oldest messages with seq > `after`, in seq order (read from disk).

        Records that fail their CRC are moved to `corrupt/`, counted as dropped and skipped.
        """
        with self._mutex:
            start = bisect.bisect_right(self._seqs, after, lo=self._head)
            picked: list[tuple[int, _Meta]] = []
            total = 0
            for seq in self._seqs[start:]:
                meta = self._meta.get(seq)
                if meta is None:
                    continue
                if picked and (len(picked) >= limit or total + meta.size > max_bytes):
                    break
                picked.append((seq, meta))
                total += meta.size
        out: list[Entry] = []
        for seq, meta in picked:
            data = self._read_record(seq)
            if data is not None:
                out.append(Entry(seq, data, meta.spooled_ms))
        return out

    def remove(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged messages; returns how many were still spooled (dropped ones are skipped)."""
        return self._delete(seqs, dropped=False)

    def drop(self, seqs: Iterable[int]) -> int:
        """Delete messages that will never be sent (the broker refuses them), counting them as dropped."""
        return self._delete(seqs, dropped=True)

    def _delete(self, seqs: Iterable[int], *, dropped: bool) -> int:
        gone: list[int] = []
        with self._mutex:
            for seq in seqs:
                meta = self._meta.pop(seq, None)
                if meta is not None:
                    self._bytes -= meta.size
                    gone.append(seq)
            if dropped:
                self.dropped_total += len(gone)
            self._compact_locked()
        if gone:
            self._persist_next()
            for seq in gone:
                self._unlink(seq)
        return len(gone)

    # -- status ---------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Messages waiting in the spool."""
        return len(self._meta)

    @property
    def bytes(self) -> int:
        """Record bytes in the spool (what `max_bytes` bounds)."""
        return self._bytes

    def oldest_ms(self) -> int | None:
        """When the oldest waiting message was spooled (Unix ms), or None when empty."""
        with self._mutex:
            for seq in self._seqs[self._head:]:
                meta = self._meta.get(seq)
                if meta is not None:
                    return meta.spooled_ms
        return None

    def close(self) -> None:
        """Release the directory lock; idempotent. Spooled messages stay for the next open."""
        if self._closed:
            return
        self._closed = True
        self._persist_next()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _take_lock(self) -> int:
        path = self.directory / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(
                f"spool directory {self.directory} is in use by another agent; "
                "each agent (and each simulated node) needs its own agent.spool_dir"
            ) from None
        return fd

    def _read_state(self) -> tuple[str, int]:
        path = self.directory / "state.json"
        try:
            state = json.loads(path.read_text())
            boot_id, next_seq = str(state["boot_id"]), int(state["next_seq"])
            if not boot_id or next_seq < 0:
                raise ValueError("empty boot_id or negative next_seq")
        except FileNotFoundError:
            return uuid.uuid4().hex, 0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = path.with_name(f"state.json.corrupt-{self._clock_ms()}")
            with contextlib.suppress(OSError):
                path.replace(aside)
            log.error("spool state %s is unreadable (%s); moved it to %s and started a new boot_id",
                      path, exc, aside.name)
            return uuid.uuid4().hex, 0
        return boot_id, next_seq

    def _write_state(self) -> None:
        path = self.directory / "state.json"
        tmp = path.with_name(".state.json.tmp")
        next_seq = self._next_seq
        text = json.dumps({"boot_id": self.boot_id, "next_seq": next_seq}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text)
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if self._fsync:
            self._fsync_dir(self.directory)
        self._persisted_next = next_seq

    def _persist_next(self) -> None:
        """Make state.json record a next_seq above every seq that has been handed out."""
        with self._state_lock:
            if self._persisted_next < self._next_seq:
                self._write_state()

    def _load_queue(self) -> None:
        for tmp in self._queue.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        found: list[tuple[int, _Meta]] = []
        for path in self._queue.glob(f"*{_SUFFIX}"):
            try:
                seq = int(path.name[: -len(_SUFFIX)])
                st = path.stat()
            except (ValueError, OSError):
                log.warning("ignoring unexpected file %s in the spool", path)
                continue
            found.append((seq, _Meta(st.st_size, st.st_mtime_ns // 1_000_000)))
        found.sort()
        self._seqs = [seq for seq, _ in found]
        self._meta = dict(found)
        self._bytes = sum(m.size for _, m in found)
        if found:
            log.info("spool %s: %d messages (%d bytes) waiting from before the restart",
                     self.directory, len(found), self._bytes)

    def _read_record(self, seq: int) -> bytes | None:
        path = self._queue / f"{seq:020d}{_SUFFIX}"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None  # dropped (spool full) since peek listed it
        data = raw[RECORD_OVERHEAD:]
        if raw[:4] != MAGIC or int.from_bytes(raw[4:8], "big") != crc32c.crc32c(data):
            corrupt = self.directory / "corrupt"
            corrupt.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                path.replace(corrupt / path.name)
            with self._mutex:
                meta = self._meta.pop(seq, None)
                if meta is not None:
                    self._bytes -= meta.size
                    self._count_drops(1)
            log.error("spool record %s failed its checksum; moved it to %s and counted it as dropped",
                      path.name, corrupt)
            return None
        return data

    def _pop_oldest_locked(self) -> int | None:
        while self._head < len(self._seqs):
            seq = self._seqs[self._head]
            self._head += 1
            meta = self._meta.pop(seq, None)
            if meta is not None:
                self._bytes -= meta.size
                self._compact_locked()
                return seq
        self._compact_locked()
        return None

    def _compact_locked(self) -> None:
        """Forget seqs that left the spool once they are a good part of the list (amortised O(1))."""
        if self._head > 1024 or len(self._seqs) - self._head > 2 * len(self._meta) + 64:
            self._seqs = [s for s in self._seqs[self._head:] if s in self._meta]
            self._head = 0

    def _count_drops(self, n: int) -> None:
        """Count `n` dropped messages and warn, at most once per `warn_every_s` (caller holds the mutex)."""
        self.dropped_total += n
        self._drops_unwarned += n
        now = time.monotonic()
        if now - self._last_warn >= self._warn_every_s:
            log.warning(
                "spool %s is full (%d bytes max): dropped the %d oldest unsent messages since the last "
                "warning (%d in total). The broker has been unreachable for long; raise "
                "agent.spool_max_bytes to hold more", self.directory, self.max_bytes,
                self._drops_unwarned, self.dropped_total)
            self._drops_unwarned = 0
            self._last_warn = now

    def _unlink(self, seq: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._queue / f"{seq:020d}{_SUFFIX}").unlink()

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
