"""Dead letters: what the ingester keeps of a message it refused, bounded whatever the message was.

Design notes: docs/design-notes.md#pipeline-ingest-dead-letters-py.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.pipeline.ingest.kafka_io import Producer

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

log = logging.getLogger(__name__)

EXCERPT_BYTES = 65_536
"""Most bytes of a refused value a dead letter carries (an 8-GPU node's message is about 5 KB)."""
KEY_BYTES = 1024
"""Most bytes of a refused key a dead letter carries (a node name is at most 256 characters)."""
REASON_CHARS = 1024
"""Longest reason kept (a reason may quote the key)."""
SEND_TIMEOUT_S = 30.0

COLUMNS = ("ingest_time", "topic", "partition", "offset", "key", "reason", "payload")


@dataclass(frozen=True)
class DeadLetter:
    """A refused message as consumed: where it was, its bytes, and why it was refused."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    reason: str

    @property
    def source(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    @property
    def cut(self) -> bool:
        """Whether the dead letter keeps less than the whole message."""
        return len(self.value) > EXCERPT_BYTES or len(self.key or b"") > KEY_BYTES

    def bounded_reason(self) -> str:
        return self.reason if len(self.reason) <= REASON_CHARS else self.reason[:REASON_CHARS - 3] + "..."

    def stored_reason(self) -> str:
        """The reason as `dead_letters` keeps it: with the original's size, digest and place when it was cut."""
        reason = self.bounded_reason()
        if not self.cut:
            return reason
        return (f"{reason} [kept the first {min(len(self.value), EXCERPT_BYTES)} of {len(self.value)} bytes, "
                f"sha256 {hashlib.sha256(self.value).hexdigest()}; the whole message is at {self.source} "
                "while that topic retains it]")


@dataclass(frozen=True)
class DlqRecord:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def dlq_record(d: DeadLetter) -> DlqRecord:
    """The bounded record sent to the DLQ topic for `d`."""
    headers = [
        ("gpufleet-error", d.bounded_reason().encode()),
        ("gpufleet-source", d.source.encode()),
        ("gpufleet-size", str(len(d.value)).encode()),
        ("gpufleet-sha256", hashlib.sha256(d.value).hexdigest().encode()),
    ]
    key = d.key[:KEY_BYTES] if d.key is not None else None
    return DlqRecord(key, d.value[:EXCERPT_BYTES], headers)


def send(producer: Producer, topic: str, dead: list[DeadLetter]) -> None:
    """Send each dead letter's bounded record to `topic`; returns once the broker acknowledged all."""
    futures = []
    for d in dead:
        log.warning("dead-lettered %s: %s", d.source, d.bounded_reason())
        rec = dlq_record(d)
        futures.append(producer.send(topic, key=rec.key, value=rec.value, headers=rec.headers))
    producer.flush(timeout=SEND_TIMEOUT_S)
    for f in futures:
        f.get(timeout=SEND_TIMEOUT_S)


def _text(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def rows(dead: list[DeadLetter], ingest_ms: int) -> list[list[object]]:
    """`dead_letters` columns (in `COLUMNS` order) for `dead`."""
    return [
        [ingest_ms] * len(dead), [d.topic for d in dead], [d.partition for d in dead], [d.offset for d in dead],
        [_text((d.key or b"")[:KEY_BYTES]) for d in dead], [d.stored_reason() for d in dead],
        [_text(d.value[:EXCERPT_BYTES]) for d in dead],
    ]


def store(into: Store, dead: list[DeadLetter], ingest_ms: int, settings: Mapping[str, object] | None = None) -> None:
    """Insert `dead` into `dead_letters` (a ReplacingMergeTree on the source position; `settings` carry the
    batch's dedup token, so a repeat of the batch adds no part either)."""
    into.insert("dead_letters", rows(dead, ingest_ms), COLUMNS, column_oriented=True, settings=settings)
