"""The outside systems the benchmarks compare gpufleet against, found on this machine or named as an error.

`make bench` installs them the way `.ci/run` installs test dependencies (Debian packages, with
`apt-get install` when missing: bench/install-peers.sh); a benchmark that needs one and cannot
find it raises `PeerMissing` with the command that installs it, never reports "not run".
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Final


class PeerMissing(RuntimeError):
    """A peer the benchmark compares against is not installed; the message names the install command."""


@dataclass(frozen=True)
class Peer:
    binary: str
    package: str

    def install_command(self) -> str:
        return f"apt-get install -y {self.package}"


PROMTOOL: Final = Peer("promtool", "prometheus")
VICTORIA_METRICS: Final = Peer("victoria-metrics", "victoria-metrics")


def require(peer: Peer) -> str:
    """The path of `peer`'s binary, or `PeerMissing` naming how to install it."""
    path = shutil.which(peer.binary)
    if path is None:
        raise PeerMissing(f"{peer.binary} is not installed: run `{peer.install_command()}` "
                          "(or `make bench`, which installs the peers it compares against)")
    return path
