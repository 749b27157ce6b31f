"""The wire contract: round-trips, refuses what it must, and its docs and schema cannot drift."""

from __future__ import annotations

import json
import math
from pathlib import Path

import msgspec
import pytest

from gpufleet import wire
from gpufleet.gpu_facts import PEAK_TABLE
from tests.builders import gpu, report

ROOT = Path(__file__).resolve().parent.parent


def test_round_trip_keeps_every_field_including_nulls() -> None:
    g = gpu(3, util_gpu_ratio=None, xids=[79, 48], error=None, tenant="t", job="j", remap_pending=False)
    r = report(gpus=[g, gpu(4, power_w=None)])
    back = wire.decode(wire.encode(r))
    assert back == r
    assert back.gpus[0].util_gpu_ratio is None
    assert back.gpus[0].xids == [79, 48]
    assert back.gpus[0].remap_pending is False


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d | {"schema_version": 2}, "unknown schema_version 2"),
        (lambda d: d | {"surprise": 1}, "unknown field `surprise`"),
        (lambda d: d | {"interval_ms": 0}, "Expected `int` >= 1 - at `$.interval_ms`"),
        (lambda d: {**d, "gpus": [{**d["gpus"][0], "util_gpu_ratio": 1.5}]}, "<= 1.0 - at `$.gpus[0].util_gpu_ratio`"),
        (lambda d: {**d, "gpus": [d["gpus"][0], d["gpus"][0]]}, "appears twice"),
        (lambda d: d | {"network": [{"device": "mlx5_0", "port": 1}, {"device": "mlx5_0", "port": 1}]},
         "a network port appears twice"),
        (lambda d: d | {"network": [{"device": "mlx5_0", "port": 1, "state": 256}]},
         "<= 255 - at `$.network[0].state`"),
    ],
)
def test_invalid_messages_are_refused_with_the_reason(mutate, message) -> None:
    doc = msgspec.json.decode(wire.encode(report()))
    with pytest.raises(wire.WireError) as err:
        wire.decode(msgspec.json.encode(mutate(doc)))
    assert message in str(err.value)


def test_committed_json_schema_matches_the_code() -> None:
    committed = json.loads((ROOT / "docs/wire-format.schema.json").read_text())
    assert committed == json.loads(json.dumps(wire.json_schema()))


def test_every_field_is_documented() -> None:
    doc = (ROOT / "docs/wire-format.md").read_text()
    for struct in (wire.NodeReport, wire.GpuSample, wire.AgentHealth, wire.NetworkPort):
        for name in struct.__struct_fields__:
            assert f"| `{name}` |" in doc, f"{struct.__name__}.{name} is not documented in docs/wire-format.md"


def test_flops_measured_is_bounded_by_the_fastest_gpu_times_the_interval() -> None:
    # The probe stored flops_measured = 1.79e308 (issue 18 item 5). The bound: 1e17 FLOP/s x interval.
    assert 10 * max(p.flops for p in PEAK_TABLE.values()) <= wire.MAX_FLOP_RATE
    at_bound = report(interval_ms=1000, gpus=[gpu(0, flops_measured=1e17)])
    assert wire.decode(wire.encode(at_bound)) == at_bound
    for value, interval in ((1.79e308, 1000), (math.nextafter(1e17, math.inf), 1000), (2e14, 1)):
        bad = report(interval_ms=interval, gpus=[gpu(0, flops_measured=value)])
        with pytest.raises(wire.WireError, match="flops_measured"):
            wire.decode(wire.encode(bad))


def test_tokens_and_samples_are_bounded_per_gpu_and_interval() -> None:
    at_bound = report(interval_ms=1000, gpus=[gpu(0, tokens_measured=1e10, samples_measured=1e10)])
    assert wire.decode(wire.encode(at_bound)) == at_bound
    for name in ("tokens_measured", "samples_measured"):
        for value, interval in ((1.79e308, 1000), (math.nextafter(1e10, math.inf), 1000), (2e7, 1)):
            bad = report(interval_ms=interval, gpus=[gpu(0, **{name: value})])
            with pytest.raises(wire.WireError, match=name):
                wire.decode(wire.encode(bad))
