"""The job view (`gpufleet jobs`) on hand-built one-minute samples: GPUs, nodes, MFU, stalled time,
stragglers and throughput per job, every figure worked out by hand; and the command's JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from gpufleet.cli import cli
from gpufleet.config import JobsConfig, StallConfig, StragglerConfig
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries.jobs import Straggler, job_view
from gpufleet.pipeline.queries.window import Window, iso
from gpufleet.wire import GpuSample
from tests.builders import gpu, report

M = 1_794_999_600_000  # 2026-11-18T11:00:00Z
MIN = 60_000
PEAK = 989e12  # H100 SXM dense BF16
WINDOW = Window(M, M + 10 * MIN)
CFG = JobsConfig(stall=StallConfig(for_s=300), straggler=StragglerConfig(for_s=300))


def _train(i: int, node: str, k: int) -> GpuSample:
    """"train" (acme): 3 GPUs on 2 nodes; computes and reports until minute 4, then hangs (flat FLOPs, no tokens)."""
    common: dict[str, Any] = {"tenant": "acme", "job": "train", "compute_processes": 1}
    if k <= 4:
        return gpu(i, node, util_gpu_ratio=0.95, tensor_active_ratio=0.5, power_w=600.0,
                   flops_measured=0.4 * PEAK * 60, tokens_measured=1000.0, samples_measured=2.0, **common)
    return gpu(i, node, util_gpu_ratio=1.0, tensor_active_ratio=0.0, power_w=90.0, flops_measured=0.0,
               tokens_measured=0.0, samples_measured=0.0, **common)


def _pair(i: int, k: int) -> GpuSample:
    """"pair" (beta): 2 GPUs on n3, busy, no OTLP; GPU 1's SM clock is held at 1500 MHz."""
    return gpu(i, "n3", tenant="beta", job="pair", util_gpu_ratio=0.95, tensor_active_ratio=0.5, power_w=600.0,
               clock_sm_mhz=1500 if i == 1 else 1980, clock_event_reasons=0)


@pytest.fixture
def store(ch_store: Any) -> Any:
    reports = []
    for k in range(1, 11):
        t = M + k * MIN
        reports += [report(node="n1", seq=k, time_ms=t, interval_ms=MIN, gpus=[_train(0, "n1", k), _train(1, "n1", k)]),
                    report(node="n2", seq=k, time_ms=t, interval_ms=MIN, gpus=[_train(0, "n2", k)]),
                    report(node="n3", seq=k, time_ms=t, interval_ms=MIN, gpus=[_pair(0, k), _pair(1, k)])]
    insert_reports(ch_store, reports, M)
    return ch_store


def test_every_column_by_hand(store: Any) -> None:
    train, pair = job_view(store, WINDOW, CFG)
    # 12 measured GPU-minutes at 40 % and 18 at 0 % of 30: MFU 0.16, all measured
    assert (train.tenant, train.job, train.clusters, train.gpus, train.nodes) == ("acme", "train", ["c1"], 3,
                                                                                 ["n1", "n2"])
    assert (train.gpu_seconds, train.first_seen, train.last_seen) == (1800.0, iso(M), iso(M + 10 * MIN))
    assert train.mfu == pytest.approx(0.16, rel=1e-12)
    assert train.mfu_source == "measured"
    # hung from minute 4 to 10: 3 GPUs x 6 minutes, longer than jobs.stall.for_s (5 minutes)
    assert (train.stalled_gpu_seconds, train.stalled_since) == (1080.0, iso(M + 4 * MIN))
    # 12 GPU-minutes x 1000 tokens (2 samples) over the job's 600 s
    assert (train.tokens, train.samples, train.tokens_per_s, train.samples_per_s) == (12_000.0, 24.0, 20.0, 0.04)
    assert train.stragglers == []  # hung GPUs are alike: none lags the others

    assert (pair.tenant, pair.job, pair.gpus, pair.nodes, pair.mfu_source) == ("beta", "pair", 2, ["n3"], "estimated")
    assert pair.mfu == pytest.approx(0.5, rel=1e-6)  # the tensor-activity estimate (Float32 0.5 is exact)
    assert (pair.stalled_gpu_seconds, pair.stalled_since) == (0.0, None)
    assert (pair.tokens, pair.tokens_per_s, pair.samples_per_s) == (None, None, None)  # reports no throughput
    # the straggler test over the last 5 minutes: 1500 MHz against the median (1980 + 1500) / 2
    assert pair.stragglers == [Straggler("n3", "GPU-n3-1", 1, "clock", iso(M + 5 * MIN), 1500.0, 1740.0)]


def test_a_stall_shorter_than_for_s_is_no_stalled_time(store: Any) -> None:
    long_for = JobsConfig(stall=StallConfig(for_s=420), straggler=CFG.straggler)  # 7 minutes: train hung for 6
    train, _ = job_view(store, WINDOW, long_for)
    assert (train.stalled_gpu_seconds, train.stalled_since) == (0.0, None)


def test_one_tenant_and_the_command(store: Any, ch_target: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert [j.job for j in job_view(store, WINDOW, CFG, tenant="beta")] == ["pair"]
    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    target = ["--dsn", ch_target.dsn, "--database", ch_target.database]
    result = CliRunner().invoke(cli, ["jobs", "--json", "--since", "10m", *target])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["window"] == {"from": iso(M), "to": iso(M + 10 * MIN)}  # ends at the newest sample
    # config defaults, 10 minutes: train hung for 6 (no stalled time), pair's GPU 1 lagged for all 10
    assert [(j["tenant"], j["job"], j["stalled_gpu_seconds"]) for j in doc["jobs"]] == [("acme", "train", 0.0),
                                                                                        ("beta", "pair", 0.0)]
    assert doc["jobs"][1]["stragglers"] == [{"node": "n3", "gpu": "GPU-n3-1", "gpu_index": 1, "cause": "clock",
                                             "since": iso(M), "clock_mhz": 1500.0, "job_clock_mhz": 1740.0}]
    result = CliRunner().invoke(cli, ["jobs", "--tenant", "acme", "--since", "10m", *target])
    assert result.exit_code == 0, result.output
    assert "train" in result.output
    assert "pair" not in result.output
    bad = CliRunner().invoke(cli, ["jobs", "--since", "ten minutes", *target])
    assert bad.exit_code == 2
    assert "'ten minutes' is not a duration" in bad.output
