"""`gpufleet billing`: close a period (frozen statements + adjustments), show, pending, verify."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gpufleet.pipeline.commands.common import open_store, read_options, resolve

if TYPE_CHECKING:
    from gpufleet.config import Config
    from gpufleet.pipeline.store import Store


def _open(config_path: str | None, dsn: str | None, database: str | None, data_dir: Path) -> tuple[Config, Store]:
    source = resolve(config_path, dsn, database, data_dir)
    return source.cfg, open_store(source)


def _echo_rows(title: str, rows: list[Any], as_json: bool) -> None:
    if as_json:
        return
    click.echo(f"{title}: {len(rows)}")
    for r in rows:
        d = asdict(r)
        hours = d.get("billable_gpu_hours", d.get("delta_billable_gpu_hours"))
        period = d.get("usage_period", d.get("period"))
        click.echo(f"  {period}  {d['tenant']:<20} {d['gpu_model']:<28} billable_gpu_hours={hours:.6f}")


@click.group("billing")
def billing() -> None:
    """Billing periods: close a month into immutable statements, list late usage, verify checksums."""


@billing.command("close")
@click.option("--period", required=True, metavar="YYYY-MM", help="The month to close, e.g. 2026-11.")
@click.option("--json", "as_json", is_flag=True, help="Print the statement as JSON.")
@read_options
def close(period: str, as_json: bool, config_path: str | None, dsn: str | None, database: str | None,
          data_dir: Path) -> None:
    """Freeze one statement per tenant and GPU model for PERIOD, booking late usage of earlier closed
    periods as adjustments; refuses a period already closed or not yet ended."""
    from gpufleet.pipeline.queries import billing as bill
    from gpufleet.pipeline.queries.policy import sync_policy

    cfg, store = _open(config_path, dsn, database, data_dir)
    now_ms = int(time.time() * 1000)
    sync_policy(store, cfg.billing, now_ms)
    result = bill.close_period(store, period, now_ms)
    if as_json:
        click.echo(json.dumps({"period": result.period, "checksum": result.checksum,
                               "statements": [asdict(r) for r in result.statements],
                               "adjustments": [asdict(r) for r in result.adjustments]}, indent=2))
        return
    click.echo(f"closed {result.period}: {len(result.statements)} statement rows, "
               f"{len(result.adjustments)} adjustment rows, checksum {result.checksum}")
    _echo_rows("statements", result.statements, as_json)
    _echo_rows("adjustments (late usage of earlier periods)", result.adjustments, as_json)


@billing.command("show")
@click.option("--period", required=True, metavar="YYYY-MM")
@click.option("--json", "as_json", is_flag=True)
@read_options
def show(period: str, as_json: bool, config_path: str | None, dsn: str | None, database: str | None,
         data_dir: Path) -> None:
    """Print a closed period's statement and the adjustments booked with it."""
    from gpufleet.pipeline.queries import billing as bill

    _, store = _open(config_path, dsn, database, data_dir)
    if period not in bill.closed_periods(store):
        raise bill.BillingError(f"period {period} is not closed: close it with 'gpufleet billing close'")
    stmts, adjs = bill.statements(store, period)
    if as_json:
        click.echo(json.dumps({"statements": [asdict(r) for r in stmts],
                               "adjustments": [asdict(r) for r in adjs]}, indent=2))
        return
    _echo_rows("statements", stmts, as_json)
    _echo_rows("adjustments", adjs, as_json)


@billing.command("pending")
@read_options
def pending(config_path: str | None, dsn: str | None, database: str | None, data_dir: Path) -> None:
    """Usage of closed periods that arrived after their close, to be booked at the next close (JSON)."""
    from gpufleet.pipeline.queries import billing as bill

    _, store = _open(config_path, dsn, database, data_dir)
    found = bill.pending_adjustments(store)
    click.echo(json.dumps({p: [{"tenant": t, "gpu_model": m, **asdict(d)} for (t, m), d in rows.items()]
                           for p, rows in found.items()}, indent=2))


@billing.command("verify")
@click.option("--period", metavar="YYYY-MM", help="Check this month's stored data (default: all of it).")
@read_options
def verify(period: str | None, config_path: str | None, dsn: str | None, database: str | None,
           data_dir: Path) -> None:
    """Recompute every statement and adjustment checksum, run the exactly-once checks on the stored data (a
    sample stored twice, a rollup that differs from its raw answer; exit 1 if anything is wrong), and list
    the GPU time claimed by more than one node that was billed to one of them only."""
    from gpufleet.pipeline.queries import billing as bill
    from gpufleet.pipeline.queries.claims import unbilled_claims

    _, store = _open(config_path, dsn, database, data_dir)
    problems = bill.verify(store)
    conflicts = unbilled_claims(store)
    if conflicts:
        click.echo(f"conflicting claims (each second billed once, to the node named last): {len(conflicts)}")
    for c in conflicts:
        click.echo(f"  {c.describe()}")
    found = bill.integrity_findings(store, period, int(time.time() * 1000))
    for p in problems:
        click.echo(p, err=True)
    for f in found:
        click.echo(f.describe(), err=True)
    if problems:
        raise bill.BillingError(f"{len(problems)} billing row(s) above do not match their checksums: they were "
                                "changed after their period closed; restore them from a backup (statements are "
                                "immutable, docs/aggregations.md)")
    if found:
        raise bill.BillingError(f"{len(found)} exactly-once check(s) above failed on the stored data"
                                f"{' of ' + period if period else ''}: a period with such findings cannot close; "
                                "repair them as docs/reliability.md (\"Repairing what the checks find\") says")
    click.echo("all billing checksums match; every sample is stored once and every rollup equals its raw answer")
