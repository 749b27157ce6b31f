"""The demo's state file (`<data-dir>/state.json`): where its store and status API are, and its pid.

The demo writes it once started and leaves it when it stops, so the read commands find the demo's
store by default (`gpufleet.pipeline.commands.common.resolve`), and ask its API while it runs.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("var/demo")
"""Where `gpufleet demo` keeps its data, and where the read commands look for it (`--data-dir`)."""


@dataclass
class DemoState:
    pid: int
    status_url: str
    dsn: str
    database: str
    bootstrap: str
    alertmanager_url: str | None = None
    jobs: dict[str, Any] | None = None
    """The demo's `jobs` settings (short stall and straggler windows): the read commands use them on its store."""

    @staticmethod
    def path(data_dir: Path) -> Path:
        return data_dir / "state.json"

    def write(self, data_dir: Path) -> None:
        tmp = self.path(data_dir).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.path(data_dir))

    @classmethod
    def read(cls, data_dir: Path) -> DemoState | None:
        try:
            return cls(**json.loads(cls.path(data_dir).read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def running(self, timeout_s: float = 2) -> bool:
        """Whether the demo runs: its process is alive and its status API answers `/healthz`."""
        if not self.alive():
            return False
        try:
            with urllib.request.urlopen(f"{self.status_url}/healthz", timeout=timeout_s):  # noqa: S310 (loopback URL we wrote)
                return True
        except OSError:
            return False

    def fetch_status(self, timeout_s: float = 30) -> dict[str, Any] | None:
        """The running demo's status document, or None if its API does not answer."""
        try:
            with urllib.request.urlopen(f"{self.status_url}/status", timeout=timeout_s) as resp:  # noqa: S310 (loopback URL we wrote)
                return json.loads(resp.read())
        except OSError:
            return None
