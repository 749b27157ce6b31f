"""Rule conditions at their edges, checked in a real Alertmanager: the `for` boundary, rising
counters (with a counter reset), MFU per tenant and for the fleet, extra rule labels."""

from __future__ import annotations

from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.rules import load_rules, parse_rules
from gpufleet.pipeline.ingest.rows import insert_reports
from tests.alerts.helpers import MIN, am_alerts, am_labels, base_ms, by_name, minute_reports
from tests.builders import gpu

H100_PEAK = 989e12  # dense BF16 FLOP/s of an H100 SXM (gpufleet/gpu_facts.py cites the datasheet)


def _busy(i: int, node: str, **over: object):
    fields = {"tenant": "acme", "job": "j1", "util_gpu_ratio": 0.9, "tensor_active_ratio": 0.6,
              "compute_processes": 1, "temp_gpu_c": 60.0, "clock_event_reasons": 0, **over}
    return gpu(i, node, **fields)


def test_degraded_fires_after_five_one_minute_samples_and_on_rising_counters(
        alertmanager, alerts_cfg, ch_store, ch_target) -> None:
    b = base_ms()

    def gpus(k: int):
        hot = {"clock_event_reasons": 0x80, "temp_gpu_c": 70.0} if k >= 10 else {}  # HW power brake from k=10
        pcie = 100 + 5 * min(max(k - 10, 0), 3)  # 100 .. k=10, then 105, 110, 115 and flat
        ecc = 50 if k <= 10 else (0 if k == 11 else 12)  # driver reload at k=11 resets the counter
        return [_busy(0, "n1", **hot), _busy(1, "n1", pcie_replay_count=pcie),
                _busy(2, "n1", ecc_corrected_volatile=ecc),
                _busy(3, "n1", clock_event_reasons=0x4)]  # SW power cap: normal under load, never degraded
    insert_reports(ch_store, minute_reports("n1", b, range(1, 31), gpus), b)
    ev = Evaluator(alerts_cfg, ch_store, alertmanager_url=alertmanager.url,
                   rules=parse_rules({"rules": [r for r in _raw_default() if r["name"] == "GpuDegraded"]}))

    # k=12: gpu0 braked for 3 samples (pending); pcie rose 100 -> 110 within (7m, 12m]; ECC 50 -> 0 -> 12
    # is a reset followed by 12 new errors.
    report = ev.evaluate_once(b + 12 * MIN)
    assert report.errors == []
    assert {(r.labels["gpu_index"], r.state) for r in ev.open_alerts()} == {("0", "pending"), ("1", "firing"),
                                                                             ("2", "firing")}
    got = {a["labels"]["gpu_index"]: a for a in am_alerts(alertmanager.url)}
    assert set(got) == {"1", "2"}
    assert got["1"]["annotations"]["summary"] == "GPU 1 on n1 (c1) is degraded: PCIe replays +10 in 5m"
    assert got["2"]["annotations"]["summary"] == "GPU 2 on n1 (c1) is degraded: correctable ECC errors +12 in 5m"

    # k=13: samples k=10..13 only cover 4 of the 5 minutes: still pending.
    ev.evaluate_once(b + 13 * MIN)
    assert {a["labels"]["gpu_index"] for a in am_alerts(alertmanager.url)} == {"1", "2"}
    # k=14: k=10..14 braked, reaching back to 9m = now - 5m: fires.
    ev.evaluate_once(b + 14 * MIN)
    got = {a["labels"]["gpu_index"]: a for a in am_alerts(alertmanager.url)}
    assert set(got) == {"0", "1", "2"}
    assert got["0"]["annotations"]["summary"] == "GPU 0 on n1 (c1) is degraded: throttling (hw_power_brake)"
    # k=19: the counters have been flat for 5 minutes (k=15..19): those two resolve, the brake stays.
    report = ev.evaluate_once(b + 19 * MIN)
    assert sorted(r.labels["gpu_index"] for r in report.resolved) == ["1", "2"]
    assert [a["labels"]["gpu_index"] for a in am_alerts(alertmanager.url)] == ["0"]


def _raw_default() -> list[dict]:
    import yaml

    from gpufleet.pipeline.alerts.rules import packaged_path

    return yaml.safe_load(packaged_path().read_text())["rules"]


RULES_MFU = {"rules": [
    {"name": "TenantMfuBelowTarget", "kind": "mfu_below_target", "severity": "info", "target": 0.5, "window": "10m",
     "by": ["tenant"], "labels": {"team": "ml-platform"},
     "annotations": {"summary": "Tenant {tenant} MFU was {mfu_pct:.1f}% over the last {window} "
                                "(target {target_pct:.0f}%, {gpus} GPUs)"}},
    {"name": "FleetMfuBelowTarget", "kind": "mfu_below_target", "severity": "info", "target": 0.6, "window": "10m",
     "annotations": {"summary": "{scope} MFU {mfu_pct:.1f}%"}},
]}


def test_mfu_below_target_per_tenant_and_fleet(alertmanager, alerts_cfg, ch_store, ch_target) -> None:
    b = base_ms()

    def gpus(k: int):
        return [
            _busy(0, "n1", tensor_active_ratio=0.25),                                    # acme: 0.25 (estimate)
            _busy(1, "n1", tensor_active_ratio=0.9, flops_measured=0.5 * H100_PEAK * 60),  # acme: 0.5 (measured wins)
            _busy(2, "n1", tenant="beta", tensor_active_ratio=0.8),                      # beta: 0.8
            _busy(3, "n1", model="Mystery GPU 9000", tensor_active_ratio=0.0),           # unknown model: left out
            gpu(4, "n1", tensor_active_ratio=0.0, compute_processes=0),                  # unallocated: left out
        ]
    insert_reports(ch_store, minute_reports("n1", b, range(1, 11), gpus), b)
    ev = Evaluator(alerts_cfg, ch_store, alertmanager_url=alertmanager.url, rules=parse_rules(RULES_MFU))

    # k=9: the data reach back 9 minutes only: no verdict over a 10-minute window.
    assert ev.evaluate_once(b + 9 * MIN).fired == []
    # k=10: acme (0.25 + 0.5) / 2 = 37.5 % < 50 %; beta 80 %; fleet (0.25 + 0.5 + 0.8) / 3 = 51.7 % < 60 %.
    report = ev.evaluate_once(b + 10 * MIN)
    assert report.errors == []
    assert am_labels(alertmanager.url) == [
        {"alertname": "FleetMfuBelowTarget", "severity": "info"},
        {"alertname": "TenantMfuBelowTarget", "severity": "info", "team": "ml-platform", "tenant": "acme"},
    ]
    got = by_name(am_alerts(alertmanager.url))
    assert got["TenantMfuBelowTarget"]["annotations"]["summary"] == (
        "Tenant acme MFU was 37.5% over the last 10m (target 50%, 2 GPUs)")
    assert got["FleetMfuBelowTarget"]["annotations"]["summary"] == "fleet MFU 51.7%"


def test_shipped_rules_load() -> None:
    assert [r.name for r in load_rules().rules] == [
        "GpuFailing", "GpuDegraded", "GpuIdleAllocated", "GpuHeldNoProcess", "GpuBusyUnallocated", "JobStalled",
        "JobStraggler", "NodeSilent",
        "AgentSpoolDropping", "GpuClaimConflict", "AllocationUnknown",
        "FleetMfuBelowTarget", "TenantMfuBelowTarget",
        "GpuNeedsReset", "NodeNeedsReboot", "GpuNeedsDrain", "FabricDegraded", "NetworkPortDown",
        "NetworkPortDegraded", "GpuMissing", "NodeConfigDrift"]
