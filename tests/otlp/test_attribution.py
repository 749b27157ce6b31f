"""Attribution: counter semantics, proration, splitting, expiry; every expected amount computed by hand."""

from __future__ import annotations

from gpufleet.agents.otlp.attribution import Attribution, AttributionSettings
from tests.otlp.otlp_builders import A, B, C, point

T0 = 1_800_000_000_000  # agent clock, ms
J0 = 1_800_000_000.0  # job clock at the agent's start, seconds


def engine(**settings: int) -> Attribution:
    return Attribution(counted_since_ms=T0, settings=AttributionSettings(**settings))


def test_cumulative_increment_is_prorated_over_the_time_between_reports() -> None:
    a = engine()
    # Counter started after the agent: the first report counts from zero, 8e12 over 4 s of job time.
    a.add([point(8e12, start_s=J0 + 10, time_s=J0 + 14, arrival_ms=T0 + 14_000)])
    assert a.take(T0 + 15_000) == {A: 2e12}  # 1 s of 4 -> 8e12 / 4
    assert a.take(T0 + 17_000) == {A: 4e12}  # 2 s more
    # Next report: 10e12 cumulative at J0+16, i.e. 2e12 more over 2 s, arriving at T0+17.5 s.
    a.add([point(10e12, start_s=J0 + 10, time_s=J0 + 16, arrival_ms=T0 + 17_500)])
    assert a.take(T0 + 18_000) == {A: 2e12 + 0.5e12}  # rest of the first span (1 s) + 0.5 s of 1e12/s
    assert a.take(T0 + 20_000) == {A: 1.5e12}  # rest of the second span; spans done
    assert a.take(T0 + 21_000) == {}  # nothing reported since: no extrapolation, no coverage


def test_totals_stay_exact_when_the_rate_does_not_divide_evenly() -> None:
    a = engine()
    a.add([point(1e12, start_s=J0 + 1, time_s=J0 + 4, arrival_ms=T0)])  # 1e12 over 3 s
    got = [a.take(T0 + 1_000)[A], a.take(T0 + 2_000)[A], a.take(T0 + 3_000)[A]]
    assert got == [1e12 / 3, 1e12 / 3, 1e12 / 3]  # each third rounded once, from the exact fraction
    assert a.take(T0 + 4_000) == {}


def test_restart_with_new_start_time_counts_the_new_counter_from_zero() -> None:
    a = engine()
    a.add([
        point(5e12, start_s=J0 + 1, time_s=J0 + 2, arrival_ms=T0),
        point(7e12, start_s=J0 + 1, time_s=J0 + 3, arrival_ms=T0),  # +2e12
        # The job restarted at J0+10: its counter starts again; 3e12 is new work, not 3e12 - 7e12.
        point(3e12, start_s=J0 + 10, time_s=J0 + 11, arrival_ms=T0),
    ])
    assert a.take(T0 + 60_000) == {A: 5e12 + 2e12 + 3e12}


def test_value_drop_without_start_time_is_a_reset() -> None:
    a = engine()
    a.add([
        point(4e12, start_s=J0 + 1, time_s=J0 + 2, arrival_ms=T0),
        point(1e12, start_s=J0 + 1, time_s=J0 + 3, arrival_ms=T0),  # dropped below 4e12: a reset
        point(1.5e12, start_s=J0 + 1, time_s=J0 + 4, arrival_ms=T0),  # +0.5e12
    ])
    assert a.take(T0 + 60_000) == {A: 4e12 + 1e12 + 0.5e12}


def test_repeated_and_older_points_add_nothing() -> None:
    a = engine()
    first = point(4e12, start_s=J0 + 1, time_s=J0 + 2, arrival_ms=T0)
    a.add([first, first, point(3e12, start_s=J0 + 1, time_s=J0 + 1.5, arrival_ms=T0)])
    assert a.take(T0 + 60_000) == {A: 4e12}
    assert a.stats().duplicates_total == 2


def test_counter_older_than_the_agent_is_a_baseline_only() -> None:
    a = engine()
    a.add([point(100e12, start_s=J0 - 3600, time_s=J0 + 5, arrival_ms=T0 + 5_000)])  # ran before we listened
    assert a.take(T0 + 6_000) == {}
    a.add([point(103e12, start_s=J0 - 3600, time_s=J0 + 8, arrival_ms=T0 + 8_000)])  # +3e12 over 3 s
    assert a.take(T0 + 60_000) == {A: 3e12}


def test_job_that_stops_reporting_drains_then_expires_and_is_never_counted_twice() -> None:
    a = engine(series_ttl_ms=60_000)
    a.add([point(2e12, start_s=J0 + 1, time_s=J0 + 3, arrival_ms=T0 + 3_000)])
    assert a.take(T0 + 5_000) == {A: 2e12}
    assert a.take(T0 + 6_000) == {}  # stopped: contributes nothing
    assert a.stats().series == 1
    a.take(T0 + 3_000 + 60_001)  # past the TTL after its last report
    assert a.stats().series == 0
    # The same counter comes back (same start): forgotten, so its value is a baseline, not new work.
    a.add([point(2.5e12, start_s=J0 + 1, time_s=J0 + 70, arrival_ms=T0 + 70_000)])
    assert a.take(T0 + 80_000) == {}
    a.add([point(3e12, start_s=J0 + 1, time_s=J0 + 71, arrival_ms=T0 + 71_000)])
    assert a.take(T0 + 80_000) == {A: 0.5e12}


def test_delta_points_count_once_each() -> None:
    a = engine()
    w1 = point(1e12, start_s=J0 + 1, time_s=J0 + 2, arrival_ms=T0, delta=True)
    w2 = point(2e12, start_s=J0 + 2, time_s=J0 + 4, arrival_ms=T0, delta=True)
    a.add([w1, w1, w2])  # the repeat of w1 is an exporter retry
    assert a.take(T0 + 1_000) == {A: 1e12 + 1e12}  # w1 whole (1 s span), half of w2 (2 s span)
    assert a.take(T0 + 2_000) == {A: 1e12}
    no_start = point(5e11, time_s=J0 + 5, arrival_ms=T0 + 2_500, delta=True)
    a.add([no_start])  # no start time: no span, due at once
    assert a.take(T0 + 3_000) == {A: 5e11}


def test_job_on_several_gpus_is_split_evenly_and_jobs_sharing_a_gpu_add_up() -> None:
    a = engine()
    a.add([
        point(9e12, start_s=J0 + 1, time_s=J0 + 2, gpus=(A, B, C), arrival_ms=T0, series="job1"),
        point(1e12, start_s=J0 + 1, time_s=J0 + 2, gpus=(C,), arrival_ms=T0, series="job2"),
    ])
    assert a.take(T0 + 1_000) == {A: 3e12, B: 3e12, C: 3e12 + 1e12}


def test_reporting_zero_flops_covers_the_gpu_with_zero() -> None:
    a = engine()
    a.add([point(0.0, start_s=J0 + 1, time_s=J0 + 3, arrival_ms=T0)])
    assert a.take(T0 + 1_000) == {A: 0.0}
    assert a.take(T0 + 2_000) == {A: 0.0}
    assert a.take(T0 + 3_000) == {}


def test_long_silence_is_spread_over_max_spread_only() -> None:
    a = engine(max_spread_ms=10_000)
    a.add([point(1e12, start_s=J0 + 1, time_s=J0 + 2, arrival_ms=T0)])
    a.add([point(7e12, start_s=J0 + 1, time_s=J0 + 3602, arrival_ms=T0 + 5_000)])  # 6e12 over an hour
    assert a.take(T0 + 10_000) == {A: 1e12 + 6e12 / 2}  # second span: 5 s of its 10 s cap
    assert a.take(T0 + 15_000) == {A: 3e12}


def test_clock_going_backwards_never_gives_negative_amounts() -> None:
    a = engine()
    a.add([point(4e12, start_s=J0 + 1, time_s=J0 + 5, arrival_ms=T0)])
    assert a.take(T0 + 2_000) == {A: 2e12}
    assert a.take(T0 + 1_000) == {A: 0.0}
    assert a.take(T0 + 4_000) == {A: 2e12}


def test_series_limit_drops_new_series_and_counts_them() -> None:
    a = engine(max_series=2)
    rejections = a.add([
        point(1e12, start_s=J0 + 1, time_s=J0 + 2, arrival_ms=T0, series="s1"),
        point(1e12, start_s=J0 + 1, time_s=J0 + 2, arrival_ms=T0, series="s2", gpus=(B,)),
        point(1e12, start_s=J0 + 1, time_s=J0 + 2, arrival_ms=T0, series="s3", gpus=(C,)),
    ])
    assert [r.reason for r in rejections] == ["series"]
    assert "already tracks 2 series" in rejections[0].message
    assert a.take(T0 + 1_000) == {A: 1e12, B: 1e12}
    assert a.stats().dropped_total == 1
