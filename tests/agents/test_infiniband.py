"""InfiniBand/RoCE ports from a fake sysfs tree: exact values, what is unreadable is null, and the ports
reach the node's message through the agent's OTel round trip."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gpufleet.agents.collectors.base import Enumeration
from gpufleet.agents.collectors.infiniband import SysfsPorts, parse_code, parse_rate
from gpufleet.wire import NetworkPort
from tests.agents.test_runner import ScriptedCollector, make_agent, spooled
from tests.fakes.fake_sysfs import FakePort, port_dir, write_port


def test_ports_are_read_exactly_in_device_and_port_order(tmp_path: Path) -> None:
    write_port(tmp_path, "mlx5_1", 1, FakePort(state=1, phys_state=3, rate="200 Gb/sec (4X HDR)",
                                               link_layer="Ethernet", counters={"link_downed": 4}))
    write_port(tmp_path, "mlx5_0", 10, FakePort(rate="2.5 Gb/sec (1X SDR)"))
    write_port(tmp_path, "mlx5_0", 2, FakePort(counters={"link_downed": 1, "link_error_recovery": 2,
                                                          "symbol_error": 65535, "port_rcv_errors": 7,
                                                          "port_xmit_discards": 12}))
    (tmp_path / "class/infiniband/mlx5_0/ports/lost+found").mkdir()  # not a port
    assert SysfsPorts(tmp_path).read() == [
        NetworkPort(device="mlx5_0", port=2, link_layer="InfiniBand", state=4, phys_state=5, rate_gbps=400.0,
                    link_downed=1, link_error_recovery=2, symbol_error=65535, port_rcv_errors=7,
                    port_xmit_discards=12),
        NetworkPort(device="mlx5_0", port=10, link_layer="InfiniBand", state=4, phys_state=5, rate_gbps=2.5,
                    link_downed=0, link_error_recovery=0, symbol_error=0, port_rcv_errors=0, port_xmit_discards=0),
        NetworkPort(device="mlx5_1", port=1, link_layer="Ethernet", state=1, phys_state=3, rate_gbps=200.0,
                    link_downed=4),
    ]


def test_a_node_without_rdma_devices_has_no_ports(tmp_path: Path) -> None:
    assert SysfsPorts(tmp_path).read() == []


def test_an_unreadable_or_garbled_file_is_null_and_logged_once(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path = write_port(tmp_path, "mlx5_0", 1, FakePort())
    (path / "state").write_text("ACTIVE\n")  # no number
    (path / "counters/symbol_error").write_text("-1\n")
    (path / "counters/port_rcv_errors").write_text("99999999999999999999\n")  # over the wire's bound
    (path / "rate").unlink()
    reader = SysfsPorts(tmp_path)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            [port] = reader.read()
            assert (port.state, port.phys_state, port.rate_gbps) == (None, 5, None)
            assert (port.symbol_error, port.port_rcv_errors, port.link_downed) == (None, None, 0)
    assert len([r for r in caplog.records if "cannot read" in r.message]) == 3  # state, two counters: once each


def test_a_flap_shows_in_the_next_read(tmp_path: Path) -> None:
    write_port(tmp_path, "mlx5_0", 1, FakePort())
    reader = SysfsPorts(tmp_path)
    assert [(p.state, p.phys_state, p.link_downed) for p in reader.read()] == [(4, 5, 0)]
    write_port(tmp_path, "mlx5_0", 1, FakePort(state=1, phys_state=2, counters={"link_downed": 1}))
    assert [(p.state, p.phys_state, p.link_downed) for p in reader.read()] == [(1, 2, 1)]


@pytest.mark.parametrize(("text", "code"), [("4: ACTIVE", 4), ("5: LinkUp", 5), ("ACTIVE", None),
                                             ("300: X", None), ("4.5: X", None)])
def test_codes_are_the_number_before_the_name(text: str, code: int | None) -> None:
    assert parse_code(text) == code


@pytest.mark.parametrize(("text", "rate"), [("400 Gb/sec (4X NDR)", 400.0), ("2.5 Gb/sec (1X SDR)", 2.5),
                                             ("100 Mb/sec", None), ("fast", None)])
def test_rates_are_gbit_per_second(text: str, rate: float | None) -> None:
    assert parse_rate(text) == rate


class EnumeratingCollector(ScriptedCollector):
    enumeration = Enumeration(4, ("GPU-dddd",))


def test_ports_and_the_enumeration_reach_the_message(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    write_port(sysfs, "mlx5_0", 1, FakePort(counters={"link_downed": 2, "symbol_error": 0}))
    write_port(sysfs, "mlx5_1", 1, FakePort(state=2, phys_state=5, link_layer="Ethernet", rate="100 Gb/sec (4X EDR)",
                                            counters={}))
    (port_dir(sysfs, "mlx5_1", 1) / "link_layer").unlink()
    agent = make_agent(tmp_path / "spool", collector=EnumeratingCollector(), network=SysfsPorts(sysfs))
    try:
        agent.tick(1_700_000_001_000, 1000)
        [report] = spooled(agent)
    finally:
        agent.close()
    assert report.network == [
        NetworkPort(device="mlx5_0", port=1, link_layer="InfiniBand", state=4, phys_state=5, rate_gbps=400.0,
                    link_downed=2, symbol_error=0),
        NetworkPort(device="mlx5_1", port=1, state=2, phys_state=5, rate_gbps=100.0),
    ]
    assert (report.gpus_expected, report.gpus_missing, len(report.gpus)) == (4, ["GPU-dddd"], 3)


def test_a_failing_network_source_costs_only_the_ports(tmp_path: Path) -> None:
    class Broken:
        def read(self) -> list[NetworkPort]:
            raise OSError("sysfs went away")

    agent = make_agent(tmp_path, network=Broken())
    try:
        report = agent.tick(1_700_000_001_000, 1000)
    finally:
        agent.close()
    assert report is not None
    assert (report.network, len(report.gpus)) == ([], 3)
    assert (report.gpus_expected, report.gpus_missing) == (None, [])
