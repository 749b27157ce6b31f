"""A small read-only HTTP API of the running pipeline: GET /status (the status document), GET /healthz.

Design notes: docs/design-notes.md#pipeline-queries-status-api-py.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from gpufleet.httpguard import ConnectionLimits, GuardedHandler, GuardedServer, GuardedServer6
from gpufleet.liveness import Health

log = logging.getLogger(__name__)

DEFAULT_LIMITS: Final = ConnectionLimits(max_connections=16, request_deadline_s=5.0, write_timeout_s=5.0)


class StatusUnavailable(RuntimeError):
    """No status document can be served now; the text says why."""


@dataclass(frozen=True, slots=True)
class _Entry:
    body: bytes | None
    error: str | None
    at: float


class StatusCache:
    """The status document, computed by one caller at a time and reused for `max_age_s`."""

    def __init__(self, document: Callable[[], dict[str, Any]], max_age_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._document = document
        self._max_age_s = max_age_s
        self._clock = clock
        self._cond = threading.Condition()
        self._entry: _Entry | None = None
        self._computing = False

    def get(self, wait_s: float) -> tuple[bytes, float]:
        """(the document as JSON, its age in seconds); raises `StatusUnavailable` when there is none to give."""
        with self._cond:
            entry = self._entry
            if entry is not None and (self._computing or self._clock() - entry.at < self._max_age_s):
                return self._served(entry)
            if self._computing:  # the first document is being computed: wait for it, boundedly
                if not self._cond.wait_for(lambda: not self._computing, timeout=wait_s) or self._entry is None:
                    raise StatusUnavailable(f"the status document is still being computed after {wait_s:g} s; "
                                            "retry later")
                return self._served(self._entry)
            self._computing = True
        entry = self._compute()
        with self._cond:
            self._entry, self._computing = entry, False
            self._cond.notify_all()
        return self._served(entry)

    def _compute(self) -> _Entry:
        try:
            body = json.dumps(self._document(), default=str).encode()
        except Exception as exc:
            log.exception("status document failed")
            return _Entry(None, f"{type(exc).__name__}: {exc}", self._clock())
        return _Entry(body, None, self._clock())

    def _served(self, entry: _Entry) -> tuple[bytes, float]:
        if entry.body is None:
            raise StatusUnavailable(f"the status document failed: {entry.error}")
        return entry.body, max(0.0, self._clock() - entry.at)


class StatusServer:
    """Serves `document()` as JSON on 127.0.0.1:`port` (0 = a free port) in a daemon thread."""

    def __init__(
        self,
        document: Callable[[], dict[str, Any]],
        host: str = "127.0.0.1",
        port: int = 0,
        health: Callable[[], Health] | None = None,
        *,
        max_age_s: float = 5.0,
        compute_wait_s: float = 60.0,
        limits: ConnectionLimits = DEFAULT_LIMITS,
    ) -> None:
        self.cache = StatusCache(document, max_age_s)
        self.health = health
        self.max_age_s = max_age_s
        self.compute_wait_s = compute_wait_s
        handler = type("BoundStatusHandler", (_Handler,), {"api": self})
        server_cls = GuardedServer6 if ":" in host else GuardedServer
        self.httpd = server_cls((host, port), handler, limits)
        self.port = int(self.httpd.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        self.allowed_hosts = allowed_hosts(host, self.port)
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="status-api", daemon=True)

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def connections(self) -> int:
        """Connections held now (for diagnostics and tests)."""
        return self.httpd.connections


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The `Host` header values that name this server: its address and port, and `localhost` when loopback."""
    names = {f"[{host}]" if ":" in host else host}
    try:
        if ipaddress.ip_address(host).is_loopback:
            names |= {"localhost", "127.0.0.1", "[::1]"}
    except ValueError:
        pass
    out = {f"{n}:{port}" for n in names}
    return frozenset(out | names if port == 80 else out)


class _Handler(GuardedHandler):
    server_version = "gpufleet-status"
    api: StatusServer

    def do_GET(self) -> None:
        self.request_read()
        host = (self.headers.get("Host") or "").strip().lower()
        if host not in self.api.allowed_hosts:
            shown = host or "(none)"
            self._send(403, {"error": f"Host {shown!r} is not this API's address; ask {self.api.url} by that name"})
            return
        path = urlsplit(self.path).path
        if path == "/healthz":
            state = self.api.health() if self.api.health is not None else None
            self._send(200 if state is None or state.ok else 503, {"ok": True} if state is None else state.to_json())
        elif path == "/status":
            self._status()
        else:
            self._send(404, {"error": f"no such path {path}: use /status or /healthz"})

    def _status(self) -> None:
        try:
            body, age = self.api.cache.get(self.api.compute_wait_s)
        except StatusUnavailable as exc:
            self._send(503, {"error": str(exc)}, (("Retry-After", "1"),))
            return
        self._write(200, body, (("Age", str(int(age))), ("Cache-Control", f"max-age={int(self.api.max_age_s)}")))

    def _send(self, code: int, doc: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> None:
        self._write(code, json.dumps(doc).encode(), headers)

    def _write(self, code: int, data: bytes, headers: tuple[tuple[str, str], ...]) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
