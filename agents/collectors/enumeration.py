"""How many GPUs a node should have, and which ones it lost: the expected set, kept across restarts.

The expected count is `agent.gpus_expected` when configured, else the node's first complete
enumeration (every GPU NVML counted was attached and named by its UUID). That enumeration is kept in
a small JSON file in the spool directory, so an agent restarted after a GPU vanished (a reboot with
the GPU off the bus) still knows it had one more, and which. A later complete enumeration of at least
as many GPUs replaces the record: a GPU swapped for a new one (RMA) or added is then the new normal.
NVML counts GPUs only when it starts, so a GPU that falls off the bus mid-run stays enumerated (and is
reported lost, `GpuFailing`); it goes missing at the next driver load or reboot.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from gpufleet.agents.collectors.base import Enumeration

log = logging.getLogger(__name__)

UNKNOWN_PREFIX = "unknown-gpu-"
"""The name a collector gives a GPU it could not attach yet (its UUID is not known)."""


class EnumerationRecord:
    """The node's expected GPUs: `observe` each interval's enumeration, read `current`."""

    def __init__(self, path: Path | None = None, configured: int | None = None) -> None:
        self._path = path
        self._configured = configured
        self._record: list[str] | None = self._load()
        self._warned = False
        self.current = Enumeration(configured if configured is not None else self._count(), ())

    def _count(self) -> int | None:
        return None if self._record is None else len(self._record)

    def _load(self) -> list[str] | None:
        if self._path is None:
            return None
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("cannot read the GPU enumeration record %s (%s); starting a new one", self._path, exc)
            return None
        uuids = data.get("uuids") if isinstance(data, dict) else None
        if not isinstance(uuids, list) or not all(isinstance(u, str) for u in uuids):
            log.warning("the GPU enumeration record %s is not {\"uuids\": [...]}; starting a new one", self._path)
            return None
        return uuids

    def observe(self, uuids: Sequence[str]) -> Enumeration:
        """This interval's enumeration (UUIDs in index order; `unknown-gpu-<i>` for one not attached yet)."""
        known = [u for u in uuids if not u.startswith(UNKNOWN_PREFIX)]
        complete = len(known) == len(uuids)
        if complete and (self._record is None or len(uuids) >= len(self._record)) and list(uuids) != self._record:
            self._record = list(uuids)
            self._save()
        expected = self._configured if self._configured is not None else self._count()
        missing: tuple[str, ...] = ()
        if expected is not None and len(uuids) < expected and self._record is not None:
            present = set(known)
            missing = tuple(u for u in self._record if u not in present)
        self.current = Enumeration(expected, missing)
        return self.current

    def _save(self) -> None:
        if self._path is None:
            return
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"uuids": self._record}) + "\n")
            tmp.replace(self._path)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot keep the GPU enumeration record %s (%s): a restart will not remember the "
                            "node's GPUs; set agent.gpus_expected", self._path, exc)
