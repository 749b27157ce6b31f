"""The `/healthz` and `/readyz` server (gpufleet/health_http.py) with real sockets: idle, trickling and
too many clients cannot stop a liveness probe from being answered.

The old server answered one connection at a time, so a client that connected and sent nothing held
it until its socket timeout, and one that trickled a byte within every timeout held it for good,
failing the kubelet's probes. Every wait here is bounded and none asserts how fast anything is.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from gpufleet.health_http import HealthServer
from gpufleet.liveness import Liveness
from tests.otlp.test_receiver_limits import Trickler, closed_by_server, wait_until

pytestmark = pytest.mark.integration  # starts a server

WAIT_S = 30.0


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=WAIT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def fresh() -> Liveness:
    """One heartbeat, beaten now and bounded far away: healthy and ready for the whole test."""
    live = Liveness().expect("collected", 3600)
    live.beat("collected")
    return live


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def idle() -> Iterator[list[socket.socket]]:
    """Connections the test opens and never sends on; closed afterwards."""
    held: list[socket.socket] = []
    yield held
    for s in held:
        s.close()


def test_an_idle_connection_held_open_does_not_stop_healthz(idle: list[socket.socket]) -> None:
    server = HealthServer(fresh()).start()
    try:
        # Connected first, so the server accepts it first; it sends nothing and stays open.
        idle.append(socket.create_connection(("127.0.0.1", server.port)))
        code, body = get(f"{server.url}/healthz")
        assert (code, body["ok"], body["stale"]) == (200, True, [])
        # Answered while the idle client still holds its connection: it was not waited out first.
        assert not closed_by_server(idle[0])
        assert get(f"{server.url}/readyz")[0] == 200
        assert not closed_by_server(idle[0])
    finally:
        server.stop()


def test_idle_connections_beyond_the_cap_make_room_for_a_probe(idle: list[socket.socket]) -> None:
    from gpufleet.httpguard import ConnectionLimits

    server = HealthServer(fresh(), limits=ConnectionLimits(max_connections=2, request_deadline_s=600.0)).start()
    try:
        idle.extend(socket.create_connection(("127.0.0.1", server.port)) for _ in range(4))
        # The two oldest idle connections are closed to admit the newer ones ...
        assert wait_until(lambda: sum(closed_by_server(s) for s in idle) == 2, timeout_s=WAIT_S)
        assert [closed_by_server(s) for s in idle] == [True, True, False, False]
        assert server.connections == 2
        assert get(f"{server.url}/healthz")[0] == 200
        # ... and the oldest one left for the probe.
        assert wait_until(lambda: sum(closed_by_server(s) for s in idle) == 3, timeout_s=WAIT_S)
        assert [closed_by_server(s) for s in idle] == [True, True, True, False]
    finally:
        server.stop()


def test_a_trickling_request_is_cut_off_at_the_deadline_and_probes_are_answered_meanwhile() -> None:
    from gpufleet.httpguard import ConnectionLimits

    server = HealthServer(fresh(), limits=ConnectionLimits(request_deadline_s=1.0)).start()
    # 40 bytes of request line at one byte per 0.2 s would take 8 s; each byte comes well within a socket timeout.
    slow = Trickler(("127.0.0.1", server.port), b"", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", every_s=0.2)
    try:
        assert get(f"{server.url}/healthz")[0] == 200
        assert slow.cut_off.wait(timeout=WAIT_S)
        assert get(f"{server.url}/healthz")[0] == 200
    finally:
        slow.stop()
        server.stop()


def test_stale_and_unknown_paths_over_ipv6_loopback() -> None:
    clock = [0.0]
    live = Liveness(lambda: clock[0]).expect("collected", 60)
    if not ipv6_loopback():
        pytest.skip("this machine cannot listen on ::1")
    server = HealthServer(live, host="::1").start()
    try:
        assert server.url == f"http://[::1]:{server.port}"
        assert get(f"{server.url}/healthz")[0] == 200
        assert get(f"{server.url}/readyz") == (503, {"ok": False, "stale": [], "checks": {
            "collected": {"age_s": 0.0, "bound_s": 60.0}}})
        clock[0] += 61
        assert get(f"{server.url}/healthz") == (503, {"ok": False, "stale": ["collected"], "checks": {
            "collected": {"age_s": 61.0, "bound_s": 60.0}}})
        assert get(f"{server.url}/metrics") == (404, {"error": "no such path /metrics: use /healthz or /readyz"})
    finally:
        server.stop()
