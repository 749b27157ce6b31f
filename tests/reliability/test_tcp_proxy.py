"""The fault proxy itself: it forwards, resets and black-holes as the fault tests rely on."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.reliability.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration  # starts a server or a process


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with TcpProxy("127.0.0.1", server.server_address[1]) as p:
        yield p
    server.shutdown()
    server.server_close()


def _connect(p: TcpProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", p.port), timeout=5)


def _talk(s: socket.socket) -> None:
    """Write and read until the connection fails (a reset shows on the first read, or on a later write)."""
    for _ in range(3):
        s.sendall(b"b")
        s.recv(10)


def test_passes_bytes_both_ways(proxy: TcpProxy) -> None:
    with _connect(proxy) as s:
        s.sendall(b"hello")
        assert s.recv(100) == b"hello"
    assert proxy.counts.accepted == 1


def test_cut_resets_open_and_new_connections(proxy: TcpProxy) -> None:
    s = _connect(proxy)
    s.sendall(b"a")
    assert s.recv(10) == b"a"
    proxy.cut()
    s.settimeout(5)
    with pytest.raises(ConnectionResetError):
        _talk(s)
    s.close()
    with pytest.raises(ConnectionResetError), _connect(proxy) as fresh:  # reset at connect or at the first read
        fresh.recv(10)
    proxy.pass_through()
    with _connect(proxy) as again:
        again.sendall(b"back")
        assert again.recv(10) == b"back"


def test_blackhole_holds_data_until_healed(proxy: TcpProxy) -> None:
    s = _connect(proxy)
    s.sendall(b"x")
    assert s.recv(10) == b"x"
    proxy.blackhole()
    s.sendall(b"held")
    s.settimeout(0.5)
    with pytest.raises(TimeoutError):
        s.recv(10)  # nothing comes back while partitioned
    with _connect(proxy) as during:  # accepted, then silence
        during.settimeout(0.3)
        during.sendall(b"q")
        with pytest.raises(TimeoutError):
            during.recv(10)
        proxy.pass_through()  # healed: the held bytes arrive, as TCP retransmission would deliver them
        during.settimeout(5)
        assert during.recv(10) == b"q"
    s.settimeout(5)
    assert s.recv(10) == b"held"
    s.close()


def test_cut_after_blackhole_resets_the_held_connections(proxy: TcpProxy) -> None:
    s = _connect(proxy)
    proxy.blackhole()
    s.sendall(b"lost")
    proxy.cut()
    s.settimeout(5)
    with pytest.raises(ConnectionResetError):
        s.recv(10)
    s.close()
