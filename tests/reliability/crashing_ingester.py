"""An ingester child process that SIGKILLs itself at an exact point of its first batch.

    python -m tests.reliability.crashing_ingester CONFIG insert:N | commit:N

`insert:N` dies as the N-th write of data to ClickHouse starts (1 = agent_reports, 2 = the GPU rows;
the batch's entry in the ledger, written before them, is not counted); `commit:N` dies as the N-th
offset commit starts, after the batch is stored. Everything else is the real ingester, consumer and
store; only the moment of death is chosen.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from gpufleet.config import load
from gpufleet.pipeline.ingest.consumer import build_consumer, build_ingester
from gpufleet.pipeline.queries.policy import sync_policy
from gpufleet.pipeline.store import Store
from gpufleet.pipeline.store.client import Target, connect
from gpufleet.pipeline.store.migrate import SchemaOptions, migrate


class _Tripwire:
    def __init__(self, target: Any, names: tuple[str, ...], at: int) -> None:
        self._target, self._names, self._at, self.calls = target, names, at, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name not in self._names:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if args and str(args[0]).endswith(".ingest_batches"):
                return attr(*args, **kwargs)
            self.calls += 1
            if self.calls == self._at:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return attr(*args, **kwargs)

        return call


def main(config_path: str, point: str) -> None:
    cfg = load(config_path)
    what, _, n = point.partition(":")
    client = connect(Target(cfg.clickhouse.dsn, cfg.clickhouse.database), create=True)
    migrate(client, SchemaOptions(database=cfg.clickhouse.database))
    sync_policy(Store(client, cfg.clickhouse.database), cfg.billing, 0)
    consumer: Any = build_consumer(cfg)
    if what == "insert":
        client = _Tripwire(client, ("insert", "raw_insert"), int(n))
    elif what == "commit":
        consumer = _Tripwire(consumer, ("commit",), int(n))
    else:
        raise SystemExit(f"unknown kill point {point!r}: use insert:N or commit:N")
    build_ingester(cfg, Store(client, cfg.clickhouse.database), consumer=consumer).run(threading.Event())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
