"""The node's InfiniBand and RoCE ports, read from sysfs: state, physical state, rate and error counters.

Reads `<root>/class/infiniband/<device>/ports/<port>/` (`state`, `phys_state`, `rate`, `link_layer`,
`counters/<name>`) under a root that defaults to `/sys` and that tests point at a fake tree. Failures
stay local: a file that cannot be read or parsed is null for that port (logged once), a port that
vanished is left out, a node without the class directory has no ports. Design notes:
docs/design-notes.md#agents-collectors-infiniband-py.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from gpufleet.node_facts import PORT_ERROR_COUNTERS
from gpufleet.wire import NetworkPort

log = logging.getLogger(__name__)

CLASS_DIR: Final = Path("class/infiniband")
_LEADING_NUMBER: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)")


def parse_code(text: str) -> float | None:
    """`"4: ACTIVE"` -> 4 (the number sysfs puts before the name); None if there is none or it is over 255."""
    m = _LEADING_NUMBER.match(text)
    if m is None or "." in m.group(1) or int(m.group(1)) > 0xFF:
        return None
    return int(m.group(1))


def parse_rate(text: str) -> float | None:
    """`"400 Gb/sec (4X NDR)"` -> 400.0, `"2.5 Gb/sec (1X SDR)"` -> 2.5 (Gbit/s)."""
    m = _LEADING_NUMBER.match(text)
    if m is None or "Gb/sec" not in text or float(m.group(1)) > 1e6:
        return None
    return float(m.group(1))


class SysfsPorts:
    """Reads every port of every RDMA device under `<root>/class/infiniband` (the agent's `NetworkSource`)."""

    def __init__(self, root: Path | str = "/sys") -> None:
        self.base = Path(root) / CLASS_DIR
        self._bad: set[Path] = set()
        self._absent_logged = False

    def read(self) -> list[NetworkPort]:
        """The ports now, by device name and port number."""
        try:
            devices = sorted(p for p in self.base.iterdir() if p.is_dir())
        except FileNotFoundError:
            if not self._absent_logged:
                self._absent_logged = True
                log.info("no RDMA devices (%s does not exist): no network ports are reported", self.base)
            return []
        except OSError as exc:
            self._once(self.base, exc)
            return []
        out: list[NetworkPort] = []
        for device in devices:
            out.extend(self._device_ports(device))
        return out

    def _device_ports(self, device: Path) -> list[NetworkPort]:
        try:
            ports = [p for p in (device / "ports").iterdir() if p.name.isdigit()]
        except OSError:
            return []  # the device went away between listing and reading, or has no ports
        found = (self._port(device.name, p) for p in sorted(ports, key=lambda p: int(p.name)))
        return [p for p in found if p is not None]

    def _port(self, device: str, path: Path) -> NetworkPort | None:
        if not path.is_dir():
            return None
        state, phys, rate, layer = (self._text(path / n) for n in ("state", "phys_state", "rate", "link_layer"))
        counters = {name: self._count(path / "counters" / name) for name in PORT_ERROR_COUNTERS}
        return NetworkPort(
            device=device, port=int(path.name), link_layer=layer or None,
            state=self._parsed(path / "state", state, parse_code),
            phys_state=self._parsed(path / "phys_state", phys, parse_code),
            rate_gbps=self._parsed(path / "rate", rate, parse_rate),
            **counters,
        )

    def _text(self, path: Path) -> str | None:
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._once(path, exc)
            return None

    def _count(self, path: Path) -> int | None:
        text = self._text(path)
        if text is None:
            return None
        if not text.isdigit() or int(text) > 0x7FFF_FFFF_FFFF_FFFF:
            self._once(path, ValueError(f"not a count: {text[:40]!r}"))
            return None
        return int(text)

    def _parsed(self, path: Path, text: str | None, parse: Callable[[str], float | None]) -> Any:
        if text is None:
            return None
        value = parse(text)
        if value is None:
            self._once(path, ValueError(f"cannot parse {text[:40]!r}"))
        return value

    def _once(self, path: Path, exc: Exception) -> None:
        if path not in self._bad:
            self._bad.add(path)
            log.warning("cannot read %s (%s); reported as null", path, exc)
