"""`gpufleet usage`: print hourly usage per tenant and GPU model from the `usage_hourly` view."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from gpufleet.pipeline.commands.common import open_store, read_options, resolve

_TABLE_COLUMNS = (
    ("hour", "hour (UTC)"), ("tenant", "tenant"), ("gpu_model", "GPU model"), ("gpus", "GPUs"),
    ("allocated_gpu_seconds", "allocated s"), ("unhealthy_gpu_seconds", "unhealthy s"),
    ("billable_gpu_hours", "billable h"), ("idle_allocated_gpu_hours", "idle h"), ("gap_gpu_seconds", "gap s"),
    ("energy_kwh", "kWh"), ("avg_utilization", "util"), ("mfu", "MFU"), ("mfu_source", "MFU source"),
)


def parse_time(text: str | None, option: str) -> int | None:
    """ISO-8601 date or date-time (UTC unless it names a zone) -> Unix ms."""
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a date or time: use ISO-8601, e.g. 2026-11-01 or 2026-11-18T10:00Z", param_hint=option
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp() * 1000)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"
    return str(value)


def render(rows: Sequence[dict[str, Any]], fmt: str, columns: Sequence[str]) -> str:
    """Rows as JSON (keys = view columns), CSV (header = view columns) or a text table."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
        return buf.getvalue().rstrip("\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title="usage per hour (GPU-seconds, billable GPU-hours; MFU 'estimated' = tensor-activity estimate)")
    for _, title in _TABLE_COLUMNS:
        table.add_column(title, justify="left" if title in ("hour (UTC)", "tenant", "GPU model") else "right")
    for r in rows:
        table.add_row(*(_cell(r.get(key)) for key, _ in _TABLE_COLUMNS))
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(table)
    return console.export_text().rstrip("\n")


@click.command("usage")
@click.option("--from", "from_", metavar="TIME", help="First hour (UTC, ISO-8601); default: the earliest.")
@click.option("--to", "to", metavar="TIME", help="End, exclusive (UTC, ISO-8601); default: the latest.")
@click.option("--tenant", help="Only this tenant.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@read_options
def usage(from_: str | None, to: str | None, tenant: str | None, fmt: str,
          config_path: str | None, dsn: str | None, database: str | None, data_dir: Path) -> None:
    """Hourly usage per tenant and GPU model: allocated, unhealthy and billable GPU time, idle time,
    reporting gaps, energy, utilization and MFU (docs/aggregations.md explains every column)."""
    from gpufleet.pipeline.queries.policy import sync_policy
    from gpufleet.pipeline.queries.usage import USAGE_COLUMNS, usage_rows

    from_ms, to_ms = parse_time(from_, "--from"), parse_time(to, "--to")
    if from_ms is not None and to_ms is not None and to_ms <= from_ms:
        raise click.BadParameter("--to must be after --from", param_hint="--to")
    source = resolve(config_path, dsn, database, data_dir)
    store = open_store(source)
    sync_policy(store, source.cfg.billing, int(time.time() * 1000))
    click.echo(render(usage_rows(store, from_ms, to_ms, tenant), fmt, USAGE_COLUMNS))
