"""A fake sysfs tree of InfiniBand/RoCE ports under a test's directory, laid out as Linux lays out
`/sys/class/infiniband/<device>/ports/<port>/` (`Documentation/ABI/stable/sysfs-class-infiniband`),
with the texts the kernel writes there (`4: ACTIVE`, `5: LinkUp`, `400 Gb/sec (4X NDR)`).

`FakePort` holds what a test controls; `write_port` (re)writes one port's files, so a test can flap a
link or raise a counter between two reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STATE_TEXT = {1: "1: DOWN", 2: "2: INIT", 3: "3: ARMED", 4: "4: ACTIVE", 5: "5: ACTIVE_DEFER"}
PHYS_TEXT = {1: "1: Sleep", 2: "2: Polling", 3: "3: Disabled", 4: "4: PortConfigurationTraining", 5: "5: LinkUp",
             6: "6: LinkErrorRecovery", 7: "7: PhyTest"}
COUNTERS = ("link_downed", "link_error_recovery", "symbol_error", "port_rcv_errors", "port_xmit_discards")


@dataclass
class FakePort:
    state: int = 4
    phys_state: int = 5
    rate: str = "400 Gb/sec (4X NDR)"
    link_layer: str = "InfiniBand"
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    """Counter files written; one not listed is absent."""


def port_dir(root: Path, device: str, port: int) -> Path:
    return root / "class" / "infiniband" / device / "ports" / str(port)


def write_port(root: Path, device: str, port: int, spec: FakePort) -> Path:
    """Write one port's files under `root` (the sysfs root); returns the port's directory."""
    path = port_dir(root, device, port)
    (path / "counters").mkdir(parents=True, exist_ok=True)
    (path / "state").write_text(STATE_TEXT[spec.state] + "\n")
    (path / "phys_state").write_text(PHYS_TEXT[spec.phys_state] + "\n")
    (path / "rate").write_text(spec.rate + "\n")
    (path / "link_layer").write_text(spec.link_layer + "\n")
    for name, value in spec.counters.items():
        (path / "counters" / name).write_text(f"{value}\n")
    return path
