"""A GPU-second is billed at most once, whoever claims it: overlapping intervals, boot ids, nodes, orders.

Every figure below is counted by hand from the samples' intervals `[time - interval_ms, time)`.
"""

from __future__ import annotations

import random
import uuid

import pytest
from click.testing import CliRunner

from gpufleet import wire
from gpufleet.cli import cli
from gpufleet.pipeline.ingest import claims
from gpufleet.pipeline.ingest.claims import ClaimBook, Coverage
from gpufleet.pipeline.ingest.consumer import build_ingester
from gpufleet.pipeline.ingest.rows import Deriver, insert_reports
from gpufleet.pipeline.queries.claims import UnbilledClaims, unbilled_claims
from gpufleet.pipeline.queries.policy import Policy
from gpufleet.pipeline.queries.usage import billable_by_tenant, usage_rows
from gpufleet.pipeline.queries.window import Window
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate
from tests.builders import TEST_RAW_TTL_DAYS, clock_at, gpu, report
from tests.pipeline.test_ingest import _cfg, _create, _produce, _run_until

H = 1_794_999_600_000  # 2026-11-18T11:00:00Z
S = 1000
HOUR = 3_600_000
SHARED = "GPU-shared"


def _stream(node: str, seconds: range, boot: str = "boot-1", uuid_: str = SHARED, tenant: str = "acme",
            step_s: int = 1, offset_ms: int = 0, interval_ms: int | None = None, seq0: int = 0) -> list:
    """One report per `step_s` seconds: the sample ending at H + (i + step_s) s (+ offset) for i in `seconds`."""
    return [
        report(node=node, boot_id=boot, seq=seq0 + n, time_ms=H + (i + step_s) * S + offset_ms,
               interval_ms=interval_ms or step_s * S, gpus=[gpu(0, node, uuid=uuid_, tenant=tenant)])
        for n, i in enumerate(seconds)
    ]


def _billed(store: Store) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(hour, tenant) -> (billable seconds, gap seconds, GPUs) from usage_hourly."""
    return {(r["hour"][11:16], r["tenant"]): (r["billable_gpu_seconds"], r["gap_gpu_seconds"], r["gpus"])
            for r in usage_rows(store)}


def _claimed(store: Store, where: str = "1") -> list[tuple]:
    return [tuple(r) for r in store.rows(
        f"SELECT node, boot_id, seq, claimed_ms, toUnixTimestamp64Milli(claim_start) - {H} "
        f"FROM {{db:Identifier}}.gpu_samples WHERE {where} ORDER BY node, boot_id, seq")]


# --- the claim book (pure) -----------------------------------------------------------------------

def test_a_claim_takes_what_earlier_claims_left() -> None:
    cov = Coverage(since=0)
    assert cov.claim(10, 20) == (10, 10)
    assert cov.claim(15, 25) == (5, 20)  # [20, 25): the tail
    assert cov.claim(30, 40) == (10, 30)  # after a hole
    assert cov.claim(5, 35) == (10, 5)  # [5, 10) and [25, 30): two pieces, the first starts at 5
    assert cov.claim(12, 18) == (0, 18)  # nothing left: the claim "starts" at its end
    assert (cov.starts, cov.ends) == ([5], [40])  # merged into one span
    cov.claim(50, 60)
    cov.claim(70, 80)
    cov.trim(2, before=30)  # the oldest span ends after 30: a later sample of the batch may need it
    assert (cov.since, cov.starts, cov.ends) == (0, [5, 50, 70], [40, 60, 80])
    cov.trim(2, before=75)
    assert (cov.since, cov.starts, cov.ends) == (40, [50, 70], [60, 80])


def test_the_book_reads_stored_claims_once_per_batch_and_only_for_what_it_does_not_know(ch_store) -> None:
    first = _stream("n1", range(10))
    insert_reports(ch_store, first, ingest_ms=H + 20_000)
    book = ClaimBook()
    # A restarted ingester: it knows nothing, so it reads what the GPU claimed from the batch's start on.
    again = _stream("n1", range(5, 15), boot="boot-2")
    assert claims.load(ch_store, book, again, ingest_ms=H + 30_000) == 1
    assert book.claim_all(again)[0] == [0] * 5 + [1000] * 5  # seconds 5-9 were claimed by boot-1
    later = _stream("n1", range(15, 20), boot="boot-2", seq0=10)
    assert claims.load(ch_store, book, later, ingest_ms=H + 40_000) == 0  # known: no query


# --- billing ------------------------------------------------------------------------------------

def test_five_messages_a_second_apart_each_claiming_an_hour_bill_five_seconds(ch_store) -> None:
    # acme's GPU reported the minute [H, H + 60 s) at 1 s; then five messages 1 s apart claim an hour each.
    normal = _stream("n1", range(60), uuid_="GPU-a")
    rogue = _stream("n1", range(60, 65), boot="boot-x", uuid_="GPU-a", interval_ms=HOUR)
    # beta's GPU gets only the five: the first bills at most ingest.max_claim_ms (60 s), then 1 s each.
    alone = _stream("n1", range(60, 65), boot="boot-y", uuid_="GPU-b", tenant="beta", interval_ms=HOUR)
    insert_reports(ch_store, normal, ingest_ms=H + 70_000)
    insert_reports(ch_store, rogue + alone, ingest_ms=H + 80_000)  # a fresh Deriver: claims read back
    assert _claimed(ch_store, "boot_id != 'boot-1'") == [
        # [H + 60 s, H + 61 s) ... [H + 64 s, H + 65 s): the second each message adds
        ("n1", "boot-x", i, 1000, (60 + i) * S) for i in range(5)
    ] + [("n1", "boot-y", 0, 60_000, 1 * S)] + [("n1", "boot-y", i, 1000, (60 + i) * S) for i in range(1, 5)]
    # acme: 60 s + 5 s, not 60 s + 5 h; beta: 60 s + 4 s; all in the hour the claims start in.
    assert _billed(ch_store) == {("11:00", "acme"): (65.0, 0.0, 1), ("11:00", "beta"): (64.0, 1.0, 1)}


def test_two_nodes_reporting_one_gpu_bill_it_once(ch_target, ch_store) -> None:
    # Minute 11:00: n1 claims all 60 s, n2 (the same UUID) seconds 30-59. Minute 11:01: both all 60 s.
    n1 = _stream("n1", range(120))
    n2 = _stream("n2", [*range(30, 60), *range(60, 120)])
    insert_reports(ch_store, n1, ingest_ms=H + 130_000)
    insert_reports(ch_store, n2, ingest_ms=H + 131_000)
    # 11:00: n1 claimed more (60 s > 30 s); 11:01: a tie, the smaller node name (n1) is billed.
    assert _billed(ch_store) == {("11:00", "acme"): (120.0, 0.0, 1)}
    minutes = Window(H, H + 2 * 60_000)
    assert billable_by_tenant(ch_store, minutes, Policy(("failing",), 5)) == {"acme": 120_000 / HOUR}
    assert unbilled_claims(ch_store) == [
        UnbilledClaims(SHARED, "c1", "n2", "c1", "n1", H, H + 60_000, 2, 90_000)]
    out = CliRunner().invoke(cli, ["billing", "verify", "--dsn", ch_target.dsn, "--database", ch_store.database])
    assert out.exit_code == 0, out.output
    assert ("GPU-shared: c1/n2 claimed 90.000 s in 2 minute(s) (2026-11-18T11:00:00Z .. 2026-11-18T11:02:00Z) "
            "that c1/n1 also claimed: not billed") in out.output


def test_a_node_renamed_mid_minute_bills_each_second_once(ch_store) -> None:
    # 10 s intervals; renamed at H + 1830 s, in the middle of minute 11:30: no second claimed twice.
    insert_reports(ch_store, _stream("n1", range(0, 1830, 10), step_s=10), ingest_ms=H + HOUR)
    insert_reports(ch_store, _stream("n1-renamed", range(1830, 3600, 10), step_s=10), ingest_ms=H + HOUR + 1)
    # Both halves are billed (their spans in minute 11:30 do not overlap): the whole hour, no gap, one GPU.
    assert _billed(ch_store) == {("11:00", "acme"): (3600.0, 0.0, 1)}
    assert unbilled_claims(ch_store) == []


def test_a_node_renamed_while_its_old_agent_still_runs_bills_each_second_once(ch_store) -> None:
    # The old name keeps reporting 300 s after the rename: both claim [H + 1830 s, H + 2130 s).
    insert_reports(ch_store, _stream("n1", range(0, 2130, 10), step_s=10), ingest_ms=H + HOUR)
    insert_reports(ch_store, _stream("n2", range(1830, 3600, 10), step_s=10), ingest_ms=H + HOUR + 1)
    # 11:30: n1 60 s > n2 30 s; 11:31-11:34: ties, n1; 11:35: n2 60 s > n1 30 s ([2100, 2130)).
    # Billed: n1 [0, 2100) + n2 [2100, 3600) = 3600 s.
    assert _billed(ch_store) == {("11:00", "acme"): (3600.0, 0.0, 1)}
    assert unbilled_claims(ch_store) == [
        UnbilledClaims(SHARED, "c1", "n1", "c1", "n2", H + 2100 * S, H + 2100 * S, 1, 30_000),
        UnbilledClaims(SHARED, "c1", "n2", "c1", "n1", H + 1800 * S, H + 2040 * S, 5, 270_000)]


def test_two_boot_ids_interleaving_on_one_node_bill_once(ch_store) -> None:
    # The agent installed twice: boot-a every second from 0, boot-b the same seconds shifted by 500 ms,
    # arriving interleaved. Their union is [H, H + 30.5 s).
    a = _stream("n1", range(30), boot="boot-a")
    b = _stream("n1", range(30), boot="boot-b", offset_ms=500)
    interleaved = [m for pair in zip(a, b, strict=True) for m in pair]
    insert_reports(ch_store, interleaved, ingest_ms=H + 40_000)
    assert ch_store.rows("SELECT sum(claimed_ms) FROM {db:Identifier}.gpu_samples") == [(30_500,)]
    assert _billed(ch_store) == {("11:00", "acme"): (30.5, 0.0, 1)}


def test_a_batch_repeated_after_a_crash_claims_what_it_claimed_first(ch_store) -> None:
    overlapping = _stream("n1", range(10), boot="boot-a") + _stream("n1", range(5, 15), boot="boot-b")
    insert_reports(ch_store, overlapping, ingest_ms=H + 20_000)
    before = _claimed(ch_store)
    # A restarted ingester repeats the same batch (same ingest time) with an empty book: it must not see
    # its own landed rows as earlier claims, so the block is identical and ClickHouse drops it.
    insert_reports(ch_store, overlapping, ingest_ms=H + 20_000)
    assert _claimed(ch_store) == before
    assert sum(ms for _, _, _, ms, _ in before) == 15_000


def test_two_boot_ids_interleaving_through_the_ingester_bill_once(broker, ch_target, ch_store, topic) -> None:
    cfg = _cfg(broker, ch_target, topic)
    _create(broker, topic, cfg.kafka.dlq_topic)
    a = _stream("n1", range(30), boot="boot-a")
    b = _stream("n1", range(30), boot="boot-b", offset_ms=500)
    _produce(broker, topic, [(m.node.encode(), wire.encode(m)) for pair in zip(a, b, strict=True) for m in pair])
    ing = build_ingester(cfg, ch_store, clock=clock_at(H + HOUR))
    _run_until(ing, lambda: ing.stats.messages == 60)
    # Through the JSON staging path: claims spliced beside the message bytes. Union [H, H + 30.5 s).
    assert ch_store.rows("SELECT sum(claimed_ms), sum(interval_ms) FROM {db:Identifier}.gpu_samples") == [
        (30_500, 60_000)]
    assert _billed(ch_store) == {("11:00", "acme"): (30.5, 0.0, 1)}


def _mixed_messages() -> list:
    """Two boot ids on n1 (seconds 0-39 and 20-59), n2 with the same UUID at 10 s (seconds 50-109),
    and a GPU of its own on n3: intervals aligned to their length, as agents send them."""
    return [
        *_stream("n1", range(40), boot="boot-a"),
        *_stream("n1", range(20, 60), boot="boot-b"),
        *_stream("n2", range(50, 110, 10), step_s=10),
        *_stream("n3", range(0, 60, 5), uuid_="GPU-own", tenant="beta", step_s=5),
    ]


def _integer_usage(store: Store) -> list[tuple]:
    keys = ("hour", "tenant", "gpu_model", "gpus", "allocated_gpu_seconds", "billable_gpu_seconds",
            "gap_gpu_seconds", "energy_kwh")
    return [tuple(r[k] for k in keys) for r in usage_rows(store)]


def test_replaying_in_another_order_bills_the_same(ch_client, ch_store) -> None:
    messages = _mixed_messages()
    insert_reports(ch_store, messages, ingest_ms=H + HOUR)
    expected = _integer_usage(ch_store)
    # acme: n1 [0, 60) once; n2's 11:00 claim ([50, 60), 10 s) is outranked by n1's 60 s; n2's 11:01 (50 s).
    assert [(r[1], r[4]) for r in expected] == [("acme", 110.0), ("beta", 60.0)]
    for order in ("shuffled, one message per batch, every batch a restart", "reversed, one ingester"):
        other = Store(ch_client, f"t_{uuid.uuid4().hex[:12]}")
        migrate(ch_client, SchemaOptions(database=other.database, raw_ttl_days=TEST_RAW_TTL_DAYS))
        try:
            again = messages[:]
            if order.startswith("shuffled"):
                random.Random(11).shuffle(again)
            else:
                again.reverse()
            deriver = Deriver()
            for n, m in enumerate(again):
                insert_reports(other, [m], ingest_ms=H + HOUR + 1 + n,
                               deriver=None if order.startswith("shuffled") else deriver)
            assert _integer_usage(other) == expected, order
            assert unbilled_claims(other) == unbilled_claims(ch_store), order
        finally:
            ch_client.command(f"DROP DATABASE IF EXISTS {other.database} SYNC")


@pytest.mark.parametrize("seconds", [range(60), range(0, 60, 2)])
def test_without_overlap_claims_are_the_reported_intervals(ch_store, seconds) -> None:
    insert_reports(ch_store, _stream("n1", seconds), ingest_ms=H + HOUR)
    assert ch_store.rows(
        "SELECT countIf(claimed_ms = interval_ms AND claim_start = time - toIntervalMillisecond(interval_ms)), "
        "count() FROM {db:Identifier}.gpu_samples") == [(len(seconds), len(seconds))]
