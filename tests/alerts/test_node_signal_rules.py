"""The node-side alert rules on hand-built messages in a real chDB, through the real evaluator (no
Alertmanager: the states, labels, annotations and values it stores): recovery actions, fabric, network
ports, missing GPUs and configuration drift, each with the cases that must not fire."""

from __future__ import annotations

from typing import Any

import yaml

from gpufleet.pipeline.alerts.evaluator import Evaluator
from gpufleet.pipeline.alerts.rules import packaged_path, parse_rules
from gpufleet.pipeline.ingest.rows import insert_reports
from gpufleet.wire import NetworkPort, NodeReport
from tests.alerts.helpers import base_ms
from tests.builders import gpu, report

STEP = 10_000  # 10 s messages
HEALTHY_FABRIC = {"fabric_state": 3, "fabric_status": 0, "fabric_clique_id": 2, "fabric_health_mask": 0b0001_1010_1010}


def _rules(*names: str, **overrides: Any) -> Any:
    raw = {r["name"]: r for r in yaml.safe_load(packaged_path().read_text())["rules"]}
    return parse_rules({"rules": [{**raw[n], **overrides.get(n, {})} for n in names]})


def _evaluator(cfg, store, *names: str, **overrides: Any) -> Evaluator:
    return Evaluator(cfg, store, rules=_rules(*names, **overrides))


def _open(ev: Evaluator) -> dict[tuple[str, ...], Any]:
    """Open alerts by (alertname, state, the labels beyond alertname and severity, sorted)."""
    out = {}
    for r in ev.open_alerts():
        labels = tuple(f"{k}={v}" for k, v in sorted(r.labels.items()) if k not in ("alertname", "severity"))
        out[(r.alertname, r.state, *labels)] = r
    return out


def _series(node: str, b: int, ks: range, gpus, **node_fields: Any) -> list[NodeReport]:
    out = []
    for k in ks:
        r = report(node=node, seq=k, time_ms=b + k * STEP, interval_ms=STEP, gpus=gpus(k))
        for name, value in node_fields.items():
            setattr(r, name, value(k) if callable(value) else value)
        out.append(r)
    return out


# -- recovery actions ----------------------------------------------------------------------------


def test_recovery_actions_fire_per_gpu_and_per_node_and_resolve_with_the_remedy(alerts_cfg, ch_store) -> None:
    b = base_ms()

    def n1(k: int):
        return [gpu(0, "n1", recovery_action=1 if 3 <= k < 8 else 0), gpu(1, "n1", recovery_action=0),
                gpu(2, "n1", recovery_action=3), gpu(3, "n1")]  # gpu3: a driver without the field

    def n2(k: int):
        return [gpu(i, "n2", recovery_action=2 if k >= 4 and i < 2 else 0) for i in range(3)]

    insert_reports(ch_store, [*_series("n1", b, range(1, 9), n1), *_series("n2", b, range(1, 9), n2)], b)
    ev = _evaluator(alerts_cfg, ch_store, "GpuNeedsReset", "NodeNeedsReboot", "GpuNeedsDrain")
    report_ = ev.evaluate_once(b + 5 * STEP)
    assert report_.errors == []
    got = _open(ev)
    assert set(got) == {
        ("GpuNeedsReset", "firing", "action=gpu_reset", "cluster=c1", "gpu=GPU-n1-0", "gpu_index=0", "node=n1"),
        ("GpuNeedsDrain", "firing", "action=drain_p2p", "cluster=c1", "gpu=GPU-n1-2", "gpu_index=2", "node=n1"),
        ("NodeNeedsReboot", "firing", "action=node_reboot", "cluster=c1", "node=n2"),
    }
    reset = got[("GpuNeedsReset", "firing", "action=gpu_reset", "cluster=c1", "gpu=GPU-n1-0", "gpu_index=0",
                 "node=n1")]
    assert reset.annotations["summary"] == ("GPU 0 on n1 (c1) needs a gpu_reset: stop the GPU's processes (drain its "
                                            "jobs), then reset it: nvidia-smi -r -i <index>")
    assert (reset.value, reset.active_at) == (1.0, b + 2 * STEP)  # the run began after the k=2 sample
    reboot = got[("NodeNeedsReboot", "firing", "action=node_reboot", "cluster=c1", "node=n2")]
    assert reboot.annotations["summary"] == ("Node n2 (c1) needs a node_reboot (GPU 0, 1): drain the node and reboot "
                                             "it: a GPU reset is not enough")
    assert reboot.value == 2.0

    report_ = ev.evaluate_once(b + 8 * STEP)  # the k=8 sample: GPU 0 of n1 was reset
    assert [r.alertname for r in report_.resolved] == ["GpuNeedsReset"]


# -- fabric ----------------------------------------------------------------------------------------


def test_fabric_degraded_needs_a_minute_of_a_fabric_reason(alerts_cfg, ch_store) -> None:
    b = base_ms()

    def gpus(k: int):
        bad_bw = {**HEALTHY_FABRIC, "fabric_health_mask": 0b0001_1010_1001}
        return [gpu(0, "n1", **(bad_bw if k >= 1 else HEALTHY_FABRIC)),  # degraded bandwidth from the start
                gpu(1, "n1", **(bad_bw if k >= 4 else HEALTHY_FABRIC)),  # for 50 s only at k=8
                gpu(2, "n1", **HEALTHY_FABRIC),
                gpu(3, "n1", **{**HEALTHY_FABRIC, "fabric_state": 2})]  # registering: failing, GpuFailing's
    insert_reports(ch_store, _series("n1", b, range(1, 9), gpus), b)
    ev = _evaluator(alerts_cfg, ch_store, "FabricDegraded", FabricDegraded={"for": "1m"})
    ev.evaluate_once(b + 8 * STEP)
    got = _open(ev)
    assert {(k[0], k[1], k[4]) for k in got} == {("FabricDegraded", "firing", "gpu_index=0"),
                                                 ("FabricDegraded", "pending", "gpu_index=1"),
                                                 ("FabricDegraded", "firing", "gpu_index=3")}
    first = next(r for k, r in got.items() if k[4] == "gpu_index=0")
    assert first.annotations["summary"] == "GPU 0 on n1 (c1), NVLink clique 2: NVSwitch fabric fabric_degraded_bw"
    not_ready = next(r for k, r in got.items() if k[4] == "gpu_index=3")
    assert not_ready.annotations["summary"] == "GPU 3 on n1 (c1), NVLink clique 2: NVSwitch fabric fabric_not_ready"


# -- network ports ---------------------------------------------------------------------------------


def _port(device: str, **fields: Any) -> NetworkPort:
    base = {"link_layer": "InfiniBand", "state": 4, "phys_state": 5, "rate_gbps": 400.0, "link_downed": 0,
            "link_error_recovery": 0, "symbol_error": 0, "port_rcv_errors": 0, "port_xmit_discards": 0}
    return NetworkPort(device=device, port=1, **{**base, **fields})


def _ports(k: int) -> list[NetworkPort]:
    down = k >= 3  # mlx5_0 goes down after the k=2 report
    return [
        _port("mlx5_0", state=1 if down else 4, phys_state=2 if down else 5, link_downed=1 if down else 0),
        _port("mlx5_1", symbol_error=40 * k),  # +280 over k=1..8
        _port("mlx5_2", port_xmit_discards=100 * k),  # +700: congestion, under the 1000 threshold
        _port("mlx5_3", state=1, phys_state=3),  # administratively disabled
        _port("mlx5_4", state=1, phys_state=2),  # never cabled: the rule ignores it
        _port("mlx5_5", symbol_error=1000 if k <= 4 else 10 * (k - 4)),  # cleared at k=5: +40, a reset
        _port("mlx5_6", link_layer="Ethernet", state=None, phys_state=None),  # unreadable: unknown, not down
        _port("mlx5_7", state=1 if k >= 5 else 4, phys_state=2 if k >= 5 else 5),  # down 40 s at k=8
    ]


def test_ports_down_and_erroring_fire_and_the_rest_does_not(alerts_cfg, ch_store) -> None:
    b = base_ms()
    insert_reports(ch_store, _series("n1", b, range(1, 9), lambda k: [gpu(0, "n1")], network=_ports), b)
    ev = _evaluator(alerts_cfg, ch_store, "NetworkPortDown", "NetworkPortDegraded",
                    NetworkPortDown={"for": "30s", "ignore_ports": ["mlx5_4/1"]},
                    NetworkPortDegraded={"window": "2m", "ignore_ports": ["mlx5_4/1"]})
    report_ = ev.evaluate_once(b + 8 * STEP)
    assert report_.errors == []
    got = _open(ev)
    assert {(k[0], k[1], k[3], k[5]) for k in got} == {
        ("NetworkPortDown", "firing", "device=mlx5_0", "port=1"),
        # `for` (30 s) is the sustain window, not max_sample_age (60 s), though the query reads 60 s back
        ("NetworkPortDown", "firing", "device=mlx5_7", "port=1"),
        ("NetworkPortDegraded", "firing", "device=mlx5_0", "port=1"),  # link_downed +1
        ("NetworkPortDegraded", "firing", "device=mlx5_1", "port=1"),
    }
    down = next(r for k, r in got.items() if k[0] == "NetworkPortDown" and k[3] == "device=mlx5_0")
    # down from the k=3 report, whose interval began at k=2: active 60 s at k=8
    assert down.active_at == b + 2 * STEP
    assert down.annotations["summary"] == "InfiniBand port mlx5_0/1 on n1 (c1) is down (DOWN, Polling) for 1m"
    noisy = next(r for k, r in got.items() if k[0] == "NetworkPortDegraded" and k[3] == "device=mlx5_1")
    assert noisy.annotations["summary"] == "InfiniBand port mlx5_1/1 on n1 (c1) is erroring: symbol_error +280 in 2m"
    assert noisy.value == 280.0
    flapped = next(r for k, r in got.items() if k[0] == "NetworkPortDegraded" and k[3] == "device=mlx5_0")
    assert flapped.annotations["summary"] == "InfiniBand port mlx5_0/1 on n1 (c1) is erroring: link_downed +1 in 2m"

    # The node stops reporting: once its newest report is older than max_sample_age (60 s), all resolve.
    assert len(ev.evaluate_once(b + 8 * STEP + 59_999).resolved) == 0
    assert sorted(r.alertname for r in ev.evaluate_once(b + 8 * STEP + 60_000).resolved) == [
        "NetworkPortDegraded", "NetworkPortDegraded", "NetworkPortDown", "NetworkPortDown"]


# -- missing GPUs ----------------------------------------------------------------------------------


def test_missing_gpus_fire_per_named_gpu_or_per_node(alerts_cfg, ch_store) -> None:
    b = base_ms()
    reports = [
        *_series("n1", b, range(1, 9), lambda k: [gpu(i, "n1") for i in range(3)], gpus_expected=4,
                 gpus_missing=["GPU-n1-3"]),
        *_series("n2", b, range(1, 9), lambda k: [gpu(i, "n2") for i in range(3)], gpus_expected=4),
        *_series("n3", b, range(1, 9), lambda k: [gpu(i, "n3") for i in range(2)], gpus_expected=2),
        *_series("n4", b, range(1, 9), lambda k: [gpu(0, "n4")]),  # expected unknown
        *_series("n5", b, range(1, 9), lambda k: [gpu(i, "n5") for i in range(2 if k < 5 else 1)],
                 gpus_expected=2, gpus_missing=lambda k: [] if k < 5 else ["GPU-n5-1"]),  # gone 30 s ago
        # MIG: three instances of one GPU are one GPU (n6 misses its second), seven of one plus another are two
        *_series("n6", b, range(1, 9), lambda k: _mig("n6", 0, 3), gpus_expected=2, gpus_missing=["GPU-n6-1"]),
        *_series("n7", b, range(1, 9), lambda k: [*_mig("n7", 0, 7), gpu(1, "n7")], gpus_expected=2),
    ]
    insert_reports(ch_store, reports, b)
    ev = _evaluator(alerts_cfg, ch_store, "GpuMissing")
    ev.evaluate_once(b + 8 * STEP)
    got = _open(ev)
    assert set(got) == {
        ("GpuMissing", "firing", "cluster=c1", "gpu=GPU-n1-3", "node=n1"),
        ("GpuMissing", "firing", "cluster=c1", "node=n2"),
        ("GpuMissing", "pending", "cluster=c1", "gpu=GPU-n5-1", "node=n5"),
        ("GpuMissing", "firing", "cluster=c1", "gpu=GPU-n6-1", "node=n6"),
    }
    assert got[("GpuMissing", "firing", "cluster=c1", "gpu=GPU-n1-3", "node=n1")].annotations["summary"] == (
        "Node n1 (c1) enumerates 3 of its 4 GPUs; missing: GPU-n1-3")
    assert got[("GpuMissing", "firing", "cluster=c1", "node=n2")].annotations["summary"] == (
        "Node n2 (c1) enumerates 3 of its 4 GPUs; missing: 1 unnamed")


def _mig(node: str, index: int, instances: int):
    """`instances` one-slice MIG instances of GPU `index` (of 7 slices)."""
    return [gpu(index, node, uuid=f"MIG-{node}-{index}-{i}", parent_uuid=f"GPU-{node}-{index}", gpu_instance_id=i,
                compute_instance_id=0, mig_profile="1g.10gb", slices=1, slices_total=7) for i in range(instances)]


# -- configuration drift ---------------------------------------------------------------------------


def _inventory(node: str, i: int, driver: str, vbios: str = "96.00.89.00.01"):
    return gpu(i, node, serial=f"{node}-{i}", driver_version=driver, vbios_version=vbios, persistence_mode=True,
               ecc_mode=True)


def test_drift_names_the_node_the_field_and_the_majority(alerts_cfg, ch_store) -> None:
    b = base_ms()
    driver = {"n1": "580.95.05", "n2": "580.95.05", "n3": "580.95.05", "n4": "570.172.08"}

    def gpus_of(node: str):
        def gpus(k: int):
            if k != 2:  # the inventory rides in one message; the others carry none
                return [gpu(i, node) for i in range(2)]
            odd_vbios = "96.00.74.00.0C" if node == "n1" else "96.00.89.00.01"
            return [_inventory(node, 0, driver[node]), _inventory(node, 1, driver[node], odd_vbios)]
        return gpus

    insert_reports(ch_store, [r for n in driver for r in _series(n, b, range(1, 7), gpus_of(n))], b)
    ev = _evaluator(alerts_cfg, ch_store, "NodeConfigDrift")
    ev.evaluate_once(b + 6 * STEP)
    got = _open(ev)
    model = "model=NVIDIA H100 80GB HBM3"
    assert set(got) == {
        ("NodeConfigDrift", "firing", "cluster=c1", "field=driver_version", model, "node=n4"),
        ("NodeConfigDrift", "firing", "cluster=c1", "field=vbios_version", model, "node=n1"),
    }
    drifted = got[("NodeConfigDrift", "firing", "cluster=c1", "field=driver_version", model, "node=n4")]
    assert drifted.annotations["summary"] == ("Node n4 (c1): driver_version 570.172.08 on 2 NVIDIA H100 80GB HBM3 "
                                              "GPU(s), the majority runs 580.95.05")
    assert drifted.value == 2.0


def test_no_majority_no_drift(alerts_cfg, ch_store) -> None:
    b = base_ms()
    half = {"n1": "580.95.05", "n2": "570.172.08"}  # 2 GPUs each: a tie is no majority

    def gpus_of(node: str):
        return lambda k: [_inventory(node, i, half[node]) for i in range(2)]

    insert_reports(ch_store, [r for n in half for r in _series(n, b, range(1, 4), gpus_of(n))], b)
    ev = _evaluator(alerts_cfg, ch_store, "NodeConfigDrift")
    assert ev.evaluate_once(b + 3 * STEP).errors == []
    assert ev.open_alerts() == []


# -- the GPU's own temperature limit in GpuDegraded ------------------------------------------------------


def test_gpu_degraded_compares_each_gpu_with_its_own_slowdown_temperature(alerts_cfg, ch_store) -> None:
    b = base_ms()

    def gpus(k: int):
        return [gpu(0, "n1", temp_gpu_c=88.0, temp_slowdown_c=92.0),  # 4 °C below its limit: fine
                gpu(1, "n1", temp_gpu_c=84.0, temp_slowdown_c=85.0),  # a cooler-rated part, 1 °C below: hot
                gpu(2, "n1", temp_gpu_c=87.0)]  # NVML could not say: the rule's temp_c (87)
    insert_reports(ch_store, _series("n1", b, range(1, 5), gpus), b)
    ev = _evaluator(alerts_cfg, ch_store, "GpuDegraded", GpuDegraded={"for": "30s"})
    ev.evaluate_once(b + 4 * STEP)
    got = {k[4]: r for k, r in _open(ev).items()}
    assert set(got) == {"gpu_index=1", "gpu_index=2"}
    assert got["gpu_index=1"].annotations["summary"] == "GPU 1 on n1 (c1) is degraded: temperature 84 C >= 83 C"
    assert got["gpu_index=2"].annotations["summary"] == "GPU 2 on n1 (c1) is degraded: temperature 87 C >= 87 C"
