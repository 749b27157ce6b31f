"""`gpufleet agent`: run the node agent (NVML) or a simulated fleet of node agents in one process.

The config file (`--config` / `$GPUFLEET_CONFIG`) gives the defaults; flags override them. One
thread ticks every node on interval boundaries, one background sender drains every node's spool
to Kafka through one producer. SIGTERM/SIGINT (or `--duration`) stop it cleanly: the sender gets
`SHUTDOWN_FLUSH_S` to deliver what is spooled, the rest stays on disk for the next start.

With `--backend simulated` every node gets its own spool under `<spool_dir>/<node>`, its own
MeterProvider and seq; `agent.spool_max_bytes` is then shared evenly between the nodes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import msgspec

from agents.runner import NodeAgent, SystemClock, run_many
from agents.sender import Sender
from agents.spool import Spool, SpoolError
from gpufleet.config import Config, ConfigError, load
from gpufleet.kafka import producer_kwargs

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_S = 5.0
"""How long a stopping agent keeps sending what is spooled before it exits."""
MIN_NODE_SPOOL_BYTES = 4 * 1024 * 1024
TRUTH_EVERY_MS = 60_000
"""The simulated fleet's ground truth (`--ground-truth`) is rewritten this often, and on exit."""


@dataclass
class NodeParts:
    """What one node agent is built from."""

    name: str
    collector: Any
    allocation: Any
    spool_dir: Path
    host_id: str | None = None


def apply_overrides(
    cfg: Config,
    *,
    backend: str | None = None,
    bootstrap: str | None = None,
    topic: str | None = None,
    interval: float | None = None,
    spool_dir: str | None = None,
) -> Config:
    """`cfg` with the command-line flags that were given (None or "" means not given) replacing the file's."""
    kafka = {k: v for k, v in (("bootstrap_servers", bootstrap), ("topic", topic)) if v}
    agent = {k: v for k, v in (("backend", backend), ("interval_s", interval), ("spool_dir", spool_dir))
             if v is not None and v != ""}
    if interval is not None and interval <= 0:
        raise ConfigError("--interval must be a positive number of seconds")
    return msgspec.structs.replace(
        cfg,
        kafka=msgspec.structs.replace(cfg.kafka, **kafka),
        agent=msgspec.structs.replace(cfg.agent, **agent),
    )


def nvml_node(cfg: Config) -> NodeParts:
    """This machine's GPUs through NVML; a clear error when NVML cannot start."""
    from agents.allocation import build_source

    try:
        from agents.collectors.nvml import NvmlCollector, NvmlUnavailable
    except ImportError as exc:
        raise click.ClickException(
            f"the NVML backend cannot be loaded ({exc}); install nvidia-ml-py or use --backend simulated"
        ) from None
    collector = NvmlCollector()
    try:
        collector.open()
    except NvmlUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    uuids = getattr(collector, "gpu_uuids", None)
    uuid_index = {u: i for i, u in enumerate(uuids)} if uuids else None
    allocation = build_source(cfg.agent.allocation, uuid_index=uuid_index)
    return NodeParts(cfg.agent.node, collector, allocation, Path(cfg.agent.spool_dir), _machine_id())


def simulated_nodes(
    cfg: Config, *, nodes: int, gpus: int, seed: int, tenants: int, faults: str, start_ms: int, interval_ms: int
) -> tuple[Any, list[NodeParts]]:
    """A simulated fleet: one `NodeParts` per node, each spooling under `<spool_dir>/<node>`."""
    from agents.collectors.simulated import SimulatedFleet, default_faults

    fault_list = []
    if faults == "default":
        try:
            fault_list = default_faults(start_ms, nodes=nodes, gpus_per_node=gpus)
        except ValueError as exc:
            log.warning("no faults injected: %s", exc)
    try:
        fleet = SimulatedFleet(nodes=nodes, gpus_per_node=gpus, tenants=tenants, seed=seed, start_ms=start_ms,
                               cluster=cfg.agent.cluster, faults=fault_list, interval_ms=interval_ms)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    root = Path(cfg.agent.spool_dir)
    parts = [NodeParts(node.name, node, node.allocation_source(), root / node.name) for node in fleet.nodes]
    return fleet, parts


def _machine_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/etc/machine-id").read_text().strip() or None
    return None


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set `stop` on SIGTERM/SIGINT while inside (main thread only), restoring the old handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config (default $GPUFLEET_CONFIG).")
@click.option("--backend", type=click.Choice(["nvml", "simulated"]), help="Where GPU counters come from.")
@click.option("--bootstrap", help="Kafka bootstrap servers (host:port[,host:port]).")
@click.option("--topic", help="Kafka topic for the samples.")
@click.option("--interval", type=float, help="Seconds between samples.")
@click.option("--spool-dir", help="Directory of the on-disk spool (a subdirectory per simulated node).")
@click.option("--nodes", type=click.IntRange(min=1), default=32, show_default=True, help="Simulated nodes.")
@click.option("--gpus", type=click.IntRange(min=1), default=8, show_default=True, help="GPUs per simulated node.")
@click.option("--seed", type=int, default=0, show_default=True, help="Simulation seed.")
@click.option("--tenants", type=click.IntRange(min=1), default=3, show_default=True, help="Simulated tenants.")
@click.option("--faults", type=click.Choice(["default", "none"]), default="default", show_default=True,
              help="Inject the demo's faults into the simulated fleet.")
@click.option("--ground-truth", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the simulated fleet's ground truth (JSON) here every minute and on exit.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds.")
def agent(
    config_path: str | None,
    backend: str | None,
    bootstrap: str | None,
    topic: str | None,
    interval: float | None,
    spool_dir: str | None,
    nodes: int,
    gpus: int,
    seed: int,
    tenants: int,
    faults: str,
    ground_truth: Path | None,
    duration: float | None,
) -> None:
    """Collect GPU counters every interval and stream them to Kafka (spooling to disk meanwhile)."""
    cfg = apply_overrides(load(config_path), backend=backend, bootstrap=bootstrap, topic=topic,
                          interval=interval, spool_dir=spool_dir)
    interval_ms = max(1, round(cfg.agent.interval_s * 1000))
    kafka_kw = producer_kwargs(cfg.kafka)  # fails fast on TLS/SASL mistakes
    clock = SystemClock()
    start_ms = clock.now_ms()
    fleet = None
    if cfg.agent.backend == "simulated":
        fleet, parts = simulated_nodes(cfg, nodes=nodes, gpus=gpus, seed=seed, tenants=tenants, faults=faults,
                                       start_ms=start_ms, interval_ms=interval_ms)
    else:
        if ground_truth is not None:
            raise click.UsageError("--ground-truth needs --backend simulated")
        parts = [nvml_node(cfg)]
    per_node_bytes = max(MIN_NODE_SPOOL_BYTES, cfg.agent.spool_max_bytes // len(parts))
    spools: list[Spool] = []
    try:
        for p in parts:
            spools.append(Spool(p.spool_dir, per_node_bytes))
    except SpoolError as exc:
        for s in spools:
            s.close()
        for p in parts:
            p.collector.close()
        raise click.ClickException(str(exc)) from None

    from kafka import KafkaProducer

    sender = Sender(lambda: KafkaProducer(**kafka_kw), cfg.kafka.topic,
                    [(p.name, s) for p, s in zip(parts, spools, strict=True)])
    agents = [
        NodeAgent(cluster=cfg.agent.cluster, node=p.name, collector=p.collector, spool=s,
                  allocation=p.allocation, send_errors=lambda i=i: sender.errors_for(i),
                  otlp_endpoint=cfg.agent.otlp_export_endpoint, otlp_interval_ms=interval_ms, host_id=p.host_id)
        for i, (p, s) in enumerate(zip(parts, spools, strict=True))
    ]
    log.info("agent: %d node(s), %s backend, every %d ms -> %s topic %s (spool %s)", len(agents),
             cfg.agent.backend, interval_ms, cfg.kafka.bootstrap_servers, cfg.kafka.topic, cfg.agent.spool_dir)
    stop = threading.Event()
    truth_written = [start_ms]

    def write_truth(force: bool = False) -> None:
        now = clock.now_ms()
        if fleet is not None and ground_truth is not None and (force or now - truth_written[0] >= TRUTH_EVERY_MS):
            fleet.write_ground_truth(ground_truth, start_ms, now)
            truth_written[0] = now

    def after_tick() -> None:
        sender.notify()
        write_truth()

    sender.start()
    ticks = 0
    try:
        with _stop_on_signals(stop):
            ticks = run_many(agents, interval_ms=interval_ms, stop=stop, clock=clock, duration_s=duration,
                             after_tick=after_tick)
    finally:
        left = sender.stop(SHUTDOWN_FLUSH_S)
        for a in agents:
            a.close()
        write_truth(force=True)
    click.echo(f"gpufleet agent: {ticks} intervals x {len(agents)} node(s); {sender.acked_total} messages "
               f"delivered, {left} left spooled", err=True)
