"""A quick look at a few read-path questions while working on them: `python -m bench.probe`.

Builds item 7's histories (bench/read_path.py) at the sizes asked, then times only the panels whose
`board/title` matches `--match`, and on request the alert cycle, `gpufleet usage` and the compared
answers (equal to raw). Figures are indicative (few runs); `python -m bench.run --only read_path` is
the measurement BENCHMARKS.md quotes.

    python -m bench.probe --gpus 1000,4000 --days 1 --match 'jobs/Jobs' --alerts
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from bench import read_path
from bench.panels import time_panels
from bench.timing import Limits


def probe(admin: Any, dsn: str, gpus: int, days: float, args: argparse.Namespace) -> dict[str, Any]:
    limits = Limits(runs=args.runs, budget_s=args.budget_s)
    pattern = re.compile(args.match) if args.match else None
    end_ms = read_path._end_ms(days)
    with read_path.history(admin, dsn, gpus, days, args.interval_ms, end_ms) as h:
        default, whole = read_path._panel_lists(h)
        picked = [p for p in (default if args.range != "whole" else []) + (whole if args.range != "default" else [])
                  if pattern is not None and pattern.search(p.key)]
        out: dict[str, Any] = {"gpus": gpus, "days": days, "interval_ms": args.interval_ms,
                               "history_s": round(h.gen["seconds"], 1),
                               "panels": time_panels(h.client, picked, limits)}
        if args.alerts:
            out["alert_cycle"] = read_path.alert_cycle(h, dsn, limits)
        if args.usage:
            out["usage"] = read_path.usage(h, limits)
        if args.compare:
            out["compared"] = [{k: c[k] for k in ("question", "equal") if k in c}
                               | ({"difference": c["difference"]} if c.get("difference") else {})
                               for c in read_path.compare_all(h, whole)]
    return out


def main(argv: list[str] | None = None) -> int:
    from gpufleet.pipeline.store.client import Target, connect

    ap = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="1000,4000", help="comma-separated fleet sizes")
    ap.add_argument("--days", type=float, default=1.0)
    ap.add_argument("--interval-ms", type=int, default=10_000,
                    help="sample interval (item 7's month history: --days 30 --interval-ms 300000 --usage)")
    ap.add_argument("--match", default="", help="regex on board/title/ref of the panels to time")
    ap.add_argument("--range", choices=("default", "whole", "both"), default="both")
    ap.add_argument("--alerts", action="store_true", help="time one alert cycle")
    ap.add_argument("--usage", action="store_true", help="time gpufleet usage over the history")
    ap.add_argument("--compare", action="store_true", help="every compared answer (slow: raw scans)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=3.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="gpufleet-probe-") as tmp:
        dsn = f"chdb://{Path(tmp) / 'chdb'}"
        admin = connect(Target(dsn, "default"), create=True)
        for gpus in (int(g) for g in args.gpus.split(",")):
            print(json.dumps(probe(admin, dsn, gpus, args.days, args), indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
