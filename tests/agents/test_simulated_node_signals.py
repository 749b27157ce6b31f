"""The simulated fleet's node-side faults: each one's signature inside its window and nowhere else, the health
it gives, and the ground truth that names it."""

from __future__ import annotations

import pytest

from gpufleet.agents.collectors.simulated import Fault, SimulatedFleet, default_faults, simulate_reports
from gpufleet.config import HealthConfig
from gpufleet.pipeline.ingest.health import classify
from gpufleet.wire import GpuSample, decode, encode

START = 1_767_225_600_000  # 2026-01-01T00:00:00Z
F_START, F_END = START + 30_500, START + 90_500  # not on a collect boundary
FAULTS = {"needs_reset": (0, 1), "needs_reboot": (0, 2), "fabric_degraded": (1, 0), "ib_port_flap": (1, 3),
          "gpu_missing": (2, 2)}
TIMES = [START + k * 1000 for k in range(1, 151)]
CFG = HealthConfig()


def _fleet() -> SimulatedFleet:
    faults = [Fault(kind, node, gpu, F_START, F_END) for kind, (node, gpu) in FAULTS.items()]
    faults.append(Fault("driver_drift", 3, None, F_START, F_END))
    return SimulatedFleet(nodes=4, gpus_per_node=4, seed=11, start_ms=START, faults=faults)


@pytest.fixture(scope="module")
def run() -> dict[int, list[tuple[int, list[GpuSample]]]]:
    """Per node, (time, samples) of each second, through fresh node collectors."""
    fleet = _fleet()
    out: dict[int, list[tuple[int, list[GpuSample]]]] = {}
    for n in range(4):
        node = fleet.make_node(n)
        out[n] = [(t, node.collect(t)) for t in TIMES]
    return out


def _gpu(samples: list[GpuSample], index: int) -> GpuSample:
    return next(s for s in samples if s.index == index)


def _inside(t: int) -> bool:
    return F_START <= t < F_END


def test_a_recovery_action_holds_for_the_window_and_its_xid_comes_once(run) -> None:
    for kind, (node, gpu), action in (("needs_reset", FAULTS["needs_reset"], 1),
                                      ("needs_reboot", FAULTS["needs_reboot"], 2)):
        series = [(t, _gpu(s, gpu)) for t, s in run[node]]
        assert [s.recovery_action for t, s in series] == [action if _inside(t) else 0 for t, _ in series], kind
        assert [t for t, s in series if s.xids] == [START + 31_000]  # the collect after 30.5 s
        assert {tuple(s.xids) for _, s in series} == {(), (154,)}
        verdicts = {classify(s, None, CFG).reasons for t, s in series if _inside(t)}
        assert verdicts == {(f"recovery_{'gpu_reset' if action == 1 else 'node_reboot'}",)}


def test_every_sample_carries_the_limits_and_a_registered_fabric(run) -> None:
    node, gpu = FAULTS["fabric_degraded"]
    for t, samples in run[node]:
        for s in samples:
            assert (s.temp_slowdown_c, s.temp_shutdown_c, s.temp_mem_max_c) == (89.0, 92.0, 95.0)
            assert (s.power_limit_w, s.power_limit_default_w, s.fabric_state, s.fabric_status) == (700.0, 700.0, 3, 0)
            degraded = s.index == gpu and _inside(t)
            assert s.fabric_health_mask == (0b0001_1010_1001 if degraded else 0b0001_1010_1010)
            assert classify(s, None, CFG).reasons == (("fabric_degraded_bw",) if degraded else ())


def test_a_port_flap_takes_the_port_down_then_makes_it_noisy(run) -> None:
    fleet = _fleet()
    node, gpu = FAULTS["ib_port_flap"]
    at = {t: {p.device: p for p in fleet.ports(node, t)} for t in (START + 30_000, START + 31_000, START + 50_000,
                                                                   START + 51_000, START + 100_000)}
    flapping = {t: ports[f"mlx5_{gpu}"] for t, ports in at.items()}
    assert [(p.state, p.phys_state, p.link_downed) for p in flapping.values()] == [
        (4, 5, 0), (1, 2, 1), (1, 2, 1), (4, 5, 1), (4, 5, 1)]  # down for 20 s from 30.5 s
    base = flapping[START + 30_000].symbol_error
    # noisy from 50.5 s: 50 symbol errors and 2 receive errors a second until 90.5 s
    assert [p.symbol_error - base for p in flapping.values()] == [0, 0, 0, 25, 2000]
    assert [p.port_rcv_errors for p in flapping.values()] == [0, 0, 0, 1, 80]
    others = [p for ports in at.values() for d, p in ports.items() if d != f"mlx5_{gpu}"]
    assert {(p.state, p.link_downed, p.port_rcv_errors) for p in others} == {(4, 0, 0)}
    assert len(at[START + 30_000]) == 4  # one port per GPU


def test_a_missing_gpu_leaves_the_enumeration_and_is_named(run) -> None:
    node, gpu = FAULTS["gpu_missing"]
    fleet = _fleet()
    for t, samples in run[node]:
        assert [s.index for s in samples] == ([0, 1, 3] if _inside(t) else [0, 1, 2, 3])
    collector = fleet.make_node(node)
    collector.collect(START + 40_000)
    assert (collector.enumeration.expected, collector.enumeration.missing) == (4, (collector.gpu_uuids[gpu],))
    collector.collect(START + 100_000)
    assert collector.enumeration.missing == ()


def test_the_inventory_comes_first_every_minute_and_when_the_driver_changes(run) -> None:
    sent = {n: [(t, s[0].driver_version) for t, s in run[n] if s[0].driver_version is not None] for n in (0, 3)}
    # collects each second from START + 1 s; the minute grid is the fleet's origin (12 h before START)
    assert sent[0] == [(START + 1_000, "580.95.05"), (START + 60_000, "580.95.05"), (START + 120_000, "580.95.05")]
    assert sent[3] == [(START + 1_000, "580.95.05"), (START + 31_000, "570.172.08"), (START + 60_000, "570.172.08"),
                       (START + 91_000, "580.95.05"), (START + 120_000, "580.95.05")]
    first = run[3][0][1][0]
    assert (first.vbios_version, first.persistence_mode, first.ecc_mode) == ("96.00.89.00.01", True, True)
    assert (first.serial or "").isdigit()
    assert run[3][1][1][0].serial is None  # the next second carries none


def test_reports_carry_the_node_sections_and_pass_the_wire(tmp_path) -> None:
    fleet = _fleet()
    reports = [decode(encode(r)) for r in simulate_reports(fleet, START + 35_000, START + 40_000, 5_000)]
    by_node = {r.node: r for r in reports}
    missing_node = by_node["sim-node-002"]
    assert (missing_node.gpus_expected, len(missing_node.gpus)) == (4, 3)
    assert missing_node.gpus_missing == [fleet.gpu_const(2, 2).uuid]
    assert [p.device for p in by_node["sim-node-001"].network] == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    assert by_node["sim-node-001"].network[3].state == 1
    truth = fleet.ground_truth(START, START + 150_000)
    kinds = {f["kind"]: f for f in truth["faults"]}
    assert kinds["ib_port_flap"]["port"] == "mlx5_3/1"
    assert kinds["ib_port_flap"]["uuid"] == fleet.gpu_const(1, 3).uuid
    assert (kinds["driver_drift"]["node"], kinds["driver_drift"]["gpu"]) == ("sim-node-003", None)
    assert kinds["needs_reset"]["xid"] == 154
    assert {f["port"] for k, f in kinds.items() if k != "ib_port_flap"} == {None}


def test_the_demo_faults_include_every_node_signal_and_validate() -> None:
    faults = default_faults(START)
    kinds = {f.kind: f for f in faults}
    assert {"needs_reset", "needs_reboot", "fabric_degraded", "ib_port_flap", "gpu_missing",
            "driver_drift"} <= set(kinds)
    assert (kinds["driver_drift"].node, kinds["driver_drift"].gpu) == (30, None)
    for f in faults:
        assert 20_000 <= f.start_ms - START <= 60_000
    with pytest.raises(ValueError, match="whole node"):
        Fault("driver_drift", 0, 1, START, START + 1)
