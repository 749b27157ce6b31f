"""The ingester's `/healthz` means health: it turns 503 when the loop stops polling Kafka or stops committing,
and 200 again when it resumes. A real broker (tansu), real chDB, the real status API over HTTP; the
heartbeats' clock is moved by hand, so nothing depends on how fast this machine is."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gpufleet.liveness import Liveness
from gpufleet.pipeline.ingest.consumer import build_consumer, build_producer, subscribe
from gpufleet.pipeline.ingest.ingester import Ingester
from gpufleet.pipeline.ingest.liveness import ingest_liveness
from gpufleet.pipeline.queries.status_api import StatusServer
from gpufleet.pipeline.store.store import Store
from tests.builders import T0_MS, clock_at, report
from tests.pipeline.test_ingest import _cfg, _create, _enc, _produce, connect_target


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class HangingConsumer:
    """The real consumer, except that `poll` blocks while `hang` is set (a loop stuck in a poll)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.hang = threading.Event()
        self.release = threading.Event()
        self.hanging = threading.Event()

    def poll(self, **kwargs: Any) -> Any:
        if self.hang.is_set():
            self.hanging.set()
            self.release.wait(60)
        return self.inner.poll(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def healthz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(what: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.fixture
def running(broker, ch_target, topic) -> Iterator[tuple[Ingester, HangingConsumer, Clock, str]]:
    cfg = _cfg(broker, ch_target, topic, poll_stale_s=30, commit_stale_s=120)
    _create(broker, topic, cfg.kafka.dlq_topic)
    clock = Clock()
    consumer = HangingConsumer(build_consumer(cfg))
    ing = Ingester(cfg, Store(connect_target(cfg), cfg.clickhouse.database), consumer, build_producer(cfg),
                   clock=clock_at(), liveness=ingest_liveness(cfg.ingest, clock))
    subscribe(consumer, cfg.kafka.topic, ing)
    api = StatusServer(lambda: {}, health=ing.liveness.check).start()
    stop = threading.Event()
    thread = threading.Thread(target=ing.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield ing, consumer, clock, api.url
    finally:
        consumer.release.set()
        stop.set()
        thread.join(30)
        api.stop()
        consumer.inner.close()


def test_healthz_turns_unhealthy_when_the_ingester_stops_polling_and_healthy_again(running, broker, topic) -> None:
    ing, consumer, clock, url = running
    _produce(broker, topic, [_enc(report(node="n1", seq=0, time_ms=T0_MS))])
    wait_for(lambda: ing.stats.messages == 1)
    code, body = healthz(url)
    assert (code, body["ok"], body["stale"]) == (200, True, [])
    assert set(body["checks"]) == {"poll", "commit"}
    assert body["checks"]["poll"]["bound_s"] == 30.0

    consumer.hang.set()  # the loop's next poll blocks: it stops polling
    consumer.hanging.wait(60)
    clock.now += 31  # past the poll bound, within the commit bound
    code, body = healthz(url)
    assert (code, body["ok"], body["stale"]) == (503, False, ["poll"])
    assert body["checks"]["poll"]["age_s"] >= 31

    consumer.hang.clear()
    consumer.release.set()  # it polls again
    wait_for(lambda: healthz(url)[0] == 200)
    code, body = healthz(url)
    assert (body["ok"], body["stale"]) == (True, [])
    assert body["checks"]["poll"]["age_s"] < 31


def test_healthz_turns_unhealthy_when_nothing_is_committed(running, broker, topic) -> None:
    ing, _consumer, clock, url = running
    wait_for(lambda: healthz(url)[0] == 200)
    # ClickHouse refuses every insert: the ingester polls, backs off, commits nothing.
    ing.writer.store = Store(BrokenClient(), ing.store.database)
    _produce(broker, topic, [_enc(report(node="n2", seq=0, time_ms=T0_MS))])
    wait_for(lambda: ing.stats.insert_errors >= 1)
    clock.now += 121
    wait_for(lambda: healthz(url)[1]["stale"] == ["commit"])  # polls go on during the back-off: poll is fresh
    assert healthz(url)[0] == 503


class BrokenClient:
    def __getattr__(self, name: str) -> Any:
        def fail(*_a: Any, **_k: Any) -> Any:
            raise ConnectionError("ClickHouse is down")
        return fail


def test_liveness_counts_from_declaration_and_readiness_wants_a_beat() -> None:
    clock = Clock()
    live = Liveness(clock).expect("a", 10).expect("b", 5)
    assert live.check().ok
    assert not live.check(ready=True).ok  # nothing has happened yet
    clock.now += 6
    assert live.check().stale == ["b"]
    live.beat("b")
    live.beat("a")
    assert live.check(ready=True).ok
    clock.now += 10.5
    health = live.check()
    assert (health.ok, health.stale, dict(health.ages_s)) == (False, ["a", "b"], {"a": 10.5, "b": 10.5})
    with pytest.raises(ValueError, match="must be positive"):
        live.expect("c", 0)
