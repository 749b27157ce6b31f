"""Closing billing periods: frozen statements with checksums, refusals, late data as adjustments."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest
from click.testing import CliRunner

from gpufleet.cli import cli
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.queries import billing
from gpufleet.pipeline.queries.billing import (
    BillingError,
    Totals,
    close_period,
    pending_adjustments,
    period_bounds,
    statements,
    verify,
)
from gpufleet.pipeline.store import Store
from tests.builders import H100, gpu, report

H = 1_794_999_600_000  # 2026-11-18T11:00:00Z
NOV_END = 1_796_083_200_000  # 2026-12-01T00:00:00Z
DEC_END = 1_798_761_600_000  # 2027-01-01T00:00:00Z


def _ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1000)


def _second(i: int, seq: int, acme: bool = True, beta: bool = True, base: int = H) -> object:
    """Second i of hour `base`: acme's GPUs 0 (300 W) and 1 (failing in seconds 0-2 and 5), beta's GPU 2 (250 W)."""
    gpus = []
    if acme:
        gpus += [gpu(0, tenant="acme"), gpu(1, tenant="acme", xids=[79] if i in (0, 1, 2, 5) else [])]
    if beta:
        gpus.append(gpu(2, tenant="beta", power_w=250.0))
    return report(seq=seq, time_ms=base + (i + 1) * 1000, gpus=gpus)


def _november(store: Store) -> None:
    """Seconds 0-9, with acme's second 5 missing (it arrives late in one test)."""
    insert_reports(store, [_second(i, i, acme=i != 5) for i in range(10)], ingest_ms=H + 20_000)


def test_period_bounds() -> None:
    assert period_bounds("2026-11") == (_ms(2026, 11, 1), NOV_END)
    assert period_bounds("2026-12") == (NOV_END, DEC_END)
    for bad in ("2026-13", "2026-1", "11-2026", "2026-11-01"):
        with pytest.raises(BillingError, match="write it as YYYY-MM"):
            period_bounds(bad)


def test_close_freezes_a_statement_per_tenant(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    _november(store)
    closed_at = NOV_END + 3_600_000
    result = close_period(store, "2026-11", now_ms=closed_at)
    acme, beta = result.statements
    # acme: GPUs 0 and 1 for 9 s each; GPU 1 failing for 3 of them; second 5 is a 1 s gap on each
    assert (acme.tenant, acme.gpu_model) == ("acme", H100)
    assert (acme.allocated_ms, acme.unhealthy_ms, acme.billable_ms, acme.idle_allocated_ms, acme.gap_ms) == (
        18_000, 3_000, 15_000, 0, 2_000)
    assert acme.energy_mj == 18 * 300 * 1000
    assert acme.billable_gpu_hours == 15_000 / 3_600_000
    assert (acme.exclude_states, acme.idle_util_pct, acme.closed_at_ms) == (("failing",), 5, closed_at)
    canonical = (f"'2026-11'|'acme'|'{H100}'|18000|3000|15000|0|2000|5400000|{5_400_000 / 3.6e9!r}|"
                 f"{15_000 / 3_600_000!r}|failing|5|{closed_at}")
    assert acme.checksum == hashlib.sha256(canonical.encode()).hexdigest()
    assert (beta.tenant, beta.allocated_ms, beta.billable_ms, beta.gap_ms, beta.energy_mj) == (
        "beta", 10_000, 10_000, 0, 10 * 250 * 1000)
    assert result.adjustments == []
    # what is stored is exactly what was returned, and its checksums hold
    assert statements(store, "2026-11") == (result.statements, [])
    assert verify(store) == []


def test_refusals(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    _november(store)
    with pytest.raises(BillingError, match="period 2026-11 has not ended"):
        close_period(store, "2026-11", now_ms=NOV_END - 1)
    close_period(store, "2026-12", now_ms=DEC_END)
    with pytest.raises(BillingError, match="periods close in order"):
        close_period(store, "2026-11", now_ms=DEC_END)
    with pytest.raises(BillingError, match="already closed at 2027-01-01T00:00:00Z; closed statements are immutable"):
        close_period(store, "2026-12", now_ms=DEC_END + 1)


def test_late_usage_is_booked_in_the_next_period_never_rewriting_a_closed_one(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    _november(store)
    frozen = close_period(store, "2026-11", now_ms=NOV_END + 1000).statements
    assert pending_adjustments(store) == {}
    # acme's second 5 of 2026-11-18 arrives in December (GPU 1 was failing in it)
    insert_reports(store, [_second(5, 105, beta=False)], ingest_ms=NOV_END + 86_400_000)
    late = Totals(allocated_ms=2_000, unhealthy_ms=1_000, billable_ms=1_000, idle_allocated_ms=0, gap_ms=-2_000,
                  energy_mj=2 * 300 * 1000)
    assert pending_adjustments(store) == {"2026-11": {("acme", H100): late}}
    assert statements(store, "2026-11") == (frozen, [])  # the closed statement did not move

    result = close_period(store, "2026-12", now_ms=DEC_END + 1000)
    assert result.statements == []  # no December usage
    (adj,) = result.adjustments
    assert (adj.booked_period, adj.usage_period, adj.tenant, adj.gpu_model) == ("2026-12", "2026-11", "acme", H100)
    assert (adj.delta_allocated_ms, adj.delta_unhealthy_ms, adj.delta_billable_ms, adj.delta_gap_ms) == (
        2_000, 1_000, 1_000, -2_000)
    assert adj.delta_billable_gpu_hours == 1_000 / 3_600_000
    assert adj.delta_energy_mj == 600_000
    assert statements(store, "2026-12") == ([], [adj])
    assert pending_adjustments(store) == {}  # booked once, never again
    assert close_period(store, "2027-01", now_ms=_ms(2027, 2, 1)).adjustments == []
    assert statements(store, "2026-11") == (frozen, [])
    assert verify(store) == []


def test_a_close_retried_after_a_crash_stores_each_row_once(ch_target, ch_client, monkeypatch) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    _november(store)
    real_insert = billing._insert

    def crash_before_marking_closed(store, table, cols, token):
        if table == "billing_periods":
            raise ConnectionError("ClickHouse went away")
        real_insert(store, table, cols, token)

    monkeypatch.setattr(billing, "_insert", crash_before_marking_closed)
    with pytest.raises(ConnectionError):
        close_period(store, "2026-11", now_ms=NOV_END + 1000)
    monkeypatch.setattr(billing, "_insert", real_insert)
    # usage arriving between the crash and the retry does not change the rows already frozen
    insert_reports(store, [_second(5, 105, beta=False)], ingest_ms=NOV_END + 1500)
    result = close_period(store, "2026-11", now_ms=NOV_END + 2000)
    stored, _ = statements(store, "2026-11")
    assert result.statements == stored
    assert [(s.tenant, s.billable_ms, s.closed_at_ms) for s in stored] == [
        ("acme", 15_000, NOV_END + 1000), ("beta", 10_000, NOV_END + 1000)]
    assert list(pending_adjustments(store)) == ["2026-11"]  # the late second waits for the next close


def test_an_altered_row_is_detected(ch_target, ch_client) -> None:
    db = ch_target.database
    store = Store(ch_client, db)
    _november(store)
    close_period(store, "2026-11", now_ms=NOV_END)
    ch_client.command(f"ALTER TABLE {db}.billing_statements UPDATE billable_ms = 1 WHERE tenant = 'beta' "
                      "SETTINGS mutations_sync = 2")
    assert verify(store) == [f"StatementRow 2026-11 beta/{H100}: checksum mismatch"]
    out = CliRunner().invoke(cli, ["billing", "verify", "--dsn", ch_target.dsn, "--database", db])
    assert out.exit_code == 1
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        f"StatementRow 2026-11 beta/{H100}: checksum mismatch",
        "gpufleet: 1 billing row(s) above do not match their checksums: they were changed after their period "
        "closed; restore them from a backup (statements are immutable, docs/aggregations.md)"]


def test_billing_command(ch_target, ch_client, monkeypatch) -> None:
    monkeypatch.delenv("GPUFLEET_CONFIG", raising=False)
    db = ch_target.database
    store = Store(ch_client, db)
    october = _ms(2026, 10, 10)
    insert_reports(store, [_second(i, i, base=october) for i in range(4)], ingest_ms=october + 10_000)
    target = ["--dsn", ch_target.dsn, "--database", db]
    runner = CliRunner()
    out = runner.invoke(cli, ["billing", "close", "--period", "2026-10", *target])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("closed 2026-10: 2 statement rows, 0 adjustment rows")
    out = runner.invoke(cli, ["billing", "close", "--period", "2026-10", *target])
    assert out.exit_code == 1
    assert "period 2026-10 was already closed" in out.output
    out = runner.invoke(cli, ["billing", "show", "--period", "2026-10", "--json", *target])
    shown = json.loads(out.output)
    # acme: 2 GPUs x 4 s, GPU 1 failing in seconds 0-2
    assert [(s["tenant"], s["allocated_ms"], s["billable_ms"]) for s in shown["statements"]] == [
        ("acme", 8_000, 5_000), ("beta", 4_000, 4_000)]
    assert runner.invoke(cli, ["billing", "verify", *target]).exit_code == 0
    assert json.loads(runner.invoke(cli, ["billing", "pending", *target]).output) == {}
    out = runner.invoke(cli, ["billing", "close", "--period", "2026-1", *target])
    assert out.exit_code == 1
    assert "write it as YYYY-MM" in out.output


FULL = "min_free_disk_bytes_to_perform_insert = 1000000000000000000"


def test_a_sample_stored_twice_blocks_the_close_and_verify_names_it(ch_target, ch_client) -> None:
    """What two copies of one batch look like once they landed further apart than the dedup window: the
    second carries a later ingest time, so ClickHouse kept both; the rollups counted both too."""
    db = ch_target.database
    store = Store(ch_client, db)
    _november(store)
    insert_reports(store, [_second(3, 3)], ingest_ms=H + 40_000)
    found = [f.describe() for f in billing.integrity_findings(store, "2026-11", NOV_END)]
    assert found == [f"duplicate samples: c1/n1 GPU {g}: {rows} rows for {samples} samples between "
                     "2026-11-18T00:00:00Z and 2026-12-01T00:00:00Z" for g, rows, samples in ((0, 10, 9), (1, 10, 9),
                                                                                               (2, 11, 10))]
    with pytest.raises(BillingError, match=r"period 2026-11 cannot close: 3 exactly-once check\(s\) failed on its "
                                           r"stored data: duplicate samples: c1/n1 GPU 0: 10 rows for 9 samples"):
        close_period(store, "2026-11", now_ms=NOV_END)
    assert billing.closed_periods(store) == {}
    out = CliRunner().invoke(cli, ["billing", "verify", "--period", "2026-11", "--dsn", ch_target.dsn,
                                   "--database", db])
    assert out.exit_code == 1
    assert out.stderr.splitlines() == [*found, (
        "gpufleet: 3 exactly-once check(s) above failed on the stored data of 2026-11: a period with such findings "
        "cannot close; repair them as docs/reliability.md (\"Repairing what the checks find\") says")]


def test_a_rollup_cut_short_blocks_the_close_until_the_insert_is_repeated(ch_target, ch_client) -> None:
    """An insert that landed in gpu_samples and the minute rollup but not the hour rollup (billing reads it),
    then one that landed in gpu_samples only: each check names its minute or hour; repeating the same
    insert (what the ingester does, G7/G18) completes the rollups and the period closes."""
    db = ch_target.database
    store = Store(ch_client, db)
    ch_client.command(f"ALTER TABLE {db}.gpu_usage_1h MODIFY SETTING {FULL}")
    with pytest.raises(Exception, match="Could not perform insert"):
        _november(store)
    ch_client.command(f"ALTER TABLE {db}.gpu_usage_1h RESET SETTING min_free_disk_bytes_to_perform_insert")
    late = report(seq=50, time_ms=H + 3_600_000 + 30_000, gpus=[gpu(0, tenant="acme")])  # 12:00:29 - 12:00:30
    ch_client.command(f"ALTER TABLE {db}.gpu_usage_1m MODIFY SETTING {FULL}")
    with pytest.raises(Exception, match="Could not perform insert"):
        insert_reports(store, [late], ingest_ms=H + 3_700_000)
    ch_client.command(f"ALTER TABLE {db}.gpu_usage_1m RESET SETTING min_free_disk_bytes_to_perform_insert")
    assert [f.describe() for f in billing.integrity_findings(store, "2026-11", NOV_END)] == [
        "raw vs minute rollup: minute 2026-11-18T12:00:00Z: raw 1 samples / 1000 ms, gpu_usage_1m 0 samples / 0 ms",
        "minute vs hour rollup: hour 2026-11-18T11:00:00Z: gpu_usage_1m 28 samples / 28000 ms, gpu_usage_1h 0 samples "
        "/ 0 ms"]
    with pytest.raises(BillingError, match="period 2026-11 cannot close: 2 exactly-once check"):
        close_period(store, "2026-11", now_ms=NOV_END)
    _november(store)  # the same inserts again: ClickHouse keeps one copy and completes what they missed
    insert_reports(store, [late], ingest_ms=H + 3_700_000)
    assert billing.integrity_findings(store, "2026-11", NOV_END) == []
    assert [(s.tenant, s.billable_ms) for s in close_period(store, "2026-11", now_ms=NOV_END).statements] == [
        ("acme", 15_000 + 1_000), ("beta", 10_000)]
