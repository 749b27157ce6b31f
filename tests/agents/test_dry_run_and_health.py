"""`gpufleet agent --dry-run [--intervals N]` prints the node's messages and touches nothing; the agent's
`/healthz` and `/readyz` follow its collections (`agent.health_port`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gpufleet.agents.command import Collected, apply_overrides
from gpufleet.config import Config
from gpufleet.embedded.broker import EmbeddedBroker, free_port
from gpufleet.wire import decode

REPO = Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUFLEET_", "PYTEST_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def dry_run(args: list[str], cwd: Path, executable: list[str] | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    cmd = [*(executable or [sys.executable, "-m", "gpufleet"]), "agent", "--dry-run", *args]
    return subprocess.run(cmd, capture_output=True, cwd=cwd, env=env or child_env(), timeout=120, check=False)


def check_dry_run_output(done: subprocess.CompletedProcess[bytes], nodes: int, intervals: int) -> list[Any]:
    """Exactly `intervals` messages per node, each a valid wire message, seqs 0.. per node, one boot id each."""
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    lines = done.stdout.decode().splitlines()
    reports = [decode(line.encode()) for line in lines]
    assert len(reports) == nodes * intervals
    by_node: dict[str, list[int]] = {}
    for r in reports:
        by_node.setdefault(r.node, []).append(r.seq)
    assert by_node == {n: list(range(intervals)) for n in by_node}
    assert len(by_node) == nodes
    assert len({(r.node, r.boot_id) for r in reports}) == nodes
    assert f"dry run, {nodes * intervals} messages printed, nothing sent" in done.stderr.decode()
    return reports


def test_dry_run_prints_each_interval_and_opens_no_spool(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    done = dry_run(["--backend", "simulated", "--nodes", "2", "--gpus", "3", "--intervals", "2",
                    "--spool-dir", str(spool), "--bootstrap", "127.0.0.1:1"], tmp_path)
    reports = check_dry_run_output(done, nodes=2, intervals=2)
    assert {len(r.gpus) for r in reports} == {3}
    assert not spool.exists(), "a dry run spools nothing"


def test_dry_run_refuses_flops_jobs(tmp_path: Path) -> None:
    done = dry_run(["--backend", "simulated", "--nodes", "1", "--flops-jobs", "1", "--intervals", "1"], tmp_path)
    assert done.returncode == 2
    assert b"--flops-jobs needs receivers, which a --dry-run does not start" in done.stderr


def test_node_flag_names_the_node() -> None:
    assert apply_overrides(Config(), node="gpu-17").agent.node == "gpu-17"
    assert apply_overrides(Config(), node=None).agent.node == Config().agent.node


class Spool:
    def __init__(self) -> None:
        self.next_seq = 5


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def test_collected_beats_only_when_a_message_was_taken() -> None:
    spools, clock = [Spool(), Spool()], Clock()
    c = Collected(spools, 30.0, clock)
    assert c.liveness.check().ok
    assert not c.liveness.check(ready=True).ok
    c.check()  # an interval that spooled nothing (NVML down): no beat
    assert not c.liveness.check(ready=True).ok
    spools[1].next_seq += 1
    clock.now += 5
    c.check()
    assert c.liveness.check(ready=True).ok
    assert c.ticks == 2
    clock.now += 31
    c.check()  # nothing new for longer than the bound
    assert c.liveness.check().stale == ["collect"]


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_the_agent_serves_readiness_once_it_has_collected(tmp_path: Path, broker: EmbeddedBroker) -> None:
    port = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({
        "kafka": {"bootstrap_servers": broker.bootstrap, "topic": "health-topic"},
        "agent": {"backend": "simulated", "spool_dir": str(tmp_path / "spool"), "health_port": port,
                  "collect_stale_s": 30},
    }))
    env = child_env()
    env["GPUFLEET_CONFIG"] = str(config)
    proc = subprocess.Popen([sys.executable, "-m", "gpufleet", "agent", "--nodes", "1", "--gpus", "1",
                             "--duration", "60"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while get(f"http://127.0.0.1:{port}/readyz") != 200:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the agent never became ready"
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["ok"] is True
        assert body["checks"]["collect"]["bound_s"] == 30.0
    finally:
        proc.terminate()
        proc.wait(30)


def test_help_documents_dry_run(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "gpufleet", "agent", "--help"], capture_output=True,
                          env=child_env(), cwd=tmp_path, timeout=60, check=False)
    for flag in ("--dry-run", "--intervals", "--node"):
        assert flag in done.stdout.decode()


def test_an_agent_that_released_nvml_on_request_stays_alive() -> None:
    spools, clock, released = [Spool()], Clock(), [False]
    c = Collected(spools, 30.0, clock, released=lambda: released[0])
    released[0] = True  # the operator's release file: nothing is spooled, by design
    for _ in range(4):
        clock.now += 20
        c.check()
    assert c.liveness.check(ready=True).ok  # a liveness probe must not restart it into holding NVML
    released[0] = False
    clock.now += 31
    c.check()
    assert c.liveness.check().stale == ["collect"]
