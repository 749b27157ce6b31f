"""`gpufleet alerts`: list firing alerts, run the evaluator, check a rules file.

    gpufleet alerts [--json]                    alerts firing now (from the alerts table)
    gpufleet alerts history [--since 24h] [--json]   every alert that fired in the window
    gpufleet alerts run [--once] [--alertmanager URL] [--rules FILE]
    gpufleet alerts check FILE...               validate rules files, run nothing

The listing finds its store as every read command does (`gpufleet.pipeline.commands.common.resolve`):
while `gpufleet demo` runs it owns the chDB store, so the listing asks the demo's status API (as
`gpufleet status` does); otherwise it opens the store.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import click

from gpufleet.errors import GpufleetError, StoreError
from gpufleet.pipeline.commands.common import (
    demo_status,
    load_config,
    open_store,
    read_options,
    resolve,
    target_options,
)


@click.group(invoke_without_command=True)
@read_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def alerts(ctx: click.Context, config_path: str | None, dsn: str | None, database: str | None, data_dir: Path,
           as_json: bool) -> None:
    """List the alerts firing now (subcommands: run, check)."""
    if ctx.invoked_subcommand is not None:
        return
    firing = _firing(config_path, dsn, database, data_dir)
    if as_json:
        click.echo(json.dumps(firing, indent=2, sort_keys=True))
        return
    if not firing:
        click.echo("no alerts firing")
        return
    for a in firing:
        lab = a["labels"]
        where = " ".join(f"{k}={lab[k]}" for k in ("cluster", "node", "gpu_index", "tenant") if k in lab)
        click.echo(f"{a['starts_at']}  {a['severity']:8}  {a['alertname']:22}  {where}")
        click.echo(f"    {a['annotations'].get('summary', '')}")


def _firing(config_path: str | None, dsn: str | None, database: str | None, data_dir: Path) -> list[dict[str, Any]]:
    source = resolve(config_path, dsn, database, data_dir)
    if source.demo is None:
        from gpufleet.pipeline.alerts.state import firing_alerts

        return firing_alerts(open_store(source))
    firing = demo_status(source.demo).get("alerts_firing")
    if not isinstance(firing, list):
        raise StoreError(f"the running demo's status API at {source.demo.status_url} gave no alerts_firing: "
                         "retry, or stop the demo and run this again")
    return firing


@alerts.command("history")
@read_options
@click.option("--since", "since", default="24h", show_default=True, metavar="DURATION",
              help="How far back from now: 30m, 6h, 2d, 1h30m.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def history_cmd(config_path: str | None, dsn: str | None, database: str | None, data_dir: Path, since: str,
                as_json: bool) -> None:
    """Every alert that fired in the last DURATION (still firing or resolved since), with its start, end and
    labels, oldest first. Reads the alerts table, so run it once `gpufleet demo` has stopped."""
    from gpufleet.pipeline.alerts.evaluator import wall_ms
    from gpufleet.pipeline.alerts.state import fired_between

    window_ms = parse_duration(since, "--since")
    now = wall_ms()
    fired = fired_between(open_store(resolve(config_path, dsn, database, data_dir)), now - window_ms, now)
    if as_json:
        click.echo(json.dumps(fired, indent=2, sort_keys=True))
        return
    if not fired:
        click.echo(f"no alert fired in the last {since}")
        return
    for a in fired:
        lab = a["labels"]
        where = " ".join(f"{k}={lab[k]}" for k in ("cluster", "node", "gpu_index", "tenant", "job") if k in lab)
        end = a["ends_at"] or "still firing"
        click.echo(f"{a['starts_at']} -> {end:24}  {a['severity']:8}  {a['alertname']:22}  {where}")


def parse_duration(text: str, option: str) -> int:
    """Milliseconds of a positive duration as the rules write them (`30m`, `2d`), or a usage error naming the option."""
    from gpufleet.pipeline.alerts.rules import duration_ms

    try:
        ms = duration_ms(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
    if ms <= 0:
        raise click.BadParameter(f"{text!r} is not longer than 0", param_hint=option)
    return ms


@alerts.command("run")
@target_options
@click.option("--alertmanager", "alertmanager_url", metavar="URL",
              help="Alertmanager base URL, e.g. http://127.0.0.1:9093 (default: alerts.alertmanager_url).")
@click.option("--rules", "rules_path", type=click.Path(dir_okay=False),
              help="Rules file (default: alerts.rules_file, else the shipped defaults).")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1), help="Seconds between evaluations.")
@click.option("--once", is_flag=True, help="Evaluate once, print what happened as JSON, and exit.")
def run_cmd(config_path: str | None, dsn: str | None, database: str | None, alertmanager_url: str | None,
            rules_path: str | None, interval_s: float | None, once: bool) -> None:
    """Evaluate the alert rules on a schedule and notify Alertmanager, until stopped (SIGTERM, Ctrl-C)."""
    import msgspec

    from gpufleet.pipeline.alerts.evaluator import Evaluator
    from gpufleet.pipeline.alerts.rules import load_rules
    from gpufleet.pipeline.store import Store

    cfg, target = load_config(config_path, dsn, database)
    alerts_cfg = cfg.alerts
    if rules_path:
        alerts_cfg = msgspec.structs.replace(alerts_cfg, rules_file=rules_path)
    if interval_s:
        alerts_cfg = msgspec.structs.replace(alerts_cfg, interval_s=interval_s)
    cfg = msgspec.structs.replace(cfg, alerts=alerts_cfg)
    rules = load_rules(cfg.alerts.rules_file)
    evaluator = Evaluator(cfg, Store.open(target), alertmanager_url=alertmanager_url, rules=rules)
    if once:
        report = evaluator.evaluate_once()
        click.echo(json.dumps({
            "now_ms": report.now_ms, "firing": report.firing, "pending": report.pending, "sent": report.sent,
            "fired": [r.alertname for r in report.fired], "resolved": [r.alertname for r in report.resolved],
            "errors": report.errors,
        }, indent=2))
        if report.errors:
            more = f" (and {len(report.errors) - 1} more in the report)" if len(report.errors) > 1 else ""
            raise GpufleetError(f"the evaluation had errors: {report.errors[0].splitlines()[0]}{more}")
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"evaluating {len(rules.rules)} rules from {rules.source} every {cfg.alerts.interval_s:g} s; "
               f"Alertmanager: {evaluator.notifier or 'none (alerts stay in ClickHouse)'}", err=True)
    health = None
    if cfg.alerts.status_port:
        from gpufleet.health_http import HealthServer

        health = HealthServer(evaluator.liveness, port=cfg.alerts.status_port).start()
        click.echo(f"health: {health.url}/healthz", err=True)
    try:
        evaluator.run(stop)
    finally:
        if health is not None:
            health.stop()


@alerts.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def check_cmd(files: tuple[str, ...]) -> None:
    """Validate rules files (exit 1 and name the rule and key on the first error)."""
    from gpufleet.pipeline.alerts.rules import RulesError, load_rules

    failed = False
    for f in files:
        try:
            rs = load_rules(f)
        except RulesError as exc:
            click.echo(f"FAIL {exc}", err=True)
            failed = True
            continue
        click.echo(f"OK   {f}: {len(rs.rules)} rules ({', '.join(r.name for r in rs.rules)})")
    if failed:
        raise SystemExit(1)
