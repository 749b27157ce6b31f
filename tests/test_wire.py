"""The wire contract: round-trips, refuses what it must, and its docs and schema cannot drift."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from gpufleet import wire
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
    for struct in (wire.NodeReport, wire.GpuSample, wire.AgentHealth):
        for name in struct.__struct_fields__:
            assert f"| `{name}` |" in doc, f"{struct.__name__}.{name} is not documented in docs/wire-format.md"
