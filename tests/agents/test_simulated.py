"""The simulated fleet: deterministic, realistic, every fault's signature in its window, truth that matches."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import pytest

from gpufleet.agents.collectors.base import Collector
from gpufleet.agents.collectors.simulated import (
    Fault,
    NodeDown,
    SimulatedFleet,
    default_faults,
    simulate_reports,
)
from gpufleet.gpu_facts import peak_flops
from gpufleet.wire import GpuSample, NodeReport, decode, encode

START = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR = 3_600_000
GIB = 1 << 30

# One fault of every GPU kind, all on the same window, none aligned to a collect boundary.
F_START = START + 30_500
F_END = START + 90_500
FAULT_GPUS = {
    "fell_off_bus": (0, 0),
    "ecc_dbe": (0, 1),
    "page_retirement_pending": (0, 2),
    "row_remap_failure": (0, 3),
    "thermal_throttle": (1, 0),
    "power_throttle": (1, 1),
    "nvlink_errors": (1, 2),
    "pcie_replay": (1, 3),
    "zombie_process": (2, 0),
    "held_no_process": (2, 1),
    "idle_allocated": (2, 2),
}
XIDS = {"fell_off_bus": 79, "ecc_dbe": 48, "page_retirement_pending": 63, "row_remap_failure": 64, "nvlink_errors": 74}
TIMES = [START + k * 1000 for k in range(1, 151)]  # collects every second for 150 s


def _fault_fleet() -> SimulatedFleet:
    faults = [Fault(kind, node, gpu, F_START, F_END) for kind, (node, gpu) in FAULT_GPUS.items()]
    faults.append(Fault("node_silent", 3, None, F_START, F_END))
    return SimulatedFleet(nodes=4, gpus_per_node=4, seed=11, start_ms=START, faults=faults)


@pytest.fixture(scope="module")
def fault_run() -> tuple[SimulatedFleet, dict[tuple[int, int], dict[int, GpuSample]]]:
    """Every GPU of nodes 0-2 collected each second, by fresh node collectors."""
    fleet = _fault_fleet()
    samples: dict[tuple[int, int], dict[int, GpuSample]] = {}
    for n in range(3):
        node = fleet.make_node(n)
        for t in TIMES:
            for s in node.collect(t):
                samples.setdefault((n, s.index), {})[t] = s
    return fleet, samples


def _inside(t: int) -> bool:
    return F_START <= t < F_END


def _series(fault_run, kind):
    _, samples = fault_run
    return samples[FAULT_GPUS[kind]]


# -- determinism -----------------------------------------------------------------------------------


def _encoded(seed: int) -> list[bytes]:
    fleet = SimulatedFleet(nodes=4, seed=seed, start_ms=START, faults=default_faults(START, nodes=4))
    return [encode(r) for r in simulate_reports(fleet, START, START + 300_000, 5_000)]


def test_same_arguments_give_byte_identical_reports():
    first = _encoded(7)
    assert len(first) > 200
    assert _encoded(7) == first
    assert _encoded(8) != first


def test_a_value_does_not_depend_on_what_was_asked_before():
    t = START + 2 * HOUR + 12_345
    fresh = SimulatedFleet(nodes=4, seed=3, start_ms=START).make_node(1).collect(t)
    warmed = SimulatedFleet(nodes=4, seed=3, start_ms=START)
    for n in range(4):  # build other nodes' timelines far ahead, and this node's earlier
        warmed.make_node(n).collect(t + 9 * HOUR)
    warmed.make_node(1).collect(START + 5_000)
    assert _encode_gpus(warmed.make_node(1).collect(t)) == _encode_gpus(fresh)


def _encode_gpus(gpus: list[GpuSample]) -> bytes:
    return encode(
        NodeReport(schema_version=1, cluster="c", node="n", boot_id="b", seq=0, time_ms=1, interval_ms=1, gpus=gpus)
    )


# -- identity and shape ----------------------------------------------------------------------------


def test_nodes_are_collectors_with_named_nodes_and_unique_uuids():
    fleet = SimulatedFleet(nodes=3, gpus_per_node=8, start_ms=START)
    assert [n.name for n in fleet.nodes] == ["sim-node-000", "sim-node-001", "sim-node-002"]
    assert all(isinstance(n, Collector) for n in fleet.nodes)
    samples = [s for n in fleet.nodes for s in n.collect(START + 1000)]
    uuids = [s.uuid for s in samples]
    assert len(set(uuids)) == 24
    assert all(re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", u) for u in uuids)
    assert [s.index for s in samples[:8]] == list(range(8))
    assert {s.model for s in samples} == {"NVIDIA H100 80GB HBM3"}
    assert {s.mem_total_bytes for s in samples} == {80 * GIB}
    assert all(s.tenant is None and s.job is None and s.flops_measured is None for s in samples)
    fleet.nodes[0].close()


def test_healthy_fleet_values_stay_in_realistic_ranges():
    fleet = SimulatedFleet(nodes=4, seed=5, start_ms=START)
    energy: dict[str, list[tuple[int, float, float]]] = {}
    for t in range(START + 60_000, START + 24 * HOUR, 300_000):
        for node in fleet.nodes:
            for s in node.collect(t):
                assert 60.0 <= s.power_w <= 700.0
                assert 30.0 <= s.temp_gpu_c <= 85.0
                assert 0 <= s.mem_used_bytes <= s.mem_total_bytes
                for ratio in (s.util_gpu_ratio, s.util_mem_ratio, s.sm_active_ratio, s.tensor_active_ratio):
                    assert 0.0 <= ratio <= 1.0
                assert s.dram_active_ratio is not None
                assert (s.ecc_uncorrected_volatile, s.ecc_uncorrected_aggregate, s.ecc_corrected_volatile) == (0, 0, 0)
                assert (s.pcie_replay_count, s.nvlink_replay_errors, s.nvlink_links_down) == (0, 0, 0)
                assert s.xids == []
                assert s.error is None
                assert (s.compute_processes > 0) == (s.mem_used_bytes > 0)
                energy.setdefault(s.uuid, []).append((t, s.energy_j, s.power_w))
    for series in energy.values():
        assert all(b[1] >= a[1] for a, b in itertools.pairwise(series))


def test_energy_counter_integrates_power():
    fleet = SimulatedFleet(nodes=2, seed=9, start_ms=START)
    node = fleet.nodes[0]
    first = node.collect(START + 1000)
    joules_from_power = [0.0] * 8
    prev = first
    for t in range(START + 2000, START + HOUR, 1000):
        cur = node.collect(t)
        for i in range(8):
            joules_from_power[i] += cur[i].power_w * 1.0  # W x 1 s
        prev = cur
    for i in range(8):
        counted = prev[i].energy_j - first[i].energy_j
        assert counted == pytest.approx(joules_from_power[i], rel=0.02)


# -- schedule realism ------------------------------------------------------------------------------


def test_schedule_has_tenants_jobs_shapes_and_gaps():
    fleet = SimulatedFleet(nodes=8, seed=2, start_ms=START)
    truth = fleet.ground_truth(START, START + 24 * HOUR)
    allocs = truth["allocations"]
    assert {a["tenant"] for a in allocs} == {"tenant-a", "tenant-b", "tenant-c"}
    assert all(re.fullmatch(r"job-\d{5,}", a["job"]) for a in allocs)
    by_job: dict[str, list[dict]] = {}
    for a in allocs:
        by_job.setdefault(a["job"], []).append(a)
    nodes_per_job = [len({a["node"] for a in v}) for v in by_job.values()]
    gpus_per_job = [len(v) for v in by_job.values()]
    assert max(nodes_per_job) >= 2  # multi-node jobs
    assert 8 in gpus_per_job  # whole-node jobs
    assert min(gpus_per_job) < 8  # small jobs

    states: Counter[str] = Counter()
    for t in range(START, START + 24 * HOUR, 600_000):
        for node in fleet.nodes:
            allocated = node.allocation_at(t)
            for s in node.collect(t):
                if s.index not in allocated:
                    states["free"] += 1
                elif s.compute_processes == 0:
                    states["allocated, no process"] += 1
                elif s.util_gpu_ratio < 0.05:
                    states["idle but running"] += 1
                else:
                    assert 0.65 <= s.util_gpu_ratio <= 1.0
                    states["busy"] += 1
    total = sum(states.values())
    assert 0.05 < states["free"] / total < 0.35
    assert states["busy"] / total > 0.5
    assert states["idle but running"] > 0
    assert states["allocated, no process"] > 0


def _busy_share(fleet: SimulatedFleet, first_hour: int, last_hour: int, days: int) -> float:
    busy = total = 0
    for d in range(days):
        for h in range(first_hour, last_hour):
            for t in range(START + (24 * d + h) * HOUR, START + (24 * d + h + 1) * HOUR, 600_000):
                for node in fleet.nodes:
                    for s in node.collect(t):
                        total += 1
                        busy += s.util_gpu_ratio >= 0.5
    return busy / total


def test_more_gpus_are_busy_by_day_than_by_night_utc():
    fleet = SimulatedFleet(nodes=16, seed=4, start_ms=START)
    assert _busy_share(fleet, 12, 18, days=2) > _busy_share(fleet, 0, 6, days=2) + 0.05


def test_estimated_mfu_of_a_busy_hour_is_in_the_range_real_fleets_see():
    fleet = SimulatedFleet(nodes=16, seed=1, start_ms=START)
    peak = peak_flops(fleet.model)
    assert peak is not None
    achieved = available = 0.0
    for t in range(START + 13 * HOUR + 30_000, START + 14 * HOUR + 1, 30_000):
        for node in fleet.nodes:
            for s in node.collect(t):
                achieved += s.tensor_active_ratio * peak
                available += peak
    assert 0.10 <= achieved / available <= 0.45


# -- faults ----------------------------------------------------------------------------------------


def test_each_xid_is_reported_once_in_the_interval_containing_it(fault_run):
    _, samples = fault_run
    first_collect_after = START + 31_000  # interval (30_000, 31_000] holds 30_500
    for kind, gpu in FAULT_GPUS.items():
        reported = [(t, s.xids) for t, s in samples[gpu].items() if s.xids]
        expected = [(first_collect_after, [XIDS[kind]])] if kind in XIDS else []
        assert reported == expected, kind
    quiet = [s for (n, g), series in samples.items() if (n, g) not in FAULT_GPUS.values() for s in series.values()]
    assert all(s.xids == [] for s in quiet)


def test_xid_interval_follows_the_nodes_last_collect():
    fleet = _fault_fleet()
    node = fleet.make_node(0)
    node.collect(START + 10_000)
    assert node.collect(START + 45_000)[1].xids == [48]  # (10_000, 45_000] holds 30_500
    assert node.collect(START + 46_000)[1].xids == []
    assert fleet.make_node(0).collect(F_START)[1].xids == [48]  # first collect: (t - 1 s, t]
    assert fleet.make_node(0).collect(F_START + 1000)[1].xids == []


def test_fell_off_bus_reports_gpu_lost_with_null_counters(fault_run):
    fleet, _ = fault_run
    for t, s in _series(fault_run, "fell_off_bus").items():
        if _inside(t):
            expected = GpuSample(
                index=0,
                uuid=fleet.gpu_const(0, 0).uuid,
                model="NVIDIA H100 80GB HBM3",
                error="GPU is lost",
                xids=[79] if t == START + 31_000 else [],
            )
            assert s == expected
        else:
            assert s.error is None
            assert s.power_w is not None
            assert s.energy_j is not None


def test_ecc_dbe_counts_until_the_end_and_volatile_resets(fault_run):
    for t, s in _series(fault_run, "ecc_dbe").items():
        if t < F_START:
            expected = (0, 0)
        elif t < F_END:
            expected = (1, 1)
        else:
            expected = (0, 1)
        assert (s.ecc_uncorrected_volatile, s.ecc_uncorrected_aggregate) == expected, t


def test_page_retirement_pending_and_row_remap_failure_flags(fault_run):
    for t, s in _series(fault_run, "page_retirement_pending").items():
        assert s.retired_pages_pending is _inside(t)
        assert s.remap_pending is _inside(t)
        assert s.retired_pages == (0 if t < F_START else 1)
    for t, s in _series(fault_run, "row_remap_failure").items():
        assert s.remap_failure is _inside(t)


def test_thermal_and_power_throttle_set_their_clock_event_bits(fault_run):
    for t, s in _series(fault_run, "thermal_throttle").items():
        assert bool(s.clock_event_reasons & 0x40) is _inside(t)
        if _inside(t):
            assert s.temp_gpu_c == 90.0  # past the slowdown (89 °C), short of the shutdown (92 °C)
            assert s.clock_sm_mhz <= 1260
        else:
            assert s.temp_gpu_c <= 85.0
    for t, s in _series(fault_run, "power_throttle").items():
        assert bool(s.clock_event_reasons & 0x80) is _inside(t)
        if _inside(t):
            assert s.clock_sm_mhz <= 990


def test_nvlink_and_pcie_error_counters_grow_during_the_fault_and_stay(fault_run):
    for t, s in _series(fault_run, "nvlink_errors").items():
        if t < F_START:
            expected = (0, 0, 0)
        elif t < F_END:
            expected = (1 + (t - F_START) * 2 // 1000, 1 + (t - F_START) // 10_000, 1)
        else:
            expected = (121, 7, 0)  # 1 + 60 s x 2/s, 1 + 60 s / 10 s, links back up
        assert (s.nvlink_replay_errors, s.nvlink_recovery_errors, s.nvlink_links_down) == expected, t
    for t, s in _series(fault_run, "pcie_replay").items():
        if t < F_START:
            expected = 0
        elif t < F_END:
            expected = 1 + (t - F_START) * 5 // 1000
        else:
            expected = 301  # 1 + 60 s x 5/s
        assert s.pcie_replay_count == expected, t


def test_process_faults_match_the_allocation(fault_run):
    fleet, _ = fault_run
    for kind in ("zombie_process", "held_no_process", "idle_allocated"):
        node, gpu = FAULT_GPUS[kind]
        for t, s in _series(fault_run, kind).items():
            if not _inside(t):
                continue
            allocated = gpu in fleet.allocations_at(node, t)
            if kind == "zombie_process":
                assert not allocated
                assert s.compute_processes >= 1
                assert s.mem_used_bytes > 0
                assert 0.1 <= s.util_gpu_ratio <= 0.4
            elif kind == "held_no_process":
                assert allocated
                assert (s.compute_processes, s.util_gpu_ratio, s.mem_used_bytes) == (0, 0.0, 0)
            else:
                assert allocated
                assert s.compute_processes >= 1
                assert s.util_gpu_ratio < 0.02


def test_node_silent_raises_node_down_for_the_whole_window():
    node = _fault_fleet().make_node(3)
    for t in TIMES:
        if _inside(t):
            with pytest.raises(NodeDown, match="sim-node-003"):
                node.collect(t)
        else:
            assert len(node.collect(t)) == 4


def test_default_faults_cover_every_alert_kind_soon_after_start():
    faults = default_faults(START)
    kinds = {f.kind for f in faults}
    assert {
        "fell_off_bus",
        "ecc_dbe",
        "thermal_throttle",
        "zombie_process",
        "held_no_process",
        "idle_allocated",
        "node_silent",
    } <= kinds
    for f in faults:
        assert 20_000 <= f.start_ms - START <= 60_000
        assert 60_000 <= f.end_ms - f.start_ms <= 90_000
    gpu_faults = [(f.node, f.gpu) for f in faults if f.gpu is not None]
    assert len(set(gpu_faults)) == len(gpu_faults)
    SimulatedFleet(start_ms=START, faults=faults)  # fits the default fleet
    SimulatedFleet(nodes=2, start_ms=START, faults=default_faults(START, nodes=2))
    with pytest.raises(ValueError, match="at least 2 nodes"):
        default_faults(START, nodes=1)


def test_bad_faults_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown fault kind 'bogus'"):
        Fault("bogus", 0, 0, START, START + 1)
    with pytest.raises(ValueError, match="needs a gpu index"):
        Fault("ecc_dbe", 0, None, START, START + 1)
    with pytest.raises(ValueError, match="ends"):
        Fault("ecc_dbe", 0, 0, START, START)
    with pytest.raises(ValueError, match="names node 5"):
        SimulatedFleet(nodes=2, start_ms=START, faults=[Fault("ecc_dbe", 5, 0, START, START + 1)])
    with pytest.raises(ValueError, match="unallocated"):
        SimulatedFleet(
            nodes=2,
            start_ms=START,
            faults=[
                Fault("zombie_process", 0, 0, START, START + 60_000),
                Fault("held_no_process", 0, 0, START, START + 60_000),
            ],
        )


# -- ground truth and reports ----------------------------------------------------------------------


def test_reports_carry_the_tenant_the_ground_truth_says(tmp_path):
    end = START + 600_000
    fleet = SimulatedFleet(nodes=4, seed=6, start_ms=START, faults=default_faults(START, nodes=4))
    fleet.write_ground_truth(tmp_path / "truth.json", START, end)
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["cluster"] == "sim"
    assert truth["seed"] == 6
    assert truth["nodes"] == ["sim-node-000", "sim-node-001", "sim-node-002", "sim-node-003"]
    uuid_of = {(g["node"], g["index"]): g["uuid"] for g in truth["gpus"]}
    assert len(uuid_of) == 32

    reports = list(simulate_reports(fleet, START, end, 5_000))
    checked = allocated = 0
    for r in reports:
        report = decode(encode(r))  # valid on the wire
        for s in report.gpus:
            assert s.uuid == uuid_of[(report.node, s.index)]
            covering = [
                a
                for a in truth["allocations"]
                if a["node"] == report.node and a["gpu"] == s.index and a["start_ms"] <= report.time_ms < a["end_ms"]
            ]
            assert len(covering) <= 1
            expected = (covering[0]["tenant"], covering[0]["job"]) if covering else (None, None)
            assert (s.tenant, s.job) == expected
            checked += 1
            allocated += bool(covering)
    assert checked > 0
    assert 0 < allocated < checked

    truth_faults = {f["kind"]: f for f in truth["faults"]}
    assert set(truth_faults) == {f.kind for f in fleet.faults}
    assert truth_faults["fell_off_bus"]["xid"] == 79
    assert truth_faults["thermal_throttle"]["xid"] is None
    assert truth_faults["node_silent"]["gpu"] is None
    assert truth_faults["node_silent"]["uuid"] is None
    ecc = truth_faults["ecc_dbe"]
    assert ecc["uuid"] == uuid_of[(ecc["node"], ecc["gpu"])]


def test_reports_are_numbered_per_node_and_skip_silent_intervals():
    end = START + 300_000
    fleet = SimulatedFleet(nodes=4, seed=6, start_ms=START, faults=default_faults(START, nodes=4))
    silent = next(f for f in fleet.faults if f.kind == "node_silent")
    reports = list(simulate_reports(fleet, START, end, 5_000))
    times = range(START + 5_000, end + 1, 5_000)
    for n, name in enumerate(fleet.node_names):
        mine = [r for r in reports if r.node == name]
        expected_times = [t for t in times if not (n == silent.node and silent.start_ms <= t < silent.end_ms)]
        assert [r.time_ms for r in mine] == expected_times
        assert [r.seq for r in mine] == list(range(len(expected_times)))
        assert len({r.boot_id for r in mine}) == 1
        assert all(r.interval_ms == 5_000 and r.cluster == "sim" for r in mine)
    assert len(expected_times) < len(times)  # the last node (silent) lost some intervals


def test_allocation_source_agrees_with_the_ground_truth():
    fleet = SimulatedFleet(nodes=2, seed=4, start_ms=START)
    node = fleet.nodes[1]
    source = node.allocation_source()
    assert source.read() == {}  # nothing collected yet
    t = START + 3 * HOUR
    node.collect(t)
    expected = {
        a["gpu"]: (a["tenant"], a["job"])
        for a in fleet.ground_truth(t, t + 1)["allocations"]
        if a["node"] == "sim-node-001" and a["start_ms"] <= t < a["end_ms"]
    }
    assert {i: (a.tenant, a.job) for i, a in source.read().items()} == expected
    assert node.allocation_source(clock=lambda: t).read() == source.read()


# -- job faults: a hung job and a straggler ------------------------------------------------------------


def _job_fault_fleet() -> SimulatedFleet:
    faults = [Fault("job_hang", 1, 2, F_START, F_END), Fault("straggler", 2, 1, F_START, F_END)]
    return SimulatedFleet(nodes=4, gpus_per_node=4, seed=11, start_ms=START, faults=faults)


def test_a_hung_job_spins_on_every_gpu_and_the_truth_names_it():
    fleet = _job_fault_fleet()
    hang = fleet.faults[0]
    job = fleet.fault_job(hang)
    assert job is not None
    assert job.start_ms <= F_START - 600_000
    assert job.end_ms >= F_END + 600_000
    assert job.process_end_ms == job.end_ms  # and kept running
    assert sorted(job.gpus) == [(1, g) for g in range(4)]  # its node is a whole-node job of its own
    (truth,) = [f for f in fleet.ground_truth(START, START + HOUR)["faults"] if f["kind"] == "job_hang"]
    assert (truth["tenant"], truth["job"], truth["nodes"]) == (job.tenant, job.id, ["sim-node-001"])
    assert truth["gpus"] == [{"node": "sim-node-001", "gpu": g, "uuid": fleet.gpu_const(1, g).uuid} for g in range(4)]
    assert fleet.hung_windows(job) == [(F_START, F_END)]
    for g in range(4):
        for t in (F_START, F_START + 30_000, F_END - 1):
            s = fleet.sample(1, g, t, t - 1000)
            assert s.util_gpu_ratio >= 0.9
            assert s.tensor_active_ratio <= 0.05
            assert s.power_w <= 0.3 * 700  # an H100 SXM's board power
            assert s.compute_processes == 1
        after = fleet.sample(1, g, F_END + 1000, F_END)
        assert after.power_w > 0.3 * 700 or after.util_gpu_ratio < 0.9  # working (or idling) again


def test_a_straggler_runs_slower_than_its_peers_and_nothing_throttles():
    fleet = _job_fault_fleet()
    straggler = fleet.faults[1]
    job = fleet.fault_job(straggler)
    assert job is not None
    assert sorted(job.gpus) == [(2, g) for g in range(4)]
    (truth,) = [f for f in fleet.ground_truth(START, START + HOUR)["faults"] if f["kind"] == "straggler"]
    assert (truth["node"], truth["gpu"], truth["job"]) == ("sim-node-002", 1, job.id)
    for t in range(F_START, F_END, 7_000):
        slow = fleet.sample(2, 1, t, t - 1000)
        peers = [fleet.sample(2, g, t, t - 1000) for g in (0, 2, 3)]
        assert slow.clock_sm_mhz == 1200
        assert all(p.clock_sm_mhz >= 1900 for p in peers)
        assert all(p.util_gpu_ratio >= 0.5 for p in [slow, *peers])  # the job runs a busy stretch
        assert slow.tensor_active_ratio < 0.9 * min(p.tensor_active_ratio for p in peers)
        assert slow.clock_event_reasons == 0  # held low without a throttle reason: cause "clock"
    assert fleet.sample(2, 1, F_END + 1000, F_END).clock_sm_mhz > 1200


def test_job_faults_need_a_whole_node_each():
    with pytest.raises(ValueError, match="need a node each"):
        SimulatedFleet(nodes=4, start_ms=START, faults=[Fault("job_hang", 1, 0, START, START + 1),
                                                        Fault("straggler", 1, 3, START, START + 1)])
    with pytest.raises(ValueError, match="node 1 is split into one-GPU slots"):
        SimulatedFleet(nodes=4, start_ms=START, faults=[Fault("held_no_process", 1, 0, START, START + 1),
                                                        Fault("straggler", 1, 3, START, START + 1)])


def test_default_faults_add_a_hung_job_and_a_straggler_on_nodes_of_their_own():
    faults = default_faults(START)
    jobs = {f.kind: f for f in faults if f.kind in ("job_hang", "straggler")}
    assert [(k, f.node, f.start_ms - START, f.end_ms - f.start_ms) for k, f in sorted(jobs.items())] == [
        ("job_hang", 30, 20_000, 60_000), ("straggler", 29, 25_000, 60_000)]
    fleet = SimulatedFleet(seed=7, start_ms=START, faults=faults)
    hung, slow = fleet.fault_job(jobs["job_hang"]), fleet.fault_job(jobs["straggler"])
    assert hung is not None
    assert slow is not None
    assert hung != slow
    assert fleet.fault_job_numbers() == {hung.number, slow.number}
    # small fleets: job faults only on nodes the pinned faults leave whole, and the fleet still builds
    # (4 x 2: the pinned kinds split nodes 0-2; 2 x 8: node 0 split, node 1 silent)
    for nodes, gpus, kinds in ((4, 8, ["job_hang", "straggler"]), (3, 8, ["job_hang"]), (2, 8, []), (4, 2, []),
                               (4, 4, ["job_hang", "straggler"])):
        faults = default_faults(START, nodes=nodes, gpus_per_node=gpus)
        assert [f.kind for f in faults if f.kind in ("job_hang", "straggler")] == kinds, (nodes, gpus)
        SimulatedFleet(nodes=nodes, gpus_per_node=gpus, start_ms=START, faults=faults)
