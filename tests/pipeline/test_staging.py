"""The JSON staging path stores exactly what the column path stores, and hands it what it cannot carry."""

from __future__ import annotations

import random
import uuid

import msgspec
import pytest

from gpufleet import wire
from gpufleet.pipeline.ingest import staging
from gpufleet.pipeline.ingest.rows import SAMPLE_COLUMNS, Deriver, derive, derived_columns, insert_columns
from gpufleet.pipeline.ingest.validation import validate, validate_for_staging
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate
from tests.builders import T0_MS, TEST_RAW_TTL_DAYS, gpu, report

H100_PEAK = 989e12


def _varied_reports() -> list[wire.NodeReport]:
    """Every kind of value the wire allows, in every field, including awkward floats and strings."""
    rnd = random.Random(7)
    out = []
    for s in range(40):
        gpus = []
        for i in range(rnd.randrange(0, 5)):
            gpus.append(gpu(
                i, f"n{s % 5}",
                model=rnd.choice([None, "", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Mystery X1"]),
                tenant=rnd.choice([None, "", "acme", "t\u00e9nant \"quoted\" \\ \u0000 \u2603"]),
                job=rnd.choice([None, "", "j1", "job\nwith newline"]),
                error=rnd.choice([None, None, None, "", "GPU is lost"]),
                util_gpu_ratio=rnd.choice([None, 0.0, 1.0, rnd.random(), 0.1 + 0.2]),
                power_w=rnd.choice([None, 0.0, rnd.uniform(50, 700), 1e6, 1e-45, 5e-324]),
                energy_j=rnd.choice([None, rnd.uniform(0, 1e12), 123456789.123456789]),
                temp_gpu_c=rnd.choice([None, -40.5, 95.0, rnd.uniform(20, 100)]),
                mem_used_bytes=rnd.choice([None, 0, 2**63 - 1, rnd.randrange(2**40)]),
                clock_sm_mhz=rnd.choice([None, 0, 2**32 - 1, 1980]),
                nvlink_links_down=rnd.choice([None, 0, 255]),
                xids=rnd.choice([[], [79], [13, 31, 13], [65535, 0]]),
                pcie_replay_count=rnd.choice([None, 0, s]),
                remap_pending=rnd.choice([None, False, True]),
                tensor_active_ratio=rnd.choice([None, 0.0, rnd.random(), 1.0]),
                flops_measured=rnd.choice([None, rnd.uniform(0, 1e15)]),
                tokens_measured=rnd.choice([None, 0.0, rnd.uniform(0, 1e6), 1e10 * 0.333]),
                samples_measured=rnd.choice([None, rnd.uniform(0, 300)]),
            ))
        out.append(report(node=f"n{s % 5}", seq=s, time_ms=T0_MS + 1000 * (s // 5), gpus=gpus,
                          interval_ms=rnd.choice([1000, 10_000, 333])))
    return out


def _rows(client, database: str) -> list[tuple]:
    cols = ", ".join(SAMPLE_COLUMNS)
    return client.query(f"SELECT {cols} FROM {database}.gpu_samples ORDER BY node, seq, gpu_index").result_rows


@pytest.fixture
def second_db(ch_client):
    name = f"t_{uuid.uuid4().hex[:12]}"
    migrate(ch_client, SchemaOptions(database=name, raw_ttl_days=TEST_RAW_TTL_DAYS))
    yield name
    ch_client.command(f"DROP DATABASE IF EXISTS {name} SYNC")


def test_json_rows_equal_column_rows(ch_client, ch_store, ch_target, second_db) -> None:
    path = staging.ensure(ch_store)
    raws = [wire.encode(r) for r in _varied_reports()]
    # Same bytes another encoder might send: pretty-printed, with surrounding whitespace.
    raws[3] = b"  \n" + msgspec.json.format(raws[3], indent=2) + b"\n\t "
    decoded = [validate_for_staging(path.decoder, msgspec.json.decode(r)["node"].encode(), r) for r in raws]
    assert all(as_json for _, as_json in decoded)
    reports = [r for r, _ in decoded]
    derived = derive(reports, Deriver())
    keep = [True] * len(reports)
    block = staging.Splicer(Deriver().peak).block(derived, {id(r): b for r, b in zip(reports, raws, strict=True)},
                                                  keep, T0_MS + 5)
    staging.insert(ch_store, path, block)
    insert_columns(Store(ch_client, second_db), "gpu_samples", derived_columns(derive(reports, Deriver()), T0_MS + 5))
    via_json, via_columns = _rows(ch_client, ch_target.database), _rows(ch_client, second_db)
    assert len(via_json) == sum(len(r.gpus) for r in reports) > 50
    assert via_json == via_columns
    assert [type(v) for row in via_json for v in row] == [type(v) for row in via_columns for v in row]


def test_json_rows_carry_the_derived_values(ch_client, ch_store, ch_target) -> None:
    path = staging.ensure(ch_store)
    reports = [
        report(node="n1", seq=0, gpus=[gpu(0, "n1", xids=[79, 13], pcie_replay_count=5)]),
        report(node="n1", seq=1, time_ms=T0_MS + 1000,
               gpus=[gpu(0, "n1", pcie_replay_count=7, error="GPU is lost", tensor_active_ratio=0.5)]),
        report(node="n2", seq=0, interval_ms=10_000, gpus=[gpu(0, "n2", model="Mystery X1"), gpu(1, "n2")]),
    ]
    raws = {id(r): wire.encode(r) for r in reports}
    block = staging.Splicer(Deriver().peak).block(derive(reports, Deriver()), raws, [True] * 3, T0_MS + 2500)
    staging.insert(ch_store, path, block)
    got = ch_client.query(
        f"SELECT node, seq, gpu_index, health, health_reasons, peak_flops, flops_estimated, "
        f"toUnixTimestamp64Milli(ingest_time) FROM {ch_target.database}.gpu_samples ORDER BY node, seq, gpu_index"
    ).result_rows
    assert got == [
        ("n1", 0, 0, "failing", ["xid_79"], H100_PEAK, 0.25 * H100_PEAK * 1.0, T0_MS + 2500),
        # pcie replays grew 5 -> 7; an unreachable GPU has no FLOPs estimate
        ("n1", 1, 0, "failing", ["unreachable", "pcie_replay"], H100_PEAK, None, T0_MS + 2500),
        ("n2", 0, 0, "ok", [], None, None, T0_MS + 2500),
        ("n2", 0, 1, "ok", [], H100_PEAK, 0.25 * H100_PEAK * 10.0, T0_MS + 2500),
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"clock_sm_mhz": 2**32 - 1, "nvlink_links_down": 255, "mem_used_bytes": 2**63 - 1, "power_w": 1e6},
        {"temp_gpu_c": -273.15, "xids": [0, 65535]},
    ],
)
def test_the_largest_values_the_wire_allows_take_the_json_path(ch_store, ch_target, fields) -> None:
    path = staging.ensure(ch_store)
    raw = wire.encode(report(node="n1", gpus=[gpu(0, "n1", **fields)]))
    result, json_ok = validate_for_staging(path.decoder, b"n1", raw)
    assert json_ok
    assert msgspec.json.encode(result) == raw


def _with(raw: bytes, field: str, value: int | float) -> bytes:
    doc = msgspec.json.decode(raw)
    if field in ("index", "clock_sm_mhz", "nvlink_links_down", "mem_used_bytes", "power_w", "temp_gpu_c"):
        doc["gpus"][0][field] = value
    else:
        doc[field] = value
    return msgspec.json.encode(doc)


@pytest.mark.parametrize(
    ("field", "value"),
    [("clock_sm_mhz", 2**32), ("nvlink_links_down", 256), ("mem_used_bytes", 2**63), ("mem_used_bytes", 2**70),
     ("index", 70_000), ("power_w", 3.5e38), ("temp_gpu_c", -3.5e38), ("seq", 2**63)],
)
def test_values_a_column_cannot_hold_never_take_the_json_path(ch_store, ch_target, field, value) -> None:
    """ClickHouse would wrap such a number silently: the staging decoder refuses it, and the message
    gets exactly what `validate` decides for it (the wire contract dead-letters it)."""
    path = staging.ensure(ch_store)
    raw = _with(wire.encode(report(node="n1")), field, value)
    result, json_ok = validate_for_staging(path.decoder, b"n1", raw)
    assert json_ok is False
    assert result == validate(b"n1", raw)


def test_dead_letter_reasons_are_validates(ch_store, ch_target) -> None:
    path = staging.ensure(ch_store)
    good = wire.encode(report(node="n1"))
    doc = msgspec.json.decode(good)
    two_uuids = msgspec.json.encode({**doc, "gpus": [doc["gpus"][0], doc["gpus"][0]]})
    cases = [
        (b"n1", None), (None, good), (b"n2", good), (b"\xff", good), (b"n1", good[:40]),
        (b"n1", msgspec.json.encode({**doc, "schema_version": 2})), (b"n1", two_uuids),
        (b"n1", good.replace(b'"cluster":"c1"', b'"cluster":"c\xff"')),
        (b"n1", msgspec.json.encode({**doc, "extra": 1})),
    ]
    for key, value in cases:
        result, json_ok = validate_for_staging(path.decoder, key, value)
        assert isinstance(result, str)
        assert (result, json_ok) == (validate(key, value), False)


def test_a_duplicated_key_fails_the_json_insert(ch_client, ch_store, ch_target) -> None:
    """msgspec keeps the last of two equal keys; ClickHouse refuses the row (the ingester then uses columns)."""
    path = staging.ensure(ch_store)
    raw = wire.encode(report(node="n1")).replace(b'"seq":0', b'"seq":0,"seq":3')
    r, json_ok = validate_for_staging(path.decoder, b"n1", raw)
    assert json_ok
    assert r.seq == 3
    block = staging.Splicer(Deriver().peak).block(derive([r], Deriver()), {id(r): raw}, [True], T0_MS)
    with pytest.raises(Exception, match="Duplicate field"):
        staging.insert(ch_store, path, block)
    assert ch_client.query(f"SELECT count() FROM {ch_target.database}.gpu_samples").result_rows == [(0,)]


def test_staging_objects_are_named_by_their_sql(ch_client, ch_store, ch_target) -> None:
    first = staging.ensure(ch_store)
    assert staging.ensure(ch_store).table == first.table
    types = dict(ch_client.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = 'gpu_samples'",
        parameters={"db": ch_target.database}).result_rows)
    assert staging.plan(ch_target.database, types).table == first.table
    other = staging.plan(ch_target.database, {**types, "clock_sm_mhz": "Nullable(UInt64)"})
    assert other.table != first.table
    with pytest.raises(staging.StagingUnsupported, match="power_w"):
        staging.plan(ch_target.database, {**types, "power_w": "Decimal(9, 2)"})


def test_ingester_redoes_a_refused_json_batch_as_columns(broker, ch_target, ch_client, topic) -> None:
    from tests.pipeline.test_ingest import _cfg, _create, _ingester, _produce, _run_until

    cfg = _cfg(broker, ch_target, topic)
    _create(broker, topic, cfg.kafka.dlq_topic)
    dup = wire.encode(report(node="n2")).replace(b'"seq":0', b'"seq":0,"seq":3')
    _produce(broker, topic, [(b"n1", wire.encode(report(node="n1"))), (b"n2", dup)])
    ing = _ingester(cfg)
    _run_until(ing, lambda: ing.stats.messages == 2)
    assert ing.stats.insert_errors == 1
    got = ch_client.query(f"SELECT node, seq, count() FROM {ch_target.database}.gpu_samples "
                          "GROUP BY node, seq ORDER BY node").result_rows
    assert got == [("n1", 0, 2), ("n2", 3, 2)]
