"""Which GPU samples change the GPU's health state: the rows `gpu_health_events` keeps (docs/aggregations.md).

The ingester marks every sample with `health_change`, comparing it with the previous sample of the
same GPU it processed (one Kafka partition is one node's, read in order, and each batch is sorted by
sample time, so that is the GPU's previous sample in time):

- `same` (0): same state as the previous sample: not an event;
- `changed` (1): another state: an event;
- `first` (2): no previous sample known to this ingester (it started, or took the node's partition
  over): an event, which a reader keeps only if the state differs from the GPU's previous event;
- `late` (3): not newer than a sample already processed for this GPU (its clock went back): an
  event, and readers recompute that GPU's changes from its raw samples (docs/aggregations.md,
  "Health events").

A reader takes the GPU's events in time order and keeps those whose state differs from the event
before: exactly the changes of the stored samples, because every sample that changes the state is
an event (restated `first` samples are dropped by the same comparison). Rows stored before this
column existed, or written without it, read `first`: more events, never a missed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from gpufleet.wire import NodeReport

SAME: Final = 0
CHANGED: Final = 1
FIRST: Final = 2
LATE: Final = 3
NAMES: Final = ("same", "changed", "first", "late")
"""The `health_change` Enum8 of gpu_samples, by value."""

Last = dict[str, tuple[int, int]]
"""GPU uuid -> (time in Unix ms, state) of the newest sample processed for it."""


def mark(reports: Sequence[NodeReport], health: Sequence[int], last: Last) -> list[int]:
    """`health_change` of every GPU sample of `reports` (in that order, `health` aligned with it),
    reading and updating `last`."""
    out: list[int] = []
    add, seen = out.append, last.get
    i = 0
    for report in reports:
        t = report.time_ms
        for g in report.gpus:
            state = health[i]
            i += 1
            prev = seen(g.uuid)
            if prev is None:
                add(FIRST)
            elif t <= prev[0]:
                add(LATE)
                continue  # the newest sample stays the one later samples compare with
            else:
                add(SAME if state == prev[1] else CHANGED)
            last[g.uuid] = (t, state)
    return out
