"""End to end: the simulated fleet's injected faults, through the ingest row builder and the shipped
default rules, arrive in a real Alertmanager with the right labels and leave it when they clear.

The simulator's ordinary jobs may raise alerts of their own (a long idle phase, a crashed job), so
this test checks that each injected fault's alert is there, not that nothing else is.
"""

from __future__ import annotations

import msgspec

from gpufleet.agents.simulation import faults as fk
from gpufleet.agents.simulation.faults import Fault
from gpufleet.agents.simulation.fleet import SimulatedFleet
from gpufleet.agents.simulation.reports import simulate_reports
from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.ingest.rows import insert_reports
from tests.alerts.helpers import MIN, am_labels, base_ms

DAY = 24 * 60 * MIN
ANCHOR = 5 * 60 * MIN + 20 * MIN
"""05:20 UTC. The simulator's schedule follows the diurnal load (time of day), so the scenario always
starts at this time of day (the latest such instant before the wall clock allows): then the jobs
around the faults, and what the GPUs do after the faults clear, are the same on every run."""


def test_injected_faults_fire_and_resolve(alertmanager, alerts_cfg, ch_store, ch_target) -> None:
    latest = base_ms()
    b = latest - (latest - ANCHOR) % DAY
    # Up to a day before the wall clock: firing alerts must say they are valid until after it.
    day_valid = msgspec.structs.replace(alerts_cfg.alerts, resend_s=DAY / 1000)
    alerts_cfg = msgspec.structs.replace(alerts_cfg, alerts=day_valid)
    start, end = b + 5 * MIN, b + 30 * MIN
    faults = [
        Fault(fk.FELL_OFF_BUS, 0, 1, start, end),
        Fault(fk.THERMAL_THROTTLE, 0, 2, start, end),
        Fault(fk.ZOMBIE_PROCESS, 1, 0, start, end),
        Fault(fk.HELD_NO_PROCESS, 1, 1, start, end),
        Fault(fk.IDLE_ALLOCATED, 1, 2, start, end),
        Fault(fk.NODE_SILENT, 2, None, b + 10 * MIN, end),
    ]
    fleet = SimulatedFleet(nodes=3, gpus_per_node=4, tenants=2, seed=7, start_ms=b, cluster="sim", faults=faults,
                           interval_ms=10_000)
    insert_reports(ch_store, simulate_reports(fleet, b, b + 45 * MIN, 10_000), b)
    ev = Evaluator(alerts_cfg, ch_store, alertmanager_url=alertmanager.url)

    def gpu_labels(alertname: str, severity: str, node: int, g: int, tenant: bool = False) -> dict[str, str]:
        labels = {"alertname": alertname, "severity": severity, "cluster": "sim", "node": fleet.node_names[node],
                  "gpu": fleet.gpu_const(node, g).uuid, "gpu_index": str(g)}
        if tenant:
            job = fleet.job_at(node, g, b + 22 * MIN)
            assert job is not None  # the simulator books a job around held/idle faults
            labels["tenant"] = job.tenant
        return labels

    expected = [
        gpu_labels("GpuFailing", "critical", 0, 1),
        gpu_labels("GpuDegraded", "warning", 0, 2),
        gpu_labels("GpuBusyUnallocated", "warning", 1, 0),
        gpu_labels("GpuHeldNoProcess", "warning", 1, 1, tenant=True),
        gpu_labels("GpuIdleAllocated", "warning", 1, 2, tenant=True),
        {"alertname": "NodeSilent", "severity": "critical", "cluster": "sim", "node": fleet.node_names[2]},
    ]
    # 17 minutes into the faults: every `for` (at most 15m for idle) is met.
    report = ev.evaluate_once(b + 22 * MIN)
    assert report.errors == []
    firing = am_labels(alertmanager.url)
    for labels in expected:
        assert labels in firing, f"{labels['alertname']} missing from Alertmanager: {firing}"

    # 15 minutes after the faults cleared (past keep_firing_for and the booked jobs' tails).
    report = ev.evaluate_once(b + 45 * MIN)
    assert report.errors == []
    firing = am_labels(alertmanager.url)
    for labels in expected:
        assert labels not in firing, f"{labels['alertname']} did not resolve"
    assert {r.alertname for r in report.resolved} >= {lab["alertname"] for lab in expected}


def test_injected_job_faults_fire_naming_the_ground_truth(alertmanager, alerts_cfg, ch_store) -> None:
    """A hung job and a straggler, through the shipped default rules (10 minutes), match the simulator's truth."""
    latest = base_ms()
    b = latest - (latest - ANCHOR) % DAY
    day_valid = msgspec.structs.replace(alerts_cfg.alerts, resend_s=DAY / 1000)
    alerts_cfg = msgspec.structs.replace(alerts_cfg, alerts=day_valid)
    start, end = b + 5 * MIN, b + 30 * MIN
    faults = [Fault(fk.JOB_HANG, 1, 2, start, end), Fault(fk.STRAGGLER, 2, 1, start, end)]
    fleet = SimulatedFleet(nodes=4, gpus_per_node=4, tenants=2, seed=7, start_ms=b, cluster="sim", faults=faults,
                           interval_ms=10_000)
    insert_reports(ch_store, simulate_reports(fleet, b, b + 45 * MIN, 10_000), b)
    truth = {f["kind"]: f for f in fleet.ground_truth(b, b + 45 * MIN)["faults"]}
    hang, straggler = truth[fk.JOB_HANG], truth[fk.STRAGGLER]
    ev = Evaluator(alerts_cfg, ch_store, alertmanager_url=alertmanager.url)

    report = ev.evaluate_once(b + 22 * MIN)  # 17 minutes into the faults
    assert report.errors == []
    firing = am_labels(alertmanager.url)
    stalled = [lab for lab in firing if lab["alertname"] == "JobStalled"]
    assert stalled == [{"alertname": "JobStalled", "severity": "warning", "cluster": "sim",
                        "tenant": hang["tenant"], "job": hang["job"]}]
    stragglers = [lab for lab in firing if lab["alertname"] == "JobStraggler"]
    assert stragglers == [{"alertname": "JobStraggler", "severity": "warning", "cluster": "sim",
                           "node": straggler["node"], "gpu": straggler["uuid"], "gpu_index": str(straggler["gpu"]),
                           "tenant": straggler["tenant"], "job": straggler["job"]}]
    (rec,) = [r for r in ev.open_alerts() if r.alertname == "JobStalled"]
    assert rec.annotations["description"].startswith(f"GPUs: {', '.join(sorted(g['uuid'] for g in hang['gpus']))}.")
    (rec,) = [r for r in ev.open_alerts() if r.alertname == "JobStraggler"]
    assert "SM clock held low" in rec.annotations["summary"]

    report = ev.evaluate_once(b + 45 * MIN)  # 15 minutes after the faults cleared
    assert report.errors == []
    assert not {"JobStalled", "JobStraggler"} & {lab["alertname"] for lab in am_labels(alertmanager.url)}
    assert {r.alertname for r in report.resolved} >= {"JobStalled", "JobStraggler"}
