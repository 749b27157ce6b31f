"""The macro expander against expectations written out by hand from the plugin's and Grafana's source.

Time range: 2026-11-18T11:06:40.123Z to 2026-11-18T12:06:40.999Z (Unix 1795000000.123 s to
1795003600.999 s); the plugin truncates to whole seconds for toDateTime and keeps milliseconds
for fromUnixTimestamp64Milli.
"""

from __future__ import annotations

import pytest

from gpufleet.dashboards.macros import (
    ALL,
    MacroError,
    TimeRange,
    Var,
    all_of,
    apply_conditional_all,
    expand_macros,
    go_duration_seconds,
    interpolate,
    one,
    render,
    seconds_to_hms,
    strip_comments,
)

FROM_MS = 1_795_000_000_123
TO_MS = 1_795_003_600_999
TR = TimeRange(FROM_MS, TO_MS, 30_000)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("$__timeFilter(time)", "time >= toDateTime(1795000000) AND time <= toDateTime(1795003600)"),
        ("$__timeFilter_ms(time)",
         "time >= fromUnixTimestamp64Milli(1795000000123) AND time <= fromUnixTimestamp64Milli(1795003600999)"),
        ("$__dateFilter(d)", "d >= toDate('2026-11-18') AND d <= toDate('2026-11-18')"),
        ("$__dateTimeFilter(d, t)",
         "(d >= toDate('2026-11-18') AND d <= toDate('2026-11-18')) AND "
         "(t >= toDateTime(1795000000) AND t <= toDateTime(1795003600))"),
        ("$__dt(d,t)",
         "(d >= toDate('2026-11-18') AND d <= toDate('2026-11-18')) AND "
         "(t >= toDateTime(1795000000) AND t <= toDateTime(1795003600))"),
        ("$__timeInterval(time)", "toStartOfInterval(toDateTime(time), INTERVAL 30 second)"),
        ("$__timeInterval_ms(time)", "toStartOfInterval(toDateTime64(time, 3), INTERVAL 30000 millisecond)"),
        ("x / $__interval_s", "x / 30"),
        ("$__fromTime AND $__toTime", "toDateTime(1795000000) AND toDateTime(1795003600)"),
        ("$__fromTime_ms, $__toTime_ms",
         "fromUnixTimestamp64Milli(1795000000123), fromUnixTimestamp64Milli(1795003600999)"),
        ("$__timeFrom(t) AND $__timeTo(t)", "t >= toDateTime(1795000000) AND t <= toDateTime(1795003600)"),
        ("$__timeGroup(time, 5m)", "toStartOfInterval(toDateTime(time), INTERVAL 300 second)"),
        ("$__timeGroup(time, '1h30m')", "toStartOfInterval(toDateTime(time), INTERVAL 5400 second)"),
        ("$__timeGroup( time , 1.5s)", "toStartOfInterval(toDateTime(time), INTERVAL 2 second)"),
        ("$__interval, $__interval_ms", "30s, 30000"),
        ("$__timeFilter(toDateTime(ts, 'UTC'))",
         "toDateTime(ts, 'UTC') >= toDateTime(1795000000) AND toDateTime(ts, 'UTC') <= toDateTime(1795003600)"),
        ("$__unknownMacro(x) AND $__timeFilterX", "$__unknownMacro(x) AND $__timeFilterX"),
        ("SELECT '$__fromTime'", "SELECT 'toDateTime(1795000000)'"),
        ("$__fromTime()", "toDateTime(1795000000)"),
    ],
)
def test_backend_macros_expand_as_the_plugin_does(sql: str, expected: str) -> None:
    assert expand_macros(sql, TR) == expected


def test_interval_seconds_is_whole_and_at_least_one() -> None:
    assert expand_macros("$__interval_s $__timeInterval(t)", TimeRange(0, 1, 500)) == (
        "1 toStartOfInterval(toDateTime(t), INTERVAL 1 second)"
    )
    assert expand_macros("$__interval_s", TimeRange(0, 1, 1999)) == "1"
    assert expand_macros("$__timeInterval_ms(t)", TimeRange(0, 1, 500)) == (
        "toStartOfInterval(toDateTime64(t, 3), INTERVAL 500 millisecond)"
    )


def test_comments_are_blanked_byte_for_byte_before_expansion() -> None:
    sql = "SELECT 1 -- $__timeFilter(x)\n/* $__fromTime × */ FROM t WHERE s = '--x' AND $__timeFrom(t)"
    # `--...` (19 bytes) and `/*...*/` (19 characters, 20 bytes: × is 2 bytes in UTF-8) become spaces
    assert expand_macros(sql, TR) == (
        "SELECT 1 " + " " * 19 + "\n" + " " * 20 + " FROM t WHERE s = '--x' AND t >= toDateTime(1795000000)"
    )
    # quotes close as in ClickHouse: doubled, or escaped with a backslash
    kept = "a 'it''s -- no' `x--y` 'it\\'s -- no' "
    assert strip_comments(kept + "-- c") == kept + " " * 4


def test_wrong_argument_count_names_the_macro() -> None:
    with pytest.raises(MacroError, match=r"\$__timeFilter expected 1 argument\(s\), received 2"):
        expand_macros("$__timeFilter(a, b)", TR)
    with pytest.raises(MacroError, match="interval must be positive"):
        expand_macros("$__timeGroup(t, 0s)", TR)
    with pytest.raises(MacroError, match="statement macro"):
        expand_macros("SELECT $__columns(t, k, v) FROM x", TR)


def test_go_durations() -> None:
    assert go_duration_seconds("1h30m") == 5400
    assert go_duration_seconds("250ms") == 0.25
    assert go_duration_seconds("0") == 0
    with pytest.raises(MacroError, match="invalid duration"):
        go_duration_seconds("1d")


# --- $__conditionalAll (browser side) -----------------------------------------------------------


def test_conditional_all_is_true_for_all_and_empty() -> None:
    sql = "WHERE $__conditionalAll(node IN (${node:singlequote}), $node) AND x"
    assert apply_conditional_all(sql, {"node": all_of(["a", "b"])}) == "WHERE 1=1 AND x"
    assert apply_conditional_all(sql, {"node": Var(())}) == "WHERE 1=1 AND x"
    assert apply_conditional_all(sql, {"node": Var("")}) == "WHERE 1=1 AND x"
    assert apply_conditional_all(sql, {"node": one("a")}) == "WHERE node IN (${node:singlequote}) AND x"
    assert apply_conditional_all(sql, {"node": Var(("a", "b"))}) == "WHERE node IN (${node:singlequote}) AND x"


def test_conditional_all_quirks_of_the_plugin() -> None:
    # braced second argument works; a format in it does not match the plugin's regex, so the condition stays
    assert apply_conditional_all("$__conditionalAll(a = 1, ${v})", {"v": all_of(["x"])}) == "1=1"
    assert apply_conditional_all("$__conditionalAll(a = 1, ${v:csv})", {"v": all_of(["x"])}) == "a = 1"
    # an unknown variable keeps the condition; a third argument stops all processing
    assert apply_conditional_all("$__conditionalAll(a = 1, $nope)", {}) == "a = 1"
    assert apply_conditional_all("$__conditionalAll(a, b, $v)", {"v": all_of([])}) == "$__conditionalAll(a, b, $v)"
    # nested parentheses and several macros, expanded from the last one
    sql = "$__conditionalAll(f(a, b) = 1, $v) OR $__conditionalAll(c = 2, $w)"
    assert apply_conditional_all(sql, {"v": one("x"), "w": all_of(["y"])}) == "f(a, b) = 1 OR 1=1"
    # JavaScript replacement patterns in the condition: `$&` inserts the macro call itself
    assert apply_conditional_all("$__conditionalAll(x = '$$', $v)", {"v": one("q")}) == "x = '$'"


# --- Grafana variable interpolation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "var", "expected"),
    [
        ("${v:singlequote}", one("a"), "'a'"),
        ("${v:singlequote}", Var(("a", "b")), "'a','b'"),
        ("${v:singlequote}", all_of(["a", "b", "c"]), "'a','b','c'"),
        ("${v:singlequote}", one("o'brien"), "'o\\'brien'"),
        ("${v:singlequote}", Var("solo"), "'solo'"),
        ("$v", Var(("a", "b")), "'a','b'"),
        ("$v", one("a"), "'a'"),
        ("$v", Var("solo"), "solo"),
        ("${v}", all_of(["a"]), "'a'"),
        ("[[v]]", Var("solo"), "solo"),
        ("${v:csv}", Var(("a", "b")), "a,b"),
        ("${v:pipe}", Var(("a", "b")), "a|b"),
        ("${v:raw}", Var(("a", "b")), "a,b"),
        ("${v:doublequote}", Var(('a"b',)), '"a\\"b"'),
        ("${v:sqlstring}", Var(("it's",)), "'it''s'"),
        ("${v:json}", Var(("a", "b")), '["a","b"]'),
        ("${v:text}", all_of(["a", "b"]), "All"),
        ("${v:glob}", Var(("a", "b")), "{a,b}"),
        ("${v:nosuchformat}", Var(("a", "b")), "{a,b}"),
        ("${v:singlequote}", Var((ALL,), ("a",), all_value=".*"), ".*"),
        ("$vx", one("a"), "$vx"),
        # Grafana escapes quotes, not backslashes: the value closes the literal (the boards avoid these)
        ("${v:singlequote}", one("x\\') OR 1=1 --"), "'x\\\\') OR 1=1 --'"),
        ("${v:sqlstring}", one("x\\' OR 1=1 --"), "'x\\'' OR 1=1 --'"),
        # percentencode: encodeURIComponent plus !'()*; a list is glob-like, braces even for one value
        ("${v:percentencode}", one("6E31"), "%7B6E31%7D"),
        ("${v:percentencode}", Var(("41", "42")), "%7B41%2C42%7D"),
        ("${v:percentencode}", all_of(["41", "42"]), "%7B41%2C42%7D"),
        ("${v:percentencode}", Var("6E31"), "6E31"),
        ("${v:percentencode}", Var("x\\') OR 1=1 --"), "x%5C%27%29%20OR%201%3D1%20--"),
        ("${v:percentencode}", Var("\u00e9!*~._-$"), "%C3%A9%21%2A~._-%24"),
        # the text of the selection, not its value
        ("${v:text}", Var(("41",), label=("A",)), "A"),
        ("${v:text}", Var(("41", "42"), label=("A", "B")), "A + B"),
        ("${v:text}", Var(("41", "42")), "41 + 42"),
    ],
)
def test_variables_interpolate_as_grafana_does(text: str, var: Var, expected: str) -> None:
    assert interpolate(text, {"v": var}) == expected


def test_builtins_and_unknown_names() -> None:
    b = {"__from": "1795000000123", "__interval": "30s"}
    assert interpolate("${__from} $__interval $__timeFilter(t) $missing", {}, b) == (
        "1795000000123 30s $__timeFilter(t) $missing"
    )
    assert interpolate("${__from:date:seconds}", {}, b) == "1795000000"
    assert seconds_to_hms(60) == "1m"
    assert seconds_to_hms(0.5) == "500ms"
    assert seconds_to_hms(3600) == "1h"


def test_full_pipeline_conditional_all_then_variables_then_macros() -> None:
    sql = (
        "SELECT $__timeInterval(time) AS t, count() FROM gpu_samples\n"
        "WHERE $__timeFilter(time)\n"
        "    AND $__conditionalAll(cluster IN (${cluster:singlequote}), $cluster)\n"
        "    AND $__conditionalAll(node IN (${node:singlequote}), $node)\n"
        "GROUP BY t"
    )
    variables = {"cluster": all_of(["c1", "c2"]), "node": Var(("n1", "n'2"))}
    assert render(sql, variables, TR) == (
        "SELECT toStartOfInterval(toDateTime(time), INTERVAL 30 second) AS t, count() FROM gpu_samples\n"
        "WHERE time >= toDateTime(1795000000) AND time <= toDateTime(1795003600)\n"
        "    AND 1=1\n"
        "    AND node IN ('n1','n\\'2')\n"
        "GROUP BY t"
    )
