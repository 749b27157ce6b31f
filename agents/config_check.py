"""The agent's own start-up checks: what `gpufleet.config_check` cannot know about the agent's sections.

The OTLP receiver's port and export endpoint, the node name and the allocation section (built,
not read: no file is opened). `gpufleet agent` passes these to `validate_startup` as `extra`, so
every problem is named in one go.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from gpufleet.agents.allocation import build_source
from gpufleet.config import Config, ConfigError
from gpufleet.config_check import Problem, port_problems
from gpufleet.dsn import redact


def agent_problems(cfg: Config) -> list[Problem]:
    a = cfg.agent
    out = port_problems("agent.otlp_receiver_port", a.otlp_receiver_port)
    if a.otlp_export_endpoint is not None:
        parts = urlsplit(a.otlp_export_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            out.append(Problem("agent.otlp_export_endpoint", f"{redact(a.otlp_export_endpoint)!r} is not an OTLP/HTTP "
                                                             "URL: use http://collector:4318, or remove the key"))
    if not a.node.strip():
        out.append(Problem("agent.node", "is empty: remove it (the host name is used) or name the node"))
    try:
        build_source(a.allocation)  # constructs only: reads no file
    except ConfigError as exc:
        out.append(Problem("agent.allocation", str(exc)))
    return out
