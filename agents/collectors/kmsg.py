"""XIDs from the kernel log, without NVML: the driver's `NVRM: Xid (PCI:dddd:bb:dd): N, ...` lines.

Design notes: docs/design-notes.md#agents-collectors-kmsg-py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

BOOT_ID_PATH: Final = "/proc/sys/kernel/random/boot_id"
READ_CHUNK: Final = 8192
"""Bytes per read: more than one /dev/kmsg record (the kernel caps a record at 1 KiB of text)."""
MAX_RECORDS_PER_POLL: Final = 2000
"""A poll returns at most this many lines; the rest waits for the next poll (a bounded loop)."""
MAX_PARTIAL_BYTES: Final = 64 * 1024
"""An unfinished line longer than this (not a kernel record: a file without newlines) is dropped."""

_XID = re.compile(
    r"NVRM: Xid \(PCI:([0-9A-Fa-f]{1,8}):([0-9A-Fa-f]{1,2}):([0-9A-Fa-f]{1,2})(?:\.[0-9A-Fa-f])?\): (\d+)")
_HEADER = re.compile(r"^(\d+),(\d+),(\d+),[^;]*;")


@dataclass(frozen=True)
class KmsgXid:
    """One XID line of the kernel log."""

    pci: tuple[int, int, int]
    """(domain, bus, device), as `nvmlDeviceGetPciInfo` reports them."""
    xid: int


@dataclass(frozen=True)
class KmsgLine:
    """One line of the kernel log, as far as the agent cares."""

    seq: int | None
    """The record's sequence number within this boot (None for a line without a kmsg header)."""
    ts_s: float | None
    """Kernel monotonic time of the record, seconds (None without a header)."""
    xid: KmsgXid | None


def parse(line: str) -> KmsgLine | None:
    """One kmsg record line: its sequence number, time and XID if any; None for continuation lines."""
    if line.startswith(" ") or not line:
        return None
    header = _HEADER.match(line)
    seq, ts = (int(header.group(2)), int(header.group(3)) / 1e6) if header else (None, None)
    match = _XID.search(line)
    if match is None:
        return KmsgLine(seq, ts, None)
    domain, bus, device = (int(match.group(i), 16) for i in (1, 2, 3))
    return KmsgLine(seq, ts, KmsgXid((domain, bus, device), int(match.group(4))))


def kernel_boot_id(path: str = BOOT_ID_PATH) -> str:
    """This boot's id ("" where the kernel does not expose one)."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Cursor:
    """The last kmsg record whose XID the agent reported, in one boot."""

    boot_id: str
    seq: int


def load_cursor(path: Path | None) -> Cursor | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
        return Cursor(str(data["boot_id"]), int(data["seq"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable XID cursor %s (%s): only the last minutes of the kernel log count", path, exc)
        return None


def save_cursor(path: Path, cursor: Cursor) -> None:
    """Write the cursor atomically (temp file + rename), so a crash leaves the old or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"boot_id": cursor.boot_id, "seq": cursor.seq}))
    os.replace(tmp, path)


@dataclass(frozen=True)
class NewRecords:
    """Which kmsg records count as new for this run (see the module text)."""

    boot_id: str
    cursor: Cursor | None
    backlog_from_s: float
    """Without a cursor of this boot: records older than this kernel time are old."""

    def admits(self, x: KmsgLine) -> bool:
        if self.cursor is not None and self.cursor.boot_id == self.boot_id:
            return x.seq is None or x.seq > self.cursor.seq
        if self.cursor is not None:  # the node rebooted since: the whole log is this boot's
            return True
        return x.ts_s is None or x.ts_s >= self.backlog_from_s


class KmsgReader:
    """Non-blocking reader of `/dev/kmsg` (one record per read) or of a file/FIFO in the same format."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._partial = b""
        self.unavailable: str | None = None
        """Why the log cannot be read (set once; the reader then stays closed)."""

    def open(self) -> bool:
        if self._fd is not None:
            return True
        if self.unavailable is not None:
            return False
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            hint = " (kernel.dmesg_restrict: give the agent CAP_SYSLOG)" if exc.errno in (errno.EPERM,
                                                                                          errno.EACCES) else ""
            self.unavailable = f"{self.path}: {exc.strerror}{hint}"
            log.warning("XIDs from the kernel log unavailable: %s; relying on NVML events alone", self.unavailable)
            return False
        return True

    def poll(self) -> list[str]:
        """The complete lines available now (at most MAX_RECORDS_PER_POLL)."""
        if not self.open():
            return []
        assert self._fd is not None
        lines: list[str] = []
        while len(lines) < MAX_RECORDS_PER_POLL:
            try:
                chunk = os.read(self._fd, READ_CHUNK)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # /dev/kmsg: records overwritten before we read them
                    log.warning("kernel log records were overwritten before the agent read them")
                    continue
                raise
            if not chunk:
                break
            data = self._partial + chunk
            *complete, self._partial = data.split(b"\n")
            if len(self._partial) > MAX_PARTIAL_BYTES:
                self._partial = b""
            lines.extend(c.decode("utf-8", "replace") for c in complete)
        return lines

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
