"""Hostile messages through the real ingester: tansu broker -> `Ingester` -> chDB, interleaved with valid ones.

A fixed, seeded list of 300 mutated messages (tests/fuzz: bit flips, truncation, type swaps,
edge values, random JSON) is produced between 100 valid ones on a one-partition topic. Each
message's fate is known beforehand from the ingester's own gates (`validate`, and the time
window around its clock, fixed here): a valid one must land in `gpu_samples` exactly once with
exactly its values (through the JSON staging path or the column path), an invalid one must be
dead-lettered with its reason and its original bytes, and the ingester keeps running: a message
produced after all of them is ingested as well.

The wire contract bounds every number by the ClickHouse column it lands in, so every message that
validates also fits its columns (asserted for each one here); a value that would overflow (an
`nvlink_links_down` of 300 into UInt8) is dead-lettered instead of stalling its batch (the last
test). A mutated message that happens to repeat another's identity is kept out (dedup is tested
in tests/pipeline/test_ingest.py).
"""

from __future__ import annotations

import random
import struct
from typing import Any

from gpufleet import wire
from gpufleet.config import Config
from gpufleet.pipeline.ingest.validation import TimeWindow, validate
from tests.builders import T0_MS, gpu, report
from tests.fuzz import base_report, mutate
from tests.security import ingest_config, produce, running_ingester, wait_for

SEED = 20261129
VALID, MUTATED = 100, 300
_RENAMED = {"index": "gpu_index", "uuid": "gpu_uuid"}
_UINT_MAX = {"UInt8": 2**8 - 1, "UInt16": 2**16 - 1, "UInt32": 2**32 - 1, "UInt64": 2**64 - 1}
FLOAT32_MAX = struct.unpack("f", struct.pack("I", 0x7F7FFFFF))[0]
NOW_MS = T0_MS + 3_600_000
"""The ingester's clock, fixed, so each dead letter's reason is known beforehand."""
WINDOW = TimeWindow.from_config(Config())


def fate(key: bytes | None, value: bytes) -> wire.NodeReport | str:
    """What the ingester makes of a message: the report, or the reason it is dead-lettered."""
    result = validate(key, value)
    if isinstance(result, str):
        return result
    return WINDOW.check(result.time_ms, NOW_MS) or result


def column_types(ch_client, database: str) -> dict[str, str]:
    rows = ch_client.query("SELECT name, type FROM system.columns WHERE database = {db:String} "
                           "AND table = 'gpu_samples'", parameters={"db": database}).result_rows
    out = {}
    for name, declared in rows:
        kind = declared
        for wrapper in ("Nullable", "LowCardinality"):
            if kind.startswith(wrapper + "("):
                kind = kind[len(wrapper) + 1:-1]
        out[name] = kind
    return out


def fits_columns(r: wire.NodeReport, types: dict[str, str]) -> bool:
    """Whether every number of `r` fits the gpu_samples column it goes to (UInt ranges, finite Float32)."""
    def fits(value: Any, kind: str) -> bool:
        if value is None or isinstance(value, bool):
            return True
        if kind in _UINT_MAX:
            return 0 <= value <= _UINT_MAX[kind]
        if kind == "Float32":
            return abs(value) <= FLOAT32_MAX
        if kind == "Array(UInt16)":
            return all(0 <= v <= 65535 for v in value)
        return True

    if not (r.seq <= _UINT_MAX["UInt64"] and r.time_ms <= 2**63 - 1):
        return False
    return all(fits(getattr(g, f), types.get(_RENAMED.get(f, f), "")) for g in r.gpus for f in wire.GPU_FIELDS)


def messages(types: dict[str, str]) -> tuple[list[tuple[bytes, bytes]], int]:
    """The produced stream (valid and mutated, interleaved, seeded) and how many repeated identities were left out."""
    rng = random.Random(SEED)
    valid = [(f"node-{i % 5}", wire.encode(base_report(f"node-{i % 5}", seq=i, n_gpus=1 + i % 3)))
             for i in range(VALID)]
    hostile = []
    left_out = 0
    seen = {("c1", f"node-{i % 5}", "boot-1", i) for i in range(VALID)}
    while len(hostile) < MUTATED:
        i = VALID + len(hostile) + left_out
        node = f"node-{i % 5}"
        data = mutate(rng, wire.encode(base_report(node, seq=i, n_gpus=1 + i % 3)))
        key = node.encode() if rng.random() < 0.95 else rng.choice([b"other", b"\xff"])
        result = fate(key, data)
        if not isinstance(result, str):
            identity = (result.cluster, result.node, result.boot_id, result.seq)
            assert fits_columns(result, types), f"a message passed validation but overflows a column: {result}"
            if identity in seen:
                # A second message under one identity (a mutated seq): which copy wins then depends on
                # batch boundaries; dedup has its own tests.
                left_out += 1
                continue
            seen.add(identity)
        hostile.append((key, data))
    stream = [(k.encode(), v) for k, v in valid] + hostile
    rng.shuffle(stream)
    return stream, left_out


def expected_rows(stream: list[tuple[bytes, bytes]]) -> list[tuple[Any, ...]]:
    """One row per GPU of the first copy of each valid message identity, as gpu_samples stores it."""
    seen: set[tuple[str, str, str, int]] = set()
    rows = []
    for key, value in stream:
        r = fate(key, value)
        if isinstance(r, str) or (r.cluster, r.node, r.boot_id, r.seq) in seen:
            continue
        seen.add((r.cluster, r.node, r.boot_id, r.seq))
        for g in r.gpus:
            job = (g.job or "") if g.tenant else ""
            rows.append((r.cluster, r.node, r.boot_id, r.seq, r.time_ms, g.index, g.uuid, g.model or "",
                         g.tenant or "", job, g.error or "", g.mem_used_bytes, g.energy_j, list(g.xids)))
    return sorted(rows, key=repr)


def test_mutated_messages_are_dead_lettered_and_valid_neighbours_ingested_exactly(
        broker, ch_target, ch_client, topic) -> None:
    db = ch_target.database
    stream, left_out = messages(column_types(ch_client, db))
    reasons = {}
    for offset, (key, value) in enumerate(stream):
        result = fate(key, value)
        if isinstance(result, str):
            reasons[offset] = result
    want = expected_rows(stream)
    cfg = ingest_config(broker.bootstrap, ch_target, topic)
    with running_ingester(cfg, clock=lambda: NOW_MS / 1000) as ing:
        produce(cfg, stream)
        wait_for(ing, lambda: ing.stats.dead_letters == len(reasons) and ing.stats.rows == len(want),
                 f"{len(reasons)} dead letters and {len(want)} GPU rows")
        # Still running: a message produced after the storm is ingested too.
        last = report(node="node-after", seq=0, time_ms=T0_MS, gpus=[gpu(0, "node-after", tenant="t")])
        produce(cfg, [(b"node-after", wire.encode(last))])
        wait_for(ing, lambda: ing.stats.rows == len(want) + 1, "the message after the hostile ones")
    got = ch_client.query(
        "SELECT cluster, node, boot_id, seq, toUnixTimestamp64Milli(time), gpu_index, gpu_uuid, model, tenant, job, "
        f"error, mem_used_bytes, energy_j, xids FROM {db}.gpu_samples WHERE node != 'node-after'").result_rows
    assert sorted(((*r[:-1], list(r[-1])) for r in got), key=repr) == want
    dead = ch_client.query(f"SELECT offset, reason, payload FROM {db}.dead_letters FINAL ORDER BY offset").result_rows
    assert {o: r for o, r, _ in dead} == reasons
    for offset, _, payload in dead:
        assert payload == stream[offset][1].decode("utf-8", "backslashreplace")
    assert len({(r[1], r[3]) for r in want}) >= VALID, "every untouched message is among the ingested"
    assert 0 < len(reasons) < len(stream) - VALID + 1
    print(f"{len(stream)} messages: {len(reasons)} dead-lettered, {len(want)} GPU rows; "
          f"{left_out} left out (column overflow or a repeated identity)")


def test_a_value_that_overflows_its_column_does_not_stall_its_neighbours(broker, ch_target, ch_client, topic) -> None:
    poison = report(node="p1", seq=0, gpus=[gpu(0, "p1", nvlink_links_down=300)])
    # The wire contract bounds every field by its column, so the poison is dead-lettered at validation.
    assert "<= 255" in validate(b"p1", wire.encode(poison))
    good = report(node="p2", seq=0, gpus=[gpu(0, "p2")])
    cfg = ingest_config(broker.bootstrap, ch_target, topic)
    with running_ingester(cfg, clock=lambda: NOW_MS / 1000) as ing:
        produce(cfg, [(b"p1", wire.encode(poison)), (b"p2", wire.encode(good))])
        wait_for(ing, lambda: ing.stats.rows >= 1 or ing.stats.dead_letters >= 1, "the good neighbour", timeout_s=8)
    rows = ch_client.query(f"SELECT node FROM {ch_target.database}.gpu_samples").result_rows
    assert ("p2",) in rows


def test_the_stream_is_what_the_docstring_says() -> None:
    """The seeded stream holds the promised mix (a guard against mutations that stop producing variety)."""
    types = {"gpu_index": "UInt16", "nvlink_links_down": "UInt8", "power_w": "Float32"}
    stream, _ = messages(types)
    kinds = [isinstance(fate(k, v), str) for k, v in stream]
    assert len(stream) == VALID + MUTATED
    assert sum(kinds) > MUTATED // 2
