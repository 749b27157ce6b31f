"""A loopback TCP proxy that breaks the network on command: pass, cut or black-hole connections.

Put it between Kafka clients and the broker (the broker must advertise the proxy's address, or
clients reconnect to the broker directly after the first metadata answer). Modes:

- `pass_through()`: every connection is forwarded both ways (the default);
- `cut()`: every open connection is reset (RST, as a crashed broker or a firewall reject would),
  and new connections are accepted and reset at once, so clients see "connection reset/refused";
- `blackhole()`: nothing is forwarded any more, in either direction, and new connections are
  accepted but never connected upstream: a network partition, where clients only notice through
  their own timeouts. Data read meanwhile is held (at most one read per direction, then TCP's own
  back-pressure holds the rest in the kernel), and `pass_through()` delivers it, as TCP
  retransmission would when a partition heals. `cut()` after `blackhole()` resets the held
  connections instead, like a firewall forgetting their state.

The proxy runs its own asyncio loop in a daemon thread; the mode methods are thread-safe and
return once the change is in effect. `counts` says how many connections it accepted and reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

Mode = Literal["pass", "cut", "blackhole"]
_T = TypeVar("_T")
_CHUNK = 64 * 1024


@dataclass
class Counts:
    """What the proxy did since it started."""

    accepted: int = 0
    reset: int = 0
    forwarded_bytes: int = 0


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `upstream`; start it, then switch modes while clients use it."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port
        self.counts = Counts()
        self._mode: Mode = "pass"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._flowing: asyncio.Event | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    # -- control (any thread) -----------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def pass_through(self) -> None:
        self._call(self._set_mode("pass"))

    def cut(self) -> None:
        self._call(self._set_mode("cut"))

    def blackhole(self) -> None:
        self._call(self._set_mode("blackhole"))

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Awaitable[_T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    # -- the loop ---------------------------------------------------------------------------------
    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            self._drop(conn)

    async def _set_mode(self, mode: Mode) -> None:
        assert self._flowing is not None
        self._mode = mode
        if mode == "pass":
            self._flowing.set()
            return
        self._flowing.clear()
        if mode == "cut":
            for conn in list(self._conns):
                self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        for task in conn.tasks:
            task.cancel()
        _reset(conn.client)
        _reset(conn.upstream)
        self.counts.reset += 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.counts.accepted += 1
        conn = _Conn(writer)
        if self._mode == "cut":
            self._drop(conn)
            return
        self._conns.add(conn)
        try:
            await self._flowing.wait()  # black-holed: accepted, never connected upstream
            up_reader, conn.upstream = await asyncio.open_connection(*self.upstream)
        except (OSError, asyncio.CancelledError):
            self._drop(conn)
            return
        if conn not in self._conns:  # cut while connecting
            _reset(conn.upstream)
            return
        conn.tasks = [asyncio.create_task(self._pump(conn, reader, conn.upstream)),
                      asyncio.create_task(self._pump(conn, up_reader, writer))]

    async def _pump(self, conn: _Conn, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await src.read(_CHUNK)
                if not data:
                    break
                await self._flowing.wait()  # a partition that started meanwhile holds this chunk
                dst.write(data)
                await dst.drain()
                self.counts.forwarded_bytes += len(data)
        except (OSError, asyncio.CancelledError):
            pass
        if conn in self._conns:  # one side closed (or failed): close both, as a real hop would
            self._conns.discard(conn)
            for w in (conn.client, conn.upstream):
                if w is not None and not w.transport.is_closing():
                    w.close()
