"""When the collector holds NVML: re-initialisation back-off and the operator's release switch.

NVML held open keeps the driver busy: `nvidia-smi -r` (GPU reset) and a driver upgrade are refused
while any process has it open. The operator asks the agent to let go by creating the release file
(`agent.nvml_release_file`, default `/run/gpufleet/nvml-release`); at its next interval the agent
frees its event sets and GPM buffers, shuts NVML down, writes `<release file>.released` as the
acknowledgement, and sends nothing (its GPUs show as silent, not failing). Removing the file makes
it start NVML again (with back-off while the driver is not back yet) and report as before.
`NvmlCollector.release()` / `reacquire()` do the same from code.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

BACKOFF_FIRST_S: Final = 1.0
BACKOFF_MAX_S: Final = 60.0


@dataclass
class Backoff:
    """Exponential back-off for NVML re-initialisation: 1, 2, 4 ... 60 s between attempts."""

    first_s: float = BACKOFF_FIRST_S
    max_s: float = BACKOFF_MAX_S
    next_at: float = 0.0
    delay_s: float = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, now: float) -> float:
        """Record a failed attempt at `now`; returns the delay until the next one."""
        self.delay_s = self.first_s if self.delay_s == 0 else min(self.max_s, self.delay_s * 2)
        self.next_at = now + self.delay_s
        return self.delay_s

    def reset(self) -> None:
        self.next_at, self.delay_s = 0.0, 0.0


class ReleaseSwitch:
    """The operator's request to release NVML: a file's presence, or a flag set from code."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.requested_in_code = False

    @property
    def ack_path(self) -> Path | None:
        return None if self.path is None else self.path.with_name(self.path.name + ".released")

    def wanted(self) -> bool:
        if self.requested_in_code:
            return True
        return self.path is not None and self.path.exists()

    def acknowledge(self, released: bool) -> None:
        """Create (released) or remove the acknowledgement file; best effort, never fatal."""
        ack = self.ack_path
        if ack is None:
            return
        try:
            if released:
                ack.write_text("NVML released by the gpufleet agent; remove the release file to resume\n")
            else:
                with contextlib.suppress(FileNotFoundError):
                    ack.unlink()
        except OSError as exc:
            log.warning("cannot write the NVML release acknowledgement %s: %s", ack, exc)
