"""The job-side helper: GPU resolution into resource attributes, and real exports to a running receiver."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.agents.otlp import OtlpReceiver, ReceiverSettings
from gpufleet.report_flops import Reporter, gpu_attributes
from tests.otlp.otlp_builders import GPUS, A, B, C, D

pytestmark = pytest.mark.integration  # starts a server or a process

HOUR_MS = 3_600_000
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pinned() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def receiver(pinned: int) -> Iterator[OtlpReceiver]:
    with OtlpReceiver(ReceiverSettings(port=0), clock=lambda: pinned, gpus=GPUS) as r:
        yield r


# -- which GPUs a job names ---------------------------------------------------------------------------


def test_cuda_visible_devices_goes_to_the_agent_as_is() -> None:
    assert gpu_attributes(None, None, {"CUDA_VISIBLE_DEVICES": " 2, 3 "}) == {"cuda.visible_devices": "2,3"}


def test_device_picks_one_entry_of_cuda_visible_devices() -> None:
    assert gpu_attributes(None, 1, {"CUDA_VISIBLE_DEVICES": "2,3"}) == {"cuda.visible_devices": "3"}
    assert gpu_attributes(None, 1, {}) == {"cuda.visible_devices": "1"}  # all GPUs visible: index = device


def test_uuids_go_as_gpu_uuids() -> None:
    env = {"CUDA_VISIBLE_DEVICES": f"{C},{D}"}
    assert gpu_attributes(None, None, env) == {"gpu.uuids": (C, D)}
    assert gpu_attributes([A], None, env) == {"gpu.uuids": (A,)}  # explicit wins over the environment


@pytest.mark.parametrize(
    ("gpus", "device", "env", "message"),
    [
        (None, None, {}, "cannot tell which GPUs this job uses"),
        (None, None, {"CUDA_VISIBLE_DEVICES": ""}, "the job sees no GPUs"),
        (None, 2, {"CUDA_VISIBLE_DEVICES": "0,1"}, "device=2 but the job sees 2 GPUs (0,1)"),
    ],
)
def test_unknowable_gpus_fail_with_a_clear_message(
    gpus: list[str] | None, device: int | None, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        gpu_attributes(gpus, device, env)


# -- real exports ---------------------------------------------------------------------------------------


def test_reporter_splits_over_cuda_visible_devices(receiver: OtlpReceiver, pinned: int) -> None:
    rep = Reporter("j1", endpoint=receiver.endpoint, environ={"CUDA_VISIBLE_DEVICES": "1,0"})
    try:
        rep.report_flops(6 * 1_000_000_000 * 2048)  # 6 x params x tokens for one step
        rep.report_flops(6 * 1_000_000_000 * 2048)
        assert rep.flush()
    finally:
        rep.shutdown()
    per_gpu = 2 * 6 * 1_000_000_000 * 2048 / 2
    assert receiver.flops_source.take(pinned + HOUR_MS, 1000) == {A: per_gpu, B: per_gpu}


def test_reporter_for_one_rank_of_several(receiver: OtlpReceiver, pinned: int) -> None:
    rep = Reporter("j2", device=1, endpoint=receiver.endpoint, environ={"CUDA_VISIBLE_DEVICES": f"{C},{D}"})
    try:
        rep.report_flops(5e12)
        assert rep.flush()
    finally:
        rep.shutdown()
    assert receiver.flops_source.take(pinned + HOUR_MS, 1000) == {D: 5e12}


def test_negative_or_nonfinite_amounts_are_refused(receiver: OtlpReceiver) -> None:
    rep = Reporter("j3", gpus=[A], endpoint=receiver.endpoint)
    try:
        with pytest.raises(ValueError, match="FLOPs must be a finite number >= 0, got -1"):
            rep.report_flops(-1)
        with pytest.raises(ValueError, match="tokens must be a finite number >= 0, got inf"):
            rep.report_tokens(float("inf"))
    finally:
        rep.shutdown()


def test_a_job_process_reports_through_the_module_level_helper(receiver: OtlpReceiver, pinned: int) -> None:
    job = textwrap.dedent("""
        from gpufleet import report_flops
        report_flops.init(job_id="subprocess-job")
        for step in range(3):
            report_flops.report_flops(6 * 125_000_000 * 4096)
            report_flops.report_tokens(4096)
        report_flops.shutdown()
    """)
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "CUDA_VISIBLE_DEVICES": "2",
           "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", job], env=env, cwd=REPO, check=True, timeout=60)
    assert receiver.flops_source.take(pinned + HOUR_MS, 1000) == {C: 3 * 6 * 125_000_000 * 4096}
    stats = receiver.stats()
    assert (stats.points_accepted_total, stats.points_rejected_total) == (2, 0)  # one FLOPs + one tokens point
