"""The ingester's heartbeats: `poll` after every poll of Kafka that returned, `commit` whenever nothing
it read is left uncommitted (after a commit, or while idle). `/healthz` fails once either is older
than its bound (`ingest.poll_stale_s`, `ingest.commit_stale_s`): a loop stuck in a poll, or batches
that ClickHouse keeps refusing, make the ingester unhealthy (docs/deploy.md)."""

from __future__ import annotations

import time
from collections.abc import Callable

from gpufleet.config import IngestConfig
from gpufleet.liveness import Liveness

POLL = "poll"
COMMIT = "commit"


def ingest_liveness(cfg: IngestConfig, clock: Callable[[], float] = time.monotonic) -> Liveness:
    """The two heartbeats, bounded by the config."""
    return Liveness(clock).expect(POLL, cfg.poll_stale_s).expect(COMMIT, cfg.commit_stale_s)
