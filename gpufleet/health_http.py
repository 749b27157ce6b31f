"""`/healthz` (liveness) and `/readyz` (readiness) over HTTP for a process's heartbeats (gpufleet/liveness.py).

200 while every heartbeat is fresh, 503 naming the stale ones otherwise; `/readyz` also answers 503
until each heartbeat has come once. The agent and the alert evaluator serve it for compose
healthchecks, Kubernetes probes and systemd watchers; it reads nothing but the heartbeats, so a
probe costs nothing. GET only.

Connections are bounded by `gpufleet.httpguard` (as the OTLP receiver and the status API are): each
is answered in its own thread, a request must arrive within one total deadline however slowly its
bytes trickle, and at most `max_connections` are held, a new one evicting the longest-waiting. So an
idle or trickling client can never stop a liveness probe from being answered.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Final

from gpufleet.httpguard import ConnectionLimits, GuardedHandler, GuardedServer, GuardedServer6
from gpufleet.liveness import Liveness

DEFAULT_LIMITS: Final = ConnectionLimits(max_connections=8, request_deadline_s=5.0, write_timeout_s=5.0)
"""Probes open one short connection each: 8 at once is plenty, 5 s is longer than any probe waits."""

PATHS: Final = ("/healthz", "/readyz")


class HealthServer:
    """Serves `liveness` on `host:port` (port 0 picks a free one) in a daemon thread until `stop()`."""

    def __init__(self, liveness: Liveness, host: str = "127.0.0.1", port: int = 0, *,
                 limits: ConnectionLimits = DEFAULT_LIMITS) -> None:
        self.liveness = liveness
        handler = type("BoundHealthHandler", (_Handler,), {"health": self})
        server_cls = GuardedServer6 if ":" in host else GuardedServer
        self.httpd = server_cls((host, port), handler, limits)
        self.port = int(self.httpd.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def connections(self) -> int:
        """Connections held now (for diagnostics and tests)."""
        return self.httpd.connections


class _Handler(GuardedHandler):
    server_version = "gpufleet-health"
    health: HealthServer

    def do_GET(self) -> None:
        self.request_read()
        if self.path not in PATHS:
            self._send(404, {"error": f"no such path {self.path}: use /healthz or /readyz"})
            return
        state = self.health.liveness.check(ready=self.path == "/readyz")
        self._send(200 if state.ok else 503, state.to_json())

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
