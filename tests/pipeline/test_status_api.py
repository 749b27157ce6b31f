"""The loopback status API under abuse, with real sockets (issue 18 item 10).

The document is a plain function (counting its calls, sleeping or blocking where a test needs a
slow one), so these tests need no store. Deadlines are configured short; every wait is bounded and
nothing asserts how fast a reply comes, only that it comes and what it holds.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gpufleet.pipeline.queries.status_api import StatusServer

pytestmark = pytest.mark.integration  # starts a server or a process

WAIT_S = 20.0


class Document:
    """A status document that counts how often it is computed; `gate`, when set, holds each computation."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.delay_s = delay_s
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
            n = self.calls
        if self.gate is not None:
            assert self.gate.wait(WAIT_S)
        time.sleep(self.delay_s)
        return {"computed": n}


def get(server: StatusServer, path: str = "/status", host: str | None = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host != "":
            conn.putheader("Host", host or f"127.0.0.1:{server.port}")
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read())
    finally:
        conn.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def serve() -> Iterator[Callable[..., StatusServer]]:
    servers: list[StatusServer] = []

    def start(document: Callable[[], dict[str, Any]], **kwargs: Any) -> StatusServer:
        servers.append(StatusServer(document, **kwargs).start())
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def test_idle_connections_are_capped_and_closed_at_the_deadline(serve: Callable[..., StatusServer]) -> None:
    # The probe: 300 idle connections were held forever (ingester 156 -> 456 threads).
    server = serve(Document())  # defaults: 16 connections, 5 s to send a request
    threads_before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(30)]
    try:
        assert wait_until(lambda: sum(closed_by_server(s) for s in idle) >= 14)
        assert wait_until(lambda: threading.active_count() <= threads_before + 16)
        assert get(server)[0] == 200  # answered while idle connections come and go
        # Every idle connection is closed by its request deadline, none is held forever.
        assert wait_until(lambda: all(closed_by_server(s) for s in idle), timeout_s=10.0)
    finally:
        for s in idle:
            s.close()


def test_concurrent_requests_share_one_computation(serve: Callable[..., StatusServer]) -> None:
    # The probe: /status computed under one lock per request: minutes without an answer under load.
    doc = Document(delay_s=0.3)
    server = serve(doc)  # refreshed at most every 5 s
    answers: list[tuple[int, Any]] = []

    def ask() -> None:
        status, _, body = get(server)
        answers.append((status, body))

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT_S)
    assert answers == [(200, {"computed": 1})] * 12
    assert doc.calls == 1
    status, headers, body = get(server)
    assert (status, body, doc.calls) == (200, {"computed": 1}, 1)
    assert headers["cache-control"] == "max-age=5"
    assert int(headers["age"]) >= 0


def test_a_refresh_in_progress_serves_the_cached_document(serve: Callable[..., StatusServer]) -> None:
    doc = Document()
    server = serve(doc, max_age_s=0.2)
    assert get(server)[2] == {"computed": 1}
    time.sleep(0.3)  # the cached document is now older than max_age_s
    doc.gate = threading.Event()
    refreshing: list[Any] = []
    first = threading.Thread(target=lambda: refreshing.append(get(server)[2]))
    first.start()
    try:
        assert wait_until(lambda: doc.calls == 2)  # the refresh is running, held by the gate
        status, headers, body = get(server)  # not held: the cached document, with its age
        assert (status, body) == (200, {"computed": 1})
        assert "age" in headers
    finally:
        doc.gate.set()
        first.join(timeout=WAIT_S)
    assert refreshing == [{"computed": 2}]


def test_host_header_must_name_the_bound_address(serve: Callable[..., StatusServer]) -> None:
    # No Host check: a page on another origin could read the API through DNS rebinding.
    server = serve(Document())
    for host in ("evil.example", f"evil.example:{server.port}", f"127.0.0.1:{server.port + 1}", ""):
        status, _, body = get(server, host=host)
        assert status == 403, host
        assert "is not this API's address" in body["error"]
    assert get(server, host=f"127.0.0.1:{server.port}")[0] == 200
    assert get(server, host=f"localhost:{server.port}", path="/healthz")[:3:2] == (200, {"ok": True})


def test_a_client_that_hangs_up_is_not_a_traceback(serve: Callable[..., StatusServer],
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    # The probe: BrokenPipe tracebacks on stderr.
    doc = Document(delay_s=0.3)
    server = serve(doc)
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(f"GET /status HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # reset before the reply is written
    assert wait_until(lambda: doc.calls >= 1)
    assert get(server)[0] == 200
    err = ""

    def complained() -> bool:
        nonlocal err
        err += capfd.readouterr().err
        return "Traceback" in err or "Exception occurred" in err

    assert not wait_until(complained, timeout_s=1.0), err
