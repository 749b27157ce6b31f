"""`gpufleet dashboards`: build, validate, preview and deploy the Grafana boards and provisioning."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gpufleet.pipeline.commands.common import read_options


@click.group()
def dashboards() -> None:
    """Grafana boards, datasource and alert rules for gpufleet (docs/dashboards.md)."""


@dashboards.command("build")
@click.option("--check", is_flag=True, help="Change nothing; exit 1 if the committed files differ from a fresh build.")
def build_cmd(check: bool) -> None:
    """Regenerate dashboards/boards/*.json and dashboards/provisioning/ from the board definitions."""
    from gpufleet.dashboards import build

    if check:
        problems = build.drift()
        for p in problems:
            click.echo(p, err=True)
        if problems:
            click.echo("run `gpufleet dashboards build` and commit the result", err=True)
            sys.exit(1)
        click.echo("generated files are up to date")
        return
    changed = build.write()
    for path in changed:
        click.echo(f"wrote {path}")
    if not changed:
        click.echo("generated files are up to date")


@dashboards.command("validate")
def validate_cmd() -> None:
    """Check every committed board and provisioning file (schema, references, drift); exit 1 on problems."""
    from gpufleet.dashboards import build, validate

    problems = validate.validate_tree() + build.drift()
    for p in problems:
        click.echo(p, err=True)
    if problems:
        sys.exit(1)
    boards = len(list((build.ROOT / build.BOARDS_DIR).glob("*.json")))
    click.echo(f"{boards} boards and the provisioning files are valid and up to date")


@dashboards.command("preview")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write index.html into.")
@click.option("--from", "from_", help="Start (ISO-8601, UTC unless zoned); default: 6 h before --to.")
@click.option("--to", help="End (ISO-8601); default: the newest sample in the store (or now when empty).")
@read_options
def preview_cmd(out_dir: Path, from_: str | None, to: str | None, config_path: str | None, dsn: str | None,
                database: str | None, data_dir: Path) -> None:
    """Render every board's panels from the same queries into one offline HTML page."""
    import time

    from gpufleet.dashboards import preview
    from gpufleet.dashboards.definitions import BOARDS
    from gpufleet.pipeline.commands.common import open_store, resolve
    from gpufleet.pipeline.commands.usage import parse_time

    source = resolve(config_path, dsn, database, data_dir)
    target = source.target
    client = open_store(source).client  # the boards' SQL names tables bare, as Grafana's datasource does
    client.database = target.database
    to_ms = parse_time(to, "--to")
    if to_ms is None:
        newest = client.query("SELECT toUnixTimestamp64Milli(max(time)), count() FROM gpu_samples").result_rows[0]
        to_ms = int(newest[0]) if newest[1] else int(time.time() * 1000)
    from_ms = parse_time(from_, "--from") or to_ms - 6 * 3_600_000
    if from_ms >= to_ms:
        raise click.BadParameter("--from must be before --to", param_hint="--from")
    boards = [b.to_json() for b in BOARDS]  # the source the committed JSON is built from
    path = preview.write(client, boards, out_dir, from_ms, to_ms, f"{target.where()} / {target.database}")
    click.echo(f"wrote {path}")


@dashboards.command("deploy")
@click.option("--url", required=True, envvar="GRAFANA_URL", help="Grafana base URL (or $GRAFANA_URL).")
@click.option("--token", help="Service-account token. Prefer --token-file or $GRAFANA_TOKEN (not in shell history).")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True), help="File holding the token.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="GPUFLEET_CONFIG",
              help="gpufleet YAML config (or $GPUFLEET_CONFIG): alerts.runbook_base_url for the rules' runbook links.")
def deploy_cmd(url: str, token: str | None, token_file: str | None, config_path: str | None) -> None:
    """Create or update the folder, datasource, boards and alert rules in a running Grafana (idempotent).

    The datasource's connection comes from this environment, as for the provisioning file:
    CLICKHOUSE_HOST, CLICKHOUSE_PORT, CLICKHOUSE_USER, CLICKHOUSE_DATABASE and CLICKHOUSE_PASSWORD
    (or CLICKHOUSE_PASSWORD_FILE).
    """
    from gpufleet import config as config_mod
    from gpufleet.dashboards.deploy import read_token, run

    cfg = config_mod.load(config_path)
    report = run(url, read_token(token, token_file), runbook_base=cfg.alerts.runbook_base_url)
    click.echo(f"created {len(report.created)}, updated {len(report.updated)} in {url}")
    for what in report.created:
        click.echo(f"  created {what}")
