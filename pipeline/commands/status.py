"""`gpufleet status`: the fleet summary, from the running pipeline's API or from the store.

While `gpufleet demo` runs it owns the chDB store, so status asks its HTTP API (the URL is in
`<data-dir>/state.json`); after it stopped, status opens the same store directly. With no demo
state, it reads the ClickHouse named by the config (`clickhouse.dsn`).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from gpufleet import config as config_mod
from gpufleet.embedded.demo.state import DemoState


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="gpufleet YAML config.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/demo"),
              show_default=True, help="The demo's data directory.")
@click.option("--dsn", help="ClickHouse DSN (overrides config and demo state).")
@click.option("--database", help="ClickHouse database.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: str | None, data_dir: Path, dsn: str | None, database: str | None, as_json: bool) -> None:
    """Print the fleet summary (GPUs reporting, samples, tenants, MFU, billing, health, alerts)."""
    cfg = config_mod.load(config_path)
    doc = None
    state = DemoState.read(data_dir) if not dsn else None
    if state and state.alive():
        doc = state.fetch_status()
    if doc is None:
        from gpufleet.pipeline.queries.status import fleet_status
        from gpufleet.pipeline.store import Store
        from gpufleet.pipeline.store.client import Target

        if state:
            dsn, database = dsn or state.dsn, database or state.database
        target = Target(dsn or cfg.clickhouse.dsn, database or cfg.clickhouse.database)
        cfg = config_mod.with_clickhouse(cfg, target.dsn, target.database)
        doc = fleet_status(Store.open(target), cfg)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
    else:
        for key, value in doc.items():
            click.echo(f"{key:24} {value}")
