"""No dashboard variable value can change a query's structure, whatever its characters.

Grafana's `${v:singlequote}` escapes `'` but not backslashes, and a value need not come from the
variable's query: Grafana keeps one set in the URL (`var-tenant=...`) or typed as a custom value.
The boards give each query variable hex values and read them through `'${v:percentencode}'`
(`dashboards.fragments.selected`). Checked here on chDB: the decoding gives back exactly the
strings; every query of every board, rendered as Grafana renders it with each hostile string as
every variable's value, has the token structure ClickHouse sees with a plain value
(`normalizeQuery`: literals become `?`) and runs; the `${v:singlequote}` filter fails that same
check; and the links to the GPU board carry the value its `gpu` variable lists for that GPU.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from gpufleet.dashboards import fragments as f
from gpufleet.dashboards.definitions import BOARDS
from gpufleet.dashboards.macros import TimeRange, Var, render
from gpufleet.dashboards.queries import panel_queries, panel_range, resolve_variables, run
from tests.dashboards import fleet_data as fd
from tests.dashboards.conftest import Fleet, committed, hexed
from tests.security import HOSTILE

WHOLE = TimeRange(fd.START_MS, fd.END_MS, 60_000)
INJECTION = "x\\') OR 1=1 --"
"""Through `${tenant:singlequote}`: `'x\\\\') OR 1=1 --'`, the literal `x\\` then `) OR 1=1`."""


def shapes(fleet: Fleet, queries: list[str]) -> list[str]:
    """Each query as ClickHouse's lexer sees it, literals replaced by `?` (one round trip)."""
    r = fleet.client.query("SELECT arrayMap(q -> normalizeQuery(q), {qs:Array(String)})", parameters={"qs": queries})
    return list(r.result_rows[0][0])


def query_variables(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in board["templating"]["list"] if v["type"] == "query"]


def every_query(board: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(SQL, panel min interval) of every variable query and panel query of the board."""
    return ([(v["query"]["rawSql"], None) for v in query_variables(board)]
            + [(q.raw_sql, q.min_interval) for q in panel_queries(board)])


def rendered(board: dict[str, Any], values: tuple[str, ...]) -> list[str]:
    """Every query as Grafana would send it with every variable set to `values` (custom values,
    not among the options, as a URL or the picker's custom value sets them)."""
    variables = {v["name"]: Var(values if v.get("multi") else values[0]) for v in query_variables(board)}
    return [render(sql, variables, panel_range(fd.START_MS, fd.END_MS, interval))
            for sql, interval in every_query(board)]


def test_selected_gives_back_exactly_the_strings(fleet: Fleet) -> None:
    strings = (*HOSTILE, "", "a,b", "{braces}")
    cases = [
        (Var(tuple(hexed(s) for s in strings)), list(strings)),  # a multi-value selection (or All)
        (Var((hexed("back\\slash\\"),)), ["back\\slash\\"]),  # one value of a multi-value variable
        (Var(hexed(INJECTION)), [INJECTION]),  # a single-value variable (the GPU board's `gpu`)
    ]
    for var, want in cases:
        sql = render(f"SELECT {f.selected('v')} AS got", {"v": var}, WHOLE)
        assert run(fleet.client, sql).rows == [(want,)]


@pytest.mark.parametrize("uid", [b.uid for b in BOARDS])
def test_no_value_changes_any_querys_structure(fleet: Fleet, uid: str) -> None:
    board = committed(uid)
    plain = shapes(fleet, rendered(board, ("plain",)))
    assert len(plain) == len(every_query(board))
    for hostile in HOSTILE:
        assert shapes(fleet, rendered(board, (hostile,))) == plain, repr(hostile)
    assert shapes(fleet, rendered(board, HOSTILE)) == plain  # all of them at once, in one selection


@pytest.mark.parametrize("uid", [b.uid for b in BOARDS])
def test_every_query_runs_with_hostile_custom_values(fleet: Fleet, uid: str) -> None:
    """They run, and match no tenant: no string here is a real value's hex."""
    for values in ((INJECTION,), ("back\\slash\\",), HOSTILE):
        for sql in rendered(committed(uid), values):
            r = run(fleet.client, sql)
            if "tenant" in r.columns:
                assert [row for row in r.rows if row[r.columns.index("tenant")]] == [], sql


def test_the_singlequote_filter_fails_the_same_check(fleet: Fleet) -> None:
    """The check has teeth: `${tenant:singlequote}` with the injection is another query."""
    old = "SELECT count() FROM gpu_samples WHERE $__conditionalAll(tenant IN (${tenant:singlequote}), $tenant)"
    sent = render(old, {"tenant": Var((INJECTION,))}, WHOLE)
    # the literal is `x\`, then `) OR 1=1`, and the plugin's backend blanks the rest as a comment
    assert sent == "SELECT count() FROM gpu_samples WHERE tenant IN ('x\\\\') OR 1=1 " + " " * len("--')")
    assert shapes(fleet, [sent])[0] != shapes(fleet, [render(old, {"tenant": Var(("plain",))}, WHOLE)])[0]


def test_links_to_the_gpu_board_carry_its_variables_value(fleet: Fleet) -> None:
    """Every data link to the GPU board passes, from a hidden column, the hex the `gpu` variable lists."""
    gpu_board = committed("gpufleet-gpu")
    listed = resolve_variables(fleet.client, gpu_board, WHOLE)["gpu"].options
    checked = 0
    for b in BOARDS:
        board = committed(b.uid)
        values = resolve_variables(fleet.client, board, WHOLE)
        panels = {p["id"]: p for p in board["panels"]}
        for q in panel_queries(board):
            overrides = panels[q.panel_id]["fieldConfig"]["overrides"]
            props = {(o["matcher"]["options"], p["id"]): p["value"] for o in overrides for p in o["properties"]}
            for (column, prop), value in props.items():
                if prop != "links" or "/d/gpufleet-gpu/" not in value[0]["url"]:
                    continue
                m = re.fullmatch(r"/d/gpufleet-gpu/gpu-detail\?var-gpu=\$\{__data\.fields\.(\w+)\}"
                                 r"&\$\{__url_time_range\}", value[0]["url"])
                assert m, value[0]["url"]
                key = m.group(1)
                assert props.get((key, "custom.hidden")) is True, f"{b.uid} panel {q.panel_id}: show {key}?"
                r = run(fleet.client, render(q.raw_sql, values, panel_range(fd.START_MS, fd.END_MS, None)))
                for row in r.rows:
                    uuid, link = row[r.columns.index(column)], row[r.columns.index(key)]
                    assert link == hexed(uuid)
                    if uuid:
                        assert link in listed, uuid
                        checked += 1
    assert checked > 0
    # Opened from such a link, the GPU board holds the same value as when the GPU is picked by name.
    picked = resolve_variables(fleet.client, gpu_board, WHOLE, {"gpu": fleet.data.focus_gpu_uuid})["gpu"]
    assert picked.value == hexed(fleet.data.focus_gpu_uuid)
