"""Each fault, hand-built, through the shipped default rules into a real Alertmanager and back out.

One minute per sample; sample k covers (base + (k-1) min, base + k min]. The faults:
  n1 gpu1  fallen off the bus (error) k=20..29, XID 79 at k=20          -> GpuFailing
  n2 gpu0  HW thermal throttle at 92 C k=10..29                          -> GpuDegraded (for 5m), and
           JobStraggler (for 10m): the one GPU of acme's job that throttles
  n2 gpu1  tenant beta, util 1 %, a process, k=5..40                     -> GpuIdleAllocated (for 15m)
  n3 gpu0  tenant gamma, no process, k=5..40                             -> GpuHeldNoProcess (for 10m)
  n3 gpu1  unallocated, 1 process, 24 GiB, k=5..40                       -> GpuBusyUnallocated (for 5m)
  n4       reports k=1..20 and k=31..50 only                             -> NodeSilent (after 60s)
Every other GPU is allocated to acme and busy. Expected alerts are worked out by hand below.
"""

from __future__ import annotations

from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.state import firing_alerts
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.pipeline.store import Store
from gpufleet.wire import GpuSample
from tests.alerts.helpers import MIN, am_alerts, am_labels, base_ms, by_name, iso, minute_reports
from tests.builders import gpu

GIB = 1 << 30


def healthy(i: int, node: str) -> GpuSample:
    return gpu(i, node, tenant="acme", job="j-acme", util_gpu_ratio=0.9, tensor_active_ratio=0.6,
               compute_processes=1, temp_gpu_c=60.0, clock_event_reasons=0, mem_used_bytes=40 * GIB)


def n1(k: int) -> list[GpuSample]:
    if 20 <= k <= 29:
        lost = gpu(1, "n1", tenant="acme", job="j-acme", error="GPU is lost", xids=[79] if k == 20 else [],
                   util_gpu_ratio=None, power_w=None, tensor_active_ratio=None, compute_processes=None)
        return [healthy(0, "n1"), lost]
    return [healthy(0, "n1"), healthy(1, "n1")]


def n2(k: int) -> list[GpuSample]:
    g0 = healthy(0, "n2")
    if 10 <= k <= 29:
        g0 = gpu(0, "n2", tenant="acme", job="j-acme", util_gpu_ratio=0.9, tensor_active_ratio=0.6,
                 compute_processes=1, temp_gpu_c=92.0, clock_event_reasons=0x40, mem_used_bytes=40 * GIB)
    util = 0.01 if 5 <= k <= 40 else 0.9
    g1 = gpu(1, "n2", tenant="beta", job="j-beta", util_gpu_ratio=util, tensor_active_ratio=0.0,
             compute_processes=1, temp_gpu_c=40.0, clock_event_reasons=0, mem_used_bytes=10 * GIB)
    return [g0, g1]


def n3(k: int) -> list[GpuSample]:
    if not 5 <= k <= 40:
        return [healthy(0, "n3"), healthy(1, "n3")]
    held = gpu(0, "n3", tenant="gamma", job="j-gamma", util_gpu_ratio=0.0, tensor_active_ratio=0.0,
               compute_processes=0, temp_gpu_c=35.0, clock_event_reasons=0, mem_used_bytes=0)
    zombie = gpu(1, "n3", util_gpu_ratio=0.25, tensor_active_ratio=0.0, compute_processes=1,
                 temp_gpu_c=50.0, clock_event_reasons=0, mem_used_bytes=24 * GIB)
    return [held, zombie]


def n4(k: int) -> list[GpuSample]:
    return [healthy(0, "n4"), healthy(1, "n4")]


FAILING = {"alertname": "GpuFailing", "severity": "critical", "cluster": "c1", "node": "n1", "gpu": "GPU-n1-1",
           "gpu_index": "1"}
DEGRADED = {"alertname": "GpuDegraded", "severity": "warning", "cluster": "c1", "node": "n2", "gpu": "GPU-n2-0",
            "gpu_index": "0"}
IDLE = {"alertname": "GpuIdleAllocated", "severity": "warning", "cluster": "c1", "node": "n2", "gpu": "GPU-n2-1",
        "gpu_index": "1", "tenant": "beta"}
HELD = {"alertname": "GpuHeldNoProcess", "severity": "warning", "cluster": "c1", "node": "n3", "gpu": "GPU-n3-0",
        "gpu_index": "0", "tenant": "gamma"}
BUSY = {"alertname": "GpuBusyUnallocated", "severity": "warning", "cluster": "c1", "node": "n3", "gpu": "GPU-n3-1",
        "gpu_index": "1"}
SILENT = {"alertname": "NodeSilent", "severity": "critical", "cluster": "c1", "node": "n4"}
STRAGGLER = {"alertname": "JobStraggler", "severity": "warning", "cluster": "c1", "node": "n2", "gpu": "GPU-n2-0",
             "gpu_index": "0", "tenant": "acme", "job": "j-acme"}


def _sorted(labels: list[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(labels, key=lambda lab: sorted(lab.items()))


def _states(client, db: str) -> dict[tuple[str, str], tuple[str, int, int | None, int | None]]:
    rows = client.query(
        f"SELECT alertname, labels['node'], state, toUnixTimestamp64Milli(active_at), "
        f"toUnixTimestamp64Milli(starts_at), toUnixTimestamp64Milli(ends_at) FROM {db}.alerts FINAL"
    ).result_rows
    return {(r[0], r[1]): (r[2], r[3], r[4], r[5]) for r in rows}


def test_every_fault_fires_in_alertmanager_and_resolves(alertmanager, alerts_cfg, ch_client, ch_target) -> None:
    b = base_ms()
    db = ch_target.database
    store = Store(ch_client, db)
    ks = range(1, 51)
    reports = (minute_reports("n1", b, ks, n1) + minute_reports("n2", b, ks, n2) + minute_reports("n3", b, ks, n3)
               + minute_reports("n4", b, [*range(1, 21), *range(31, 51)], n4))
    insert_reports(store, reports, b + 51 * MIN)
    ev = Evaluator(alerts_cfg, store, alertmanager_url=alertmanager.url)

    # k=8: idle, held and busy have held 4 minutes (k=5..8): pending, not sent.
    report = ev.evaluate_once(b + 8 * MIN)
    assert report.errors == []
    assert am_alerts(alertmanager.url) == []
    assert _states(ch_client, db) == {
        ("GpuIdleAllocated", "n2"): ("pending", b + 4 * MIN, None, None),
        ("GpuHeldNoProcess", "n3"): ("pending", b + 4 * MIN, None, None),
        ("GpuBusyUnallocated", "n3"): ("pending", b + 4 * MIN, None, None),
    }

    # k=20: the failing GPU's first bad sample fires at once; the others are sustained by now.
    report = ev.evaluate_once(b + 20 * MIN)
    assert report.errors == []
    assert sorted(r.alertname for r in report.fired) == [
        "GpuBusyUnallocated", "GpuDegraded", "GpuFailing", "GpuHeldNoProcess", "GpuIdleAllocated", "JobStraggler"]
    assert am_labels(alertmanager.url) == _sorted([FAILING, DEGRADED, IDLE, HELD, BUSY, STRAGGLER])
    got = by_name(am_alerts(alertmanager.url))
    assert {a["startsAt"] for a in got.values()} == {iso(b + 20 * MIN)}
    assert got["GpuFailing"]["endsAt"] == iso(b + 20 * MIN + 4 * 3600 * 1000)  # valid for 4 x resend_s
    assert got["GpuFailing"]["annotations"] == {
        "summary": "GPU 1 on n1 (c1) is failing: unreachable, xid_79",
        "description": "Model NVIDIA H100 80GB HBM3, tenant 'acme', job 'j-acme'. Drain the node and reset or "
                       "replace the GPU.",
        "runbook_url": "docs/alerts.md#gpufailing",
    }
    # Idle since the end of k=4 (seen pending at k=8): 16 minutes = 0.27 GPU-hours; utilization 1 %.
    assert got["GpuIdleAllocated"]["annotations"]["summary"] == (
        "Tenant beta holds GPU 1 on n2 idle (1.0% < 5% for 16m): 0.27 GPU-hours wasted so far")
    assert got["GpuHeldNoProcess"]["annotations"]["summary"] == (
        "Tenant gamma holds GPU 0 on n3 with no process for 16m (job 'j-gamma' crashed or never started): "
        "0.27 GPU-hours wasted so far")
    assert got["GpuBusyUnallocated"]["annotations"]["summary"] == (
        "GPU 1 on n3 is allocated to no one but runs 1 process(es) holding 24.0 GiB (a zombie after its job ended?)")
    assert got["GpuDegraded"]["annotations"]["summary"] == (
        "GPU 0 on n2 (c1) is degraded: throttling (hw_thermal), temperature 92 C >= 87 C")
    assert got["JobStraggler"]["annotations"]["summary"].startswith(
        "Job j-acme (acme) is held back by GPU 0 on n2: thermal throttling;")
    listed = firing_alerts(store)
    assert [a["alertname"] for a in listed] == [
        "GpuFailing", "GpuBusyUnallocated", "GpuDegraded", "GpuHeldNoProcess", "GpuIdleAllocated", "JobStraggler"]
    assert all(a["state"] == "firing" and a["starts_at"] == iso(b + 20 * MIN) for a in listed)
    assert listed[0]["labels"] == FAILING

    # k=26: node n4 last reported at k=20, six minutes ago.
    report = ev.evaluate_once(b + 26 * MIN)
    assert [r.alertname for r in report.fired] == ["NodeSilent"]
    assert am_labels(alertmanager.url) == _sorted([FAILING, DEGRADED, IDLE, HELD, BUSY, SILENT, STRAGGLER])
    silent = by_name(am_alerts(alertmanager.url))["NodeSilent"]
    assert silent["startsAt"] == iso(b + 26 * MIN)
    assert silent["annotations"]["summary"] == f"Node n4 (c1) has sent nothing for 6m (last report {iso(b + 20 * MIN)})"

    # k=35: the bus, the heat and the node are back (last failing sample k=29 is older than
    # keep_firing_for = 5m); Alertmanager drops resolved alerts from its active list.
    report = ev.evaluate_once(b + 35 * MIN)
    assert sorted(r.alertname for r in report.resolved) == ["GpuDegraded", "GpuFailing", "JobStraggler",
                                                             "NodeSilent"]
    assert am_labels(alertmanager.url) == _sorted([IDLE, HELD, BUSY])
    states = _states(ch_client, db)
    assert states[("GpuFailing", "n1")] == ("resolved", b + 19 * MIN, b + 20 * MIN, b + 35 * MIN)
    assert states[("NodeSilent", "n4")] == ("resolved", b + 20 * MIN, b + 26 * MIN, b + 35 * MIN)
    assert states[("GpuDegraded", "n2")][0] == "resolved"

    # k=45: everything healthy again.
    report = ev.evaluate_once(b + 45 * MIN)
    assert sorted(r.alertname for r in report.resolved) == ["GpuBusyUnallocated", "GpuHeldNoProcess",
                                                              "GpuIdleAllocated"]
    assert am_alerts(alertmanager.url) == []
    assert firing_alerts(store) == []
    assert {s[0] for s in _states(ch_client, db).values()} == {"resolved"}
