"""Connection limits for gpufleet's small HTTP servers: the agent's OTLP receiver and the status API.

- `GuardedServer` admits at most `max_connections` connections. When it is full, a new connection
  evicts the one that has waited longest for its request (an idle keep-alive connection or a
  trickling client); if every connection is being answered, the new one gets a canned 503.
- `GuardedHandler` gives each request one total deadline: its request line, headers and body must
  arrive within `request_deadline_s` of the server starting to wait for it (idle keep-alive time
  counts), however slowly the bytes trickle; a socket timeout alone restarts with every byte.
  Replies are written under `write_timeout_s`.
- `BodySlots` bounds the requests whose bodies are read at once; when all are taken, a new request
  evicts the oldest one still reading a body after `evict_after_s`, so slow clients cannot hold them.
- A client that hangs up or times out is logged at debug, never with a traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

log = logging.getLogger(__name__)

_BUSY_TEXT: Final = b"too many connections to this server; retry later\n"
_BUSY_REPLY: Final = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
                      b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(_BUSY_TEXT), _BUSY_TEXT))


_EVICT_WAIT_S: Final = 5.0
"""How long a request waits for the slot of the reader it evicted (that reader's thread only has to wake up)."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-server bounds on connections and on the time one request may take to arrive."""

    max_connections: int = 32
    """Connections held at once; more evict the longest-waiting one (or get 503)."""
    request_deadline_s: float = 10.0
    """One request (line, headers, body) must arrive within this long of the server waiting for it."""
    write_timeout_s: float = 5.0
    """A reply the client does not read within this long is abandoned."""

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.request_deadline_s <= 0 or self.write_timeout_s <= 0:
            raise ValueError(f"connection limits must be positive, got {self}")


class _DeadlineReader(io.RawIOBase):
    """A socket's read side that raises `TimeoutError` once `deadline` (monotonic seconds) has passed."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within its deadline")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


@dataclass(slots=True)
class _Conn:
    waiting: bool
    """True while waiting for or reading a request (evictable); False while it is answered."""
    since: float


class _Tracker:
    """The connections a server holds, and which of them are waiting for a request since when."""

    def __init__(self, max_connections: int) -> None:
        self._max = max_connections
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, _Conn] = {}
        self.evicted_total = 0
        self.refused_total = 0

    def admit(self, sock: socket.socket) -> bool:
        with self._lock:
            if len(self._conns) >= self._max:
                victim = min((c for c in self._conns.items() if c[1].waiting), key=lambda c: c[1].since, default=None)
                if victim is None:
                    self.refused_total += 1
                    return False
                del self._conns[victim[0]]
                self.evicted_total += 1
                _hang_up(victim[0])
            self._conns[sock] = _Conn(True, time.monotonic())
            return True

    def mark(self, sock: socket.socket, waiting: bool) -> None:
        with self._lock:
            conn = self._conns.get(sock)
            if conn is not None:
                conn.waiting, conn.since = waiting, time.monotonic()

    def leave(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.pop(sock, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._conns)


def _hang_up(sock: socket.socket) -> None:
    """Wake the thread blocked reading `sock`: its read returns end-of-stream and it closes the connection."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class GuardedServer(ThreadingHTTPServer):
    """A threading HTTP server that holds at most `limits.max_connections` connections."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    """Listen backlog: a burst of clients connecting at once waits here rather than being refused."""

    def __init__(self, address: tuple[str, int], handler: type[GuardedHandler], limits: ConnectionLimits) -> None:
        self.limits = limits
        self.tracker = _Tracker(limits.max_connections)
        super().__init__(address, handler)

    @property
    def connections(self) -> int:
        """Connections held now (for diagnostics and tests)."""
        return len(self.tracker)

    def verify_request(self, request: socket.socket, client_address: object) -> bool:  # type: ignore[override]
        if self.tracker.admit(request):
            return True
        log.debug("refusing a connection from %s: %d connections held", client_address, self.limits.max_connections)
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(_BUSY_REPLY)
        return False

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        self.tracker.leave(request)
        super().shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that hung up or stalled is its own problem: debug, never a traceback on stderr."""
        log.debug("connection from %s failed", client_address, exc_info=True)


class GuardedServer6(GuardedServer):
    address_family = socket.AF_INET6


class GuardedHandler(BaseHTTPRequestHandler):
    """A request handler whose every request has one total deadline; subclasses call `request_read()`."""

    server: GuardedServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader; ours enforces the deadline
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.server.limits.request_deadline_s
        self.server.tracker.mark(self.connection, waiting=True)
        super().handle_one_request()

    def request_read(self) -> None:
        """The whole request is in: from now on the connection is being answered (not evictable)."""
        self._reader.deadline = math.inf
        self.server.tracker.mark(self.connection, waiting=False)
        self.connection.settimeout(self.server.limits.write_timeout_s)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s - " + format, type(self).__name__, self.address_string(), *args)


class BodySlots:
    """At most `n` request bodies read and processed at once; a slow reader is evicted for a new request."""

    def __init__(self, n: int, evict_after_s: float) -> None:
        self._n = n
        self._evict_after_s = evict_after_s
        self._cond = threading.Condition()
        self._holders: dict[socket.socket, _Conn] = {}
        self.evicted_total = 0

    def acquire(self, sock: socket.socket) -> bool:
        """Take a slot for `sock` (True), evicting the oldest slow body reader if need be; False when none."""
        with self._cond:
            if len(self._holders) >= self._n:
                victim = self._slowest()
                if victim is None:
                    return False
                self.evicted_total += 1
                _hang_up(victim)
                if not self._cond.wait_for(lambda: len(self._holders) < self._n, timeout=_EVICT_WAIT_S):
                    return False
            self._holders[sock] = _Conn(True, time.monotonic())
            return True

    def body_read(self, sock: socket.socket) -> None:
        """`sock`'s body is in: it is processed now, no longer evictable."""
        with self._cond:
            conn = self._holders.get(sock)
            if conn is not None:
                conn.waiting = False

    def release(self, sock: socket.socket) -> None:
        with self._cond:
            self._holders.pop(sock, None)
            self._cond.notify_all()

    @property
    def held(self) -> int:
        with self._cond:
            return len(self._holders)

    def _slowest(self) -> socket.socket | None:
        cutoff = time.monotonic() - self._evict_after_s
        readers = [(c.since, s) for s, c in self._holders.items() if c.waiting and c.since <= cutoff]
        return min(readers, key=lambda r: r[0])[1] if readers else None
