"""The health rollups' views after 0110 (newest state packed into one integer, the hour level fed with the
minute rows as they are): hand-computed rows of `gpu_health_1m` and `gpu_health_1h` for samples written
straight into `gpu_samples` (every view fills as in production), with ties in time, several minutes in one
insert block, a replayed block and a later block of the same hour.
"""

from __future__ import annotations

from typing import Any

from gpufleet.pipeline.store.client import Target

COLUMNS = ("time, interval_ms, ingest_time, cluster, node, boot_id, seq, gpu_index, gpu_uuid, model, tenant, job, "
           "health, health_reasons, xids, pcie_replay_count, ecc_corrected_volatile, error, compute_processes, "
           "util_gpu_ratio")


def _row(time: str, boot: str, seq: int, health: str, reasons: str = "[]", xids: str = "[]", pcie: str = "NULL",
         ecc: str = "NULL", tenant: str = "t1", processes: str = "1", util: str = "0.5") -> str:
    return (f"('2026-11-18 {time}', 10000, '2026-11-18 11:00:00', 'c1', 'n1', '{boot}', {seq}, 0, 'GPU-A', 'H100', "
            f"'{tenant}', 'j1', '{health}', {reasons}, {xids}, {pcie}, {ecc}, '', {processes}, {util})")


# One insert block over two minutes (10:00 and 10:01; a sample is filed under the minute its interval starts).
# At 10:01:30 two samples (two boots) share the time: the newest state is the greater, failing.
BLOCK = [
    _row("10:00:10.000", "b1", 1, "ok", pcie="5", ecc="2"),  # interval starts 10:00:00
    _row("10:00:20.000", "b1", 2, "degraded", "['ecc_sbe']", "[79, 48]", pcie="7", ecc="3", util="0.25"),
    _row("10:01:30.000", "b1", 3, "failing", "['xid_79']", "[79]", pcie="7", processes="0"),
    _row("10:01:30.000", "b2", 1, "ok", pcie="1", util="0.75"),
]
LATER = [_row("10:02:10.000", "b2", 2, "ok", "['ecc_sbe']", pcie="2", tenant="")]  # same hour, another block

MINUTE_SQL = """
SELECT minute, sum(samples), sum(reported_ms), sum(failing_ms), sum(degraded_ms), max(worst), max(last),
       sum(xid_events), arraySort(groupUniqArrayArray(reasons)), min(pcie_replay_min), max(pcie_replay_max),
       max(ecc_corrected_max), min(ecc_corrected_min), min(idle_util_min), sum(held_no_process)
FROM {db}.{table} GROUP BY minute ORDER BY minute
"""


def _insert(client: Any, db: str, rows: list[str]) -> None:
    client.command(f"INSERT INTO {db}.gpu_samples ({COLUMNS}) VALUES " + ", ".join(rows))


def _read(client: Any, db: str, table: str, level: str) -> list[tuple[Any, ...]]:
    sql = MINUTE_SQL.replace("minute", level).format(db=db, table=table)
    return [tuple(str(v) if i in (0, 6) else v for i, v in enumerate(r)) for r in client.query(sql).result_rows]


def test_minute_and_hour_rows_equal_the_hand_computed_ones(ch_target: Target, ch_client: Any) -> None:
    db = ch_target.database
    _insert(ch_client, db, BLOCK)
    _insert(ch_client, db, BLOCK)  # replayed block: deduplicated, in the views as well
    minute_rows = [
        # 10:00: ok then degraded (newest); ECC 2..3, PCIe 5..7; idle_util_min over allocated samples with a process
        ("2026-11-18 10:00:00", 2, 20000, 0, 10000, "degraded", "(datetime.datetime(2026, 11, 18, 10, 0, 20), "
         "'degraded')", 2, ["ecc_sbe"], 5, 7, 3, 2, 0.25, 0),
        # 10:01: a failing and an ok sample at the same time: newest state failing; ECC NULL read as 0;
        # the failing sample has no process (held_no_process 1), the ok one has util 0.75
        ("2026-11-18 10:01:00", 2, 20000, 10000, 0, "failing", "(datetime.datetime(2026, 11, 18, 10, 1, 30), "
         "'failing')", 1, ["xid_79"], 1, 7, 0, 0, 0.75, 1),
    ]
    assert _read(ch_client, db, "gpu_health_1m", "minute") == minute_rows
    # the hour level: the two minute rows merged as the part was written (one row stored)
    assert ch_client.query(f"SELECT count() FROM {db}.gpu_health_1h").result_rows[0][0] == 1
    hour = ("2026-11-18 10:00:00", 4, 40000, 10000, 10000, "failing",
            "(datetime.datetime(2026, 11, 18, 10, 1, 30), 'failing')", 3, ["ecc_sbe", "xid_79"], 1, 7, 3, 0, 0.25, 1)
    assert _read(ch_client, db, "gpu_health_1h", "hour") == [hour]

    _insert(ch_client, db, LATER)  # unallocated: no idle_util_min, no held_no_process; newest state ok
    assert _read(ch_client, db, "gpu_health_1h", "hour") == [
        ("2026-11-18 10:00:00", 5, 50000, 10000, 10000, "failing",
         "(datetime.datetime(2026, 11, 18, 10, 2, 10), 'ok')", 3, ["ecc_sbe", "xid_79"], 1, 7, 3, 0, 0.25, 1)]
    ch_client.command(f"OPTIMIZE TABLE {db}.gpu_health_1h FINAL")  # one row per key: tenant t1 and unallocated
    assert ch_client.query(f"SELECT tenant, samples FROM {db}.gpu_health_1h ORDER BY tenant").result_rows == [
        ("", 1), ("t1", 4)]
