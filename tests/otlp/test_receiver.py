"""The OTLP/HTTP receiver over real HTTP: a real OpenTelemetry SDK exporter, hand-built protobuf and JSON.

The receiver's clock is pinned to the instant the test starts, so every report "arrives" then and
`take` one hour later returns each report's whole amount: the totals below are computed by hand.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from collections.abc import Iterator

import pytest
from google.rpc.status_pb2 import Status
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from gpufleet.agents.otlp import OtlpReceiver, ReceiverError, ReceiverSettings
from gpufleet.config import AgentConfig
from gpufleet.wire import GpuSample
from tests.otlp.otlp_builders import GPUS, A, B, C, D, Dp, post, request, sdk_counter

pytestmark = pytest.mark.integration  # starts a server or a process

HOUR_MS = 3_600_000


class PinnedClock:
    def __init__(self) -> None:
        self.now = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.now


def start(clock: PinnedClock, **settings: object) -> OtlpReceiver:
    return OtlpReceiver(ReceiverSettings(port=0, **settings), clock=clock, gpus=GPUS).start()  # type: ignore[arg-type]


@pytest.fixture
def clock() -> PinnedClock:
    return PinnedClock()


@pytest.fixture
def receiver(clock: PinnedClock) -> Iterator[OtlpReceiver]:
    r = start(clock)
    yield r
    r.close()


def take_all(r: OtlpReceiver, clock: PinnedClock) -> dict[str, float]:
    return r.flops_source.take(clock.now + HOUR_MS, 1000)


def job_s(clock: PinnedClock, offset_s: float) -> float:
    """A job timestamp `offset_s` after the receiver started (counters younger than the agent count)."""
    return clock.now / 1000 + offset_s


# -- a real OpenTelemetry SDK client ---------------------------------------------------------------


def test_sdk_cumulative_counter_gives_exact_flops(receiver: OtlpReceiver, clock: PinnedClock) -> None:
    with sdk_counter(receiver.endpoint, {"gpu.uuid": A, "job.id": "j1"}) as (flops, provider):
        flops.add(3_000_000_000_000)
        flops.add(1_000_000_000_000)
        assert provider.force_flush()
        flops.add(2_000_000_000_000)
        assert provider.force_flush()
    assert take_all(receiver, clock) == {A: 6e12}
    stats = receiver.stats()
    assert stats.requests_by_status == {200: 3}  # two flushes and the shutdown export
    assert (stats.points_accepted_total, stats.points_rejected_total) == (3, 0)


def test_sdk_delta_gzip_split_over_listed_gpus(receiver: OtlpReceiver, clock: PinnedClock) -> None:
    with sdk_counter(receiver.endpoint, {"gpu.uuids": [A, B]}, delta=True, compression=Compression.Gzip) as (
        flops, provider,
    ):
        flops.add(4e12)
        assert provider.force_flush()
        flops.add(2e12)
        assert provider.force_flush()
    assert take_all(receiver, clock) == {A: 3e12, B: 3e12}


def test_sdk_deflate_cuda_visible_devices_resolved_to_uuids(receiver: OtlpReceiver, clock: PinnedClock) -> None:
    with sdk_counter(receiver.endpoint, {"cuda.visible_devices": "2,3"}, compression=Compression.Deflate) as (
        flops, provider,
    ):
        flops.add(8e12)
        assert provider.force_flush()
    assert take_all(receiver, clock) == {C: 4e12, D: 4e12}


def test_sdk_job_restart_resets_the_counter_without_negative_or_double_counting(
    receiver: OtlpReceiver, clock: PinnedClock
) -> None:
    resource = {"gpu.uuid": B, "job.id": "j7"}  # same series identity in both runs
    with sdk_counter(receiver.endpoint, resource) as (flops, provider):
        flops.add(5e12)
        assert provider.force_flush()
    with sdk_counter(receiver.endpoint, resource) as (flops, provider):  # restarted: new start time
        flops.add(2e12)
        assert provider.force_flush()
    assert take_all(receiver, clock) == {B: 7e12}


# -- OTLP/JSON ---------------------------------------------------------------------------------------


def json_body(clock: PinnedClock, uuid: str, value: float) -> bytes:
    start, end = job_s(clock, 1), job_s(clock, 3)
    doc = {
        "resourceMetrics": [{
            "resource": {"attributes": [{"key": "gpufleet.job.id", "value": {"stringValue": "j-json"}}]},
            "scopeMetrics": [{
                "scope": {"name": "train"},
                "metrics": [{
                    "name": "gpufleet.job.flops", "unit": "{flop}",
                    "sum": {
                        "aggregationTemporality": 2, "isMonotonic": True,
                        "dataPoints": [{
                            "attributes": [{"key": "gpu.uuid", "value": {"stringValue": uuid}}],
                            "startTimeUnixNano": str(round(start * 1000) * 1_000_000),
                            "timeUnixNano": str(round(end * 1000) * 1_000_000),
                            "asDouble": value,
                            "exemplars": [{"timeUnixNano": "1", "asDouble": 1.0,
                                           "traceId": "5b8efff798038103d269b633813fc60c",
                                           "spanId": "eee19b7ec3c1b174"}],
                        }],
                    },
                    "someFutureField": {"ignored": True},
                }],
            }],
        }],
    }
    return json.dumps(doc).encode()


def test_json_encoding_is_accepted_and_answered_in_json(receiver: OtlpReceiver, clock: PinnedClock) -> None:
    r = post(receiver.address, json_body(clock, C, 5e12), "application/json")
    assert (r.status, r.headers["content-type"], r.json()) == (200, "application/json", {})
    assert take_all(receiver, clock) == {C: 5e12}


def test_json_unknown_gpu_gets_partial_success(receiver: OtlpReceiver, clock: PinnedClock) -> None:
    r = post(receiver.address, json_body(clock, "GPU-elsewhere", 5e12), "application/json")
    assert r.status == 200
    partial = r.json()["partialSuccess"]
    assert partial["rejectedDataPoints"] == "1"
    assert "gpu.uuid 'GPU-elsewhere' is not a GPU of this node" in partial["errorMessage"]
    assert take_all(receiver, clock) == {}
    assert receiver.stats().points_rejected_total == 1


# -- validation: unknown GPUs, wrong kinds, other metrics ------------------------------------------


def test_unknown_gpu_is_rejected_and_the_rest_accepted(receiver: OtlpReceiver, clock: PinnedClock) -> None:
    req = request([
        Dp(2e12, start_s=job_s(clock, 1), time_s=job_s(clock, 2), attrs={"gpu.uuid": A}),
        Dp(2e12, start_s=job_s(clock, 1), time_s=job_s(clock, 2), attrs={"gpu.uuid": "GPU-nothere"}),
        Dp(2e12, start_s=job_s(clock, 1), time_s=job_s(clock, 2), attrs={"cuda.visible_devices": "7"}),
    ])
    r = post(receiver.address, req.SerializeToString())
    assert (r.status, r.headers["content-type"]) == (200, "application/x-protobuf")
    response = ExportMetricsServiceResponse.FromString(r.body)
    assert response.partial_success.rejected_data_points == 2
    message = response.partial_success.error_message
    assert "'GPU-nothere' is not a GPU of this node" in message
    assert "cuda.visible_devices index 7 is not a GPU of this node" in message
    assert take_all(receiver, clock) == {A: 2e12}
    stats = receiver.stats()
    assert (stats.points_accepted_total, stats.points_rejected_total) == (1, 2)
    source = receiver.flops_source  # what the runner reads into AgentHealth
    assert (source.points_accepted_total, source.points_rejected_total) == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "value", "expected"),
    [
        ({"kind": "gauge"}, 1e12, "must be a monotonic Sum (an OTel Counter), got gauge"),
        ({"monotonic": False}, 1e12, "must be monotonic (a Counter, not an UpDownCounter)"),
        ({"unit": "GFLOP"}, 1e12, "has unit 'GFLOP'; report plain counts with unit '{flop}'"),
        ({}, -5.0, "value must be a finite number >= 0, got -5.0"),
        ({}, float("nan"), "value must be a finite number >= 0, got nan"),
    ],
)
def test_wrong_types_are_rejected_with_a_reason(
    receiver: OtlpReceiver, clock: PinnedClock, kwargs: dict[str, object], value: float, expected: str
) -> None:
    req = request([Dp(value, start_s=job_s(clock, 1), time_s=job_s(clock, 2))], resource={"gpu.uuid": A}, **kwargs)
    r = post(receiver.address, req.SerializeToString())
    response = ExportMetricsServiceResponse.FromString(r.body)
    assert (r.status, response.partial_success.rejected_data_points) == (200, 1)
    assert expected in response.partial_success.error_message
    assert take_all(receiver, clock) == {}


def test_other_metrics_are_ignored_without_error(receiver: OtlpReceiver, clock: PinnedClock) -> None:
    req = request([Dp(12.0, start_s=job_s(clock, 1), time_s=job_s(clock, 2))], name="http.server.requests", unit="1")
    r = post(receiver.address, req.SerializeToString())
    assert (r.status, r.body) == (200, b"")  # an empty ExportMetricsServiceResponse
    stats = receiver.stats()
    assert (stats.points_ignored_total, stats.points_rejected_total) == (1, 0)


# -- bad requests: clear HTTP errors -------------------------------------------------------------------


def test_garbage_protobuf_is_400_with_a_status_message(receiver: OtlpReceiver) -> None:
    r = post(receiver.address, b"this is not protobuf")
    assert r.status == 400
    assert "not a valid protobuf ExportMetricsServiceRequest" in r.reason
    assert "not a valid protobuf ExportMetricsServiceRequest" in Status.FromString(r.body).message


def test_garbage_json_is_400_with_a_json_status(receiver: OtlpReceiver) -> None:
    r = post(receiver.address, b"{not json", "application/json")
    assert r.status == 400
    assert r.json()["message"].startswith("body is not valid JSON")


def test_wrong_content_type_is_415(receiver: OtlpReceiver) -> None:
    r = post(receiver.address, b"flops=1", "text/plain")
    assert (r.status, r.headers["content-type"]) == (415, "text/plain; charset=utf-8")
    assert b"use application/x-protobuf or application/json" in r.body


def test_unknown_content_encoding_is_415(receiver: OtlpReceiver) -> None:
    r = post(receiver.address, b"\x00", extra={"Content-Encoding": "br"})
    assert r.status == 415
    assert "Content-Encoding 'br' is not supported" in Status.FromString(r.body).message


def test_body_over_the_limit_is_413(clock: PinnedClock) -> None:
    with start(clock, max_body_bytes=1000) as r:
        reply = post(r.address, b"\x00" * 1001)
        assert reply.status == 413
        assert "body is 1001 bytes, over the agent's 1000-byte limit" in reply.reason


def test_gzip_bomb_is_413_not_memory(clock: PinnedClock) -> None:
    bomb = gzip.compress(b"\x00" * 1_000_000)
    with start(clock, max_inflated_bytes=10_000) as r:
        reply = post(r.address, bomb, extra={"Content-Encoding": "gzip"})
        assert reply.status == 413
        assert "inflates to more than 10000 bytes" in Status.FromString(reply.body).message


def test_other_paths_and_methods(receiver: OtlpReceiver) -> None:
    assert post(receiver.address, b"", path="/v1/traces").status == 404
    r = post(receiver.address, b"", method="GET")
    assert (r.status, r.headers["allow"]) == (405, "POST")


def test_503_until_the_gpus_are_known_then_accepted(clock: PinnedClock) -> None:
    with OtlpReceiver(ReceiverSettings(port=0), clock=clock) as r:
        body = request([Dp(1e12, start_s=job_s(clock, 1), time_s=job_s(clock, 2))], resource={"gpu.uuid": A})
        first = post(r.address, body.SerializeToString())
        assert (first.status, first.headers["retry-after"]) == (503, "1")
        r.set_gpus(GPUS)
        assert post(r.address, body.SerializeToString()).status == 200
        assert take_all(r, clock) == {A: 1e12}


def test_tap_feeds_the_roster_from_each_collection(clock: PinnedClock) -> None:
    class OneGpu:
        def collect(self, now_ms: int) -> list[GpuSample]:
            return [GpuSample(index=0, uuid="GPU-tapped")]

        def close(self) -> None:
            pass

    with OtlpReceiver(ReceiverSettings(port=0), clock=clock) as r:
        assert r.tap(OneGpu()).collect(clock.now) == [GpuSample(index=0, uuid="GPU-tapped")]
        body = request([Dp(1e12, start_s=job_s(clock, 1), time_s=job_s(clock, 2))],
                       resource={"cuda.visible_devices": "0"})
        assert post(r.address, body.SerializeToString()).status == 200
        assert take_all(r, clock) == {"GPU-tapped": 1e12}


# -- floods: bounded, and take() never waits on them -----------------------------------------------------


def three_points(clock: PinnedClock, value: float) -> bytes:
    dps = [Dp(value, start_s=job_s(clock, 1), time_s=job_s(clock, 2), attrs={"gpu.uuid": g}) for g in (A, B, C)]
    return request(dps).SerializeToString()


def test_points_over_the_rate_answer_429_until_the_budget_refills(clock: PinnedClock) -> None:
    with start(clock, max_points_per_s=4) as r:
        assert post(r.address, three_points(clock, 1e12)).status == 200
        refused = post(r.address, three_points(clock, 1e12))  # 1 point of budget left
        assert (refused.status, refused.headers["retry-after"]) == (429, "1")
        clock.now += 500  # half a second refills 2 points: 3 in all
        assert post(r.address, three_points(clock, 1e12)).status == 200
        assert take_all(r, clock) == {A: 2e12, B: 2e12, C: 2e12}
        assert r.stats().requests_by_status == {200: 2, 429: 1}


def test_request_with_more_points_than_a_second_allows_is_413(clock: PinnedClock) -> None:
    with start(clock, max_points_per_s=2) as r:
        reply = post(r.address, three_points(clock, 1e12))
        assert reply.status == 413
        assert "request has 3 FLOPs points, over the agent's limit of 2 per second" in reply.reason


def test_stalled_clients_get_cut_off_at_the_door_and_never_block_take(clock: PinnedClock) -> None:
    from gpufleet.httpguard import ConnectionLimits

    limits = ConnectionLimits(request_deadline_s=30.0)
    with start(clock, max_concurrent_requests=2, evict_slow_after_s=30.0, connections=limits) as r:
        assert post(r.address, three_points(clock, 2e12)).status == 200
        stalled = []
        for _ in range(2):  # send headers promising a body that never comes
            s = socket.create_connection(r.address)
            s.sendall(b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                      b"Content-Length: 100\r\n\r\n")
            stalled.append(s)
        try:
            deadline = time.monotonic() + 30
            while r.in_flight < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert r.in_flight == 2
            busy = post(r.address, three_points(clock, 1e12))
            assert (busy.status, busy.headers["retry-after"]) == (503, "1")
            assert take_all(r, clock) == {A: 2e12, B: 2e12, C: 2e12}  # returns while both handlers wait
        finally:
            for s in stalled:
                s.close()


# -- where it listens -------------------------------------------------------------------------------------


def test_listens_on_loopback_by_default(clock: PinnedClock) -> None:
    settings = ReceiverSettings.from_agent_config(AgentConfig())
    assert (settings.host, settings.port) == ("127.0.0.1", 4318)
    assert ReceiverSettings().host == "127.0.0.1"
    with OtlpReceiver(ReceiverSettings(port=0), clock=clock, gpus=GPUS) as r:
        assert r.address[0] == "127.0.0.1"
        assert r.endpoint == f"http://127.0.0.1:{r.address[1]}"


def test_port_in_use_fails_with_the_setting_to_change(receiver: OtlpReceiver, clock: PinnedClock) -> None:
    with pytest.raises(ReceiverError, match=r"set agent\.otlp_receiver_port to a free port"):
        OtlpReceiver(ReceiverSettings(port=receiver.address[1]), clock=clock).start()


def test_a_bug_on_one_request_costs_that_request_only(
    receiver: OtlpReceiver, clock: PinnedClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpufleet.agents.otlp.receiver as module

    real = module.extract
    monkeypatch.setattr(module, "extract", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    broken = post(receiver.address, three_points(clock, 1e12))
    assert broken.status == 500
    assert "agent error: RuntimeError: boom" in Status.FromString(broken.body).message
    monkeypatch.setattr(module, "extract", real)
    assert post(receiver.address, three_points(clock, 1e12)).status == 200
    assert take_all(receiver, clock) == {A: 1e12, B: 1e12, C: 1e12}
