"""Property-based fuzz of the agent's OTLP/HTTP receiver over real HTTP: mutated protobuf and JSON bodies.

Each hostile request (corrupt protobuf, mutated OTLP/JSON, random JSON, broken gzip/deflate, a body
in the other encoding) gets a 4xx answer or a 200 (with `partial_success` when points were
refused), in the request's encoding, never a 500; the receiver keeps serving. Between them, a
valid job report for another GPU goes in each time, and the FLOPs the agent attributes to that GPU
are exactly the sum of those reports.
"""

from __future__ import annotations

import gzip
import json
import random
import time
import zlib
from collections.abc import Iterator

import pytest
from google.protobuf.message import DecodeError
from google.rpc.status_pb2 import Status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from gpufleet.agents.otlp import OtlpReceiver, ReceiverSettings
from tests.fuzz import BYTE_OPS, DOC_OPS, random_json
from tests.otlp.otlp_builders import DELTA, GPUS, A, B, C, D, Dp, post, request

pytestmark = pytest.mark.integration  # starts a server or a process

HOUR_MS = 3_600_000
PROTOBUF, JSON = "application/x-protobuf", "application/json"
ALLOWED = {200, 400, 413, 415}
"""What a hostile request may get: 429/503 would be load shedding, which this test never causes."""


class PinnedClock:
    def __init__(self) -> None:
        self.now = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> PinnedClock:
    return PinnedClock()


@pytest.fixture
def receiver(clock: PinnedClock) -> Iterator[OtlpReceiver]:
    with OtlpReceiver(ReceiverSettings(port=0), clock=clock, gpus=GPUS) as r:
        yield r


def _bases(clock: PinnedClock) -> list[tuple[str, bytes]]:
    """Valid requests about GPUs A, B and C (never D): protobuf and OTLP/JSON, several shapes."""
    t0 = clock.now / 1000
    proto = [
        request([Dp(3e12, start_s=t0 + 1, time_s=t0 + 2, attrs={"gpu.uuid": A})], resource={"job.id": "j1"}),
        request([Dp(5, start_s=t0 + 1, time_s=t0 + 3)], resource={"gpu.uuids": [A, B]}, temporality=DELTA),
        request([Dp(1e9, start_s=t0 + 1, time_s=t0 + 2), Dp(2e9, start_s=t0 + 2, time_s=t0 + 3)],
                resource={"cuda.visible_devices": "0,2"}),
    ]
    out = [(PROTOBUF, r.SerializeToString()) for r in proto]
    doc = {"resourceMetrics": [{
        "resource": {"attributes": [{"key": "gpu.uuid", "value": {"stringValue": C}}]},
        "scopeMetrics": [{"scope": {"name": "train"}, "metrics": [{
            "name": "gpufleet.job.flops", "unit": "{flop}",
            "sum": {"aggregationTemporality": 1, "isMonotonic": True, "dataPoints": [{
                "startTimeUnixNano": str(int((t0 + 1) * 1e3) * 1_000_000),
                "timeUnixNano": str(int((t0 + 2) * 1e3) * 1_000_000), "asDouble": 7e12}]},
        }]}],
    }]}
    out.append((JSON, json.dumps(doc).encode()))
    return out


def _hostile(rng: random.Random, media: str, body: bytes) -> tuple[str, bytes, dict[str, str]]:
    """A mutated body, sometimes compressed (well or badly), sometimes under the other content type."""
    choice = rng.random()
    if choice < 0.4:
        body = rng.choice(BYTE_OPS)(rng, body)
    elif choice < 0.8 and media == JSON:
        doc = json.loads(body)
        for _ in range(rng.randint(1, 3)):
            doc = rng.choice(DOC_OPS)(rng, doc)
        body = json.dumps(doc, allow_nan=True).encode()
    elif choice < 0.9:
        body = json.dumps(random_json(rng), allow_nan=True).encode()
    headers = {}
    encoding = rng.choice(["", "", "gzip", "deflate", "gzip-broken", "identity"])
    if encoding.startswith("gzip"):
        body = gzip.compress(body)
        if encoding == "gzip-broken":
            body = rng.choice(BYTE_OPS)(rng, body)
        headers["Content-Encoding"] = "gzip"
    elif encoding == "deflate":
        headers["Content-Encoding"] = "deflate"
        body = zlib.compress(body)
    elif encoding:
        headers["Content-Encoding"] = encoding
    if rng.random() < 0.1:
        media = JSON if media == PROTOBUF else PROTOBUF
    return media, body, headers


def _neighbour(clock: PinnedClock, n: int) -> tuple[bytes, float]:
    """The n-th valid report: a delta counter of its own series on GPU D."""
    value = float((n + 1) * 1_000_000_000)
    t0 = clock.now / 1000
    req = request([Dp(value, start_s=t0 + 1, time_s=t0 + 2)], resource={"gpu.uuid": D, "job.id": f"neighbour-{n}"},
                  temporality=DELTA)
    return req.SerializeToString(), value


def _parses(media: str, status: int, body: bytes) -> bool:
    """The reply body is the OTLP message the status calls for, in the request's encoding."""
    message = ExportMetricsServiceResponse() if status == 200 else Status()
    try:
        if media == JSON:
            from google.protobuf import json_format

            json_format.Parse(body, message)
        else:
            message.ParseFromString(body)
    except (DecodeError, ValueError):
        return False
    return True


def test_hostile_requests_get_4xx_or_200_and_valid_neighbours_count_exactly(
        receiver: OtlpReceiver, clock: PinnedClock) -> None:
    bases = _bases(clock)
    sent: list[float] = []
    statuses: dict[int, int] = {}

    @settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(st.randoms(use_true_random=False), st.integers(0, len(bases) - 1))
    def check(rng: random.Random, which: int) -> None:
        media, body, headers = _hostile(rng, *bases[which])
        reply = post(receiver.address, body, media, extra=headers)
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
        assert reply.status in ALLOWED, (reply.status, reply.reason)
        if reply.headers["content-type"] in (PROTOBUF, JSON):
            assert _parses(reply.headers["content-type"], reply.status, reply.body), reply.body[:200]
        good, value = _neighbour(clock, len(sent))
        ok = post(receiver.address, good)
        assert (ok.status, ok.body) == (200, b""), ok.reason
        sent.append(value)

    check()
    got = receiver.flops_source.take(clock.now + HOUR_MS, 1000)
    assert got.get(D) == sum(sent)
    assert 500 not in receiver.stats().requests_by_status
    assert statuses.get(200, 0) > 0
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > 0
    print(f"hostile requests by status: {dict(sorted(statuses.items()))}; {len(sent)} valid neighbours")
