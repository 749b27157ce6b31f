"""The agent's per-interval loop: collect, stamp, export through OTel, spool; one node or a whole fleet.

Design notes: docs/design-notes.md#agents-runner-py.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Protocol, runtime_checkable

import msgspec

from gpufleet.agents.allocation import (
    Allocation,
    AllocationUnknown,
    Answer,
    Key,
    Unknown,
    answer_for,
    attribution_fields,
)
from gpufleet.agents.collectors.base import Collector, NodeDown, NodeReleased
from gpufleet.agents.kafka_exporter import KafkaMetricExporter
from gpufleet.agents.meter import AgentMeter, Frame, NodeExtras, node_resource, otlp_reader
from gpufleet.agents.spool import Spool
from gpufleet.gpu_facts import peak_flops
from gpufleet.wire import (
    MAX_FLOP_RATE,
    AgentHealth,
    GpuSample,
    NetworkPort,
    NodeReport,
    max_counts,
    max_flops,
    share_of_gpu,
)

log = logging.getLogger(__name__)


class Clock(Protocol):
    """Wall time for sample stamps and the wait between intervals."""

    def now_ms(self) -> int:
        """Unix milliseconds."""
        ...

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        """Sleep up to `seconds`; True when `stop` is set (return early then)."""
        ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        return stop.wait(max(0.0, seconds))


class AllocationReader(Protocol):
    """`agents.allocation.AllocationSource`: GPU index or device UUID -> `Allocation`, `Shared` or `Unknown`."""

    def read(self) -> Mapping[Key, Answer]: ...


@runtime_checkable
class FlopsSource(Protocol):
    """Measured model FLOPs per GPU uuid for the interval ending at `now_ms` (the OTLP receiver).

    A source may also expose `points_accepted_total`, `points_rejected_total` and
    `flops_clamped_total` (ints); the agent reports them in its health.
    """

    def take(self, now_ms: int, interval_ms: int) -> dict[str, float]: ...


class NetworkSource(Protocol):
    """The node's InfiniBand/RoCE ports this interval (`agents.collectors.infiniband.SysfsPorts`)."""

    def read(self) -> list[NetworkPort]: ...


class GpuListener(Protocol):
    """Told the node's GPUs every interval (`OtlpReceiver.set_gpus`)."""

    def __call__(self, index_to_uuid: Mapping[int, str], *, jobs: Mapping[str, str],
                 ceilings: Mapping[str, float]) -> None: ...


def flop_ceiling(model: str | None, overrides: Mapping[str, float] | None = None) -> float:
    """FLOP/s one GPU of `model` can execute at most: its peak (config `peak_flops` first, then the table),
    `MAX_FLOP_RATE` for a model found in neither, never above it."""
    peak = peak_flops(model, overrides) if model else None
    return float(MAX_FLOP_RATE) if peak is None else min(peak, float(MAX_FLOP_RATE))


COUNT_FIELDS: Final = ("tokens_measured", "samples_measured")
"""`GpuSample` fields stamped from the `counts` sources, like `flops_measured` from the FLOPs source."""


def stamp(gpus: Iterable[GpuSample], allocation: Mapping[Key, Answer], flops: Mapping[str, float],
          counts: Mapping[str, Mapping[str, float]] | None = None) -> tuple[GpuSample, ...]:
    """The samples with their attribution from `allocation` (`allocation.answer_for`), flops from `flops` and
    each of `COUNT_FIELDS` from `counts[field]` (by uuid)."""
    counts = counts or {}
    return tuple(msgspec.structs.replace(
        g, **attribution_fields(answer_for(g, allocation)), flops_measured=flops.get(g.uuid),
        **{f: counts.get(f, {}).get(g.uuid) for f in COUNT_FIELDS}) for g in gpus)


class _AllUnknown(dict[Key, Answer]):
    """The answer when the source could not answer: every device `Unknown`."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = Unknown(reason)

    def get(self, key: Key, default: Any = None) -> Answer:  # type: ignore[override]
        return self.reason


def bounded(values: Mapping[str, float], limit: float) -> tuple[dict[str, float], list[str]]:
    """`values` without those the wire would refuse (not finite, negative, over `limit`), and their GPUs."""
    kept: dict[str, float] = {}
    bad: list[str] = []
    for uuid, value in values.items():
        if isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= limit:
            kept[uuid] = value
        else:
            bad.append(uuid)
    return kept, bad


def bounded_flops(flops: Mapping[str, float], interval_ms: int) -> tuple[dict[str, float], list[str]]:
    """`flops` without values the wire would refuse (not finite, negative, over `max_flops`), and their GPUs."""
    return bounded(flops, max_flops(interval_ms))


class NodeAgent:
    """One node: its collector, allocation and FLOPs sources, OTel meter and spool."""

    def __init__(
        self,
        *,
        cluster: str,
        node: str,
        collector: Collector,
        spool: Spool,
        allocation: AllocationReader | None = None,
        flops: FlopsSource | None = None,
        counts: Mapping[str, FlopsSource] | None = None,
        on_gpus: GpuListener | None = None,
        peak_flops: Mapping[str, float] | None = None,
        send_errors: Callable[[], int] = lambda: 0,
        otlp_endpoint: str | None = None,
        otlp_interval_ms: int = 1000,
        host_id: str | None = None,
        network: NetworkSource | None = None,
    ) -> None:
        self.cluster = cluster
        self.node = node
        self.collector = collector
        self.spool = spool
        self._allocation = allocation
        self._flops = flops
        self._counts = dict(counts or {})
        """`COUNT_FIELDS` name -> the source of its per-GPU amounts (the OTLP receiver's tokens and samples)."""
        self._network = network
        self._on_gpus = on_gpus
        self._peak_overrides = dict(peak_flops or {})
        self._ceilings: dict[str | None, float] = {}
        self._flops_nulled = 0
        self._clamped_warned = 0
        self._warned_at: dict[str, int] = {}
        self._send_errors = send_errors
        self._allocation_down: str | None = None
        self._unknown_total = 0
        self._down = False
        self.released = False
        """The collector let go of the GPUs on request (`NodeReleased`) at the last interval."""
        self.exporter = KafkaMetricExporter(lambda: self.meter.frame, spool.append)
        extra = (lambda: [otlp_reader(otlp_endpoint, otlp_interval_ms)]) if otlp_endpoint else tuple
        self.meter = AgentMeter(node_resource(cluster, node, spool.boot_id, host_id), self.exporter,
                                extra_readers=extra)

    def tick(self, now_ms: int, interval_ms: int) -> NodeReport | None:
        """One interval: collect, stamp, export, spool. Returns the spooled message (None if none)."""
        started = time.perf_counter()
        try:
            samples = self.collector.collect(now_ms)
        except NodeReleased as exc:
            if not self.released:
                log.warning("node %s: %s; sending nothing until the release is withdrawn", self.node, exc)
            self.released = True
            return None
        except NodeDown as exc:
            self.released = False
            if not self._down:
                log.warning("node %s is down, sending nothing until it answers: %s", self.node, exc)
            self._down = True
            return None
        except Exception:
            log.exception("collecting node %s failed; nothing sent this interval", self.node)
            return None
        collect_s = time.perf_counter() - started
        self.released = False
        if self._down:
            log.info("node %s answers again", self.node)
            self._down = False
        allocation = self._read_allocation()
        self._report_gpus(samples, allocation)
        gpus = stamp(samples, allocation, self._read_flops(now_ms, interval_ms), self._read_counts(now_ms, interval_ms))
        self._unknown_total += sum(g.allocation_unknown for g in gpus)
        health = AgentHealth(
            collect_seconds=collect_s,
            nvml_errors=self._nvml_errors(gpus),
            **self._collector_health(),
            spool_depth=self.spool.depth,
            spool_dropped_total=self.spool.dropped_total,
            send_errors_total=self._send_errors(),
            otlp_points_accepted_total=int(getattr(self._flops, "points_accepted_total", 0)),
            otlp_points_rejected_total=int(getattr(self._flops, "points_rejected_total", 0)),
            flops_clamped_total=int(getattr(self._flops, "flops_clamped_total", 0)) + self._flops_nulled,
            allocation_unknown_total=self._unknown_total,
        )
        self._warn_clamped(now_ms, health.flops_clamped_total)
        extras = NodeExtras(*self._enumeration(), network=self._read_network())
        self.meter.observe(Frame(self.spool.next_seq, now_ms, interval_ms, gpus, health, node=extras))
        self.meter.collect()
        return self.exporter.last_report

    def close(self) -> None:
        """Shut the meter, the collector and the spool down (the sender is closed by its owner first)."""
        for step in (self.meter.shutdown, self.collector.close, self.spool.close):
            try:
                step()
            except Exception:
                log.exception("closing node %s: %s failed", self.node, getattr(step, "__qualname__", step))

    def _report_gpus(self, samples: Sequence[GpuSample], allocation: Mapping[Key, Answer]) -> None:
        if self._on_gpus is None:
            return
        jobs = {}
        for g in samples:
            a = answer_for(g, allocation)
            if isinstance(a, Allocation) and a.job is not None:  # one job: only it may report FLOPs
                jobs[g.uuid] = a.job
        try:
            self._on_gpus({g.index: g.uuid for g in samples if g.parent_uuid is None}, jobs=jobs,
                          ceilings={g.uuid: self._ceiling(g) for g in samples})
        except Exception:
            log.exception("passing node %s's GPUs to the OTLP receiver failed", self.node)

    def _ceiling(self, gpu: GpuSample) -> float:
        """The GPU's FLOP/s ceiling; a MIG instance's is its share of the GPU's."""
        found = self._ceilings.get(gpu.model)
        if found is None:
            found = self._ceilings[gpu.model] = flop_ceiling(gpu.model, self._peak_overrides)
        num, den = share_of_gpu(gpu)
        return found * num / den

    def _read_allocation(self) -> Mapping[Key, Answer]:
        """This interval's answer; every GPU `Unknown` when the source cannot answer (logged once per outage)."""
        if self._allocation is None:
            return {}
        try:
            answer = self._allocation.read()
        except AllocationUnknown as exc:
            return self._unknown(str(exc), None)
        except Exception as exc:
            return self._unknown(f"the allocation source failed ({exc!r})", exc)
        if self._allocation_down is not None:
            log.warning("node %s: the allocation source answers again; attributing GPUs again", self.node)
            self._allocation_down = None
        return answer

    def _unknown(self, reason: str, exc: Exception | None) -> Mapping[Key, Answer]:
        if self._allocation_down != reason:
            log.error("node %s: %s; sending every GPU with allocation_unknown (billed to nobody) until it answers",
                      self.node, reason, exc_info=exc)
            self._allocation_down = reason
        return _AllUnknown(reason)

    def _read_flops(self, now_ms: int, interval_ms: int) -> Mapping[str, float]:
        if self._flops is None:
            return {}
        try:
            taken = self._flops.take(now_ms, interval_ms)
        except Exception:
            log.exception("FLOPs source failed on node %s; no measured FLOPs this interval", self.node)
            return {}
        kept, bad = bounded_flops(taken, interval_ms)
        if bad:
            self._flops_nulled += len(bad)
            if self._may_warn("nulled", now_ms):
                log.warning("node %s: measured FLOPs of GPU(s) %s were not finite or over %.4g for %d ms; sent as "
                            "null (counted in flops_clamped_total)", self.node, ", ".join(bad[:8]),
                            max_flops(interval_ms), interval_ms)
        return kept

    def _read_counts(self, now_ms: int, interval_ms: int) -> dict[str, dict[str, float]]:
        out = {}
        for name, source in self._counts.items():
            try:
                taken = source.take(now_ms, interval_ms)
            except Exception:
                log.exception("%s source failed on node %s; none this interval", name, self.node)
                continue
            out[name], bad = bounded(taken, max_counts(interval_ms))
            if bad and self._may_warn(name, now_ms):
                log.warning("node %s: %s of GPU(s) %s were not finite or over %.4g for %d ms; sent as null",
                            self.node, name, ", ".join(bad[:8]), max_counts(interval_ms), interval_ms)
        return out

    def _warn_clamped(self, now_ms: int, total: int) -> None:
        if total > self._clamped_warned and self._may_warn("clamped", now_ms):
            log.warning("node %s: jobs reported more FLOPs than their GPUs' peak x interval in %d GPU-interval(s); "
                        "clamped at peak, the excess follows in later intervals (flops_clamped_total %d; a job "
                        "reporting more than it executes, or FP8 FLOPs above the BF16 peak)",
                        self.node, total - self._clamped_warned, total)
            self._clamped_warned = total

    def _may_warn(self, what: str, now_ms: int) -> bool:
        """At most one warning of a kind a minute."""
        last = self._warned_at.get(what)
        if last is not None and now_ms - last < 60_000:
            return False
        self._warned_at[what] = now_ms
        return True

    def _read_network(self) -> tuple[NetworkPort, ...]:
        if self._network is None:
            return ()
        try:
            return tuple(self._network.read())
        except Exception:
            log.exception("reading node %s's network ports failed; none reported this interval", self.node)
            return ()

    def _enumeration(self) -> tuple[int | None, tuple[str, ...]]:
        """(GPUs expected, UUIDs missing) when the collector keeps them (`Enumerating`), else (None, ())."""
        found = getattr(self.collector, "enumeration", None)
        if found is None:
            return None, ()
        return found.expected, tuple(found.missing)

    def _collector_health(self) -> dict[str, int]:
        """The collector's own figures for `AgentHealth` when it keeps them (`NvmlCollector.stats`)."""
        stats = getattr(self.collector, "stats", None)
        names = ("nvml_calls", "nvml_call_budget", "nvml_deadline_misses", "xids_dropped_total")
        return {n: int(getattr(stats, n)) for n in names if isinstance(getattr(stats, n, None), int)}

    def _nvml_errors(self, gpus: Sequence[GpuSample]) -> int:
        """The collector's failed-read count when it keeps one, else the GPUs that could not be read."""
        count = getattr(self.collector, "errors_last_interval", None)
        return int(count) if isinstance(count, int) else sum(g.error is not None for g in gpus)


def next_boundary(now_ms: int, interval_ms: int) -> int:
    """The first multiple of `interval_ms` strictly after `now_ms`."""
    return (now_ms // interval_ms + 1) * interval_ms


def run_many(
    agents: Sequence[NodeAgent],
    *,
    interval_ms: int,
    stop: threading.Event,
    clock: Clock | None = None,
    duration_s: float | None = None,
    after_tick: Callable[[], None] = lambda: None,
) -> int:
    """Tick every agent on each interval boundary until `stop` is set or `duration_s` has passed.

    One thread, one timer, any number of nodes. Returns how many intervals ran.
    """
    clock = clock or SystemClock()
    start = clock.now_ms()
    end = None if duration_s is None else start + int(duration_s * 1000)
    due = next_boundary(start, interval_ms)
    ticks = 0
    while not stop.is_set():
        if end is not None and due > end:
            break
        now = clock.now_ms()
        if now < due:
            if clock.wait((due - now) / 1000, stop):
                break
            continue
        for agent in agents:
            try:
                agent.tick(due, interval_ms)
            except Exception:
                log.exception("interval %d of node %s failed", due, agent.node)
        after_tick()
        ticks += 1
        late = clock.now_ms() - (due + interval_ms)
        due += interval_ms
        if late >= interval_ms:
            missed = late // interval_ms
            log.warning("an interval took too long: skipped %d sample time(s) (%d nodes)", missed, len(agents))
            due += missed * interval_ms
    return ticks


def run_one(agent: NodeAgent, **kwargs: Any) -> int:
    """`run_many` for a single node."""
    return run_many([agent], **kwargs)
