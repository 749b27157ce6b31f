"""A simulated fleet loaded into chDB for the dashboard tests: every panel and alert rule has data.

70 minutes of a 4-node x 4-GPU simulated fleet (`agents.collectors.simulated`) at 20 s, with one
fault of every kind placed so that, at the end `END_MS`, each Grafana alert rule's condition holds;
jobs of the first tenant report measured FLOPs (as jobs using the OTLP helper would); some agents
report spool depth and send errors; for the last 8 minutes a second agent (another boot id) on one
node reports one of its GPUs again; three messages sit in the dead-letter table; October usage is
billed and closed, more October usage arrives late, and November is closed too, so statements and
adjustments exist; and the real alert evaluator has run over the data, so the `alerts` table holds
firing and resolved episodes. Everything goes through the pipeline's own insert path
(`pipeline.rows.insert_reports`).

`FOCUS_NODE`/`FOCUS_GPU` is the GPU where an ECC double-bit error happens while a tenant holds it
and which then idles: the tests' concrete variable values point there, so every panel has data for
one cluster, node, tenant, model and GPU too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gpufleet.agents.collectors.simulated import Fault, SimulatedFleet, simulate_reports
from gpufleet.agents.flops_jobs import SAMPLE_TOKENS, TOKEN_FLOPS
from gpufleet.agents.simulation import faults as fk
from gpufleet.config import ClickHouseConfig, Config
from gpufleet.gpu_facts import peak_flops
from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.rules import packaged_rules
from gpufleet.pipeline.ingest.rows import Deriver, insert_reports
from gpufleet.pipeline.queries import billing
from gpufleet.wire import GpuSample, NodeReport
from tests.builders import report

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

MINUTE = 60_000
INTERVAL_MS = 20_000
END_MS = 1_795_002_000_000  # 2026-11-18T11:40:00Z
START_MS = END_MS - 70 * MINUTE
CLUSTER = "sim"
NODES = 4
GPUS = 4
FOCUS_NODE, FOCUS_GPU = 0, 1
H100 = "NVIDIA H100 80GB HBM3"
OCTOBER_MS = 1_793_484_000_000  # 2026-10-31T22:00:00Z
NOV_1_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
DEC_1_MS = 1_796_083_200_000  # 2026-12-01T00:00:00Z


def _faults() -> list[Fault]:
    s, e = START_MS, END_MS
    return [
        Fault(fk.NODE_SILENT, 0, None, s + 1 * MINUTE, s + 3 * MINUTE),  # a gap on the focus node
        Fault(fk.ECC_DBE, FOCUS_NODE, FOCUS_GPU, s + 7 * MINUTE, s + 9 * MINUTE),  # inside the booking
        Fault(fk.IDLE_ALLOCATED, FOCUS_NODE, FOCUS_GPU, s + 15 * MINUTE, e + 5 * MINUTE),
        Fault(fk.HELD_NO_PROCESS, 0, 2, s + 20 * MINUTE, e + 5 * MINUTE),
        Fault(fk.ZOMBIE_PROCESS, 0, 3, s + 25 * MINUTE, e + 5 * MINUTE),
        Fault(fk.NVLINK_ERRORS, 1, 2, s + 10 * MINUTE, s + 12 * MINUTE),
        Fault(fk.PCIE_REPLAY, 1, 3, s + 12 * MINUTE, s + 14 * MINUTE),
        Fault(fk.PAGE_RETIREMENT_PENDING, 2, 0, s + 14 * MINUTE, s + 16 * MINUTE),
        Fault(fk.ROW_REMAP_FAILURE, 2, 1, s + 16 * MINUTE, s + 18 * MINUTE),
        Fault(fk.POWER_THROTTLE, 2, 2, s + 18 * MINUTE, s + 20 * MINUTE),
        Fault(fk.THERMAL_THROTTLE, 1, 1, s + 28 * MINUTE, e + 5 * MINUTE),
        Fault(fk.FELL_OFF_BUS, 1, 0, s + 35 * MINUTE, e + 5 * MINUTE),
        Fault(fk.NODE_SILENT, 3, None, e - 3 * MINUTE, e + 5 * MINUTE),
        Fault(fk.STRAGGLER, 1, 1, s + 40 * MINUTE, e + 5 * MINUTE),  # the thermal GPU lags its node's job
        Fault(fk.JOB_HANG, 2, 3, s + 45 * MINUTE, e + 5 * MINUTE),  # node 2's job hangs for the last 25 minutes
        Fault(fk.NEEDS_RESET, 2, 2, e - 6 * MINUTE, e + 5 * MINUTE),
        Fault(fk.NEEDS_REBOOT, 2, 1, e - 7 * MINUTE, e + 5 * MINUTE),
        Fault(fk.NEEDS_DRAIN, 1, 3, e - 9 * MINUTE, e + 5 * MINUTE),
        Fault(fk.FABRIC_DEGRADED, 2, 3, e - 10 * MINUTE, e + 5 * MINUTE),
        Fault(fk.IB_PORT_FLAP, 2, 3, e - 8 * MINUTE, e + 5 * MINUTE),
        Fault(fk.IB_PORT_DOWN, 2, 0, e - 5 * MINUTE, e + 5 * MINUTE),
        Fault(fk.GPU_MISSING, 0, 0, e - 5 * MINUTE, e + 5 * MINUTE),
        Fault(fk.DRIVER_DRIFT, 1, None, e - 10 * MINUTE, e + 5 * MINUTE),
    ]


@dataclass(frozen=True)
class Loaded:
    """What the tests need to know about the loaded data."""

    database: str
    fleet: SimulatedFleet
    focus_node: str
    focus_tenant: str
    focus_gpu_uuid: str
    model: str


def _measure_flops(reports: list[NodeReport], tenant: str, fleet: SimulatedFleet) -> None:
    """Jobs of `tenant` report model FLOPs: 80% of the tensor-activity estimate, as a real job might, none
    while hung; and the tokens and samples those FLOPs stand for (gpufleet.agents.flops_jobs' model)."""
    jobs = [fleet.fault_job(f) for f in fleet.faults if f.kind in fk.JOB_KINDS]
    hung = {job.id: fleet.hung_windows(job) for job in jobs if job is not None}
    for r in reports:
        for g in r.gpus:
            if g.tenant == tenant and g.tensor_active_ratio is not None and g.model and not g.error:
                peak = peak_flops(g.model)
                if peak:
                    stuck = any(s <= r.time_ms < e for s, e in hung.get(g.job or "", ()))
                    g.flops_measured = 0.0 if stuck else 0.8 * g.tensor_active_ratio * peak * r.interval_ms / 1000
                    g.tokens_measured = g.flops_measured / TOKEN_FLOPS
                    g.samples_measured = g.tokens_measured / SAMPLE_TOKENS


def _sick_agent(reports: list[NodeReport], node: str) -> None:
    """One agent spools and fails to send for five minutes, drops NVML reads and rejects OTLP points, and later
    drops 3 messages from a full spool."""
    errors = 0
    for r in reports:
        if r.node == node and START_MS + 20 * MINUTE < r.time_ms <= START_MS + 25 * MINUTE:
            errors += 2
            r.agent.spool_depth = 5 + (r.seq % 4)
            r.agent.send_errors_total = errors
            r.agent.nvml_errors = 1
            r.agent.otlp_points_rejected_total = 3
        elif r.node == node and r.time_ms > START_MS + 25 * MINUTE:
            r.agent.send_errors_total = errors
    for r in reports:
        if r.node == node and r.time_ms > END_MS - 10 * MINUTE:
            r.agent.spool_dropped_total = 3  # the spool overflowed 10 minutes before the end: 3 messages lost
            r.agent.allocation_unknown_total = 8  # and its allocation source went silent for an interval


def _second_agent(reports: list[NodeReport], node: str, index: int) -> list[NodeReport]:
    """The agent installed twice on `node` for the last 8 minutes: a second boot id reports GPU `index` again
    (same samples; its time is claimed already, so it bills nothing and GpuClaimConflict fires)."""
    out = []
    for r in reports:
        if r.node == node and r.time_ms > END_MS - 8 * MINUTE:
            gpus = [g for g in r.gpus if g.index == index]
            out.append(report(node=node, cluster=r.cluster, seq=len(out), time_ms=r.time_ms, gpus=gpus,
                              interval_ms=r.interval_ms, boot_id=f"{node}-second-agent"))
    return out


def _insert_in_batches(store: Store, reports: list[NodeReport], deriver: Deriver) -> None:
    """Insert two minutes of reports at a time, ingested 1.5 s after the batch's last sample."""
    batch: list[NodeReport] = []
    for r in sorted(reports, key=lambda r: (r.time_ms, r.node)):
        if batch and r.time_ms // (2 * MINUTE) != batch[0].time_ms // (2 * MINUTE):
            insert_reports(store, batch, max(b.time_ms for b in batch) + 1500, deriver)
            batch = []
        batch.append(r)
    if batch:
        insert_reports(store, batch, max(b.time_ms for b in batch) + 1500, deriver)


def _dead_letters(store: Store) -> None:
    rows = [
        [END_MS - 30 * MINUTE, "gpufleet.samples", 0, 17, "sim-node-002", "not valid JSON: truncated", "{\"sch"],
        [END_MS - 20 * MINUTE, "gpufleet.samples", 1, 40, "sim-node-001", "invalid message: Expected `int`", "{}"],
        [END_MS - 10 * MINUTE, "gpufleet.samples", 1, 41, "sim-node-001", "invalid message: Expected `int`", "{}"],
    ]
    store.insert("dead_letters", rows, ["ingest_time", "topic", "partition", "offset", "key", "reason", "payload"])


def _october(tenants: list[str], start_ms: int, minutes: int, seq0: int) -> list[NodeReport]:
    """Hand-built reports of an extra node in October: one GPU per tenant, every 20 s."""
    out = []
    for k in range(minutes * 3):
        t = start_ms + (k + 1) * INTERVAL_MS
        gpus = [
            GpuSample(index=i, uuid=f"GPU-oct-{i}", model=H100, tenant=name, job=f"{name}-oct",
                      util_gpu_ratio=0.7, power_w=500.0, tensor_active_ratio=0.3, compute_processes=1)
            for i, name in enumerate(tenants)
        ]
        out.append(report(node="oct-node", cluster=CLUSTER, seq=seq0 + k, time_ms=t, gpus=gpus,
                          interval_ms=INTERVAL_MS, boot_id="oct-boot"))
    return out


def _billing(store: Store, tenants: list[str]) -> None:
    """October billed and closed; late October usage; November closed (adjustments booked there)."""
    insert_reports(store, _october(tenants, OCTOBER_MS, 10, 0), OCTOBER_MS + 11 * MINUTE)
    billing.close_period(store, "2026-10", NOV_1_MS + 5 * MINUTE)
    insert_reports(store, _october(tenants, OCTOBER_MS + 10 * MINUTE, 5, 30), END_MS + MINUTE)
    billing.close_period(store, "2026-11", DEC_1_MS + 5 * MINUTE)


def _alerts(store: Store) -> None:
    """The real evaluator (default rules, no Alertmanager) every 4 minutes from the 6th minute on."""
    cfg = Config(clickhouse=ClickHouseConfig(database=store.database))
    evaluator = Evaluator(cfg, store, rules=packaged_rules("default_rules.yaml"))
    for now in range(START_MS + 6 * MINUTE, END_MS + 1, 4 * MINUTE):
        report_ = evaluator.evaluate_once(now)
        if report_.errors:
            raise RuntimeError(f"alert evaluator failed on the test data: {report_.errors}")


def simulated_fleet() -> SimulatedFleet:
    return SimulatedFleet(nodes=NODES, gpus_per_node=GPUS, tenants=2, seed=7, start_ms=START_MS, cluster=CLUSTER,
                          faults=_faults(), model=H100, interval_ms=INTERVAL_MS)


def simulated_reports(fleet: SimulatedFleet) -> list[NodeReport]:
    """The fleet's messages as loaded: the first tenant's jobs report FLOPs, one agent is sick."""
    reports = list(simulate_reports(fleet, START_MS, END_MS, INTERVAL_MS))
    _measure_flops(reports, fleet.tenant_names[0], fleet)
    _sick_agent(reports, fleet.node_names[2])
    return reports


def load(store: Store) -> Loaded:
    """Load the dataset into the store's (migrated, empty) database."""
    fleet = simulated_fleet()
    reports = simulated_reports(fleet)
    _insert_in_batches(store, reports + _second_agent(reports, fleet.node_names[2], 3), Deriver())
    _dead_letters(store)
    _billing(store, list(fleet.tenant_names))
    _alerts(store)
    focus = next(
        g for r in reports if r.node == fleet.node_names[FOCUS_NODE] and r.time_ms == END_MS
        for g in r.gpus if g.index == FOCUS_GPU
    )
    if not focus.tenant:
        raise RuntimeError("the focus GPU should be held by a tenant at the end (its idle_allocated booking)")
    return Loaded(store.database, fleet, fleet.node_names[FOCUS_NODE], focus.tenant, focus.uuid, fleet.model)
