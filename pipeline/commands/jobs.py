"""`gpufleet jobs`: per job, its GPUs and nodes, MFU, stalled time, stragglers and throughput.

The window ends at the newest sample in the store (so a stopped demo's jobs still show) and reaches
`--since` back, on whole minutes; `pipeline/queries/jobs.py` defines every column.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import click

from gpufleet.pipeline.alerts.command import parse_duration
from gpufleet.pipeline.commands.common import open_store, read_options, resolve

_NEWEST: Final = "SELECT toUnixTimestamp64Milli(max(time)), count() FROM {db:Identifier}.gpu_samples"
_COLUMNS: Final = (("tenant", "tenant"), ("job", "job"), ("gpus", "GPUs"), ("nodes", "nodes"), ("mfu", "MFU"),
                   ("mfu_source", "MFU source"), ("stalled_gpu_seconds", "stalled GPU-s"),
                   ("stragglers", "stragglers"), ("tokens_per_s", "tokens/s"), ("samples_per_s", "samples/s"))


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "nodes":
        return ", ".join(value) if len(value) <= 3 else f"{', '.join(value[:3])} +{len(value) - 3}"
    if key == "stragglers":
        return ", ".join(f"{s['node']}/{s['gpu_index']} ({s['cause']})" for s in value) or "-"
    if key == "mfu":
        return f"{100 * value:.1f}%"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_table(rows: Sequence[dict[str, Any]], title: str) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for _, heading in _COLUMNS:
        table.add_column(heading)
    for r in rows:
        table.add_row(*(_cell(key, r[key]) for key, _ in _COLUMNS))
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(table)
    return console.export_text().rstrip("\n")


@click.command("jobs")
@click.option("--tenant", help="Only this tenant's jobs.")
@click.option("--since", "since", default="1h", show_default=True, metavar="DURATION",
              help="How far back from the newest sample: 30m, 6h, 2d.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@read_options
def jobs(tenant: str | None, since: str, as_json: bool, config_path: str | None, dsn: str | None,
         database: str | None, data_dir: Path) -> None:
    """Per job: GPUs, nodes, MFU (measured where the job reports FLOPs, else the hardware estimate), stalled
    GPU-seconds, stragglers at the window's end and the tokens and samples it reported per second."""
    from gpufleet.pipeline.queries.jobs import job_view
    from gpufleet.pipeline.queries.window import Window, iso

    span_ms = parse_duration(since, "--since")
    source = resolve(config_path, dsn, database, data_dir)
    store = open_store(source)
    newest, samples = store.rows(_NEWEST)[0]
    if not samples:
        doc: dict[str, Any] = {"window": None, "jobs": []}
    else:
        window = Window.covering(int(newest) - span_ms, int(newest))
        rows = job_view(store, window, source.cfg.jobs, tenant)
        doc = {"window": {"from": iso(window.start_ms), "to": iso(window.end_ms)}, "jobs": [r.to_dict() for r in rows]}
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    elif not doc["jobs"]:
        click.echo("no jobs in the window" if samples else "no samples in the store")
    else:
        window_text = f"{doc['window']['from']} to {doc['window']['to']}"
        click.echo(render_table(doc["jobs"], f"jobs, {window_text} (MFU 'estimated' = tensor-activity estimate)"))
