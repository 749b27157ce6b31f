"""`/healthz` (liveness) and `/readyz` (readiness) over HTTP for a process's heartbeats (gpufleet/liveness.py).

200 while every heartbeat is fresh, 503 naming the stale ones otherwise; `/readyz` also answers 503
until each heartbeat has come once. The agent and the alert evaluator serve it for compose
healthchecks, Kubernetes probes and systemd watchers; it reads nothing but the heartbeats, so a
probe costs nothing. Requests are handled one at a time in a daemon thread; GET only.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from gpufleet.liveness import Liveness

log = logging.getLogger(__name__)


class HealthServer:
    """Serves `liveness` on `host:port` (port 0 picks a free one) until `stop()`."""

    def __init__(self, liveness: Liveness, host: str = "127.0.0.1", port: int = 0) -> None:
        class Handler(BaseHTTPRequestHandler):
            timeout = 5

            def do_GET(self) -> None:
                if self.path not in ("/healthz", "/readyz"):
                    self._send(404, {"error": f"no such path {self.path}: use /healthz or /readyz"})
                    return
                health = liveness.check(ready=self.path == "/readyz")
                self._send(200 if health.ok else 503, health.to_json())

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("health: " + format, *args)

        self.httpd = HTTPServer((host, port), Handler)
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
