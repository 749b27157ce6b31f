"""gpufleet: GPU-fleet telemetry you can bill from.

The one import name of the distribution. Its parts: `gpufleet.agents` (the node agent),
`gpufleet.pipeline` (ingest, queries, alerts, store), `gpufleet.dashboards` (Grafana) and
`gpufleet.embedded` (the single-machine stack). Jobs use `from gpufleet import report_flops`.
The shared core beside them: the wire contract, configuration, errors, GPU facts and the CLI.
"""

from gpufleet.errors import GpufleetError
from gpufleet.version import __version__

__all__ = ["GpufleetError", "__version__"]
