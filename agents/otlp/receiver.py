"""The node agent's OTLP/HTTP metrics receiver: jobs POST `/v1/metrics`, the agent takes per-GPU FLOPs.

Design notes: docs/design-notes.md#agents-otlp-receiver-py.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from gpufleet.agents.otlp import codec
from gpufleet.agents.otlp.attribution import Attribution, AttributionSettings, AttributionStats
from gpufleet.agents.otlp.gpus import GpuRoster
from gpufleet.agents.otlp.metrics import OtlpCounters, OtlpStats
from gpufleet.agents.otlp.points import Extraction, Point, extract
from gpufleet.errors import ServiceError
from gpufleet.flops_contract import FLOPS, METRICS_PATH, SAMPLES, TOKENS
from gpufleet.httpguard import BodySlots, ConnectionLimits, GuardedHandler, GuardedServer, GuardedServer6
from gpufleet.wire import MAX_COUNT_RATE

if TYPE_CHECKING:
    from gpufleet.agents.collectors.base import Collector
    from gpufleet.config import AgentConfig
    from gpufleet.wire import GpuSample

log = logging.getLogger(__name__)

Clock = Callable[[], int]
"""Unix milliseconds, the agent's clock."""

_WARN_EVERY_MS: Final = 60_000


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class ReceiverError(ServiceError):
    """The receiver cannot start; the text says why and which setting to change."""


_CHUNK: Final = 256
"""Points attributed per hold of the attribution lock (a take waits for one chunk at most)."""


@dataclass(frozen=True)
class ReceiverSettings:
    host: str = "127.0.0.1"
    port: int = 4318
    """0 picks a free port (tests)."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body accepted as sent (413 above)."""
    max_inflated_bytes: int = 32 * 1024 * 1024
    """Largest body after gzip/deflate (413 above: no gzip bombs)."""
    max_points_per_s: int = 10_000
    """Contract points accepted per second (a second's worth at once; a busy 8-GPU node sends a few a second);
    a request beyond gets 429, one with more points than this gets 413."""
    max_concurrent_requests: int = 8
    """Request bodies read and processed at once; more get 503, unless one has been reading for longer than
    `evict_slow_after_s` (then it is cut off for the new one)."""
    evict_slow_after_s: float = 1.0
    retry_after_s: int = 1
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    """Connection cap and the total deadline of one request (headers + body)."""
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    attributed_metrics: tuple[str, ...] = (FLOPS.name, TOKENS.name, SAMPLES.name)
    """Contract metrics attributed to GPUs; the others are validated, counted and dropped."""

    @classmethod
    def from_agent_config(cls, agent: AgentConfig, **overrides: object) -> ReceiverSettings:
        return cls(host=agent.otlp_receiver_host, port=agent.otlp_receiver_port, **overrides)  # type: ignore[arg-type]


class MetricSource:
    """One metric's per-GPU amounts per interval: the runner's `FlopsSource` for `gpufleet.job.flops`."""

    def __init__(self, receiver: OtlpReceiver, metric: str) -> None:
        self._receiver = receiver
        self._metric = metric

    def take(self, now_ms: int, interval_ms: int) -> dict[str, float]:
        """GPU uuid -> amount due in (previous take, now_ms]; FLOPs clamped at each GPU's ceiling x `interval_ms`."""
        return self._receiver._take(self._metric, now_ms, interval_ms)

    @property
    def flops_clamped_total(self) -> int:
        """GPU-intervals whose FLOPs were clamped at the GPU's ceiling x interval, for the agent's health report."""
        return self._receiver.attribution_stats(self._metric).clamped_total

    @property
    def points_accepted_total(self) -> int:
        """The receiver's accepted contract points (all metrics), for the agent's health report."""
        return self._receiver.counters.snapshot().points_accepted_total

    @property
    def points_rejected_total(self) -> int:
        return self._receiver.counters.snapshot().points_rejected_total


class _Gate:
    """The attribution lock: handlers hold it a chunk at a time and step aside while a take waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held = False
        self._takers = 0

    @contextmanager
    def handler(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._held and not self._takers)
            self._held = True
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def taker(self) -> Iterator[None]:
        with self._cond:
            self._takers += 1
            self._cond.wait_for(lambda: not self._held)
            self._takers -= 1
            self._held = True
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()


class _PointBudget:
    """A token bucket of points per second on the receiver's clock (a full second's worth at most)."""

    def __init__(self, per_s: int, now_ms: int) -> None:
        self._per_s = per_s
        self._tokens = float(per_s)
        self._at_ms = now_ms
        self._lock = threading.Lock()

    def spend(self, n: int, now_ms: int) -> bool:
        with self._lock:
            if now_ms > self._at_ms:
                self._tokens = min(float(self._per_s), self._tokens + (now_ms - self._at_ms) * self._per_s / 1000)
                self._at_ms = now_ms
            if n > self._tokens:
                return False
            self._tokens -= n
            return True


class OtlpReceiver:
    """OTLP/HTTP receiver plus attribution; start with `start()` or `with`, stop with `close()`."""

    def __init__(
        self,
        settings: ReceiverSettings | None = None,
        *,
        clock: Clock = wall_clock_ms,
        gpus: Mapping[int, str] | None = None,
    ) -> None:
        self.settings = settings or ReceiverSettings()
        self.counters = OtlpCounters()
        self._clock = clock
        self._roster = GpuRoster(gpus)
        started = clock()
        self._engines = {m: Attribution(started, self.settings.attribution) for m in self.settings.attributed_metrics}
        self._gate = _Gate()
        self._budget = _PointBudget(self.settings.max_points_per_s, started)
        self._slots = BodySlots(self.settings.max_concurrent_requests, self.settings.evict_slow_after_s)
        self._server: GuardedServer | None = None
        self._thread: threading.Thread | None = None
        self._last_warn_ms: int | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> OtlpReceiver:
        if self._server is not None:
            return self
        host, port = self.settings.host, self.settings.port
        server_cls = GuardedServer6 if ":" in host else GuardedServer
        handler = type("BoundHandler", (_Handler,), {"receiver": self})
        try:
            self._server = server_cls((host, port), handler, self.settings.connections)
        except OSError as exc:
            raise ReceiverError(
                f"OTLP receiver cannot listen on {host}:{port}: {exc}; set agent.otlp_receiver_port "
                "to a free port, or agent.otlp_receiver_enabled: false"
            ) from None
        if not _is_loopback(host):
            log.warning("OTLP receiver listens on %s, not loopback: any host that reaches it can report FLOPs", host)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="otlp-receiver", daemon=True
        )
        self._thread.start()
        log.info("OTLP receiver listening on %s", self.endpoint)
        return self

    def close(self) -> None:
        """Stop listening (idempotent); requests in flight are cut off."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise ReceiverError("the OTLP receiver is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def endpoint(self) -> str:
        """Base URL for `OTEL_EXPORTER_OTLP_ENDPOINT` (the exporter appends /v1/metrics)."""
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # -- the agent's side ----------------------------------------------------------------------

    def set_gpus(
        self,
        index_to_uuid: Mapping[int, str],
        *,
        jobs: Mapping[str, str] | None = None,
        ceilings: Mapping[str, float] | None = None,
    ) -> None:
        """This node's GPUs (NVML index -> uuid), the jobs the allocation source says hold them (uuid -> job,
        known ones only) and their FLOP/s ceilings (uuid -> FLOP/s); cheap to call every interval."""
        roster = GpuRoster(index_to_uuid, jobs, ceilings)
        if roster != self._roster:
            self._roster = roster

    def tap(self, collector: Collector) -> Collector:
        """Wrap a collector so every collection updates the receiver's GPU roster."""
        return _RosterTap(collector, self)

    @property
    def flops_source(self) -> MetricSource:
        return self.source(FLOPS.name)

    def source(self, metric: str) -> MetricSource:
        if metric not in self._engines:
            raise ValueError(f"{metric!r} is not attributed; list it in ReceiverSettings.attributed_metrics")
        return MetricSource(self, metric)

    @property
    def in_flight(self) -> int:
        """Requests whose body is being read or processed now (for diagnostics and tests)."""
        return self._slots.held

    @property
    def connections(self) -> int:
        """Connections held now (for diagnostics and tests)."""
        return 0 if self._server is None else self._server.connections

    def stats(self) -> OtlpStats:
        return self.counters.snapshot()

    def attribution_stats(self, metric: str = FLOPS.name) -> AttributionStats:
        with self._gate.taker():
            return self._engines[metric].stats()

    def _take(self, metric: str, now_ms: int, interval_ms: int) -> dict[str, float]:
        ceilings = _ceilings(metric, self._roster)
        with self._gate.taker():
            return self._engines[metric].take(now_ms, interval_ms, ceilings)

    # -- the jobs' side --------------------------------------------------------------------------

    def _handle_post(self, h: _Handler) -> tuple[codec.Reply, bool]:
        """Answer one POST; returns the reply and whether the body was read (else the connection closes)."""
        media = codec.media_type(h.headers.get("Content-Type"))
        retry = (("Retry-After", str(self.settings.retry_after_s)),)
        refused = _check_head(urlsplit(h.path).path, media, h.headers.get("Content-Length"), self.settings)
        if isinstance(refused, codec.Reply):
            return refused, False
        sock = h.connection
        if not self._slots.acquire(sock):
            return codec.failure(503, "agent is busy with other OTLP requests; retry later", media, retry), False
        try:
            body = h.rfile.read(refused)
            if len(body) < refused:
                return codec.failure(400, f"body ended after {len(body)} of {refused} bytes", media), False
            self._slots.body_read(sock)
            h.request_read()
            return self._handle_body(body, media, h.headers.get("Content-Encoding", ""), retry), True
        finally:
            self._slots.release(sock)

    def _handle_body(self, body: bytes, media: str, encoding: str, retry: tuple[tuple[str, str], ...]) -> codec.Reply:
        try:
            raw = codec.decompress(body, encoding, self.settings.max_inflated_bytes)
            request = codec.parse_request(raw, media)
        except codec.BodyError as exc:
            return codec.failure(exc.status, str(exc), media)
        roster = self._roster
        if not roster:
            return codec.failure(503, "agent has not discovered this node's GPUs yet; retry later", media, retry)
        now = self._clock()
        found = extract(request, roster, now)
        limit = self.settings.max_points_per_s
        if len(found.points) > limit:
            return codec.failure(413, f"request has {len(found.points)} FLOPs points, over the agent's limit of "
                                 f"{limit} per second; send smaller batches", media)
        if found.points and not self._budget.spend(len(found.points), now):
            return codec.failure(429, f"agent takes at most {limit} points per second; retry later", media, retry)
        accepted = self._attribute(found, roster)
        self.counters.counted(accepted, found.rejected_total, found.ignored)
        if found.rejected:
            self._warn(now, found.message())
            return codec.success(media, found.rejected_total, found.message())
        return codec.success(media)

    def _attribute(self, found: Extraction, roster: GpuRoster) -> int:
        """Feed the points to their metrics' attribution, a chunk at a time; rejections go into `found`."""
        by_metric: dict[str, list[Point]] = {}
        for p in found.points:
            by_metric.setdefault(p.metric, []).append(p)
        rejected = 0
        for metric, points in by_metric.items():
            engine = self._engines.get(metric)
            if engine is None:
                continue  # validated and counted, not attributed
            ceilings = _ceilings(metric, roster)
            for i in range(0, len(points), _CHUNK):
                with self._gate.handler():
                    refusals = engine.add(points[i:i + _CHUNK], ceilings)
                for r in refusals:
                    found.reject(r.reason, r.message)
                rejected += len(refusals)
        return len(found.points) - rejected

    def _warn(self, now_ms: int, message: str) -> None:
        if self._last_warn_ms is None or now_ms - self._last_warn_ms >= _WARN_EVERY_MS:
            self._last_warn_ms = now_ms
            log.warning("OTLP receiver %s (further rejections are only counted for a minute)", message)


def _ceilings(metric: str, roster: GpuRoster) -> Mapping[str, float]:
    """Per GPU, the most of `metric` it may do a second: its FLOP/s peak for FLOPs, the wire's
    `MAX_COUNT_RATE` for tokens and samples (bounded like FLOPs, never above what the wire carries)."""
    if metric == FLOPS.name:
        return roster.ceilings
    return dict.fromkeys(roster.uuids, float(MAX_COUNT_RATE))


def _check_head(path: str, media: str, content_length: str | None, settings: ReceiverSettings) -> int | codec.Reply:
    """The body length to read, or the error reply for a request refused on its path and headers alone."""
    if path != METRICS_PATH:
        return codec.failure(404, f"{path} is not served here: this agent only receives metrics at {METRICS_PATH} "
                             "(for a job's traces and logs set OTEL_TRACES_EXPORTER=none, OTEL_LOGS_EXPORTER=none)",
                             media)
    if content_length is None:
        return codec.failure(411, "Content-Length is required (chunked bodies are not accepted)", media)
    length = int(content_length) if content_length.strip().isdigit() else -1
    if length < 0:
        return codec.failure(400, f"Content-Length {content_length!r} is not a byte count", media)
    if length > settings.max_body_bytes:
        return codec.failure(413, f"body is {length} bytes, over the agent's {settings.max_body_bytes}-byte limit; "
                             "send smaller batches (exporter max_export_batch_size)", media)
    if media not in codec.MEDIA_TYPES:
        return codec.failure(415, f"Content-Type {media or '(none)'!r} is not supported; "
                             f"use {' or '.join(codec.MEDIA_TYPES)}", media)
    return length


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(GuardedHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gpufleet-otlp"
    receiver: OtlpReceiver

    def do_POST(self) -> None:
        try:
            reply, body_read = self.receiver._handle_post(self)
        except TimeoutError:
            raise  # the stdlib closes a stalled connection
        except Exception as exc:  # a bug must cost one request, never the receiver
            log.exception("OTLP receiver failed on a request")
            media = codec.media_type(self.headers.get("Content-Type"))
            reply, body_read = codec.failure(500, f"agent error: {type(exc).__name__}: {exc}", media), False
        self._send(reply, close=not body_read)

    def _not_allowed(self) -> None:
        media = codec.media_type(self.headers.get("Content-Type"))
        reply = codec.failure(405, f"{self.command} is not allowed; POST OTLP metrics to {METRICS_PATH}", media,
                              (("Allow", "POST"),))
        self._send(reply, close=True)

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_allowed

    def _send(self, reply: codec.Reply, close: bool) -> None:
        self.receiver.counters.request(reply.status)
        self.request_read()
        self.send_response(reply.status, reply.reason)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)


class _RosterTap:
    """A collector that feeds each collection's GPU roster to the receiver, then returns it unchanged."""

    def __init__(self, inner: Collector, receiver: OtlpReceiver) -> None:
        self._inner = inner
        self._receiver = receiver

    def collect(self, now_ms: int) -> list[GpuSample]:
        samples = self._inner.collect(now_ms)
        self._receiver.set_gpus({s.index: s.uuid for s in samples})
        return samples

    def close(self) -> None:
        self._inner.close()
