"""The `gpufleet` command: one entry point, subcommands loaded lazily from the module that owns them.

Lazy loading keeps `gpufleet agent` on a node free of pipeline imports (no chdb, no ClickHouse
client) and keeps start-up fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import click

from gpufleet.config import ConfigError
from gpufleet.version import __version__

# subcommand -> "module:attribute" of a click command
COMMANDS: dict[str, str] = {
    "agent": "gpufleet.agents.command:agent",
    "ingest": "gpufleet.pipeline.commands.ingest:ingest",
    "migrate": "gpufleet.pipeline.commands.migrate:migrate_cmd",
    "demo": "gpufleet.embedded.demo.command:demo",
    "status": "gpufleet.pipeline.commands.status:status",
    "usage": "gpufleet.pipeline.commands.usage:usage",
    "billing": "gpufleet.pipeline.commands.billing:billing",
    "alerts": "gpufleet.pipeline.alerts.command:alerts",
    "dashboards": "gpufleet.dashboards.command:dashboards",
    "tenants": "gpufleet.pipeline.commands.tenants:tenants",
    "schema": "gpufleet.schema_cmd:schema",
}


QUIET_LOGGERS = ("kafka.protocol", "kafka.net.connection")
"""Loggers that would print secrets at DEBUG (kafka-python's request dumps), capped at INFO."""


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if _importable(n))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            raise click.ClickException(
                f"'gpufleet {cmd_name}' needs a part that is not installed ({exc.name}); "
                "install the matching extra, e.g. pip install 'gpufleet[embedded]'"
            ) from None


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(COMMANDS[name].partition(":")[0]) is not None
    except ModuleNotFoundError:
        return False


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="gpufleet")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """gpufleet: GPU-fleet telemetry, MFU, health, billing and alerts."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every request it sends, bytes and all, at DEBUG: with SASL PLAIN that includes
    # the password. Its protocol loggers stay at INFO whatever -v says (docs/security.md).
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.INFO))


def main() -> None:
    try:
        cli.main(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"gpufleet: configuration error: {exc}", err=True)
        sys.exit(2)
