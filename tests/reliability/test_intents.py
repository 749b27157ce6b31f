"""The ingester's intent log on its own: where it lives, what survives, what is set aside."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from gpufleet.pipeline.ingest.intents import COLUMNS, JSON, JSON_AS_COLUMNS, Intent, IntentLog, decode, encode


def _intent(token: str, ms: int = 1) -> Intent:
    return Intent(token, ms, False, "db.gpu_samples_json_x", [(b'{"a":1}', True), (b'{"b":2}', False)])


def test_kept_only_for_an_embedded_store_on_disk(tmp_path: Path) -> None:
    log = IntentLog.for_store(f"chdb://{tmp_path / 'store'}", "gpufleet")
    assert log is not None
    assert log.directory == tmp_path / "store" / "gpufleet-intents" / "gpufleet"
    assert IntentLog.for_store("chdb://memory", "gpufleet") is None
    assert IntentLog.for_store("http://ch:8123", "gpufleet") is None


def test_recorded_intents_come_back_oldest_first_until_done(tmp_path: Path) -> None:
    log = IntentLog(tmp_path)
    a, b = _intent("a" * 32), _intent("b" * 32, 2)
    log.record(b)
    os.utime(tmp_path / f"{'b' * 32}.intent", ns=(1, 1))  # written first
    log.record(a)
    assert log.pending() == [b, a]
    log.record(Intent(a.token, a.ingest_ms, True, a.staging_table, a.messages))  # switched path: rewritten
    assert [i.columns_only for i in IntentLog(tmp_path).pending()] == [False, True]
    log.done(b.token)
    log.done(b.token)  # twice is fine (a replay removed it already)
    assert log.pending() == [Intent(a.token, a.ingest_ms, True, a.staging_table, a.messages)]
    with pytest.raises(ValueError, match="not an intent token"):
        log.done("../escape")


def test_a_torn_or_damaged_intent_is_set_aside_and_logged(tmp_path: Path, caplog) -> None:
    log = IntentLog(tmp_path)
    (tmp_path / f".{'c' * 32}.intent.tmp").write_bytes(b"half")  # died mid-write: never an intent
    (tmp_path / f"{'d' * 32}.intent").write_bytes(b"\x00garbage")
    (tmp_path / f"{'e' * 32}.intent").write_bytes(b"".join(encode(_intent("e" * 32)))[:-3])  # cut short
    caplog.set_level(logging.ERROR, logger="gpufleet.pipeline.ingest.intents")
    assert log.pending() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{'d' * 32}.intent.unreadable",
                                                          f"{'e' * 32}.intent.unreadable"]
    assert "run the check in docs/reliability.md" in caplog.records[0].getMessage()


def test_each_message_keeps_its_insert_path_and_an_unknown_path_is_damage() -> None:
    intent = Intent("f" * 32, 7, False, "db.t", [(b"a", JSON), (b"b", COLUMNS), (b"c", JSON_AS_COLUMNS)])
    raw = b"".join(encode(intent))
    assert decode(raw) == intent
    head = raw.index(b"\n") + 1
    bad = raw[:head + 4] + bytes([3]) + raw[head + 5:]  # the first frame's path byte
    with pytest.raises(ValueError, match="unknown insert path 3"):
        decode(bad)
