"""A real Prometheus Alertmanager for one machine: the Debian/upstream binary on a loopback port.

The demo and the tests start it with a minimal config (one route, a null receiver) so alerts can
be seen at /api/v2/alerts; production runs Alertmanager from docker-compose with real receivers.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.embedded.broker import free_port

BINARIES = ("prometheus-alertmanager", "alertmanager")
MINIMAL_CONFIG = """\
route:
  receiver: "null"
  group_by: ["alertname", "cluster", "node"]
  group_wait: 1s
  group_interval: 5s
  repeat_interval: 4h
receivers:
  - name: "null"
"""


def find_binary() -> str | None:
    """Path of an Alertmanager binary on PATH, or None."""
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class EmbeddedAlertmanager:
    """An Alertmanager process with its own config and storage under `workdir`."""

    workdir: Path
    port: int = 0
    config: str = MINIMAL_CONFIG
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedAlertmanager:
        binary = find_binary()
        if binary is None:
            raise RuntimeError(
                "Alertmanager is not installed: apt-get install prometheus-alertmanager (or put 'alertmanager' on PATH)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "alertmanager.yml").write_text(self.config)
        self.port = self.port or free_port()
        log = open(self.workdir / "alertmanager.log", "ab")  # noqa: SIM115 (owned by the child)
        self._proc = subprocess.Popen(
            [binary, f"--config.file={self.workdir / 'alertmanager.yml'}",
             f"--storage.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--cluster.listen-address="],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:  # noqa: S310 (loopback)
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Alertmanager did not become ready on {self.url}; see {self.workdir}/alertmanager.log")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def __enter__(self) -> EmbeddedAlertmanager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
