"""The disk spool: order, restart replay, drop-oldest bound, crash safety and never-reused seqs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpufleet.agents.spool import RECORD_OVERHEAD, Spool, SpoolError

MB = 1024 * 1024


def payload(seq: int, size: int = 100) -> bytes:
    return f"message-{seq:04d}-".encode().ljust(size, b"x")


def test_messages_come_back_in_order_and_leave_only_when_removed(tmp_path: Path) -> None:
    with Spool(tmp_path, MB) as spool:
        assert spool.next_seq == 0
        for seq in range(5):
            assert spool.append(seq, payload(seq))
        assert [e.seq for e in spool.peek()] == [0, 1, 2, 3, 4]
        assert [e.data for e in spool.peek(limit=2)] == [payload(0), payload(1)]
        assert [e.seq for e in spool.peek(after=2)] == [3, 4]
        assert spool.remove([0, 1]) == 2
        assert spool.remove([1]) == 0  # already gone
        assert [e.seq for e in spool.peek()] == [2, 3, 4]
        assert spool.depth == 3
        assert spool.bytes == 3 * (100 + RECORD_OVERHEAD)
        assert spool.next_seq == 5


def test_restart_replays_what_was_not_acknowledged_in_order_with_its_seq(tmp_path: Path) -> None:
    with Spool(tmp_path, MB) as first:
        boot_id = first.boot_id
        for seq in range(6):
            first.append(seq, payload(seq))
        first.remove([0, 1, 3])
    with Spool(tmp_path, MB) as again:
        assert again.boot_id == boot_id
        assert [(e.seq, e.data) for e in again.peek()] == [(2, payload(2)), (4, payload(4)), (5, payload(5))]
        assert again.next_seq == 6
        assert again.depth == 3


def test_seq_continues_after_every_message_was_acknowledged(tmp_path: Path) -> None:
    with Spool(tmp_path, MB) as first:
        for seq in range(3):
            first.append(seq, payload(seq))
        first.remove([0, 1, 2])
    with Spool(tmp_path, MB) as again:
        assert again.depth == 0
        assert again.next_seq == 3


def test_full_spool_drops_the_oldest_first_and_counts_them(tmp_path: Path) -> None:
    record = 100 + RECORD_OVERHEAD
    with Spool(tmp_path, 3 * record, warn_every_s=3600) as spool:
        for seq in range(5):
            spool.append(seq, payload(seq))
        # 5 records of 108 bytes into 324 bytes: the two oldest went
        assert spool.dropped_total == 2
        assert [e.seq for e in spool.peek()] == [2, 3, 4]
        assert spool.bytes == 3 * record
        spool.append(5, payload(5, size=2 * 100 + RECORD_OVERHEAD))  # needs two records' room
        assert spool.dropped_total == 4
        assert [e.seq for e in spool.peek()] == [4, 5]
    with Spool(tmp_path, 3 * record) as again:
        assert [e.seq for e in again.peek()] == [4, 5]
        assert again.next_seq == 6


def test_a_message_larger_than_the_whole_spool_is_dropped_and_its_seq_not_reused(tmp_path: Path) -> None:
    with Spool(tmp_path, 1000) as spool:
        spool.append(0, payload(0))
        assert spool.append(1, b"y" * 2000) is False
        assert spool.dropped_total == 1
        assert spool.next_seq == 2
        assert [e.seq for e in spool.peek()] == [0]
    with pytest.raises(ValueError, match="never reused"), Spool(tmp_path, 1000) as again:
        again.append(1, payload(1))


def test_a_damaged_record_is_moved_aside_and_counted(tmp_path: Path) -> None:
    with Spool(tmp_path, MB) as spool:
        for seq in range(3):
            spool.append(seq, payload(seq))
    victim = tmp_path / "queue" / f"{1:020d}.msg"
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with Spool(tmp_path, MB) as again:
        assert [e.seq for e in again.peek()] == [0, 2]
        assert again.dropped_total == 1
        assert again.depth == 2
    assert (tmp_path / "corrupt" / victim.name).exists()


def test_a_second_agent_cannot_share_the_directory(tmp_path: Path) -> None:
    with Spool(tmp_path, MB), pytest.raises(SpoolError, match="in use by another agent"):
        Spool(tmp_path, MB)


def test_state_file_names_boot_id_and_next_seq(tmp_path: Path) -> None:
    with Spool(tmp_path, MB) as spool:
        spool.append(0, payload(0))
        spool.remove([0])
        boot_id = spool.boot_id
    state = json.loads((tmp_path / "state.json").read_text())
    assert state == {"boot_id": boot_id, "next_seq": 1}


WRITER = textwrap.dedent(
    """
    import sys
    from gpufleet.agents.spool import Spool
    spool = Spool(sys.argv[1], 1 << 30, fsync=False)
    ack = sys.argv[2] == "ack"
    seq = spool.next_seq
    while True:
        spool.append(seq, (b"%d:" % seq) + b"z" * 3000)
        if ack:
            spool.remove([seq])
        print(seq, flush=True)
        seq += 1
    """
)


def _kill_writer_after(tmp_path: Path, mode: str, count: int) -> list[int]:
    """Run a writer process, SIGKILL it after it reported `count` finished appends; return those seqs."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), mode], stdout=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    done = [int(proc.stdout.readline()) for _ in range(count)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    return done


@pytest.mark.integration
def test_killed_mid_stream_loses_nothing_acknowledged_and_leaves_no_torn_record(tmp_path: Path) -> None:
    done = _kill_writer_after(tmp_path, "keep", 200)
    with Spool(tmp_path, 1 << 30) as spool:
        entries = spool.peek(limit=10_000, max_bytes=1 << 30)
        seqs = [e.seq for e in entries]
        assert seqs[: len(done)] == done  # every append that returned is there, in order
        assert seqs == list(range(len(seqs)))  # and nothing else but whole later ones
        for e in entries:
            assert e.data == (b"%d:" % e.seq) + b"z" * 3000
        assert spool.dropped_total == 0
        assert spool.next_seq == len(seqs)
    assert not list((tmp_path / "queue").glob(".*.tmp"))


def test_killed_after_acknowledgements_never_reuses_a_seq(tmp_path: Path) -> None:
    done = _kill_writer_after(tmp_path, "ack", 150)
    with Spool(tmp_path, 1 << 30) as spool:
        leftover = [e.seq for e in spool.peek(limit=10_000)]
        assert spool.next_seq > done[-1]
        assert all(seq > done[-1] for seq in leftover)  # at most the one in progress
        assert spool.next_seq > max(leftover, default=-1)
