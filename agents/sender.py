"""The sender: one background thread that drains spools to Kafka, deleting a message only once acknowledged.

Design notes: docs/design-notes.md#agents-sender-py.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpufleet.agents.spool import Spool

log = logging.getLogger(__name__)

PER_MESSAGE_ERRORS = frozenset({"MessageSizeTooLargeError", "RecordListTooLargeError", "CorruptRecordError"})
"""kafka-python errors that condemn the message itself (matched by class name, so no import here)."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: `initial_s * factor**(failures-1)`, capped at `max_s`."""

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        base = min(self.max_s, self.initial_s * self.factor ** max(0, failures - 1))
        return base * (1.0 - self.jitter + 2.0 * self.jitter * rand())


@dataclass(eq=False, slots=True)
class Lane:
    """One node's spool and its sending state."""

    key: bytes
    spool: Spool
    cursor: int = -1
    """Highest seq handed to the producer in order; a failure moves it back below the failed seq."""
    inflight: dict[int, Any] = field(default_factory=dict)
    errors: int = 0
    """Send errors of this node's messages (connection failures are counted apart, for every lane)."""
    progress_at: float = 0.0
    """When a future of this lane last completed, or its first message in flight was sent."""


class Sender:
    """Drains one or more spools to one Kafka topic on a background thread (one shared producer)."""

    def __init__(
        self,
        producer_factory: Callable[[], Any],
        topic: str,
        lanes: Sequence[tuple[str, Spool]],
        *,
        backoff: Backoff = Backoff(),
        max_inflight: int = 2000,
        lag_log_every_s: float = 30.0,
        rand: Callable[[], float] = random.random,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        poll_s: float = 0.2,
        stall_s: float = 90.0,
    ) -> None:
        self._factory = producer_factory
        self.topic = topic
        self.lanes = [Lane(name.encode(), spool) for name, spool in lanes]
        self._backoff = backoff
        self._per_lane = max(8, max_inflight // max(1, len(self.lanes)))
        self._lag_every = lag_log_every_s
        self._rand = rand
        self._now = monotonic
        self._wall_ms = wall_ms
        self._poll_s = poll_s
        self._stall_s = stall_s
        self._events: queue.SimpleQueue[tuple[int, int, Any] | None] = queue.SimpleQueue()
        self._producer: Any = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._last_lag_log = -float("inf")
        self._stop_at: float | None = None
        self._thread: threading.Thread | None = None
        self.send_errors_total = 0
        """Every failed attempt: connection failures plus failed messages of all lanes."""
        self._shared_errors = 0
        self.acked_total = 0
        self.connected = threading.Event()
        """Set once a producer exists (for callers that want to wait for the broker)."""

    # -- control ------------------------------------------------------------------------------
    def start(self) -> Sender:
        self._thread = threading.Thread(target=self._run, name="gpufleet-sender", daemon=True)
        self._thread.start()
        return self

    def notify(self) -> None:
        """Wake the thread: something new is spooled."""
        self._events.put(None)

    def stop(self, deadline_s: float = 5.0) -> int:
        """Send what is spooled until `deadline_s`, close the producer; returns messages left spooled."""
        self._stop_at = self._now() + max(0.0, deadline_s)
        self.notify()
        if self._thread is not None:
            self._thread.join(deadline_s + 15.0)  # + the producer's bounded close
            if self._thread.is_alive():
                log.error("the sender thread did not stop in time; unsent messages stay spooled")
        left = sum(lane.spool.depth for lane in self.lanes)
        if left:
            log.warning("stopped with %d messages unsent; they stay spooled and go out on the next start", left)
        return left

    def errors_for(self, lane_index: int) -> int:
        """Send errors that concern one node: its own failed messages plus every connection failure."""
        return self.lanes[lane_index].errors + self._shared_errors

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._should_exit():
                try:
                    self._step()
                except Exception as exc:  # e.g. the spool's disk: never let the thread die
                    log.exception("sender error; messages stay spooled, retrying")
                    self._back_off(f"sender error: {type(exc).__name__}: {exc}")
                    self._wait(self._retry_at - self._now())
        finally:
            self._close()

    def _step(self) -> None:
        if self._producer is None and not self._connect():
            self._wait(self._retry_at - self._now())
            return
        if self._now() >= self._retry_at:
            self._fill()
        self._drain_events(self._poll_s)
        self._check_stalled()
        self._log_lag()

    def _should_exit(self) -> bool:
        if self._stop_at is None:
            return False
        if self._now() >= self._stop_at or self._producer is None:
            return True
        return not any(lane.inflight or lane.spool.depth for lane in self.lanes)

    def _connect(self) -> bool:
        if self._now() < self._retry_at:
            return False
        try:
            self._producer = self._factory()
        except Exception as exc:
            self._failed(f"cannot connect to Kafka: {type(exc).__name__}: {exc}", None)
            return False
        self.connected.set()
        log.info("connected to Kafka; sending to topic %s", self.topic)
        return True

    def _fill(self) -> None:
        for i, lane in enumerate(self.lanes):
            room = self._per_lane - len(lane.inflight)
            if room <= 0:
                continue
            for entry in lane.spool.peek(after=lane.cursor, limit=room + len(lane.inflight)):
                if entry.seq in lane.inflight:
                    lane.cursor = entry.seq
                    continue
                if room <= 0:
                    break
                try:
                    fut = self._producer.send(self.topic, key=lane.key, value=entry.data)
                except Exception as exc:
                    if type(exc).__name__ in PER_MESSAGE_ERRORS:
                        self._condemn(lane, entry.seq, exc)
                        lane.cursor = entry.seq
                        continue
                    self._failed(f"send failed: {type(exc).__name__}: {exc}", lane)
                    if not getattr(exc, "retriable", False):
                        self._reset_producer(exc)
                    return
                if not lane.inflight:
                    lane.progress_at = self._now()
                lane.inflight[entry.seq] = fut
                lane.cursor = entry.seq
                room -= 1
                fut.add_both(self._on_done, i, entry.seq, fut)

    def _on_done(self, lane_index: int, seq: int, fut: Any, _result: object) -> None:
        """Runs on kafka-python's I/O thread: only hand the outcome over."""
        self._events.put((lane_index, seq, fut))

    def _drain_events(self, timeout: float) -> None:
        try:
            event = self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return
        acked: dict[int, list[int]] = {}
        failure: BaseException | None = None
        while True:
            if event is not None:
                lane_index, seq, fut = event
                lane = self.lanes[lane_index]
                lane.progress_at = self._now()
                current = lane.inflight.get(seq) is fut
                if current:
                    del lane.inflight[seq]
                if fut.exception is None:  # acknowledged, even by a producer since replaced
                    acked.setdefault(lane_index, []).append(seq)
                elif not current:
                    pass  # a failure from a producer since replaced: the message is queued again already
                elif type(fut.exception).__name__ in PER_MESSAGE_ERRORS:
                    self._condemn(lane, seq, fut.exception)
                else:
                    lane.cursor = min(lane.cursor, seq - 1)
                    self._count_error(lane)
                    failure = fut.exception
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
        for lane_index, seqs in acked.items():
            self.acked_total += self.lanes[lane_index].spool.remove(seqs)
        if failure is not None:
            self._back_off(f"broker did not acknowledge: {type(failure).__name__}: {failure}")
            if not getattr(failure, "retriable", False):
                self._reset_producer(failure)
        elif acked and self._failures:
            log.info("Kafka is taking messages again after %d failed attempts", self._failures)
            self._failures = 0
            self._retry_at = 0.0
            self._last_error = None

    def _check_stalled(self) -> None:
        """Replace a producer that has left some node's messages in flight, unanswered, for `stall_s`."""
        now = self._now()
        stalled = [lane for lane in self.lanes if lane.inflight and now - lane.progress_at >= self._stall_s]
        if not stalled or self._producer is None:
            return
        count = sum(len(lane.inflight) for lane in stalled)
        reason = (f"Kafka producer stalled: {count} messages of {len(stalled)} node(s) in flight with no answer "
                  f"for {self._stall_s:.0f} s")
        self._failed(reason, None)
        self._reset_producer(TimeoutError(reason))

    def _reset_producer(self, cause: BaseException) -> None:
        """Replace a producer stuck in a non-retriable state (e.g. the broker forgot its producer id).

        Everything still spooled is sent again by the next producer, in order; a message the old one
        got acknowledged without us hearing of it may arrive twice (the ingester drops the copy).
        """
        log.warning("replacing the Kafka producer after %s: %s", type(cause).__name__, cause)
        producer, self._producer = self._producer, None
        for lane in self.lanes:
            lane.inflight.clear()
            lane.cursor = -1
        if producer is not None:
            from gpufleet.kafka import close_producer

            close_producer(producer, 0.0)

    def _failed(self, reason: str, lane: Lane | None) -> None:
        self._count_error(lane)
        self._back_off(reason)

    def _count_error(self, lane: Lane | None) -> None:
        self.send_errors_total += 1
        if lane is None:
            self._shared_errors += 1
        else:
            lane.errors += 1

    def _back_off(self, reason: str) -> None:
        self._failures += 1
        delay = self._backoff.delay(self._failures, self._rand)
        self._retry_at = self._now() + delay
        if self._failures == 1 or reason != self._last_error:
            log.warning("%s; messages stay spooled, retrying in %.1f s", reason, delay)
        else:
            log.debug("%s; retrying in %.1f s", reason, delay)
        self._last_error = reason

    def _condemn(self, lane: Lane, seq: int, exc: BaseException) -> None:
        self.send_errors_total += 1
        lane.errors += 1
        lane.spool.drop([seq])
        log.error("Kafka refuses message seq %d of node %s for good (%s: %s); dropped it",
                  seq, lane.key.decode(), type(exc).__name__, exc)

    def _log_lag(self) -> None:
        now = self._now()
        if now - self._last_lag_log < self._lag_every:
            return
        depth = sum(lane.spool.depth for lane in self.lanes)
        if not depth:
            return
        oldest = min((t for lane in self.lanes if (t := lane.spool.oldest_ms()) is not None), default=None)
        age = (self._wall_ms() - oldest) / 1000 if oldest is not None else 0.0
        if self._last_error is None and age < self._lag_every:
            return  # healthy: a few messages in flight
        size = sum(lane.spool.bytes for lane in self.lanes)
        log.warning("behind: %d messages (%.1f MB) wait in the spool, the oldest for %.0f s; last error: %s",
                    depth, size / 1e6, age, self._last_error)
        self._last_lag_log = now

    def _wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, waking early on `notify()`/`stop()` (completions are handled meanwhile)."""
        self._drain_events(max(0.01, min(seconds, self._poll_s * 5)))

    def _close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        from gpufleet.kafka import close_producer

        remaining = 0.0 if self._stop_at is None else max(0.0, self._stop_at - self._now())
        try:
            close_producer(producer, min(remaining, 5.0))
            # completions that raced the close still count: their messages were acknowledged
            self._drain_events(0.0)
        except Exception:
            log.exception("closing the Kafka producer failed; unsent messages stay spooled")
