"""A ClickHouse server for the fault tests: one process owns a chDB store and serves ClickHouse's HTTP interface.

    python -m tests.reliability.store_server STORE_PATH PORT_FILE [PORT]

chDB lets one process open a store, and a real ClickHouse server cannot be installed here, so tests that
need several ingester processes writing one store, and a server that finishes an insert its client no
longer waits for, run this instead. What it models, and what not:

- the wire: ClickHouse's HTTP interface as clickhouse-connect's HTTP client speaks it (queries and their
  parameters and settings as URL parameters or body, inserts as a body in Native or JSONEachRow, lz4
  request bodies, chunked transfer, errors as status 500 with `X-ClickHouse-Exception-Code`). Ingesters
  reach it with an ordinary `http://user:password@127.0.0.1:PORT` DSN: the server code path, unchanged;
- the engine: every statement runs in chDB, the ClickHouse engine itself (26.9): insert deduplication by
  token, materialized-view chains committing table by table, `max_execution_time`, refusals such as
  NOT_ENOUGH_SPACE are ClickHouse's own. Tables are non-replicated MergeTree, so deduplication is the
  local log (`non_replicated_deduplication_window`), not Keeper as on a replicated cluster;
- a received insert is carried out whatever became of its client, as a server does once it has the whole
  body. The test can hold an insert after it was received and before it runs (`POST /_hold`), see whose it
  is (`GET /_held`: the DSN's user name names the ingester), and let it run later (`POST /_release`): a
  slow insert, made slow on purpose, that completes after its ingester died and its partition moved;
- a server crash is this process getting SIGKILL: what chDB had committed stays, as a server's parts do
  after a process crash (neither fsyncs each part).
"""

from __future__ import annotations

import base64
import json
import queue
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from clickhouse_connect.driver._backend.chdb_backend import ChdbBackend, _decompress
from clickhouse_connect.driver._backend.models import QueryRuntime

POOL = 6
_INSERT = re.compile(
    rb"^\s*INSERT\s+INTO\s+(?P<table>[^\s(]+)\s*(?:\((?P<cols>[^)]*)\))?\s*FORMAT\s+(?P<fmt>\w+)[ \t]*\n?",
    re.IGNORECASE)
_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
_NOT_SETTINGS = {"query", "database", "query_id", "session_id", "session_timeout", "session_check", "default_format",
                 "wait_end_of_query", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
                 "enable_http_compression", "client_protocol_version", "user", "password", "compress", "decompress",
                 "buffer_size", "quota_key", "role"}


@dataclass
class Held:
    """A received insert waiting for the test's release."""

    id: int
    table: str
    user: str
    token: str
    go: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    error: str = ""


class Engine:
    """A pool of chDB connections to one store, and the holds the test arms."""

    def __init__(self, path: str) -> None:
        self.pool: queue.Queue[ChdbBackend] = queue.Queue()
        for _ in range(POOL):
            self.pool.put(ChdbBackend(connection_string=str(Path(path).resolve())))
        self.lock = threading.Lock()
        self.armed: list[tuple[str, int]] = []
        self.held: dict[int, Held] = {}
        self.next_id = 1

    @contextmanager
    def backend(self) -> Iterator[ChdbBackend]:
        b = self.pool.get()
        try:
            yield b
        finally:
            self.pool.put(b)

    def arm(self, table: str, count: int) -> None:
        with self.lock:
            self.armed.append((table, count))

    def maybe_hold(self, table: str, user: str, token: str) -> Held | None:
        with self.lock:
            for i, (pattern, count) in enumerate(self.armed):
                if pattern in table:
                    self.armed[i] = (pattern, count - 1)
                    self.armed = [a for a in self.armed if a[1] > 0]
                    held = self.held[self.next_id] = Held(self.next_id, table, user, token)
                    self.next_id += 1
                    return held
        return None


def _error_code(message: str) -> str:
    m = re.search(r"Code:\s*(\d+)", message)
    return m.group(1) if m else "1002"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    engine: Engine

    def log_message(self, format: str, *args: Any) -> None:
        return

    # --- HTTP plumbing --------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client is gone (killed): the work is done all the same

    def _user(self) -> str:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            return base64.b64decode(auth[6:]).decode(errors="replace").split(":", 1)[0]
        return ""

    def do_GET(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        body = self._body()
        encoding = self.headers.get("Content-Encoding")
        if encoding and body:
            body = _decompress(body, encoding)
        if url.path.startswith("/_"):
            self._control(url.path, params)
            return
        try:
            status, out, headers = self._clickhouse(params, body)
        except Exception as exc:  # the engine's refusal, as a server reports it
            message = str(exc)
            self._send(500, message.encode(), {"X-ClickHouse-Exception-Code": _error_code(message)})
            return
        self._send(status, out, headers)

    # --- the ClickHouse interface ---------------------------------------------------------------
    def _clickhouse(self, params: dict[str, str], body: bytes) -> tuple[int, bytes, dict[str, str]]:
        settings = {k: v for k, v in params.items() if k not in _NOT_SETTINGS and not k.startswith("param_")}
        binds = {k: v for k, v in params.items() if k.startswith("param_")}
        runtime = QueryRuntime(database=params.get("database") or None, settings=settings)
        head = params.get("query", "").encode()
        if head and body:
            statement, data = head, body
        else:
            statement, data = (head or body), b""
            m = _INSERT.match(statement)
            if m and m.end() < len(statement):
                statement, data = statement[:m.end()], statement[m.end():]
        insert = _INSERT.match(statement)
        if insert and data:
            self._insert(insert, data, runtime, settings)
            return 200, b"", {"X-ClickHouse-Summary": "{}"}
        sql = statement.decode()
        fmt_match = _FORMAT.search(sql)
        with self.engine.backend() as b:
            out = b.execute_raw_query(sql, binds, None, runtime, None)
        headers = {"X-ClickHouse-Timezone": "UTC", "X-ClickHouse-Summary": "{}"}
        if fmt_match or sql.lstrip().upper().startswith(("SELECT", "WITH", "SHOW", "DESCRIBE", "EXISTS")):
            headers["X-ClickHouse-Format"] = fmt_match.group(1) if fmt_match else "TabSeparated"
        return 200, out, headers

    def _insert(self, m: re.Match[bytes], data: bytes, runtime: QueryRuntime, settings: dict[str, str]) -> None:
        table = m.group("table").decode()
        cols = [c.strip().strip("`\"") for c in m.group("cols").decode().split(",")] if m.group("cols") else None
        held = self.engine.maybe_hold(table, self._user(), settings.get("insert_deduplication_token", ""))
        if held is not None:
            held.go.wait()
        try:
            with self.engine.backend() as b:
                b.execute_raw_insert(table, cols, data, m.group("fmt").decode(), None, runtime, None)
        except Exception as exc:
            if held is not None:
                held.error = str(exc)
            raise
        finally:
            if held is not None:
                held.done.set()

    # --- the test's controls -------------------------------------------------------------------
    def _control(self, path: str, params: dict[str, str]) -> None:
        engine = self.engine
        if path == "/_hold":
            engine.arm(params["table"], int(params.get("count", "1")))
            self._send(200, b"{}")
        elif path == "/_held":
            with engine.lock:
                rows = [{"id": h.id, "table": h.table, "user": h.user, "token": h.token} for h in engine.held.values()
                        if not h.go.is_set()]
            self._send(200, json.dumps(rows).encode())
        elif path == "/_release":
            with engine.lock:
                held = engine.held[int(params["id"])]
            held.go.set()
            held.done.wait(120)
            self._send(200, json.dumps({"error": held.error}).encode())
        else:
            self._send(404, b"no such control")


def main(store: str, port_file: str, port: int = 0) -> None:
    Handler.engine = Engine(store)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    tmp = Path(port_file).with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.replace(port_file)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
