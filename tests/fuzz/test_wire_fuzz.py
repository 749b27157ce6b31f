"""Property-based fuzz of the wire decoder and the ingester's validation: thousands of hostile messages.

Each mutated message is either a valid `NodeReport` (and then exactly what its bytes say) or a
reason string: no other exception escapes `pipeline.ingester.validate`, and `gpufleet.wire.decode`
raises only `WireError`. The staging path's bounded decoder admits a subset of the same messages
with the same values. Hypothesis runs derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpufleet import wire
from gpufleet.pipeline.ingest import staging
from gpufleet.pipeline.ingest.validation import validate, validate_for_staging
from tests.fuzz import base_report, mutate

FUZZ = settings(max_examples=1500, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BASES = [wire.encode(base_report(f"node-{i}", seq=i, n_gpus=i % 4)) for i in range(8)]
KEYS = st.sampled_from([None, b"", b"node-0", b"node-1", b"\xff\xfe", "n\u00f6de".encode()])


def _check_report(r: wire.NodeReport, data: bytes) -> None:
    """What any accepted message satisfies, checked by hand against the contract."""
    assert r.schema_version == wire.SCHEMA_VERSION
    assert all(1 <= len(s) <= 256 for s in (r.cluster, r.node, r.boot_id))
    assert 1 <= r.interval_ms <= 3_600_000
    assert r.seq >= 0
    assert r.time_ms >= 0
    assert len({g.uuid for g in r.gpus}) == len(r.gpus)
    for g in r.gpus:
        assert g.index >= 0
        for name in ("util_gpu_ratio", "util_mem_ratio", "sm_active_ratio", "tensor_active_ratio", "dram_active_ratio"):
            v = getattr(g, name)
            assert v is None or 0.0 <= v <= 1.0
        for name in ("tenant", "job", "model", "error"):
            v = getattr(g, name)
            assert v is None or len(v) <= 1024
        assert all(0 <= x <= 65535 for x in g.xids)
        assert g.flops_measured is None or 0 <= g.flops_measured <= 10**14 * r.interval_ms  # 1e17 FLOP/s
    assert len(data) <= wire.MAX_MESSAGE_BYTES
    # An accepted message re-encodes to bytes that decode to the same report.
    assert wire.decode(wire.encode(r)) == r


@FUZZ
@given(st.randoms(use_true_random=False), st.sampled_from(BASES))
@example(random.Random(1), b"")
@example(random.Random(2), b"\xff" * 10)
@example(random.Random(3), b'{"schema_version":1}')
def test_decode_returns_a_report_or_raises_wire_error(rng: random.Random, base: bytes) -> None:
    data = mutate(rng, base) if base else base
    reason = None
    try:
        r = wire.decode(data)
    except wire.WireError as exc:
        reason = str(exc)
    else:
        _check_report(r, data)
    assert reason is None or reason.strip()


@FUZZ
@given(st.randoms(use_true_random=False), st.sampled_from(BASES), KEYS)
def test_validate_returns_a_report_or_a_reason_and_never_raises(rng: random.Random, base: bytes,
                                                                key: bytes | None) -> None:
    data = mutate(rng, base)
    key = key if key != b"node-0" else msgspec.json.decode(base)["node"].encode()
    result = validate(key, data)
    if isinstance(result, str):
        assert result.strip(), result
        assert len(result) < 4000, result
        return
    assert isinstance(result, wire.NodeReport)
    assert key == result.node.encode()
    _check_report(result, data)


NAMES = st.text(min_size=1, max_size=256)
LABELS = st.none() | st.text(max_size=1024)
RATIOS = st.none() | st.floats(0.0, 1.0)
# The wire's bounds are its columns' (UInt8/16/32, int64-bounded UInt64 counters, Float32 watts and
# degrees, DateTime64 up to 2300): the largest values allowed are generated as edge cases.
COUNTS = st.none() | st.integers(0, 2**63 - 1)
NONNEG = st.none() | st.floats(0.0, 1e300)
GPUS = st.builds(
    wire.GpuSample, index=st.integers(0, 2**16 - 1), uuid=NAMES, model=LABELS, error=LABELS, tenant=LABELS,
    job=LABELS, util_gpu_ratio=RATIOS, tensor_active_ratio=RATIOS, mem_used_bytes=COUNTS,
    power_w=st.none() | st.floats(0.0, 1e6), energy_j=NONNEG,
    temp_gpu_c=st.none() | st.floats(-273.15, 1e4), clock_sm_mhz=st.none() | st.integers(0, 2**32 - 1),
    xids=st.lists(st.integers(0, 65535), max_size=5), remap_pending=st.none() | st.booleans(),
    nvlink_links_down=st.none() | st.integers(0, 255),
    flops_measured=st.none() | st.floats(0.0, 1e14),  # 1e17 FLOP/s x 1 ms, the shortest interval: always valid
)
REPORTS = st.builds(
    wire.NodeReport, schema_version=st.just(wire.SCHEMA_VERSION), cluster=NAMES, node=NAMES, boot_id=NAMES,
    seq=st.integers(0, 2**63 - 1), time_ms=st.integers(0, 10_413_792_000_000), interval_ms=st.integers(1, 3_600_000),
    gpus=st.lists(GPUS, max_size=4, unique_by=lambda g: g.uuid),
)


@settings(FUZZ, max_examples=400)
@given(REPORTS)
def test_valid_edge_values_are_accepted_exactly(r: wire.NodeReport) -> None:
    """Longest names, empty and Unicode labels, 0 and 1 ratios, the largest integers: accepted as sent.

    Infinity is left out: JSON cannot carry it (the agent never reads one from NVML).
    """
    data = wire.encode(r)
    assert validate(r.node.encode(), data) == r


@settings(FUZZ, max_examples=300)
@given(st.randoms(use_true_random=False), st.sampled_from(BASES))
def test_tombstones_and_keyless_messages_get_a_reason(rng: random.Random, base: bytes) -> None:
    assert validate(b"node-0", None) == "empty message (tombstone): agents never send one"
    result = validate(None, mutate(rng, base) if rng.random() < 0.5 else base)
    assert isinstance(result, str)
    assert result


def test_staging_decoder_admits_a_subset_with_identical_values(ch_target, ch_client) -> None:
    """The JSON staging path may only take messages `validate` accepts, decoded to the same values."""
    types = dict(ch_client.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = 'gpu_samples'",
        parameters={"db": ch_target.database}).result_rows)
    decoder = staging.plan(ch_target.database, types).decoder
    taken = []

    @FUZZ
    @given(st.randoms(use_true_random=False), st.sampled_from(BASES))
    def check(rng: random.Random, base: bytes) -> None:
        data = mutate(rng, base)
        key = msgspec.json.decode(base)["node"].encode()
        result, as_json = validate_for_staging(decoder, key, data)
        plain = validate(key, data)
        if isinstance(plain, str):
            assert result == plain
            assert not as_json
            return
        assert not isinstance(result, str)
        assert msgspec.to_builtins(result) == msgspec.to_builtins(plain)
        taken.append(as_json)

    check()
    assert any(taken), "no mutated message stayed valid: the mutations are too destructive to test this"


def test_invalid_utf8_inside_a_string_is_a_wire_error() -> None:
    good = wire.encode(base_report("node-0", seq=0))
    bad = good.replace(b'"acme"', b'"ac\xc3\x28e"', 1)
    with pytest.raises(wire.WireError):
        wire.decode(bad)
