"""Item 7's views figure alone, several times: `python -m bench.views --runs 5 [--before 110]`.

Runs `bench.ingest.views_cost` (what BENCHMARKS.md item 7 quotes as "insert CPU the views issue 12 added
cost": the JSON staging insert per GPU row with every view against without issue 12's) on item 7's messages
(`read_path.Sizes.views_messages`), `--runs` times, and prints each run's figures and the median and spread.
`--before V` interleaves runs of the schema without migrations V and later (the before of a view change, same
machine state); the figure of each is printed beside the other's. About a minute per run on 2 cores.
`--paired N` instead inserts N batches into each schema in turn (same batches, random order per round) and
prints the minimum and median CPU per GPU row of each: steadier than a run's median of 3 on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import ingest as item
from bench import read_path
from bench.common import fleet_messages


@contextmanager
def schema_before(version: int | None) -> Iterator[None]:
    """Migrations from `version` on left out of `migrate` while inside (None: all of them)."""
    from gpufleet.pipeline.store import migrate

    original = migrate.available
    if version is not None:
        migrate.available = lambda: [m for m in original() if m.version < version]
    try:
        yield
    finally:
        migrate.available = original


def paired(admin: Any, msgs: list[Any], rounds: int, before: int | None) -> dict[str, Any]:
    """Min and median CPU us per GPU row of each schema over `rounds` interleaved inserts (see the docstring)."""
    import random
    import uuid

    from bench.common import cpu_seconds
    from bench.history import views_of
    from gpufleet.pipeline.ingest import staging
    from gpufleet.pipeline.store import Store
    from gpufleet.pipeline.store.migrate import SchemaOptions, migrate

    issue_12 = item.issue_12_views()
    # schema name: (migrations left out from, views dropped; None: every view fed by gpu_samples)
    schemas: dict[str, tuple[int | None, set[str] | None]] = {
        "with_views": (None, set()), "without_issue_12_views": (None, issue_12), "raw_table_only": (None, None)}
    if before is not None:
        schemas["before_with_views"] = (before, set())
    dbs: dict[str, tuple[Any, Any]] = {}
    batches: list[Any] | None = None
    cpu: dict[str, list[float]] = {name: [] for name in schemas}
    try:
        for name, (version, drop) in schemas.items():
            database = f"bench_paired_{uuid.uuid4().hex[:8]}"
            with schema_before(version):
                migrate(admin, SchemaOptions(database=database))
            store = Store(admin, database)
            path = staging.ensure(store)
            for view in views_of(admin, database):
                if not view[2].endswith(".gpu_samples") and (drop is None or view[0] in drop):
                    admin.command(f"DROP VIEW {database}.{view[0]}")
            item.stop_merges(admin, database)
            dbs[name] = (store, path)
            batches = batches or item._batches(path, msgs, rounds)
        for b in batches or []:
            for name in random.sample(list(schemas), len(schemas)):
                store, path = dbs[name]
                c = cpu_seconds()
                staging.insert(store, path, memoryview(b.block))
                cpu[name].append((cpu_seconds() - c) / b.rows * 1e6)
    finally:
        for store, _ in dbs.values():
            admin.command(f"DROP DATABASE IF EXISTS {store.database} SYNC")
    out: dict[str, Any] = {"inserts": rounds, "gpu_rows_per_insert": batches[0].rows if batches else 0}
    for stat in ("min", "median"):
        f = min if stat == "min" else statistics.median
        us = {name: round(f(v), 2) for name, v in cpu.items()}
        out[stat] = us | {f"{name}_extra_pct": round(100 * (us[name] / us["without_issue_12_views"] - 1), 1)
                          for name in ("with_views", "before_with_views") if name in us}
    return out


def _figures(r: dict[str, Any]) -> dict[str, float]:
    return {"with_views_us": round(r["with_views"]["cpu_us_per_row"], 2),
            "without_issue_12_us": round(r["without_issue_12_views"]["cpu_us_per_row"], 2),
            "raw_table_us": round(r["raw_table_only"]["cpu_us_per_row"], 2),
            "issue_12_extra_pct": round(100 * r["issue_12_views_extra_cost"], 1)}


def main(argv: list[str] | None = None) -> int:
    from gpufleet.pipeline.store.client import Target, connect

    ap = argparse.ArgumentParser(prog="python -m bench.views", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--before", type=int, default=None, help="also measure the schema without migrations >= this")
    ap.add_argument("--paired", type=int, default=0, help="N interleaved inserts per schema instead of runs")
    args = ap.parse_args(argv)
    if args.paired:
        with tempfile.TemporaryDirectory(prefix="gpufleet-views-") as tmp:
            admin = connect(Target(f"chdb://{Path(tmp) / 'chdb'}", "default"), create=True)
            per_insert = read_path.Sizes().views_messages // 3  # as views_cost: 3 inserts of item 7's messages
            print(json.dumps(paired(admin, fleet_messages(per_insert * args.paired), args.paired, args.before)))
        return 0
    msgs = fleet_messages(read_path.Sizes().views_messages)
    schemas = {"after": None} | ({"before": args.before} if args.before is not None else {})
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in schemas}
    with tempfile.TemporaryDirectory(prefix="gpufleet-views-") as tmp:
        admin = connect(Target(f"chdb://{Path(tmp) / 'chdb'}", "default"), create=True)
        for i in range(args.runs):
            for name, version in (list(schemas.items()) if i % 2 == 0 else list(schemas.items())[::-1]):
                with schema_before(version):
                    runs[name].append(_figures(item.views_cost(admin, msgs)))
                print(json.dumps({"run": i, "schema": name, **runs[name][-1]}), flush=True)
    for name, rs in runs.items():
        pct = [r["issue_12_extra_pct"] for r in rs]
        print(json.dumps({"schema": name, "issue_12_extra_pct": pct, "median": statistics.median(pct),
                          "min": min(pct), "max": max(pct)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
