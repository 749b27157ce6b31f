"""A small read-only HTTP API of the running pipeline: GET /status (the status document), GET /healthz.

`/healthz` answers 200 while the process's heartbeats are fresh and 503, naming the stale ones,
once one is older than its bound (gpufleet/liveness.py); without heartbeats it answers 200.

chDB lets one process own a store, so while `gpufleet demo` or `gpufleet ingest` runs, other
processes (`gpufleet status`) ask it over this API instead of opening the store. It listens on
loopback only.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gpufleet.liveness import Health

log = logging.getLogger(__name__)


class StatusServer:
    """Serves `document()` as JSON on 127.0.0.1:`port` (0 = a free port) in a daemon thread."""

    def __init__(self, document: Callable[[], dict[str, Any]], host: str = "127.0.0.1", port: int = 0,
                 health: Callable[[], Health] | None = None) -> None:
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    state = health() if health is not None else None
                    self._send(200 if state is None or state.ok else 503,
                               {"ok": True} if state is None else state.to_json())
                elif self.path == "/status":
                    try:
                        with lock:
                            body = document()
                    except Exception as exc:
                        log.exception("status document failed")
                        self._send(500, {"error": str(exc)})
                        return
                    self._send(200, body)
                else:
                    self._send(404, {"error": f"no such path {self.path}: use /status or /healthz"})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("status api: " + format, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="status-api", daemon=True)

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
