"""`gpufleet agent`: run the node agent (NVML) or a simulated fleet of node agents in one process.

Design notes: docs/design-notes.md#agents-command-py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec

from gpufleet.agents.collectors.infiniband import SysfsPorts
from gpufleet.agents.config_check import agent_problems
from gpufleet.agents.dry_run import StdoutSpool
from gpufleet.agents.otlp.receiver import MetricSource, OtlpReceiver, ReceiverError, ReceiverSettings
from gpufleet.agents.runner import NodeAgent, SystemClock, run_many
from gpufleet.agents.sender import Sender
from gpufleet.agents.spool import Spool, SpoolError
from gpufleet.config import Config, ConfigError, load
from gpufleet.config_check import validate_startup
from gpufleet.errors import GpufleetError, UsageError
from gpufleet.flops_contract import SAMPLES, TOKENS
from gpufleet.health_http import HealthServer
from gpufleet.kafka import producer_kwargs
from gpufleet.liveness import Liveness

if TYPE_CHECKING:
    import subprocess

    from gpufleet.agents.flops_jobs import FleetSpec, JobsSpec
    from gpufleet.agents.simulation.fleet import SimulatedFleet

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_S = 5.0
"""How long a stopping agent keeps sending what is spooled before it exits."""
MIN_NODE_SPOOL_BYTES = 4 * 1024 * 1024
TRUTH_EVERY_MS = 60_000
"""The simulated fleet's ground truth (`--ground-truth`) is rewritten this often, and on exit."""
COLLECT = "collect"


@dataclass
class NodeParts:
    """What one node agent is built from."""

    name: str
    collector: Any
    allocation: Any
    spool_dir: Path
    host_id: str | None = None
    receiver: OtlpReceiver | None = None
    """The node's OTLP receiver for jobs' FLOPs (None: no measured FLOPs)."""
    network: Any = None
    """The node's `NetworkSource` (InfiniBand/RoCE ports; None: not reported)."""


def apply_overrides(
    cfg: Config,
    *,
    backend: str | None = None,
    bootstrap: str | None = None,
    topic: str | None = None,
    interval: float | None = None,
    spool_dir: str | None = None,
    node: str | None = None,
) -> Config:
    """`cfg` with the command-line flags that were given (None or "" means not given) replacing the file's."""
    kafka = {k: v for k, v in (("bootstrap_servers", bootstrap), ("topic", topic)) if v}
    agent = {k: v for k, v in (("backend", backend), ("interval_s", interval), ("spool_dir", spool_dir),
                               ("node", node)) if v is not None and v != ""}
    if interval is not None and interval <= 0:
        raise ConfigError("--interval must be a positive number of seconds")
    return msgspec.structs.replace(
        cfg,
        kafka=msgspec.structs.replace(cfg.kafka, **kafka),
        agent=msgspec.structs.replace(cfg.agent, **agent),
    )


def nvml_node(cfg: Config, *, dry_run: bool = False) -> NodeParts:
    """This machine's GPUs through NVML; a clear error when NVML cannot start. A dry run keeps no kernel-log
    cursor (what it prints must not count as reported for the real agent)."""
    from gpufleet.agents.allocation import build_source

    try:
        from gpufleet.agents.collectors.nvml import NvmlCollector
    except ImportError as exc:
        raise UsageError(
            f"the NVML backend cannot be loaded ({exc}); install nvidia-ml-py or use --backend simulated"
        ) from None
    agent = cfg.agent
    collector = NvmlCollector(
        interval_ms=round(agent.interval_s * 1000), deadline_s=agent.nvml_deadline_s,
        slow_every_s=agent.nvml_slow_every_s, call_budget_per_gpu=agent.nvml_call_budget_per_gpu,
        kmsg_path=agent.kmsg_path,
        kmsg_cursor=Path(agent.spool_dir) / "kmsg-cursor.json" if agent.kmsg_path and not dry_run else None,
        release_file=Path(agent.nvml_release_file) if agent.nvml_release_file else None,
        inventory_every_s=agent.nvml_inventory_every_s, gpus_expected=agent.gpus_expected,
        enumeration_file=None if dry_run else Path(agent.spool_dir) / "gpus.json",
    )
    collector.open()  # NvmlUnavailable says why and how to fix it
    uuids = getattr(collector, "gpu_uuids", None)
    uuid_index = {u: i for i, u in enumerate(uuids)} if uuids else None
    allocation = build_source(cfg.agent.allocation, uuid_index=uuid_index, devices=collector.devices)
    network = SysfsPorts(agent.sysfs_root) if agent.network_ports else None
    return NodeParts(cfg.agent.node, collector, allocation, Path(cfg.agent.spool_dir), _machine_id(), network=network)


def simulated_nodes(cfg: Config, spec: FleetSpec) -> tuple[SimulatedFleet, list[NodeParts]]:
    """A simulated fleet: one `NodeParts` per node, each spooling under `<spool_dir>/<node>`.

    With `agent.allocation.source` left at `none` every node reads the simulator's own allocations (its
    ground truth); any other source is built for each node as on a real one (its GPU UUIDs, its
    `devices`), so a test kubelet, a fake /proc tree or an allocation file decides the tenants instead.
    """
    from gpufleet.agents.allocation import build_source

    try:
        fleet = spec.build()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    root = Path(cfg.agent.spool_dir)
    own = cfg.agent.allocation.source == "none"
    parts = [NodeParts(node.name, node, node.allocation_source() if own else build_source(
        cfg.agent.allocation, uuid_index={u: i for i, u in enumerate(node.gpu_uuids)}, devices=node.devices),
        root / node.name, network=node.network_source() if cfg.agent.network_ports else None)
        for node in fleet.nodes]
    return fleet, parts


def publish_uuids(path: Path, parts: list[NodeParts]) -> None:
    """Write `{"nodes": {node: [GPU UUID by index]}}` (JSON) atomically: what a test kubelet or allocation
    file needs to name the simulated GPUs."""
    import json

    doc = {"nodes": {p.name: list(getattr(p.collector, "gpu_uuids", [])) for p in parts}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def start_receivers(parts: list[NodeParts], settings: ReceiverSettings, gpus: dict[int, str] | None = None) -> None:
    """Start one OTLP receiver per node (`settings` for each); on failure close the ones started.

    `gpus` (index -> uuid), when known now, answers jobs before the first interval.
    """
    try:
        for p in parts:
            p.receiver = OtlpReceiver(settings, gpus=gpus).start()
    except ReceiverError:
        close_receivers(parts)
        raise


def count_sources(receiver: OtlpReceiver) -> dict[str, MetricSource]:
    """The receiver's tokens and samples, by the `GpuSample` field each is stamped into."""
    return {"tokens_measured": receiver.source(TOKENS.name), "samples_measured": receiver.source(SAMPLES.name)}


def close_receivers(parts: list[NodeParts]) -> None:
    for p in parts:
        if p.receiver is not None:
            try:
                p.receiver.close()
            except Exception:
                log.exception("closing the OTLP receiver of node %s failed", p.name)
            p.receiver = None


def open_spools(parts: list[NodeParts], per_node_bytes: int) -> list[Spool]:
    """One spool per node; on failure the ones opened are closed and `SpoolError` is raised."""
    spools: list[Spool] = []
    try:
        for p in parts:
            spools.append(Spool(p.spool_dir, per_node_bytes))
    except SpoolError:
        for s in spools:
            s.close()
        raise
    return spools


def jobs_spec(cfg: Config, fleet: SimulatedFleet, spec: FleetSpec, parts: list[NodeParts], jobs: int) -> JobsSpec:
    """What the simulated FLOPs jobs need: the fleet, each node's receiver, the GPU's peak FLOP/s."""
    from gpufleet.agents.flops_jobs import JobsSpec
    from gpufleet.gpu_facts import peak_flops

    peak = peak_flops(fleet.model, cfg.peak_flops)
    if peak is None:
        raise ConfigError(f"no peak FLOP/s is known for {fleet.model!r}: add it under peak_flops in the "
                          "config to run --flops-jobs")
    return JobsSpec(fleet=spec, endpoints={p.name: p.receiver.endpoint for p in parts if p.receiver is not None},
                    jobs=jobs, peak_flop_s=peak, step_ms=spec.interval_ms,
                    export_interval_ms=max(1000, 2 * spec.interval_ms), parent_pid=os.getpid())


def attach_receivers(cfg: Config, parts: list[NodeParts], fleet: SimulatedFleet | None, spec: FleetSpec | None,
                     flops_jobs: int) -> JobsProcess:
    """Give the nodes their OTLP receivers (see the module docstring); the FLOPs jobs to start, if any."""
    if fleet is None or spec is None:
        if cfg.agent.otlp_receiver_enabled:
            uuids = getattr(parts[0].collector, "gpu_uuids", None)
            start_receivers(parts, ReceiverSettings.from_agent_config(cfg.agent),
                            dict(enumerate(uuids)) if uuids else None)
        return JobsProcess(None)
    if flops_jobs == 0:
        return JobsProcess(None)
    start_receivers(parts, ReceiverSettings(port=0))
    log.info("OTLP receivers: %s", ", ".join(f"{p.name} {p.receiver.endpoint}" for p in parts if p.receiver))
    return JobsProcess(jobs_spec(cfg, fleet, spec, parts, flops_jobs))


class JobsProcess:
    """The simulated FLOPs jobs' child process: started once after the first interval, stopped at exit."""

    def __init__(self, spec: JobsSpec | None) -> None:
        self._spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self._tried = False

    def start_once(self) -> None:
        if self._spec is None or self._tried:
            return
        self._tried = True
        from gpufleet.agents.flops_jobs import start_process

        try:
            self.proc = start_process(self._spec)
            log.info("simulated FLOPs jobs started (pid %d): %d job(s)", self.proc.pid, self._spec.jobs)
        except OSError as exc:
            log.error("cannot start the simulated FLOPs jobs: %s; no measured FLOPs this run", exc)

    def stop(self) -> None:
        if self.proc is None:
            return
        from gpufleet.agents.flops_jobs import stop_process

        code = stop_process(self.proc)
        if code not in (0, None, -signal.SIGTERM):  # SIGTERM before its handler was set: stopped all the same
            log.warning("the simulated FLOPs jobs exited with code %s", code)
        self.proc = None


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
@click.option("--node", help="This node's name (default agent.node, the host name); Kubernetes passes spec.nodeName.")
@click.option("--nodes", type=click.IntRange(min=1), default=32, show_default=True, help="Simulated nodes.")
@click.option("--gpus", type=click.IntRange(min=1), default=8, show_default=True, help="GPUs per simulated node.")
@click.option("--seed", type=int, default=0, show_default=True, help="Simulation seed.")
@click.option("--tenants", type=click.IntRange(min=1), default=3, show_default=True, help="Simulated tenants.")
@click.option("--faults", type=click.Choice(["default", "none"]), default="default", show_default=True,
              help="Inject the demo's faults into the simulated fleet.")
@click.option("--ground-truth", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the simulated fleet's ground truth (JSON) here every minute and on exit.")
@click.option("--publish-uuids", "publish_uuids_to", type=click.Path(dir_okay=False, path_type=Path),
              help="Write each node's GPU UUIDs here (JSON) before the first interval, for a test kubelet or "
                   "allocation file to name them.")
@click.option("--flops-jobs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Simulated jobs that report model FLOPs over OTLP to their nodes' receivers (simulated backend).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds.")
@click.option("--dry-run", is_flag=True,
              help="Print each interval's messages as JSON lines on stdout; send, spool and listen to nothing.")
@click.option("--intervals", type=click.IntRange(min=1), help="Stop after this many intervals.")
def agent(
    config_path: str | None,
    backend: str | None,
    bootstrap: str | None,
    topic: str | None,
    interval: float | None,
    spool_dir: str | None,
    node: str | None,
    nodes: int,
    gpus: int,
    seed: int,
    tenants: int,
    faults: str,
    ground_truth: Path | None,
    publish_uuids_to: Path | None,
    flops_jobs: int,
    duration: float | None,
    dry_run: bool,
    intervals: int | None,
) -> None:
    """Collect GPU counters every interval and stream them to Kafka (spooling to disk meanwhile)."""
    cfg = apply_overrides(load(config_path), backend=backend, bootstrap=bootstrap, topic=topic,
                          interval=interval, spool_dir=spool_dir, node=node)
    # every config problem named at once; never probes the network
    validate_startup(cfg, role="agent", extra=agent_problems(cfg))
    interval_ms = max(1, round(cfg.agent.interval_s * 1000))
    kafka_kw = producer_kwargs(cfg.kafka)  # fails fast on TLS/SASL mistakes, in a dry run too
    clock = SystemClock()
    start_ms = clock.now_ms()
    fleet = None
    spec = None
    if cfg.agent.backend == "simulated":
        from gpufleet.agents.flops_jobs import FleetSpec

        spec = FleetSpec(cluster=cfg.agent.cluster, nodes=nodes, gpus=gpus, tenants=tenants, seed=seed,
                         faults=faults, start_ms=start_ms, interval_ms=interval_ms)
        fleet, parts = simulated_nodes(cfg, spec)
    else:
        for flag, given in (("--ground-truth", ground_truth is not None), ("--flops-jobs", flops_jobs > 0)):
            if given:
                raise click.UsageError(f"{flag} needs --backend simulated")
        parts = [nvml_node(cfg, dry_run=dry_run)]
    if dry_run and flops_jobs:
        raise click.UsageError("--flops-jobs needs receivers, which a --dry-run does not start")
    if publish_uuids_to is not None:
        publish_uuids(publish_uuids_to, parts)
    try:
        jobs = JobsProcess(None) if dry_run else attach_receivers(cfg, parts, fleet, spec, flops_jobs)
        spools = dry_run_spools(parts) if dry_run else open_spools(
            parts, max(MIN_NODE_SPOOL_BYTES, cfg.agent.spool_max_bytes // len(parts)))
    except (GpufleetError, click.ClickException):
        close_receivers(parts)
        for p in parts:
            p.collector.close()
        raise
    sender = None if dry_run else _sender(kafka_kw, cfg.kafka.topic, parts, spools)
    agents = [
        NodeAgent(cluster=cfg.agent.cluster, node=p.name, collector=p.collector, spool=s,  # type: ignore[arg-type]
                  allocation=p.allocation, send_errors=(lambda i=i: sender.errors_for(i)) if sender else lambda: 0,
                  flops=p.receiver.flops_source if p.receiver else None,
                  counts=count_sources(p.receiver) if p.receiver else None,
                  on_gpus=p.receiver.set_gpus if p.receiver else None, peak_flops=cfg.peak_flops,
                  otlp_endpoint=cfg.agent.otlp_export_endpoint, otlp_interval_ms=interval_ms, host_id=p.host_id,
                  network=p.network)
        for i, (p, s) in enumerate(zip(parts, spools, strict=True))
    ]
    log.info("agent: %d node(s), %s backend, every %d ms -> %s", len(agents), cfg.agent.backend, interval_ms,
             "stdout (dry run)" if dry_run else f"{cfg.kafka.bootstrap_servers} topic {cfg.kafka.topic} "
             f"(spool {cfg.agent.spool_dir})")
    stop = threading.Event()
    truth_written = [start_ms]
    collected = Collected(spools, cfg.agent.collect_stale_s, released=lambda: all(a.released for a in agents))
    health = None if dry_run or not cfg.agent.health_port else HealthServer(
        collected.liveness, cfg.agent.health_host, cfg.agent.health_port).start()

    def write_truth(force: bool = False) -> None:
        now = clock.now_ms()
        if fleet is not None and ground_truth is not None and (force or now - truth_written[0] >= TRUTH_EVERY_MS):
            fleet.write_ground_truth(ground_truth, start_ms, now)
            truth_written[0] = now

    def after_tick() -> None:
        if sender is not None:
            sender.notify()
        collected.check()
        write_truth()
        jobs.start_once()  # after the first interval: every receiver knows its node's GPUs by then
        if intervals is not None and collected.ticks >= intervals:
            stop.set()

    if sender is not None:
        sender.start()
    ticks = 0
    try:
        with _stop_on_signals(stop):
            ticks = run_many(agents, interval_ms=interval_ms, stop=stop, clock=clock, duration_s=duration,
                             after_tick=after_tick)
    finally:
        jobs.stop()
        left = sender.stop(SHUTDOWN_FLUSH_S) if sender is not None else 0
        for a in agents:
            a.close()
        close_receivers(parts)
        write_truth(force=True)
        if health is not None:
            health.stop()
    if sender is None:
        click.echo(f"gpufleet agent: {ticks} intervals x {len(agents)} node(s); dry run, "
                   f"{collected.total()} messages printed, nothing sent", err=True)
        return
    click.echo(f"gpufleet agent: {ticks} intervals x {len(agents)} node(s); {sender.acked_total} messages "
               f"delivered, {left} left spooled", err=True)


def _sender(kafka_kw: dict[str, Any], topic: str, parts: list[NodeParts], spools: list[Spool]) -> Sender:
    from kafka import KafkaProducer

    return Sender(lambda: KafkaProducer(**kafka_kw), topic, [(p.name, s) for p, s in zip(parts, spools, strict=True)])


def dry_run_spools(parts: list[NodeParts]) -> list[Spool]:
    """One `StdoutSpool` per node, all printing whole lines to stdout."""
    lock = threading.Lock()
    out = click.get_binary_stream("stdout")
    return [StdoutSpool(out, lock) for _ in parts]  # type: ignore[misc]


class Collected:
    """The agent's heartbeat: `collect` beats whenever an interval spooled (or printed) a message.

    Each spool's `next_seq` moves past every message it takes, so their sum grows exactly when a
    collection completed; `/healthz` and `/readyz` fail after `agent.collect_stale_s` without one. An
    agent whose collectors all let go of NVML on the operator's request (`released`) beats too: a liveness
    probe must not restart it into holding NVML during a driver upgrade or GPU reset.
    """

    def __init__(self, spools: list[Any], bound_s: float, clock: Callable[[], float] = time.monotonic,
                 released: Callable[[], bool] = lambda: False) -> None:
        self.spools = spools
        self._released = released
        self.liveness = Liveness(clock).expect(COLLECT, bound_s)
        self.ticks = 0
        self._start = self.total()
        self._seen = self._start

    def total(self) -> int:
        return sum(int(s.next_seq) for s in self.spools)

    def check(self) -> None:
        """After an interval: count it, and beat if a message was taken since the last check."""
        self.ticks += 1
        now = self.total()
        if now > self._seen or self._released():  # released on request (NodeReleased): alive, by design
            self.liveness.beat(COLLECT)
        self._seen = now
