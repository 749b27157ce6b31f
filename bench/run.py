"""`python -m bench.run` (what `make bench` runs): every benchmark item, `bench/results.json`, the
results table in BENCHMARKS.md.

    python -m bench.run                       # everything (35 minutes or more on 2 cores; read_path is half)
    python -m bench.run --only ingest,agent   # a subset: ingest, agent, storage, queries, freshness, scaling, read_path
    python -m bench.run --quick               # smaller sizes, for trying the suite (figures not comparable)

Items not selected keep their previous figures in results.json (each carries its own date), so
the file and the table always show the latest run of every item. An item that fails is recorded
as `{"status": "failed", "error": ...}` and the others still run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import model, read_path, report
from bench.common import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
ITEMS = ("ingest", "agent", "storage", "queries", "freshness", "scaling", "read_path")


def _sizes(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {"ingest": {"messages": 8000, "variants": ("optimized", "columns_gc_on")},
                "agent": {"ticks": 100, "realtime_s": 3.0},
                "storage": {"nodes": 2, "hours": 0.5},
                "queries": {"gpus": 200, "days": 0.5, "runs": 3},
                "freshness": {"nodes": 32, "seconds": 25.0, "warmup_s": 8.0},
                "scaling": {"messages": 8000, "process_counts": (1, 2)},
                "read_path": {"sizes": read_path.QUICK, "plot": None}}
    return {"ingest": {"messages": 40_000}, "agent": {}, "storage": {}, "queries": {}, "freshness": {},
            "scaling": {}, "read_path": {}}


def _runners(workdir: Path, dsn: str, sizes: dict[str, dict[str, Any]]) -> dict[str, Callable[[], dict[str, Any]]]:
    def client() -> Any:
        from gpufleet.pipeline.store.client import Target, connect

        return connect(Target(dsn, "default"), create=True)

    def ingest() -> dict[str, Any]:
        from bench import ingest as item

        return item.run(workdir=workdir, dsn=dsn, profile=True, **sizes["ingest"])

    def agent() -> dict[str, Any]:
        from bench import agent as item

        return item.run(**sizes["agent"])

    def storage() -> dict[str, Any]:
        from bench import storage as item

        return item.run(client(), workdir, **sizes["storage"])

    def queries() -> dict[str, Any]:
        from bench import queries as item

        return item.run(dsn, **sizes["queries"])

    def freshness() -> dict[str, Any]:
        from bench import freshness as item

        return item.run(workdir, **sizes["freshness"])

    def scaling() -> dict[str, Any]:
        from bench import scaling as item

        return item.run(workdir / "scaling", **sizes["scaling"])

    def read_path_item() -> dict[str, Any]:
        return read_path.run(dsn, workdir / "read_path", **sizes["read_path"])

    return {"ingest": ingest, "agent": agent, "storage": storage, "queries": queries, "freshness": freshness,
            "scaling": scaling, "read_path": read_path_item}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated items among {', '.join(ITEMS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes (to try the suite; not for the record)")
    parser.add_argument("--workdir", default=str(ROOT / "var" / "bench"), help="scratch space (deleted first)")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--no-markdown", action="store_true", help="do not rewrite the table in BENCHMARKS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    selected = ITEMS if not args.only else tuple(i.strip() for i in args.only.split(",") if i.strip())
    unknown = [i for i in selected if i not in ITEMS]
    if unknown:
        parser.error(f"unknown item(s) {unknown}; choose among {', '.join(ITEMS)}")
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    dsn = f"chdb://{(workdir / 'chdb').resolve()}"
    results_path = Path(args.results)
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["machine"] = machine()
    results["quick"] = args.quick
    runners = _runners(workdir, dsn, _sizes(args.quick))
    for name in selected:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            figures = runners[name]()
            figures["status"] = figures.get("status", "ok")
        except Exception as exc:
            traceback.print_exc()
            figures = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]}
        figures["measured_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        figures["bench_seconds"] = round(time.perf_counter() - started, 1)
        results[name] = figures
        results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"[bench] {name}: {figures['status']} in {figures['bench_seconds']} s", file=sys.stderr, flush=True)
    if not args.no_markdown:
        report.update_markdown(ROOT / "BENCHMARKS.md", results)
        scaling_doc = ROOT / "docs" / "scaling.md"
        if scaling_doc.exists():
            model.update_markdown(scaling_doc, results)
    profile = workdir / "ingest_profile.txt"
    if profile.exists():
        shutil.copy(profile, ROOT / "bench" / "ingest_profile.txt")
    return 0 if all(results.get(i, {}).get("status") == "ok" for i in selected) else 1


if __name__ == "__main__":
    sys.exit(main())
