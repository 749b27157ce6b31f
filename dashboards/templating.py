"""The browser side of a Grafana query: `$__conditionalAll` and variable interpolation, ported from source.

Design notes: docs/design-notes.md#dashboards-templating-py.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

ALL = "$__all"
"""The value Grafana stores for a variable set to All."""


class MacroError(ValueError):
    """A macro or variable could not be expanded; the message says which and why."""


@dataclass(frozen=True)
class Var:
    """A dashboard variable's current state as Grafana holds it (`value` is `ALL` or `(ALL,)` for All)."""

    value: str | tuple[str, ...]
    options: tuple[str, ...] = ()
    """Every option value the variable's query returned (what All stands for)."""
    all_value: str | None = None
    """The variable's custom all value (`allValue`), if set."""
    label: str | tuple[str, ...] | None = None
    """The current selection's display text (Grafana's `current.text`); None: the same as `value`."""

    @property
    def is_all(self) -> bool:
        v = self.value
        return v == ALL or (isinstance(v, tuple) and bool(v) and v[0] == ALL)

    def legacy_string(self) -> str:
        """`current.value.toString()` in JavaScript: a list joins with ','."""
        return ",".join(self.value) if isinstance(self.value, tuple) else self.value

    def text(self) -> str:
        """`getValueText()`: "All", else the selection's text, a list joined with ' + '."""
        if self.is_all:
            return "All"
        shown = self.value if self.label is None else self.label
        return " + ".join(shown) if isinstance(shown, tuple) else shown


def all_of(options: tuple[str, ...] | list[str], multi: bool = True) -> Var:
    """A variable set to All over `options`."""
    return Var((ALL,) if multi else ALL, tuple(options))


def one(value: str, multi: bool = True) -> Var:
    """A variable set to one concrete value (a one-element list when the variable is multi-value)."""
    return Var((value,) if multi else value, (value,))


# --- step 1: $__conditionalAll (the plugin's browser code) ---------------------------------------

_CONDITIONAL_ALL = "$__conditionalAll("
_COND_VAR_RE = re.compile(r"(?<=\$\{)[\w\d]+(?=\})|(?<=\$)[\w\d]+", re.ASCII)
_MACRO_ARG_TOKENS = re.compile(r"\(|\)|,")


def macro_args(query: str, args_index: int) -> list[str]:
    """Port of `getMacroArgs`: split the argument list opening at `args_index` on depth-1 commas."""
    args: list[str] = []
    depth = 0
    last_end = 1
    sub = query[args_index:]
    for m in _MACRO_ARG_TOKENS.finditer(sub):
        found = m.group(0)
        if found == "(":
            depth += 1
        elif found == ")":
            depth -= 1
        if found == "," and depth == 1:
            args.append(sub[last_end : m.end() - 1])
            last_end = m.end()
        if depth == 0:
            args.append(sub[last_end : m.end() - 1])
            return args
    return []


def _js_replace_first(text: str, pattern: str, replacement: str) -> str:
    """JavaScript `text.replace(pattern, replacement)` for a string pattern, `$` specials included."""
    pos = text.find(pattern)
    if pos < 0:
        return text
    out: list[str] = []
    i = 0
    while i < len(replacement):
        c = replacement[i]
        nxt = replacement[i + 1] if i + 1 < len(replacement) else ""
        if c == "$" and nxt in "$&`'" and nxt:
            out.append({"$": "$", "&": pattern, "`": text[:pos], "'": text[pos + len(pattern) :]}[nxt])
            i += 2
            continue
        out.append(c)
        i += 1
    return text[:pos] + "".join(out) + text[pos + len(pattern) :]


def apply_conditional_all(query: str, variables: Mapping[str, Var]) -> str:
    """`$__conditionalAll(cond, $var)` -> `cond`, or `1=1` when `$var` is empty or All (browser-side)."""
    if not query:
        return query
    index = query.rfind(_CONDITIONAL_ALL)
    guard = 0
    while index != -1:
        guard += 1
        if guard > 10_000:
            raise MacroError("$__conditionalAll does not terminate: its condition contains the macro again")
        params = macro_args(query, index + len(_CONDITIONAL_ALL) - 1)
        if len(params) != 2:
            return query
        phrase = params[0]
        found = _COND_VAR_RE.search(params[1].strip())
        if found:
            var = variables.get(found.group(0))
            if var is not None and var.legacy_string() in ("", ALL):
                phrase = "1=1"
        query = _js_replace_first(query, f"{_CONDITIONAL_ALL}{params[0]},{params[1]})", phrase)
        index = query.rfind(_CONDITIONAL_ALL)
    return query


# --- step 2: Grafana variable interpolation ------------------------------------------------------

VARIABLE_RE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}", re.ASCII
)
"""Grafana's `VARIABLE_REGEX` (grafana/scenes `variables/constants.ts`)."""

Value = str | list[str]


def _plugin_format(value: Value) -> str:
    """The ClickHouse plugin's default formatter (`CHDatasource.format`)."""
    if isinstance(value, list):
        return "'" + "','".join(value) + "'"
    return value


def _quote(value: Value, quote: str, escaped: str) -> str:
    if isinstance(value, list):
        return ",".join(quote + v.replace(quote, escaped) + quote for v in value)
    return quote + value.replace(quote, escaped) + quote


def _sqlstring(value: Value) -> str:
    def one_(v: str) -> str:
        return "'" + v.replace("'", "''").replace('"', '\\"') + "'"

    return ",".join(one_(v) for v in value) if isinstance(value, list) else one_(value)


def _joined(sep: str) -> Callable[[Value], str]:
    return lambda value: sep.join(value) if isinstance(value, list) else value


def _glob(value: Value) -> str:
    if isinstance(value, list):
        return "{" + ",".join(value) + "}" if len(value) > 1 else ",".join(value)
    return value


def _json(value: Value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def encode_uri_component_strict(text: str) -> str:
    """Grafana's `encodeURIComponentStrict`: `encodeURIComponent` (UTF-8, upper-case `%XX`) that also
    encodes `!'()*`, so only `A-Z a-z 0-9 - _ . ~` and `%` remain."""
    try:
        return urllib.parse.quote(text, safe="", encoding="utf-8", errors="strict")
    except UnicodeEncodeError as exc:  # JavaScript throws URIError on a lone surrogate
        raise MacroError(f"percentencode: {text!r} is not valid Unicode (URIError in Grafana)") from exc


def _percentencode(value: Value) -> str:
    """`percentencode`: like glob, but URL-escaped; a list is always `{a,b}` (braces even for one)."""
    if isinstance(value, list):
        return encode_uri_component_strict("{" + ",".join(value) + "}")
    return encode_uri_component_strict(value)


_FORMATS: dict[str, Callable[[Value], str]] = {
    "raw": _joined(","),
    "csv": _joined(","),
    "pipe": _joined("|"),
    "glob": _glob,
    "json": _json,
    "singlequote": lambda v: _quote(v, "'", "\\'"),
    "doublequote": lambda v: _quote(v, '"', '\\"'),
    "sqlstring": _sqlstring,
    "percentencode": _percentencode,
}
FORMATS: frozenset[str] = frozenset({*_FORMATS, "text", "date", "join"})
"""Formats this expander implements (Grafana has a few more: regex, lucene, queryparam...)."""

_GRAFANA_ONLY_FORMATS = frozenset(
    {"regex", "lucene", "queryparam", "customqueryparam", "distributed", "html", "uriencode"}
)


def _date(value: Value, args: list[str]) -> str:
    ms = int(value if isinstance(value, str) else value[0])
    arg = args[0] if args else "iso"
    if arg == "ms":
        return str(ms)
    if arg == "seconds":
        return str(round(ms / 1000))
    if arg == "iso":
        return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    raise MacroError(f"date format {arg!r} is not supported here; use ms, seconds or iso")


def _format(name: str, var: Var | None, value: Value, fmt: str | None) -> str:
    if fmt is None:
        return _plugin_format(value)
    fmt_name, *args = fmt.split(":")
    if fmt_name == "text":
        return var.text() if var is not None else (value if isinstance(value, str) else ",".join(value))
    if fmt_name == "date":
        return _date(value, args)
    if fmt_name == "join":
        return (args[0] if args else ",").join(value) if isinstance(value, list) else value
    if fmt_name in _GRAFANA_ONLY_FORMATS:
        raise MacroError(f"variable ${{{name}:{fmt}}}: format {fmt_name!r} is not supported by this expander")
    return _FORMATS.get(fmt_name, _glob)(value)  # Grafana falls back to glob for an unknown format


def seconds_to_hms(seconds: float) -> str:
    """Grafana's `rangeUtil.secondsToHms`: the `$__interval` text ('1m', '30s', '500ms')."""
    parts = (
        (math.floor(seconds / 31536000), "y"),
        (math.floor((seconds % 31536000) / 86400), "d"),
        (math.floor(((seconds % 31536000) % 86400) / 3600), "h"),
        (math.floor((((seconds % 31536000) % 86400) % 3600) / 60), "m"),
        (math.floor((((seconds % 31536000) % 86400) % 3600) % 60), "s"),
    )
    for count, unit in parts:
        if count:
            return f"{count}{unit}"
    ms = math.floor(seconds * 1000.0)
    return f"{ms}ms" if ms else "less than a millisecond"

def interpolate(query: str, variables: Mapping[str, Var], builtins: Mapping[str, str] | None = None) -> str:
    """Grafana's `templateSrv.replace(query, scopedVars, plugin.format)`; unknown names stay as written."""
    builtins = builtins or {}

    def replace(m: re.Match[str]) -> str:
        var1, var2, fmt2, var3, field_path, fmt3 = m.groups()
        name = var1 or var2 or var3
        fmt = fmt2 or fmt3
        if field_path:
            raise MacroError(f"variable {m.group(0)}: field paths are not supported by this expander")
        var = variables.get(name)
        if var is None:
            if name in builtins:
                return _format(name, None, builtins[name], fmt)
            return m.group(0)
        if var.is_all:
            if var.all_value is not None:
                # CustomAllValue: used as written (then interpolated again), whatever the format
                return "All" if fmt == "text" else interpolate(var.all_value, variables, builtins)
            value: Value = list(var.options)
        else:
            value = list(var.value) if isinstance(var.value, tuple) else var.value
        return _format(name, var, value, fmt)

    return VARIABLE_RE.sub(replace, query)


def variable_names(text: str) -> list[str]:
    """Names of every variable reference (`$x`, `${x}`, `${x:fmt}`, `[[x]]`) in `text`, in order."""
    return [m.group(1) or m.group(2) or m.group(4) for m in VARIABLE_RE.finditer(text)]


def variable_formats(text: str) -> list[tuple[str, str]]:
    """(name, format) for every reference with an explicit format."""
    out = []
    for m in VARIABLE_RE.finditer(text):
        fmt = m.group(3) or m.group(6)
        if fmt:
            out.append((m.group(2) or m.group(4), fmt))
    return out


def variable_references(text: str) -> list[tuple[str, str | None, int, str]]:
    """(name, format or None, offset, the reference as written) for every variable reference in `text`."""
    return [(m.group(1) or m.group(2) or m.group(4), m.group(3) or m.group(6), m.start(), m.group(0))
            for m in VARIABLE_RE.finditer(text)]
