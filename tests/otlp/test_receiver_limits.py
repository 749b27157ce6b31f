"""The OTLP receiver's connection limits with real sockets (issue 18 item 8): slow clients cannot hold it.

Deadlines are configured short (seconds) so the tests stay fast; every wait is bounded and none
asserts how fast anything is, only that a stalled or trickling client is cut off and that a
legitimate post is answered while they try.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from gpufleet.agents.otlp import OtlpReceiver, ReceiverSettings
from tests.otlp.otlp_builders import GPUS, A, Dp, post, request

pytestmark = pytest.mark.integration  # starts a server or a process

WAIT_S = 20.0
HEAD = b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: 100\r\n\r\n"


def valid_body(now_ms: int) -> bytes:
    t = now_ms / 1000
    return request([Dp(1e12, start_s=t + 1, time_s=t + 2)], resource={"gpu.uuid": A}).SerializeToString()


class Trickler:
    """A client that sends `head` at once, then `data` one byte every `every_s` seconds until stopped or cut off."""

    def __init__(self, address: tuple[str, int], head: bytes, data: bytes, every_s: float = 0.2) -> None:
        self.sock = socket.create_connection(address)
        self.sock.sendall(head)
        self.cut_off = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(data, every_s), daemon=True)
        self._thread.start()

    def _run(self, data: bytes, every_s: float) -> None:
        for i in range(len(data)):
            if self._stop.is_set():
                return
            try:
                self.sock.sendall(data[i:i + 1])
            except OSError:
                self.cut_off.set()
                return
            if self._stop.wait(every_s):
                return
        self.sock.settimeout(WAIT_S)
        with contextlib.suppress(OSError):
            self.sock.recv(1)
        self.cut_off.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def wait_until(condition, timeout_s: float = WAIT_S) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def closed_by_server(sock: socket.socket) -> bool:
    """True when the server has closed `sock` (end of stream or reset); never blocks."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    from gpufleet.httpguard import ConnectionLimits

    limits = ConnectionLimits(max_connections=16, request_deadline_s=2.0)
    r = OtlpReceiver(ReceiverSettings(port=0, connections=limits, evict_slow_after_s=0.5), gpus=GPUS).start()
    yield r
    r.close()


def test_eight_trickling_bodies_do_not_lock_legitimate_posts_out() -> None:
    # The probe: 8 connections sending a body at 1 byte per 2 s held all 8 slots; every post got 503.
    # Default settings: 8 body slots, a reader slower than 1 s gives way to a new request.
    with OtlpReceiver(ReceiverSettings(port=0), gpus=GPUS) as r:
        tricklers = [Trickler(r.address, HEAD, b"\x00" * 100, every_s=2.0) for _ in range(8)]
        try:
            assert wait_until(lambda: r.in_flight == 8)
            time.sleep(1.1)
            reply = post(r.address, valid_body(int(time.time() * 1000)))
            assert reply.status == 200
            assert 503 not in r.stats().requests_by_status
        finally:
            for t in tricklers:
                t.stop()


def test_trickling_bodies_are_cut_off_at_the_request_deadline(receiver: OtlpReceiver) -> None:
    tricklers = [Trickler(receiver.address, HEAD, b"\x00" * 100, every_s=0.2) for _ in range(3)]
    try:
        # 100 bytes at 5 per second would take 20 s; the deadline is 2 s, though a byte comes every 0.2 s.
        assert wait_until(lambda: all(t.cut_off.is_set() for t in tricklers), timeout_s=10.0)
    finally:
        for t in tricklers:
            t.stop()


def test_trickling_headers_are_cut_off_at_the_request_deadline(receiver: OtlpReceiver) -> None:
    slow = Trickler(receiver.address, b"", HEAD, every_s=0.2)  # the headers alone take 20 s at this pace
    try:
        started = time.monotonic()
        assert slow.cut_off.wait(timeout=10.0)
        assert time.monotonic() - started < 10.0
    finally:
        slow.stop()


def test_idle_connections_beyond_the_cap_make_room_for_new_ones() -> None:
    from gpufleet.httpguard import ConnectionLimits

    limits = ConnectionLimits(max_connections=4, request_deadline_s=30.0)
    with OtlpReceiver(ReceiverSettings(port=0, connections=limits), gpus=GPUS) as r:
        idle = [socket.create_connection(r.address) for _ in range(10)]
        try:
            # The six oldest idle connections are closed to admit the newer ones ...
            assert wait_until(lambda: sum(closed_by_server(s) for s in idle) == 6)
            assert [closed_by_server(s) for s in idle] == [True] * 6 + [False] * 4
            assert r.connections == 4
            reply = post(r.address, valid_body(int(time.time() * 1000)))
            assert reply.status == 200
            # ... and one more for the post.
            assert wait_until(lambda: sum(closed_by_server(s) for s in idle) == 7)
            assert r.connections <= 4
        finally:
            for s in idle:
                s.close()
