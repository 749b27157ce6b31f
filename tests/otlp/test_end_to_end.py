"""A real SDK job -> the receiver -> per-GPU FLOPs stamped into node reports -> gpu_samples in chDB."""

from __future__ import annotations

import time

from clickhouse_connect.driver.client import Client

from gpufleet.agents.otlp import OtlpReceiver, ReceiverSettings
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from tests.builders import gpu, report
from tests.otlp.otlp_builders import sdk_counter

ROSTER = {0: "GPU-n1-0", 1: "GPU-n1-1", 2: "GPU-n1-2"}  # the uuids tests.builders.gpu gives node n1


def test_measured_flops_reach_clickhouse_exactly(ch_target: Target, ch_client: Client) -> None:
    pinned = time.time_ns() // 1_000_000
    with OtlpReceiver(ReceiverSettings(port=0), clock=lambda: pinned, gpus=ROSTER) as receiver:
        with sdk_counter(receiver.endpoint, {"cuda.visible_devices": "0,1", "job.id": "train"}) as (flops, p):
            flops.add(6 * 7_000_000_000 * 1024)  # one step of a 7B model on 1024 tokens
            assert p.force_flush()
        with sdk_counter(receiver.endpoint, {"gpu.uuid": "GPU-n1-1", "job.id": "eval"}) as (flops, p):
            flops.add(2 * 7_000_000_000 * 512)
            assert p.force_flush()
        source = receiver.flops_source
        reports = []
        for seq in range(2):  # the agent's loop: take, stamp, send
            now = pinned + 3_600_000 + seq * 1000
            measured = source.take(now, 1000)
            gpus = [gpu(i, flops_measured=measured.get(ROSTER[i])) for i in range(3)]
            reports.append(report(seq=seq, time_ms=now, gpus=gpus))
    insert_reports(Store(ch_client, ch_target.database), reports, ingest_ms=pinned)
    rows = ch_client.query(
        f"SELECT gpu_index, sum(flops_measured), count(flops_measured) FROM {ch_target.database}.gpu_samples "
        "GROUP BY gpu_index ORDER BY gpu_index"
    ).result_rows
    train, evaluation = 6 * 7_000_000_000 * 1024, 2 * 7_000_000_000 * 512
    # One row per GPU carries FLOPs (the second interval had none due); GPU 2 never reported: NULL, never 0.
    assert rows == [(0, train / 2, 1), (1, train / 2 + evaluation, 1), (2, None, 0)]
