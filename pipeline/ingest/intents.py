"""The ingester's intent log: the batch being written, kept on disk until its offsets are committed.

Design notes: docs/design-notes.md#pipeline-ingest-intents-py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

_SUFFIX = ".intent"

COLUMNS, JSON, JSON_AS_COLUMNS = 0, 1, 2
"""A message's insert path: Python columns; the JSON staging path; the column path taken after the
JSON insert of its block failed with none of it stored (a token of its own: pipeline/ingest/writer.py)."""
_PATHS = (COLUMNS, JSON, JSON_AS_COLUMNS)
_TOKEN = re.compile(r"^[0-9a-f]{16,64}$")


class Intent(msgspec.Struct, frozen=True):
    """One batch as its first attempt planned it: enough to repeat its inserts exactly."""

    token: str
    """The batch's dedup token (`dedup.insert_token` of its messages)."""
    ingest_ms: int
    columns_only: bool
    """Written by earlier versions only (True: every message went as columns); now always False, the
    path is per message."""
    staging_table: str
    """The JSON staging table its JSON part went through ("" when none): a repeat must use the same one."""
    messages: list[tuple[bytes, int]]
    """Each message's wire bytes and its insert path (`COLUMNS`, `JSON`, `JSON_AS_COLUMNS`)."""


class _Head(msgspec.Struct, frozen=True):
    token: str
    ingest_ms: int
    columns_only: bool
    staging_table: str
    count: int


_FRAME = struct.Struct(">IB")
_IOV_MAX = 1024
_encode_head = msgspec.json.Encoder().encode
_decode_head = msgspec.json.Decoder(_Head).decode


class _Damaged(ValueError):
    """An intent file that is not whole."""


def encode(intent: Intent) -> list[bytes]:
    """The file's contents as buffers (the messages are not copied)."""
    head = _Head(intent.token, intent.ingest_ms, intent.columns_only, intent.staging_table, len(intent.messages))
    parts = [_encode_head(head) + b"\n"]
    for data, path in intent.messages:
        parts.append(_FRAME.pack(len(data), path))
        parts.append(data)
    return parts


def decode(raw: bytes) -> Intent:
    line, sep, body = raw.partition(b"\n")
    if not sep:
        raise _Damaged("no header line")
    head = _decode_head(line)
    view, pos, messages = memoryview(body), 0, []
    for _ in range(head.count):
        if pos + _FRAME.size > len(view):
            raise _Damaged("truncated")
        size, path = _FRAME.unpack_from(view, pos)
        pos += _FRAME.size
        if path not in _PATHS:
            raise _Damaged(f"unknown insert path {path}")
        if pos + size > len(view):
            raise _Damaged("truncated")
        messages.append((bytes(view[pos:pos + size]), path))
        pos += size
    if pos != len(view):
        raise _Damaged("trailing bytes")
    return Intent(head.token, head.ingest_ms, head.columns_only, head.staging_table, messages)


def _write_all(fd: int, parts: Sequence[bytes]) -> None:
    for k in range(0, len(parts), _IOV_MAX):
        chunk = parts[k:k + _IOV_MAX]
        written = os.writev(fd, chunk)
        rest = memoryview(b"".join(chunk))[written:] if written < sum(map(len, chunk)) else memoryview(b"")
        while rest:  # a short write (rare for a regular file): finish it plainly
            rest = rest[os.write(fd, rest):]


class IntentLog:
    """A directory of intents; one ingester writes it, a restarted one replays what is left."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_store(cls, dsn: str, database: str) -> IntentLog | None:
        """The log of an embedded on-disk store (`chdb:///path`); None for a server or an in-memory store."""
        if not dsn.startswith("chdb:"):
            return None
        path = dsn.removeprefix("chdb://")
        if path in ("memory", ":memory:", ""):
            return None
        return cls(Path(path) / "gpufleet-intents" / database)

    def record(self, intent: Intent) -> None:
        """Write (or rewrite) the intent; raises OSError when the disk refuses (the batch then waits)."""
        path = self._path(intent.token)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, encode(intent))
        finally:
            os.close(fd)
        tmp.replace(path)

    def done(self, token: str) -> None:
        """Forget a batch whose offsets are committed (missing is fine: replayed and removed already)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(token).unlink()

    def pending(self) -> list[Intent]:
        """Intents left by a process that died, oldest first; an unreadable one is set aside and logged."""
        for tmp in self.directory.glob(f".*{_SUFFIX}.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        found = sorted(self.directory.glob(f"*{_SUFFIX}"), key=lambda p: p.stat().st_mtime_ns)
        out = []
        for path in found:
            try:
                out.append(decode(path.read_bytes()))
            except (OSError, ValueError) as exc:  # msgspec's errors are ValueErrors too
                aside = path.with_name(path.name + ".unreadable")
                with contextlib.suppress(OSError):
                    path.replace(aside)
                log.error("intent %s is unreadable (%s); moved it to %s. Its batch is redelivered by Kafka, "
                          "but rollup rows of a cut insert may be missing: run the check in docs/reliability.md",
                          path, exc, aside.name)
        return out

    def _path(self, token: str) -> Path:
        if not _TOKEN.match(token):
            raise ValueError(f"not an intent token: {token!r}")
        return self.directory / f"{token}{_SUFFIX}"
