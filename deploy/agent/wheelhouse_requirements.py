"""Write `requirements.txt` for a wheelhouse: every wheel in it, pinned by version and SHA-256.

`install.sh --wheelhouse DIR` installs with `pip install --no-index --find-links DIR --require-hashes
-r DIR/requirements.txt`: nothing from an index, nothing whose bytes differ from what was built.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def requirement(wheel: Path) -> str:
    """`name==version --hash=sha256:...` from a wheel's file name (PEP 427) and bytes."""
    name, version = wheel.name.split("-")[:2]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return f"{name}=={version} --hash=sha256:{digest}"


def main(folder: str) -> None:
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        sys.exit(f"no wheels in {folder}")
    (Path(folder) / "requirements.txt").write_text("".join(requirement(w) + "\n" for w in wheels))


if __name__ == "__main__":
    main(sys.argv[1])
