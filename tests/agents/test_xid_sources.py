"""XIDs from the kernel log beside NVML events: parsing the driver's lines, the once-only ledger, the
kmsg fallback through a file and a FIFO, XIDs raised while the agent was down, and the cursor that keeps
a restart from reporting them twice."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gpufleet.agents.collectors.kmsg import Cursor, KmsgLine, KmsgReader, KmsgXid, kernel_boot_id, parse, save_cursor
from gpufleet.agents.collectors.xid_events import XidLedger
from tests.agents.nvml_helpers import PCI0, PCI1, Make, events_settled, eventually, hopper, tick, volta
from tests.fakes.fake_pynvml import FakeNvml


def kmsg_line(seq: int, pci: tuple[int, int, int], xid: int, ts_s: float | None = None, detail: str = "") -> str:
    """One /dev/kmsg record as the NVIDIA driver writes it (priority 4 = warning, facility kern)."""
    ts_us = int((time.monotonic() if ts_s is None else ts_s) * 1e6)
    domain, bus, device = pci
    return f"4,{seq},{ts_us},-;NVRM: Xid (PCI:{domain:04x}:{bus:02x}:{device:02x}): {xid}, {detail or 'pid=1234'}\n"


# -- parsing -----------------------------------------------------------------------------------


def test_the_drivers_xid_lines_are_parsed() -> None:
    line = ("4,1905,27263391,-;NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, "
            "GPU has fallen off the bus.")
    assert parse(line) == KmsgLine(1905, 27.263391, KmsgXid((0, 0x3B, 0), 79))
    assert parse("NVRM: Xid (PCI:0002:c1:00.0): 13, Graphics SM Warp Exception") == KmsgLine(
        None, None, KmsgXid((2, 0xC1, 0), 13))
    assert parse("6,1906,27263400,-;nvidia-modeset: Loading NVIDIA Kernel Mode Setting Driver") == KmsgLine(
        1906, 27.2634, None)
    assert parse(" SUBSYSTEM=pci") is None  # a continuation line


def test_the_ledger_reports_each_xid_once_across_both_sources() -> None:
    ledger = XidLedger(window_s=10.0, max_per_gpu=256)
    assert ledger.add("event", 1, 79, t=100.0)
    assert not ledger.add("kmsg", 1, 79, t=100.4, seq=7)  # the same XID from the kernel log: its twin
    assert ledger.add("kmsg", 1, 79, t=100.5, seq=8)  # a second 79 only the log saw
    assert not ledger.add("event", 1, 79, t=100.6)  # ...and its event, arriving late
    assert ledger.add("kmsg", 0, 48, t=101.0, seq=9)  # another GPU
    assert ledger.add("event", 1, 79, t=130.0)  # outside the window: a new XID
    assert ledger.drain() == ({1: [79, 79, 79], 0: [48]}, 9)
    assert ledger.drain() == ({}, 9)
    assert ledger.counts == {"event": 3, "kmsg": 3, "twin": 2}


def test_the_reader_handles_partial_lines_of_a_growing_file(tmp_path: Path) -> None:
    path = tmp_path / "kmsg"
    path.write_text("4,1,5,-;first\n4,2,6,-;sec")
    reader = KmsgReader(str(path))
    assert reader.poll() == ["4,1,5,-;first"]
    with path.open("a") as f:
        f.write("ond\n")
    assert reader.poll() == ["4,2,6,-;second"]
    assert reader.poll() == []
    reader.close()


def test_an_unreadable_log_is_reported_once_and_left_alone(tmp_path: Path) -> None:
    reader = KmsgReader(str(tmp_path / "missing"))
    assert reader.poll() == []
    assert reader.unavailable is not None
    assert "missing" in reader.unavailable
    assert reader.poll() == []


# -- the fallback end to end -------------------------------------------------------------------


def test_xids_that_no_event_delivers_come_from_the_kernel_log(make_collector: Make, tmp_path: Path) -> None:
    log = tmp_path / "kmsg"
    log.write_text("")
    fake = FakeNvml([hopper(), volta(supported_events=0)])  # GPU 1 has no XID events at all
    collector = make_collector(fake, kmsg_path=str(log), kmsg_cursor=tmp_path / "cursor.json")
    collector.open()
    assert events_settled(collector)
    fake.inject_xid(0, 31)  # seen by both: the event and the driver's line
    with log.open("a") as f:
        f.write(kmsg_line(101, PCI0, 31))
        f.write(kmsg_line(102, PCI1, 62))  # only the log has it
    assert fake.wait_for_event_consumer()
    assert eventually(lambda: collector.xid_watcher.ledger.counts["kmsg"] == 2)
    assert [s.xids for s in collector.collect(0)] == [[31], [62]]
    assert collector.xid_watcher.ledger.counts["twin"] == 1


def test_a_fifo_works_as_the_log(make_collector: Make, tmp_path: Path) -> None:
    fifo = tmp_path / "kmsg.fifo"
    os.mkfifo(fifo)
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake, kmsg_path=str(fifo))
    collector.open()
    writer = os.open(fifo, os.O_WRONLY)
    try:
        os.write(writer, kmsg_line(5, PCI1, 74).encode())
        assert eventually(lambda: collector.xid_watcher.ledger.counts["kmsg"] == 1)
    finally:
        os.close(writer)
    assert [s.xids for s in collector.collect(0)] == [[], [74]]


@pytest.mark.skipif(time.monotonic() < 700, reason="this boot is younger than the 10-minute backlog window")
def test_xids_raised_while_the_agent_was_down_are_reported_once_across_restarts(
    make_collector: Make, tmp_path: Path,
) -> None:
    log, cursor = tmp_path / "kmsg", tmp_path / "cursor.json"
    now = time.monotonic()
    log.write_text(
        kmsg_line(10, PCI0, 48, ts_s=1.0)  # at boot, before the 10-minute backlog window: long handled
        + kmsg_line(11, PCI1, 79, ts_s=now - 60)  # a minute ago, while no agent ran
        + kmsg_line(12, PCI0, 94, ts_s=now - 30)
    )
    fake = FakeNvml([hopper(), volta()])
    first = make_collector(fake, kmsg_path=str(log), kmsg_cursor=cursor)
    first.open()
    assert eventually(lambda: first.xid_watcher.ledger.counts["kmsg"] == 2)
    assert [s.xids for s in first.collect(0)] == [[94], [79]]
    tick(fake, first)  # the next interval saves the cursor: the XIDs are in a spooled message by then
    first.close()
    assert cursor.exists()

    with log.open("a") as f:
        f.write(kmsg_line(13, PCI1, 63, ts_s=time.monotonic()))  # raised between the two runs
    second = make_collector(fake, kmsg_path=str(log), kmsg_cursor=cursor)
    second.open()
    assert eventually(lambda: second.xid_watcher.ledger.counts["kmsg"] == 1)
    assert [s.xids for s in second.collect(0)] == [[], [63]]


def test_a_cursor_from_another_boot_means_the_whole_log_is_new(make_collector: Make, tmp_path: Path) -> None:
    log, cursor = tmp_path / "kmsg", tmp_path / "cursor.json"
    save_cursor(cursor, Cursor("a-boot-before-the-reboot", 500))
    log.write_text(kmsg_line(3, PCI0, 79, ts_s=1.0))  # early in this boot, before the agent started
    fake = FakeNvml([hopper(), volta()])
    collector = make_collector(fake, kmsg_path=str(log), kmsg_cursor=cursor)
    collector.open()
    assert eventually(lambda: collector.xid_watcher.ledger.counts["kmsg"] == 1)
    assert [s.xids for s in collector.collect(0)] == [[79], []]


@pytest.mark.skipif(not kernel_boot_id(), reason="no kernel boot id on this system")
def test_the_cursor_names_this_boot(make_collector: Make, tmp_path: Path) -> None:
    log, cursor = tmp_path / "kmsg", tmp_path / "cursor.json"
    log.write_text(kmsg_line(42, PCI0, 13))
    fake = FakeNvml([hopper()])
    collector = make_collector(fake, kmsg_path=str(log), kmsg_cursor=cursor)
    collector.open()
    assert eventually(lambda: collector.xid_watcher.ledger.counts["kmsg"] == 1)
    collector.collect(0)
    tick(fake, collector)
    assert cursor.read_text() == f'{{"boot_id": "{kernel_boot_id()}", "seq": 42}}'
