"""The front door: after `gpufleet demo` (and while it runs) every read command reads the demo's store by
default, the same way; pointed at nothing, a read command says where it looked, exits 2 and creates nothing.

One demo run is shared by the module (started in a fresh directory, so `var/demo` is the default data
directory there, as after `make run`): the tests that need it running come first, then it is stopped
with SIGINT (Ctrl-C) and the read commands run on what it left. Every command runs as a child process
the way a user types it, with no `--data-dir` and no config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpufleet.dashboards import build
from gpufleet.embedded.demo.state import DemoState
from gpufleet.pipeline.store.client import DEFAULT_DSN, Target

pytestmark = pytest.mark.integration  # starts the demo and runs commands as processes

NODES, GPUS = 2, 2
WAIT_S = 180  # generous bound on start-up and shut-down; never a speed assertion
ENV = {**os.environ, "GPUFLEET_CONFIG": ""}
BOARDS = [json.loads(p.read_text()) for p in sorted((build.ROOT / build.BOARDS_DIR).glob("*.json"))]
QUERY_PANELS = sum(1 for b in BOARDS for p in b["panels"] if p.get("targets"))


@dataclass
class Run:
    code: int
    out: str
    err: str


def gpufleet(cwd: Path, *args: str) -> Run:
    done = subprocess.run([sys.executable, "-m", "gpufleet", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=WAIT_S, check=False)
    return Run(done.returncode, done.stdout, done.stderr)


@dataclass
class Demo:
    cwd: Path
    proc: subprocess.Popen[bytes]
    state: DemoState

    def log(self) -> str:
        return (self.cwd / "demo.log").read_text(errors="replace")

    def stop(self) -> None:
        """Ctrl-C, then wait for it to finish."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _status_with_data(state: DemoState | None) -> bool:
    if state is None:
        return False
    try:
        with urllib.request.urlopen(f"{state.status_url}/status", timeout=30) as resp:
            doc = json.loads(resp.read())
    except OSError:
        return False
    return doc["gpus_reporting"] == NODES * GPUS and doc.get("billable_gpu_hours", 0) > 0


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The demo, running in a fresh directory, once every GPU has reported and usage is billable."""
    cwd = tmp_path_factory.mktemp("front-door")
    with open(cwd / "demo.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpufleet", "demo", "--quiet", "--nodes", str(NODES), "--gpus", str(GPUS),
             "--faults", "none", "--flops-jobs", "0", "--no-alertmanager"],
            cwd=cwd, env=ENV, stdout=log, stderr=subprocess.STDOUT,
        )
    data_dir = cwd / "var" / "demo"
    deadline = time.monotonic() + WAIT_S
    state = None
    try:
        while not _status_with_data(state := DemoState.read(data_dir)):
            assert proc.poll() is None, f"the demo exited: {(cwd / 'demo.log').read_text()}"
            assert time.monotonic() < deadline, f"no data within {WAIT_S} s: {(cwd / 'demo.log').read_text()}"
            time.sleep(1)
        assert state is not None
        yield Demo(cwd, proc, state)
    finally:
        Demo(cwd, proc, state or DemoState(0, "", "", "", "")).stop()


@pytest.fixture(scope="module")
def stopped(demo: Demo) -> Demo:
    demo.stop()
    assert demo.proc.returncode == 0, demo.log()
    return demo


def owned(demo: Demo, origin: str) -> str:
    s = demo.state
    return (f"gpufleet: the running demo (pid {s.pid}) has the store at {s.dsn} ({origin}) open, and chDB lets one "
            "process open a store: stop the demo (Ctrl-C) and run this again, or read through its API "
            f"(`gpufleet status --json`, `gpufleet alerts --json`, {s.status_url}/status)\n")


# -- while the demo runs ----------------------------------------------------------------------------------


def test_while_it_runs_status_and_alerts_ask_its_api(demo: Demo) -> None:
    status = gpufleet(demo.cwd, "status", "--json")
    assert status.code == 0, status.err
    doc = json.loads(status.out)
    assert (doc["gpus_reporting"], doc["nodes_reporting"]) == (NODES * GPUS, NODES)
    alerts = gpufleet(demo.cwd, "alerts", "--json")
    assert alerts.code == 0, alerts.err
    assert isinstance(json.loads(alerts.out), list)


def test_while_it_runs_the_other_readers_say_the_demo_holds_the_store(demo: Demo) -> None:
    origin = "the demo's store, from var/demo/state.json"
    for args in (["usage", "--format", "json"], ["billing", "pending"], ["dashboards", "preview", "--out", "board"],
                 ["jobs", "--json"], ["alerts", "history", "--json"]):
        run = gpufleet(demo.cwd, *args)
        assert (run.code, run.out, run.err) == (2, "", owned(demo, origin)), args
    run = gpufleet(demo.cwd, "usage", "--dsn", demo.state.dsn)
    assert (run.code, run.out, run.err) == (2, "", owned(demo, "from --dsn"))
    assert not (demo.cwd / "board").exists()


# -- after it stopped ------------------------------------------------------------------------------------


def test_after_it_stopped_every_read_command_reads_its_store(stopped: Demo) -> None:
    cwd = stopped.cwd
    status = gpufleet(cwd, "status", "--json")
    assert status.code == 0, status.err
    doc = json.loads(status.out)
    assert (doc["gpus_reporting"], doc["nodes_reporting"]) == (NODES * GPUS, NODES)

    usage = gpufleet(cwd, "usage", "--format", "json")
    assert usage.code == 0, usage.err
    billed: dict[str, float] = {}
    for row in json.loads(usage.out):
        billed[row["tenant"]] = billed.get(row["tenant"], 0.0) + row["billable_gpu_hours"]
    assert sorted(billed) == doc["tenants"]
    assert billed == pytest.approx(doc["billable_gpu_hours_by_tenant"], rel=1e-9)

    alerts = gpufleet(cwd, "alerts", "--json")
    assert alerts.code == 0, alerts.err
    assert json.loads(alerts.out) == doc["alerts_firing"]
    history = gpufleet(cwd, "alerts", "history", "--json")
    assert history.code == 0, history.err
    fired = {a["fingerprint"]: a for a in json.loads(history.out)}
    assert {a["fingerprint"] for a in doc["alerts_firing"]} <= set(fired)  # what fires now fired in the last day
    assert all(a["starts_at"] is not None for a in fired.values())

    jobs = gpufleet(cwd, "jobs", "--json")
    assert jobs.code == 0, jobs.err
    listed = json.loads(jobs.out)
    assert listed["jobs"]
    assert {j["tenant"] for j in listed["jobs"]} <= set(doc["tenants"])
    assert all(1 <= j["gpus"] <= NODES * GPUS for j in listed["jobs"])

    pending = gpufleet(cwd, "billing", "pending")
    assert (pending.code, json.loads(pending.out)) == (0, {})  # no period was closed
    verify = gpufleet(cwd, "billing", "verify")
    assert (verify.code, verify.out) == (0, "all billing checksums match; every sample is stored once and every "
                                            "rollup equals its raw answer\n")

    preview = gpufleet(cwd, "dashboards", "preview", "--out", "board")
    assert (preview.code, preview.out) == (0, "wrote board/index.html\n"), preview.err
    page = (cwd / "board" / "index.html").read_text()
    assert page.count('class="panel"') == QUERY_PANELS
    assert 'class="err"' not in page

    sql = gpufleet(cwd, "tenants", "sql", "--tenant", doc["tenants"][0], "--password-file", "tenant.pw")
    assert sql.code == 0, sql.err
    assert f"-- gpufleet tenant isolation for tenant '{doc['tenants'][0]}' in database {stopped.state.database}\n" \
        in sql.out


def test_pointed_at_nothing_a_reader_says_where_it_looked_and_creates_nothing(stopped: Demo, tmp_path: Path) -> None:
    run = gpufleet(stopped.cwd, "usage", "--dsn", f"chdb://{tmp_path}/nonexistent/x")
    assert (run.code, run.out) == (2, "")
    assert run.err == (f"gpufleet: no ClickHouse store at chdb://{tmp_path}/nonexistent/x (from --dsn): point to a "
                       "store with --dsn, --data-dir (a demo's) or clickhouse.dsn in the config, or create one with "
                       "`gpufleet migrate`\n")
    assert not (tmp_path / "nonexistent").exists()

    # No demo state here: the default store, which this machine may or may not have (another checkout's
    # old code may have created it), so the line is checked for where it looked, not for why it failed.
    default_existed = Path(DEFAULT_DSN.removeprefix("chdb://")).exists()
    for args in (["usage"], ["billing", "pending"], ["alerts", "--json"], ["dashboards", "preview", "--out", "b"],
                 ["jobs"], ["alerts", "history"]):
        run = gpufleet(tmp_path, *args)
        assert (run.code, run.out, run.err.count("\n")) == (2, "", 1), args
        assert run.err.startswith("gpufleet: ")
        assert f"{DEFAULT_DSN} (the default clickhouse.dsn; no demo state in var/demo)" in run.err, args
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert Path(DEFAULT_DSN.removeprefix("chdb://")).exists() == default_existed


# -- without the demo -----------------------------------------------------------------------------------


def test_a_store_without_the_schema_says_to_migrate_and_creates_no_database(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    run = gpufleet(tmp_path, "usage", "--dsn", f"chdb://{store}")
    assert (run.code, run.out) == (2, "")
    assert run.err == (f"gpufleet: chdb://{store} (from --dsn) has no gpufleet schema in database gpufleet: create "
                       f"it with `gpufleet migrate --dsn chdb://{store} --database gpufleet`\n")
    databases = subprocess.run(
        [sys.executable, "-c", "import sys, clickhouse_connect; c = clickhouse_connect.get_client(dsn=sys.argv[1]); "
         "print(sorted(r[0] for r in c.query('SELECT name FROM system.databases').result_rows))", f"chdb://{store}"],
        capture_output=True, text=True, timeout=WAIT_S, check=True).stdout
    assert "gpufleet" not in databases, databases


def test_the_store_is_found_in_one_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpufleet.pipeline.commands.common import resolve

    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid names no running demo
    data_dir = tmp_path / "demo"
    data_dir.mkdir()
    state = DemoState(child.pid, "http://127.0.0.1:1", f"chdb://{tmp_path}/demo-store", "demo_db", "127.0.0.1:1")
    state.write(data_dir)
    configured = tmp_path / "with-dsn.yaml"
    configured.write_text("clickhouse: {dsn: 'chdb:///configured', database: conf_db}\n")
    database_only = tmp_path / "database-only.yaml"
    database_only.write_text("clickhouse: {database: conf_db}\n")

    def target(config: Path | None, dsn: str | None, database: str | None, where: Path) -> tuple[Target, str]:
        source = resolve(str(config) if config else None, dsn, database, where)
        assert source.demo is None
        assert (source.cfg.clickhouse.dsn, source.cfg.clickhouse.database) == (source.target.dsn,
                                                                               source.target.database)
        return source.target, source.target.origin

    assert target(configured, "chdb:///flag", None, data_dir) == (Target("chdb:///flag", "conf_db"), "from --dsn")
    assert target(configured, None, None, data_dir) == (Target("chdb:///configured", "conf_db"),
                                                        f"clickhouse.dsn in {configured}")
    assert target(database_only, None, None, data_dir) == (
        Target(f"chdb://{tmp_path}/demo-store", "demo_db"), f"the demo's store, from {data_dir}/state.json")
    assert target(None, None, "other", data_dir) == (
        Target(f"chdb://{tmp_path}/demo-store", "other"), f"the demo's store, from {data_dir}/state.json")
    assert target(None, None, None, tmp_path / "none") == (
        Target(DEFAULT_DSN, "gpufleet"), f"the default clickhouse.dsn; no demo state in {tmp_path / 'none'}")


def test_the_demos_store_is_read_with_the_demos_job_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpufleet jobs` on a stopped demo counts its one-minute faults with the demo's 15 s windows, unless the
    config says otherwise."""
    from gpufleet.config import JobsConfig
    from gpufleet.embedded.demo.stack import DEMO_JOBS
    from gpufleet.pipeline.commands.common import resolve

    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    data_dir = tmp_path / "demo"
    data_dir.mkdir()
    DemoState(child.pid, "http://127.0.0.1:1", f"chdb://{tmp_path}/s", "db", "127.0.0.1:1",
              jobs={"stall": {"for_s": 15.0, "max_gap_s": 15.0}, "straggler": {"for_s": 15.0}}).write(data_dir)
    assert resolve(None, None, None, data_dir).cfg.jobs == DEMO_JOBS
    assert DEMO_JOBS.stall.for_s == DEMO_JOBS.straggler.for_s == 15.0
    own = tmp_path / "jobs.yaml"
    own.write_text("jobs: {stall: {for_s: 120}}\n")
    assert resolve(str(own), None, None, data_dir).cfg.jobs.stall.for_s == 120.0
    assert resolve(None, f"chdb://{tmp_path}/s", None, data_dir).cfg.jobs == JobsConfig()  # not through the state
