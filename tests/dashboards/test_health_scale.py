"""The health board's fleet panels that read only the GPUs (or nodes) the hour level picks, by hand.

A GPU whose error counter did not change, with no link down or no throttle bit counted adds nothing to
those panels and is not read; every interval with any rollup row still has its point. The not-ok timeline
(the GPUs not ok the longest, fewer than its limit here) is checked beside them; its pick: test_health_top.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from gpufleet.gpu_facts import THROTTLE_GPU_IDLE, THROTTLE_SW_POWER_CAP, THROTTLE_SW_THERMAL
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target
from tests.builders import gpu, report
from tests.dashboards.conftest import board_answers

M = 1_794_999_600_000  # 2026-11-18T11:00:00Z, an hour boundary
MIN = 60_000
WEEK = 7 * 86_400_000


def _load(target: Target, client: Any) -> None:
    """n1 reports minutes 0-4, n2 minutes 0-5 (each sample's interval is its minute)."""
    def n1(i: int) -> Any:
        return report("n1", seq=i, time_ms=M + (i + 1) * MIN, interval_ms=MIN, gpus=[
            gpu(0, "n1", ecc_corrected_volatile=[0, 0, 3, 3, 5][i],
                clock_event_reasons=THROTTLE_SW_POWER_CAP if i == 3 else 0),
            gpu(1, "n1", ecc_corrected_volatile=7, clock_event_reasons=THROTTLE_SW_THERMAL if i == 1 else 0),
            gpu(2, "n1", nvlink_links_down=1 if i == 1 else 0, pcie_replay_count=2),
        ])

    def n2(i: int) -> Any:
        return report("n2", seq=i, time_ms=M + (i + 1) * MIN, interval_ms=MIN, gpus=[
            gpu(0, "n2", clock_event_reasons=THROTTLE_GPU_IDLE, nvlink_replay_errors=4 if i == 5 else 0,
                temp_gpu_c=[60.0, 61.0, 62.0, 63.0, 64.0, 65.0][i]),
        ])

    insert_reports(Store(client, target.database), [*(n1(i) for i in range(5)), *(n2(i) for i in range(6))],
                   ingest_ms=M + 10 * MIN)


def _answers(target: Target, start: int, end: int) -> dict[str, list[Any]]:
    return board_answers(target, "gpufleet-health", start, end, MIN)


def _m(i: int) -> datetime:
    return datetime(2026, 11, 18, 11) + timedelta(minutes=i)  # naive UTC, as the client returns it


def test_minute_buckets_read_only_the_picked_gpus_and_keep_every_point(ch_target: Target, ch_client: Any) -> None:
    _load(ch_target, ch_client)
    got = _answers(ch_target, M, M + 6 * MIN - 1000)
    # n1/0's counter 0, 0, 3, 3, 5; n1/1 stays at 7 (not read); minute 5 holds n2's rows only: its point is 0
    assert got["ECC errors"] == [(_m(0), 0, 0), (_m(1), 0, 0), (_m(2), 3, 0), (_m(3), 0, 0), (_m(4), 2, 0),
                                 (_m(5), 0, 0)]
    # n2/0's replay errors 0 -> 4 in minute 5; n1/2's link down in minute 1, its PCIe replays constant
    assert got["NVLink and PCIe errors"] == [(_m(0), 0, 0, 0), (_m(1), 0, 0, 1), (_m(2), 0, 0, 0),
                                             (_m(3), 0, 0, 0), (_m(4), 0, 0, 0), (_m(5), 4, 0, 0)]
    # n2/0's idle bit is not counted: minute 5 is 0
    assert got["Throttled GPUs"] == [(_m(0), 0, 0, 0), (_m(1), 1, 0, 0), (_m(2), 0, 0, 0), (_m(3), 0, 0, 1),
                                     (_m(4), 0, 0, 0), (_m(5), 0, 0, 0)]
    # thermal throttling degrades n1/1, a link down fails n1/2, replay growth degrades n2/0; n1/0 stays ok
    assert got["Health timeline of the 20 GPUs not ok the longest"] == [
        (_m(0), "n1 / GPU 1", 0), (_m(0), "n1 / GPU 2", 0), (_m(0), "n2 / GPU 0", 0),
        (_m(1), "n1 / GPU 1", 1), (_m(1), "n1 / GPU 2", 2),
        (_m(2), "n1 / GPU 1", 0), (_m(2), "n1 / GPU 2", 0),
        (_m(5), "n2 / GPU 0", 1),
    ]


def test_hourly_buckets(ch_target: Target, ch_client: Any) -> None:
    _load(ch_target, ch_client)
    got = _answers(ch_target, M + 2 * 3_600_000 - WEEK, M + 2 * 3_600_000)
    hour = _m(0)
    assert got["ECC errors"] == [(hour, 0, 0)]  # one interval per GPU: its first counts 0
    assert got["NVLink and PCIe errors"] == [(hour, 0, 0, 1)]
    assert got["Throttled GPUs"] == [(hour, 1, 0, 1)]
    assert got["Health timeline of the 20 GPUs not ok the longest"] == [
        (hour, "n1 / GPU 1", 1), (hour, "n1 / GPU 2", 2), (hour, "n2 / GPU 0", 1)]
