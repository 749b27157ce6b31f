"""The wire's attribution fields: unknown allocations, shared GPUs and MIG instances, checked by `decode`."""

from __future__ import annotations

import msgspec
import pytest

from gpufleet import wire
from gpufleet.wire import GpuSample, Share, WireError
from tests.builders import gpu, report


def _decode(*gpus: GpuSample) -> wire.NodeReport:
    return wire.decode(wire.encode(report(gpus=list(gpus))))


def test_a_shared_gpu_names_its_largest_holder_and_round_trips() -> None:
    shares = [Share("acme", "j1", 1), Share("beta", "j2", 3)]
    out = _decode(gpu(0, tenant="beta", job="j2", shares=shares))
    assert out.gpus[0].shares == shares
    assert b'"weight"' in wire.encode(report(gpus=[gpu(0, tenant="beta", job="j2", shares=shares)]))


@pytest.mark.parametrize(("fields", "problem"), [
    ({"tenant": "acme", "shares": [Share("acme", "j1"), Share("beta", "j2", 2)]}, "largest weight"),
    ({"tenant": "acme", "shares": [Share("acme")]}, "one holder"),
    ({"tenant": "acme", "allocation_unknown": True}, "names nobody"),
    ({"parent_uuid": "GPU-x", "slices": 1}, "together"),
    ({"parent_uuid": "GPU-x", "slices": 8, "slices_total": 7}, "1..slices_total"),
])
def test_inconsistent_attribution_is_refused(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        _decode(gpu(0, **fields))


def test_a_mig_instance_is_its_share_of_the_gpu() -> None:
    mig = gpu(0, uuid="MIG-a", parent_uuid="GPU-p", gpu_instance_id=9, compute_instance_id=0,
              mig_profile="1g.10gb", slices=1, slices_total=7)
    out = _decode(mig)
    assert wire.share_of_gpu(out.gpus[0]) == (1, 7)
    assert wire.share_of_gpu(gpu(1)) == (1, 1)


def test_an_unknown_allocation_is_a_flag_absent_when_false() -> None:
    assert b"allocation_unknown" not in wire.encode(report(gpus=[gpu(0)]))
    assert _decode(gpu(0, allocation_unknown=True)).gpus[0].allocation_unknown is True
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"tenant": ""}, Share)
