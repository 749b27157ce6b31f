"""`gpufleet agent --dry-run`: the node's messages as JSON lines on stdout instead of the spool and Kafka.

`StdoutSpool` stands where the spool stands: each message the exporter hands over is written to
the stream as one line (the exact bytes Kafka would carry, a `NodeReport` in JSON) and nothing is
kept, so a dry run touches no spool directory, no broker and no sequence state. Its `boot_id` is
new every run. An installer or an operator runs it to see what a node would send.
"""

from __future__ import annotations

import threading
import uuid
from typing import BinaryIO


class StdoutSpool:
    """The spool's writer side for a dry run: `append` prints, nothing is queued, nothing is dropped."""

    depth = 0
    dropped_total = 0

    def __init__(self, out: BinaryIO, lock: threading.Lock | None = None) -> None:
        self.boot_id = uuid.uuid4().hex
        self._out = out
        self._lock = lock or threading.Lock()
        self._next_seq = 0

    @property
    def next_seq(self) -> int:
        """The seq of the next message (messages printed so far)."""
        return self._next_seq

    def append(self, seq: int, data: bytes) -> bool:
        """Write `data` and a newline, whole, under the shared lock (nodes of one run print to one stream)."""
        with self._lock:
            self._out.write(data + b"\n")
            self._out.flush()
        self._next_seq = seq + 1
        return True

    def close(self) -> None:
        """Nothing to release."""
