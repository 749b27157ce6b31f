"""`make gpu-smoke` works before it meets a GPU: the whole check against the pynvml fake, one JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import gpu_smoke

pytestmark = pytest.mark.integration  # the whole tool for a few seconds of wall time, not a unit


def test_the_smoke_check_runs_against_the_fake_and_writes_one_report(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    assert gpu_smoke.main(["--fake", "--duration", "4", "--interval", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "fake"
    assert len(report["inventory"]["gpus"]) == gpu_smoke.FAKE_GPUS
    assert report["inventory"]["gpus"][0]["gpm_supported"] is True
    fields = report["fields"]["0"]
    assert fields["energy"].startswith("ok ")
    assert (fields["nvlink_dl_crc"], fields["nvlink5_symbol_errors"]) == ("ok 0", "Not Supported")  # an H100
    assert set(report["latency_ms"]) >= {"nvmlDeviceGetFieldValues(fast batch)", "nvmlDeviceGetSamples"}
    assert all(not v["errors"] for v in report["latency_ms"].values())
    run = report["run"]
    # counted by the collector, as AgentHealth carries it: 12 per GPU, plus one UUID look-up for each XID event
    # delivered under another handle (one every other interval here)
    assert 12.0 <= run["nvml_calls_per_gpu_per_interval"] <= 12.0 + 1 / gpu_smoke.FAKE_GPUS
    assert (run["nvml_errors_total"], run["deadline_misses_total"], run["error_samples"]) == (0, 0, {})
    assert run["agent_cpu_ms_per_interval"]["n"] >= 1
    events = report["events"]
    assert set(events["xid_registration_by_agent"].values()) == {"registered"}
    assert events["xids_reported_by_agent"] >= 1
    assert "unmatched" not in events["delivered"]
    assert {"matched by handle", "matched by UUID"} <= set(events["delivered"])
    for gpu in report["energy"]:  # counter deltas against the power readings held over each interval
        assert 0.8 < gpu["ratio"] < 1.2
    assert report["utilization"]["raw_sample_range"][1] <= 100  # percent
