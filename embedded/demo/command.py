"""`gpufleet demo`: run the embedded pipeline with a simulated fleet and a live view."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live

from gpufleet import config as config_mod
from gpufleet.embedded.demo.live import LiveView
from gpufleet.embedded.demo.stack import DemoOptions, DemoStack
from gpufleet.embedded.demo.state import DEFAULT_DATA_DIR
from gpufleet.errors import GpufleetError
from gpufleet.pipeline.queries.status import fleet_status
from gpufleet.pipeline.store import Store


@click.command()
@click.option("--duration", type=float, default=0, help="Stop by itself after this many seconds (0 = until Ctrl-C).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_DIR,
              show_default=True, help="Where the store, logs and ground truth go.")
@click.option("--nodes", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--gpus", type=click.IntRange(1, 72), default=8, show_default=True, help="GPUs per node.")
@click.option("--tenants", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--interval", type=float, default=1.0, show_default=True, help="Agent interval, seconds.")
@click.option("--faults", type=click.Choice(["default", "none"]), default="default", show_default=True)
@click.option("--flops-jobs", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Simulated jobs that report model FLOPs over OTLP (measured MFU).")
@click.option("--no-alertmanager", is_flag=True, help="Do not start the embedded Alertmanager.")
@click.option("--keep-data", is_flag=True, help="Keep the previous run's store instead of starting fresh.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="gpufleet YAML config.")
@click.option("--quiet", is_flag=True, help="No live view (for scripts and CI).")
def demo(duration: float, data_dir: Path, nodes: int, gpus: int, tenants: int, seed: int, interval: float,
         faults: str, flops_jobs: int, no_alertmanager: bool, keep_data: bool, config_path: str | None,
         quiet: bool) -> None:
    """Run broker, store, simulated fleet, ingester and alerts on this machine, with a live view."""
    console = Console(stderr=quiet)
    opts = DemoOptions(data_dir=data_dir, nodes=nodes, gpus=gpus, tenants=tenants, seed=seed, interval_s=interval,
                       faults=faults, alertmanager=not no_alertmanager, keep_data=keep_data,
                       flops_jobs=flops_jobs)
    stack = DemoStack(opts, cfg=config_mod.load(config_path))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.monotonic()
    try:
        stack.start(say=lambda m: console.print(f"[dim]started[/dim] {m}"))
        if stack.target is None or stack.ingester is None:
            raise GpufleetError(f"the demo stack did not start; see the logs in {data_dir}")
        view_store = Store.open(stack.target)
        view = LiveView(view_store, stack.ingester.stats, nodes * gpus)
        console.print(f"status API {stack.status_api.url if stack.status_api else '-'}/status; "
                      f"Ctrl-C stops everything" + (f"; stopping after {duration:.0f} s" if duration else ""))
        with Live(console=console, refresh_per_second=2, transient=False, auto_refresh=False,
                  redirect_stderr=False) as live:
            while not stop.is_set():
                elapsed = time.monotonic() - t0
                if duration and elapsed >= duration:
                    break
                if not stack.children_alive():
                    console.print(f"[red]a demo process exited early; see the logs in {data_dir}[/red]")
                    break
                if not quiet:
                    live.update(view.render(fleet_status(view_store, stack.cfg), elapsed), refresh=True)
                stop.wait(1.0)
    finally:
        console.print("stopping ...")
        stack.stop()
    console.print(f"stopped. `gpufleet status --json --data-dir {data_dir}` reads the store.")
