"""Which GPU samples change the GPU's health state: the rows `gpu_health_events` keeps.

`mark` compares each sample with the GPU's previous sample as processed: `same` (0), `changed` (1),
`first` (2: no previous one known to this ingester) or `late` (3: not newer than one already processed).
Design notes: docs/design-notes.md#pipeline-ingest-transitions-py.
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
