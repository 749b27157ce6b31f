"""`gpufleet status`: the fleet summary, from the running demo's API or from the store.

It finds its store as every read command does (`common.resolve`): while `gpufleet demo` runs it
owns the chDB store, so status asks its HTTP API (the URL is in `<data-dir>/state.json`); after it
stopped, status opens the same store directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from gpufleet.pipeline.commands.common import demo_status, open_store, read_options, resolve


@click.command()
@read_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: str | None, dsn: str | None, database: str | None, data_dir: Path, as_json: bool) -> None:
    """Print the fleet summary (GPUs reporting, samples, tenants, MFU, billing, health, alerts)."""
    source = resolve(config_path, dsn, database, data_dir)
    if source.demo is not None:
        doc = demo_status(source.demo)
    else:
        from gpufleet.pipeline.queries.status import fleet_status

        doc = fleet_status(open_store(source), source.cfg)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
    else:
        for key, value in doc.items():
            click.echo(f"{key:24} {value}")
