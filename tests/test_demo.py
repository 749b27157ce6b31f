"""`gpufleet demo` end to end: a short run, then `gpufleet status --json` against its ground truth.

The demo starts tansu, chDB, Alertmanager (when installed), the simulated agents with FLOPs-reporting
jobs, the ingester and the alert evaluator; after it stops, no process it started may be left.
Expected figures come from the ground truth the demo writes (`ground-truth.json`), not constants.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.integration  # starts a server or a process

DURATION_S = 40
NODES, GPUS = 4, 2
SILENT_AFTER_MS = 30_000  # health.silent_after_s in the default config: "reporting" looks this far back
WAIT_S = 120  # generous bound on the whole run; never a speed assertion


def run_demo(data_dir: Path, duration_s: int = DURATION_S, nodes: int = NODES, gpus: int = GPUS) -> tuple[
        str, list[psutil.Process]]:
    """Run the demo to its end; its output, and every process it started (seen while it ran)."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "gpufleet", "demo", "--duration", str(duration_s), "--quiet", "--data-dir",
         str(data_dir), "--nodes", str(nodes), "--gpus", str(gpus)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "GPUFLEET_CONFIG": ""},
    )
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + WAIT_S + duration_s
    try:
        parent = psutil.Process(demo.pid)
        while demo.poll() is None and time.monotonic() < deadline:
            try:
                for p in parent.children(recursive=True):
                    seen.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.5)
        output = demo.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, output
    return output, list(seen.values())


def read(data_dir: Path, *args: str) -> Any:
    """`gpufleet <args> --json --data-dir <data_dir>`'s JSON."""
    out = subprocess.run(
        [sys.executable, "-m", "gpufleet", *args, "--json", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=WAIT_S, env={**os.environ, "GPUFLEET_CONFIG": ""}, check=True,
    )
    return json.loads(out.stdout)


def status(data_dir: Path) -> dict:
    return read(data_dir, "status")


def test_demo_runs_reports_mfu_from_both_sources_and_leaves_no_process(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    output, started = run_demo(data_dir)
    doc = status(data_dir)
    truth = json.loads((data_dir / "ground-truth.json").read_text())
    bootstrap = json.loads((data_dir / "state.json").read_text())["bootstrap"]

    # What the ground truth says should be reporting at the newest sample: every node except one
    # that a node_silent fault kept quiet over the whole look-back window.
    last_ms = int(dt.datetime.fromisoformat(doc["last_sample_at"]).timestamp() * 1000)
    silent = {f["node"] for f in truth["faults"]
              if f["kind"] == "node_silent" and f["start_ms"] <= last_ms - SILENT_AFTER_MS and f["end_ms"] > last_ms}
    assert len(truth["nodes"]) == NODES
    assert doc["nodes_reporting"] == NODES - len(silent)
    assert doc["gpus_reporting"] == sum(g["node"] not in silent for g in truth["gpus"])
    assert doc["gpus_reporting"] == 8  # the default faults silence no node within 40 s (node_silent starts at 60 s)
    assert doc["samples_total"] > 0
    assert doc["dlq_total"] == 0
    assert doc["tenants"]
    assert set(doc["tenants"]) <= {a["tenant"] for a in truth["allocations"]}
    # Jobs report FLOPs over OTLP on some GPUs; the others' MFU is the tensor-activity estimate.
    assert doc["mfu_source"] == "mixed"
    assert 0 < doc["mfu_measured_coverage"] < 1

    assert "socket disconnected" not in output  # Kafka clients closed before the broker stopped
    assert "Traceback" not in output
    assert started, "the demo started no process"
    assert [p for p in started if p.is_running()] == []
    leftovers = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if str(data_dir) in cmdline or bootstrap in cmdline:
            leftovers.append(cmdline)
    assert leftovers == []


def test_a_90_s_demo_fires_job_stalled_and_job_straggler_on_the_injected_job_faults(tmp_path: Path) -> None:
    """The demo's job faults (a hung job from 20 s, a straggler from 25 s, a minute each) fire their alerts
    through the packaged demo rules, and `gpufleet alerts history` names the job, node and GPU the simulator's
    ground truth gives; `gpufleet jobs` counts the hung job's stalled time (the demo's 15 s windows)."""
    data_dir = tmp_path / "demo"
    run_demo(data_dir, duration_s=90, nodes=8, gpus=4)
    truth = {f["kind"]: f for f in json.loads((data_dir / "ground-truth.json").read_text())["faults"]}
    hang, straggler = truth["job_hang"], truth["straggler"]
    fired = read(data_dir, "alerts", "history")
    stalled = [a for a in fired if a["alertname"] == "JobStalled"]
    assert [(a["labels"]["tenant"], a["labels"]["job"]) for a in stalled] == [(hang["tenant"], hang["job"])]
    assert stalled[0]["annotations"]["description"].startswith(
        f"GPUs: {', '.join(sorted(g['uuid'] for g in hang['gpus']))}.")
    lagging = [a["labels"] for a in fired
               if a["alertname"] == "JobStraggler" and a["labels"]["job"] == straggler["job"]]
    assert [(lab["node"], lab["gpu"], lab["gpu_index"], lab["tenant"]) for lab in lagging] == [
        (straggler["node"], straggler["uuid"], str(straggler["gpu"]), straggler["tenant"])]
    jobs = {(j["tenant"], j["job"]): j for j in read(data_dir, "jobs", "--since", "5m")["jobs"]}
    assert jobs[(hang["tenant"], hang["job"])]["stalled_gpu_seconds"] > 0
