"""The `gpufleet` command: one entry point, subcommands loaded lazily from the module that owns them.

Lazy loading keeps `gpufleet agent` on a node free of pipeline imports (no chdb, no ClickHouse
client) and keeps start-up fast. Failures are reported here and nowhere else: a `GpufleetError`
becomes one line on stderr and its exit code, anything unexpected one line and exit 1; the
traceback only with `-v` (docs/errors.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import traceback

import click

from gpufleet.errors import FAILURE, GpufleetError, UsageError, first_line
from gpufleet.version import __version__

# subcommand -> "module:attribute" of a click command
COMMANDS: dict[str, str] = {
    "agent": "gpufleet.agents.command:agent",
    "ingest": "gpufleet.pipeline.commands.ingest:ingest",
    "migrate": "gpufleet.pipeline.commands.migrate:migrate_cmd",
    "demo": "gpufleet.embedded.demo.command:demo",
    "status": "gpufleet.pipeline.commands.status:status",
    "usage": "gpufleet.pipeline.commands.usage:usage",
    "jobs": "gpufleet.pipeline.commands.jobs:jobs",
    "billing": "gpufleet.pipeline.commands.billing:billing",
    "alerts": "gpufleet.pipeline.alerts.command:alerts",
    "dashboards": "gpufleet.dashboards.command:dashboards",
    "tenants": "gpufleet.pipeline.commands.tenants:tenants",
    "schema": "gpufleet.schema_cmd:schema",
}


QUIET_LOGGERS = ("kafka.protocol", "kafka.net.connection")
"""Loggers that would print secrets at DEBUG (kafka-python's request dumps), capped at INFO."""
CLIENT_LOGGERS = ("urllib3", "clickhouse_connect")
"""HTTP client loggers whose retry warnings repeat what gpufleet's one-line error says: shown only with -v."""


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used, and whose failures are reported once."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise  # click's own: usage errors (exit 2), --help, Ctrl-C, output piped into `head`
        except Exception as exc:  # a GpufleetError's line and code, or one line for the unexpected
            ctx.exit(report(exc, verbose=bool(ctx.params.get("verbose"))))

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if _importable(n))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        try:
            command: click.Command = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            raise UsageError(
                f"'gpufleet {cmd_name}' needs a part that is not installed ({exc.name}); "
                "install the matching extra, e.g. pip install 'gpufleet[embedded]'"
            ) from None
        return command


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
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(level if verbose else logging.ERROR)


def report(exc: Exception, *, verbose: bool) -> int:
    """Write the one line a failure shows (the traceback first with -v); returns the exit code."""
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, GpufleetError):  # its text is ours: one line, or a list of problems under one
        label = f"{exc.label}: " if exc.label else ""
        click.echo(f"gpufleet: {label}{exc}", err=True)
        return exc.exit_code
    hint = "" if verbose else "; rerun with -v for the traceback"
    click.echo(f"gpufleet: unexpected error: {type(exc).__name__}: {first_line(exc)}{hint}", err=True)
    return FAILURE


def main() -> None:
    """The `gpufleet` console script: failures are reported by the group (`report`), once."""
    cli.main(prog_name="gpufleet")
