"""`gpufleet migrate`: apply the versioned schema migrations (idempotent)."""

from __future__ import annotations

import click

from gpufleet.pipeline.commands.common import load_config, target_options
from gpufleet.pipeline.store.client import connect, redact
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate


@click.command("migrate")
@target_options
def migrate_cmd(config_path: str | None, dsn: str | None, database: str | None) -> None:
    """Create or upgrade the ClickHouse schema; safe to run any number of times."""
    cfg, target = load_config(config_path, dsn, database)
    applied = migrate(connect(target, create=True), SchemaOptions.from_config(cfg))
    where = f"{redact(target.dsn)} database {target.database}"
    click.echo(f"applied migrations {applied} to {where}" if applied else f"schema up to date on {where}")
