"""`gpufleet demo --duration 90` fires every node-side alert, each on what the simulator's ground truth says
broke: the GPU that needs a reset, the node that needs a reboot, the GPU whose fabric degraded, the port
that flapped, the GPU that went missing, the node whose driver drifted.

The demo's packaged rules (`pipeline/alerts/demo_rules.yaml`) have windows of seconds; the faults start
20-60 s into the run. The check reads the alerts table the run leaves (every episode, fired or not, with
its labels), never a timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration  # starts the whole demo stack

NODES, GPUS = 8, 8  # 56 GPU slots outside the silent node: every default fault kind fits
WAIT_S = 400  # generous bound on the whole run; never a speed assertion


def _run(data_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gpufleet", "demo", "--duration", "90", "--quiet", "--no-alertmanager",
         "--data-dir", str(data_dir), "--nodes", str(NODES), "--gpus", str(GPUS), "--flops-jobs", "0"],
        capture_output=True, text=True, timeout=WAIT_S, env={**os.environ, "GPUFLEET_CONFIG": ""}, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


_READ_ALERTS = """
import json, sys
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
state = json.load(open(sys.argv[1]))
store = Store.open(Target(state["dsn"], state["database"]))
rows = store.rows("SELECT alertname, labels FROM {db:Identifier}.alerts FINAL WHERE state IN ('firing', 'resolved')")
print(json.dumps([[name, dict(labels)] for name, labels in rows]))
"""
"""Read in a process of its own: chDB serves one store per process, and this one may hold the tests' store."""


def _fired(data_dir: Path) -> list[tuple[str, dict[str, str]]]:
    done = subprocess.run([sys.executable, "-c", _READ_ALERTS, str(data_dir / "state.json")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "GPUFLEET_CONFIG": ""}, check=False)
    assert done.returncode == 0, done.stderr
    return [(name, labels) for name, labels in json.loads(done.stdout.strip().splitlines()[-1])]


def test_every_node_signal_alert_fires_on_its_ground_truth(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    _run(data_dir)
    truth = json.loads((data_dir / "ground-truth.json").read_text())
    fired = _fired(data_dir)
    faults: dict[str, dict[str, Any]] = {f["kind"]: f for f in truth["faults"]}

    def labels_of(name: str) -> list[dict[str, str]]:
        return [labels for n, labels in fired if n == name]

    reset, reboot = faults["needs_reset"], faults["needs_reboot"]
    assert {(x["node"], x["gpu"], x["action"]) for x in labels_of("GpuNeedsReset")} == {
        (reset["node"], reset["uuid"], "gpu_reset")}
    assert {(x["node"], x["action"]) for x in labels_of("NodeNeedsReboot")} == {(reboot["node"], "node_reboot")}
    fabric = faults["fabric_degraded"]
    assert {(x["node"], x["gpu"]) for x in labels_of("FabricDegraded")} == {(fabric["node"], fabric["uuid"])}
    flap = faults["ib_port_flap"]
    port = tuple(flap["port"].split("/"))
    for name in ("NetworkPortDown", "NetworkPortDegraded"):
        assert {(x["node"], x["device"], x["port"]) for x in labels_of(name)} == {(flap["node"], *port)}, name
    missing = faults["gpu_missing"]
    assert {(x["node"], x["gpu"]) for x in labels_of("GpuMissing")} == {(missing["node"], missing["uuid"])}
    drift = faults["driver_drift"]
    assert {(x["node"], x["field"]) for x in labels_of("NodeConfigDrift")} == {(drift["node"], "driver_version")}
