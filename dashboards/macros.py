"""Expand a panel's SQL exactly as Grafana and the ClickHouse plugin would, so it can run without Grafana.

A query travels three steps before ClickHouse sees it: `$__conditionalAll` and Grafana's variable
interpolation in the browser (`dashboards.templating`), then the plugin's backend macros, ported
here from `pkg/macros/macros.go` (grafana/clickhouse-datasource 4.20) on grafana/macropro: SQL
comments are blanked byte for byte, then every `$__name(...)` is replaced, longest name first.
`render` runs all three. Time ranges are Unix milliseconds, UTC. Only pure functions live here.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gpufleet.dashboards.templating import (
    ALL,
    FORMATS,
    MacroError,
    Var,
    all_of,
    apply_conditional_all,
    interpolate,
    macro_args,
    one,
    seconds_to_hms,
    variable_formats,
    variable_names,
    variable_references,
)

__all__ = [
    "ALL", "FORMATS", "PLUGIN_MACROS", "MacroError", "TimeRange", "Var", "all_of", "apply_conditional_all",
    "builtin_values", "expand_macros", "go_duration_seconds", "interpolate", "macro_args", "one", "render",
    "seconds_to_hms", "strip_comments", "variable_formats", "variable_names", "variable_references",
]


@dataclass(frozen=True)
class TimeRange:
    """The dashboard time range and the panel interval Grafana computed for the query."""

    from_ms: int
    to_ms: int
    interval_ms: int = 1000

    @property
    def interval_s(self) -> int:
        """The plugin's N: whole seconds of the interval, at least 1 (Go `int(math.Max(s, 1))`)."""
        return int(max(self.interval_ms / 1000.0, 1.0))


def builtin_values(time_range: TimeRange) -> dict[str, str]:
    """Grafana's built-in variables that panel queries can use: `$__from`, `$__to`, `$__interval(_ms)`."""
    return {
        "__from": str(time_range.from_ms),
        "__to": str(time_range.to_ms),
        "__interval": seconds_to_hms(time_range.interval_ms / 1000),
        "__interval_ms": str(time_range.interval_ms),
    }


# --- the plugin's backend macros ----------------------------------------------------------------


def _scan_quoted(s: str, pos: int) -> int:
    """ClickHouse quoting ('...', "...", `...`): doubled quote or backslash escape continue it."""
    quote = s[pos]
    i = pos + 1
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            i += 2
        elif s[i] == quote:
            if i + 1 < len(s) and s[i + 1] == quote:
                i += 2
                continue
            return i + 1
        else:
            i += 1
    return len(s)


def _dollar_quote_end(s: str, pos: int) -> int:
    j = pos + 1
    while j < len(s) and s[j] != "$":
        if not (s[j].isascii() and (s[j].isalnum() or s[j] == "_")):
            return -1
        j += 1
    if j >= len(s):
        return -1
    tag = s[pos : j + 1]
    idx = s.find(tag, j + 1)
    return -1 if idx < 0 else idx + len(tag)


def _blank(text: str) -> str:
    return " " * len(text.encode())  # Go blanks byte for byte


def strip_comments(query: str) -> str:
    """Blank `--` and `/* */` comments outside string literals, as macropro does for the plugin."""
    out: list[str] = []
    i = 0
    n = len(query)
    while i < n:
        c = query[i]
        if c in "'\"`":
            j = _scan_quoted(query, i)
            out.append(query[i:j])
            i = j
            continue
        if c == "$":
            end = _dollar_quote_end(query, i)
            if end >= 0:
                out.append(query[i:end])
                i = end
                continue
        if query.startswith("--", i):
            j = i
            while j < n and query[j] not in "\r\n":
                j += 1
            out.append(_blank(query[i:j]))
            i = j
            continue
        if query.startswith("/*", i):
            end = query.find("*/", i + 2)
            j = n if end < 0 else end + 2
            out.append(_blank(query[i:j]))
            i = j
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _simple_literal_end(s: str, pos: int) -> int:
    """macropro's `scanStringLiteral`: doubled-quote escapes only."""
    quote = s[pos]
    j = pos + 1
    while j < len(s):
        if s[j] == quote:
            if j + 1 < len(s) and s[j + 1] == quote:
                j += 2
                continue
            return j + 1
        j += 1
    return j


def _closing_paren(s: str, open_: int) -> int:
    depth = 0
    i = open_
    while i < len(s):
        c = s[i]
        if c in "'\"":
            i = _simple_literal_end(s, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _parse_args(raw: str) -> list[str]:
    raw = raw.strip()
    if not raw:
        return []
    args: list[str] = []
    depth = 0
    start = 0
    i = 0
    while i < len(raw):
        c = raw[i]
        if c in "'\"":
            i = _simple_literal_end(raw, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            if depth == 0:
                raise MacroError(f"unexpected ')' at position {i}")
            depth -= 1
        elif c == "," and depth == 0:
            args.append(raw[start:i].strip())
            start = i + 1
        i += 1
    if depth != 0:
        raise MacroError("unbalanced parentheses in arguments")
    args.append(raw[start:].strip())
    return args


def _to_datetime(ms: int) -> str:
    return f"toDateTime({ms // 1000})"


def _to_datetime64(ms: int) -> str:
    return f"fromUnixTimestamp64Milli({ms})"


def _to_date(ms: int) -> str:
    day = dt.datetime.fromtimestamp(ms // 1000, tz=dt.UTC).strftime("%Y-%m-%d")
    return f"toDate('{day}')"


def _want(name: str, args: list[str], count: int) -> None:
    if len(args) != count:
        raise MacroError(f"argument count mismatch: ${name} expected {count} argument(s), received {len(args)}")


_GO_DURATION = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration_seconds(text: str) -> float:
    """Go's `time.ParseDuration` in seconds ('5m', '1h30m', '1.5s')."""
    body = text.lstrip("+-")
    sign = -1.0 if text.startswith("-") else 1.0
    if body == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(body):
        m = _GO_DURATION.match(body, pos)
        if m is None:
            break
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    if not body or pos != len(body):
        raise MacroError(f'time: invalid duration "{text}"')
    return sign * total


def _go_round(x: float) -> int:
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def format_duration(ms: int) -> str:
    """macropro's `FormatDuration` (the backend's own `$__interval`)."""
    if ms == 0:
        return "0s"
    ms = abs(ms)
    for size, unit in ((3_600_000, "h"), (60_000, "m"), (1000, "s")):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _macro_table(tr: TimeRange) -> dict[str, Callable[[list[str]], str]]:
    f, t = tr.from_ms, tr.to_ms

    def time_filter(a: list[str]) -> str:
        _want("__timeFilter", a, 1)
        return f"{a[0]} >= {_to_datetime(f)} AND {a[0]} <= {_to_datetime(t)}"

    def time_filter_ms(a: list[str]) -> str:
        _want("__timeFilter_ms", a, 1)
        return f"{a[0]} >= {_to_datetime64(f)} AND {a[0]} <= {_to_datetime64(t)}"

    def date_filter(a: list[str]) -> str:
        _want("__dateFilter", a, 1)
        return f"{a[0]} >= {_to_date(f)} AND {a[0]} <= {_to_date(t)}"

    def date_time_filter(a: list[str]) -> str:
        _want("__dateTimeFilter", a, 2)
        d, c = a
        return (
            f"({d} >= {_to_date(f)} AND {d} <= {_to_date(t)}) AND "
            f"({c} >= {_to_datetime(f)} AND {c} <= {_to_datetime(t)})"
        )

    def time_interval(a: list[str]) -> str:
        _want("__timeInterval", a, 1)
        return f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {tr.interval_s} second)"

    def time_interval_ms(a: list[str]) -> str:
        _want("__timeInterval_ms", a, 1)
        return f"toStartOfInterval(toDateTime64({a[0]}, 3), INTERVAL {int(max(tr.interval_ms, 1))} millisecond)"

    def time_from(a: list[str]) -> str:
        _want("__timeFrom", a, 1)
        return f"{a[0]} >= {_to_datetime(f)}"

    def time_to(a: list[str]) -> str:
        _want("__timeTo", a, 1)
        return f"{a[0]} <= {_to_datetime(t)}"

    def time_group(a: list[str]) -> str:
        _want("__timeGroup", a, 2)
        period = a[1].strip().strip("'\"")
        secs = _go_round(go_duration_seconds(period))
        if secs <= 0:
            raise MacroError(f'$__timeGroup: interval must be positive, got "{period}"')
        return f"toStartOfInterval(toDateTime({a[0].strip()}), INTERVAL {secs} second)"

    def no_context(name: str) -> Callable[[list[str]], str]:
        def fail(_: list[str]) -> str:
            raise MacroError(f"${name}: no {name.removeprefix('__')} name in query context")

        return fail

    return {
        "interval": lambda _: format_duration(tr.interval_ms),
        "interval_ms": lambda _: str(tr.interval_ms),
        "timeFilter": time_filter,
        "timeFrom": time_from,
        "timeTo": time_to,
        "timeGroup": time_group,
        "table": no_context("__table"),
        "column": no_context("__column"),
        "fromTime": lambda _: _to_datetime(f),
        "toTime": lambda _: _to_datetime(t),
        "fromTime_ms": lambda _: _to_datetime64(f),
        "toTime_ms": lambda _: _to_datetime64(t),
        "timeFilter_ms": time_filter_ms,
        "dateFilter": date_filter,
        "dateTimeFilter": date_time_filter,
        "dt": date_time_filter,
        "timeInterval": time_interval,
        "timeInterval_ms": time_interval_ms,
        "interval_s": lambda _: str(tr.interval_s),
    }


PLUGIN_MACROS: frozenset[str] = frozenset(_macro_table(TimeRange(0, 0)))
"""Every macro the plugin's backend expands (without the `$__` prefix)."""

STATEMENT_MACROS = ("columns", "rateColumns", "perSecondColumns", "increaseColumns", "lttb")
_STATEMENT_RE = re.compile(r"\$__(" + "|".join(STATEMENT_MACROS) + r")\(")


def _is_name_char(c: str) -> bool:
    return c == "_" or (c.isascii() and c.isalnum())


def expand_macros(query: str, time_range: TimeRange) -> str:
    """The plugin backend's `macros.Interpolate`: blank comments, then expand `$__name(...)`, longest first."""
    if m := _STATEMENT_RE.search(query):
        raise MacroError(f"statement macro $__{m.group(1)} is not supported by this expander; write the SQL out")
    table = _macro_table(time_range)
    result = strip_comments(query)
    for name in sorted(table, key=lambda n: (-len(n), n)):
        token = "$__" + name
        out: list[str] = []
        s = result
        while True:
            idx = s.find(token)
            if idx < 0:
                out.append(s)
                break
            after = idx + len(token)
            if after < len(s) and _is_name_char(s[after]):
                out.append(s[:after])
                s = s[after:]
                continue
            out.append(s[:idx])
            s = s[after:]
            raw = ""
            if s.startswith("("):
                end = _closing_paren(s, 0)
                if end >= 0:
                    raw, s = s[1:end], s[end + 1 :]
            try:
                out.append(table[name](_parse_args(raw)))
            except MacroError as exc:
                raise MacroError(f"macro {token}({raw}): {exc}") from None
        result = "".join(out)
    return result


def render(query: str, variables: Mapping[str, Var], time_range: TimeRange) -> str:
    """All three steps: the SQL the ClickHouse server receives for this panel query."""
    query = apply_conditional_all(query, variables)
    query = interpolate(query, variables, builtin_values(time_range))
    return expand_macros(query, time_range)
