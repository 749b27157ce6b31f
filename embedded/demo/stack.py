"""Starts and stops the embedded stack: broker, store, Alertmanager, simulated agents, ingester, evaluator.

Children run in their own process groups and are stopped in reverse order on any exit path
(normal end, `--duration`, Ctrl-C, SIGTERM, or an error during start-up).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from gpufleet import config as config_mod
from gpufleet import kafka
from gpufleet.config import Config, JobsConfig, StallConfig, StragglerConfig
from gpufleet.embedded.alertmanager import EmbeddedAlertmanager, find_binary
from gpufleet.embedded.broker import EmbeddedBroker
from gpufleet.embedded.demo.state import DEFAULT_DATA_DIR, DemoState
from gpufleet.pipeline.ingest.consumer import build_ingester
from gpufleet.pipeline.ingest.ingester import Ingester
from gpufleet.pipeline.queries.policy import sync_policy
from gpufleet.pipeline.queries.status import fleet_status
from gpufleet.pipeline.queries.status_api import StatusServer
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

log = logging.getLogger(__name__)


DEMO_JOBS = JobsConfig(stall=StallConfig(for_s=15.0, max_gap_s=15.0), straggler=StragglerConfig(for_s=15.0))
"""The demo's one-minute job faults count as stalled and straggling after 15 s (the demo rules' windows),
unless the config sets `jobs`; `gpufleet jobs` and the boards read the demo's store with the same."""


@dataclass
class DemoOptions:
    data_dir: Path = DEFAULT_DATA_DIR
    nodes: int = 32
    gpus: int = 8
    tenants: int = 3
    seed: int = 7
    interval_s: float = 1.0
    faults: str = "default"
    alertmanager: bool = True
    keep_data: bool = False
    flops_jobs: int = 2


@dataclass
class DemoStack:
    opts: DemoOptions
    cfg: Config = field(default_factory=Config)
    broker: EmbeddedBroker | None = None
    alertmanager: EmbeddedAlertmanager | None = None
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    ingester: Ingester | None = None
    evaluator: Any = None
    status_api: StatusServer | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    target: Target | None = None

    def start(self, say: Callable[[str], None] = lambda _: None) -> DemoStack:
        o = self.opts
        o.data_dir.mkdir(parents=True, exist_ok=True)
        store_dir = o.data_dir / "clickhouse"
        if not o.keep_data:
            for stale in (store_dir, o.data_dir / "spool", o.data_dir / "alertmanager"):
                shutil.rmtree(stale, ignore_errors=True)
        self.broker = EmbeddedBroker(log_path=o.data_dir / "broker.log").start()
        say(f"broker (tansu) on {self.broker.bootstrap}")
        self.target = Target(f"chdb://{store_dir.resolve()}", "gpufleet")
        cfg = self.cfg
        cfg = msgspec.structs.replace(
            cfg,
            kafka=msgspec.structs.replace(cfg.kafka, bootstrap_servers=self.broker.bootstrap, partitions=4),
            ingest=msgspec.structs.replace(cfg.ingest, max_poll_interval_ms=5000, session_timeout_ms=5000),
        )
        if cfg.jobs == JobsConfig():
            cfg = msgspec.structs.replace(cfg, jobs=DEMO_JOBS)
        self.cfg = cfg = config_mod.with_clickhouse(cfg, self.target.dsn, self.target.database)
        kafka.ensure_topics(cfg.kafka)
        ch = Store.open(self.target, create=True)  # the demo owns its store, so it creates it
        migrate(ch.client, SchemaOptions.from_config(cfg))
        sync_policy(ch, cfg.billing, int(time.time() * 1000))
        say(f"store (chDB) at {store_dir}")
        if o.alertmanager and find_binary():
            self.alertmanager = EmbeddedAlertmanager(o.data_dir / "alertmanager").start()
            say(f"Alertmanager on {self.alertmanager.url}")
        elif o.alertmanager:
            say("Alertmanager not installed (apt-get install prometheus-alertmanager): alerts stay in ClickHouse only")
        self._start_agents()
        say(f"simulated fleet: {o.nodes} nodes x {o.gpus} GPUs, {o.tenants} tenants, faults={o.faults}")
        self.ingester = build_ingester(cfg, ch)
        self._thread("ingester", self.ingester.run, self.stop_event)
        self._start_evaluator()
        status_store = Store.open(self.target)
        self.status_api = StatusServer(lambda: fleet_status(status_store, cfg)).start()
        DemoState(
            pid=os.getpid(), status_url=self.status_api.url, dsn=self.target.dsn, database=self.target.database,
            bootstrap=self.broker.bootstrap, alertmanager_url=self.alertmanager.url if self.alertmanager else None,
            jobs=msgspec.to_builtins(cfg.jobs),
        ).write(o.data_dir)
        return self

    def _start_agents(self) -> None:
        o = self.opts
        cmd = [
            sys.executable, "-m", "gpufleet", "agent", "--backend", "simulated",
            "--bootstrap", self.broker.bootstrap if self.broker else "", "--topic", self.cfg.kafka.topic,
            "--nodes", str(o.nodes), "--gpus", str(o.gpus), "--tenants", str(o.tenants), "--seed", str(o.seed),
            "--interval", str(o.interval_s), "--faults", o.faults, "--spool-dir", str(o.data_dir / "spool"),
            "--ground-truth", str(o.data_dir / "ground-truth.json"), "--flops-jobs", str(o.flops_jobs),
        ]
        self._spawn(cmd, o.data_dir / "agents.log")

    def _spawn(self, cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        out = open(log_path, "ab")  # noqa: SIM115 (owned by the child)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append(proc)
        return proc

    def _start_evaluator(self) -> None:
        from gpufleet.pipeline.alerts.evaluator import Evaluator
        from gpufleet.pipeline.alerts.rules import DEMO_RULES, packaged_rules

        am = self.alertmanager.url if self.alertmanager else None
        # The demo's faults last a minute, so unless a rules file is configured it uses the packaged
        # demo rules: the production rules with 15-20 s windows instead of 10-15 minutes.
        rules = None if self.cfg.alerts.rules_file else packaged_rules(DEMO_RULES)
        self.evaluator = Evaluator(self.cfg, Store.open(self.target), alertmanager_url=am, rules=rules)
        self._thread("alerts", self.evaluator.run, self.stop_event)

    def _thread(self, name: str, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def children_alive(self) -> bool:
        return all(p.poll() is None for p in self.children) and (self.broker is None or self.broker.running)

    def stop(self) -> None:
        """Stop everything, newest first; safe to call twice."""
        for proc in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.children:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.children.clear()
        # Let the ingester drain what the agents flushed on their way out, then stop it.
        time.sleep(2 * self.cfg.ingest.batch_ms / 1000)
        self.stop_event.set()
        for t in self.threads:
            t.join(30)
        self.threads.clear()
        if self.ingester is not None:  # before the broker goes: no "socket disconnected" errors on a clean stop
            with contextlib.suppress(Exception):
                self.ingester.consumer.close()
            with contextlib.suppress(Exception):
                self.ingester.dlq.close()
        if self.status_api is not None:
            self.status_api.stop()
            self.status_api = None
        if self.alertmanager is not None:
            self.alertmanager.stop()
        if self.broker is not None:
            self.broker.stop()
        # state.json stays: `gpufleet status` then finds the store, and sees the pid is gone.
