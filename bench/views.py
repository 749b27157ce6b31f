"""Item 7's views figure alone, several times: `python -m bench.views --runs 5 [--before 110]`.

Runs `bench.ingest.views_cost` (what BENCHMARKS.md item 7 quotes as "insert CPU the views issue 12 added
cost": the JSON staging insert per GPU row with every view against without issue 12's) on item 7's messages
(`read_path.Sizes.views_messages`), `--runs` times, and prints each run's figures and the median and spread.
`--before V` interleaves runs of the schema without migrations V and later (the before of a view change, same
machine state); the figure of each is printed beside the other's. About a minute per run on 2 cores.
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
    args = ap.parse_args(argv)
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
