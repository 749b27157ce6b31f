"""Build the self-contained agent artifact: one executable carrying Python and the agent's dependencies.

Run by `make agent-artifact` with the interpreter of a build virtualenv that holds the agent-only
install (no pipeline extras) and PyInstaller. Writes, under `dist/`:

    gpufleet-agent-<version>-linux-<arch>          the executable (`gpufleet` with the agent commands)
    gpufleet-agent-<version>-linux-<arch>.sha256   `sha256sum` format; install.sh checks it
    gpufleet-agent-<version>-linux-<arch>.json     version, arch, sha256 and the glibc it needs

The glibc floor is measured, not assumed: the highest `GLIBC_x.y` symbol version any ELF file in
the bundle requires (objdump -T). A node whose glibc is older cannot run it; install.sh refuses.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEEP_OUT = ("gpufleet.pipeline", "gpufleet.embedded", "gpufleet.dashboards", "chdb", "clickhouse_connect",
            "pandas", "pyarrow", "numpy", "tkinter")
"""The agent never imports these (README: the agent installs light)."""


def artifact_name(version: str, arch: str) -> str:
    return f"gpufleet-agent-{version}-linux-{arch}"


def pyinstaller_args(name: str, dist: Path, work: Path) -> list[str]:
    args = ["--onefile", "--noconfirm", "--clean", "--name", name, "--distpath", str(dist),
            "--workpath", str(work), "--specpath", str(work),
            # `gpufleet.cli` loads subcommands by name: name the agent's modules for the analysis.
            "--hidden-import", "gpufleet.agents.command", "--collect-submodules", "gpufleet.agents",
            "--hidden-import", "gpufleet.schema_cmd"]
    for module in KEEP_OUT:
        args += ["--exclude-module", module]
    return [*args, str(ROOT / "deploy" / "agent" / "entry.py")]


def glibc_floor(executable: Path) -> str:
    """The highest glibc symbol version required by any ELF in the one-file bundle (and its bootloader)."""
    from PyInstaller.archive.readers import CArchiveReader

    worst = _glibc_versions(executable)
    archive = CArchiveReader(str(executable))
    with tempfile.TemporaryDirectory() as tmp:
        for name in archive.toc:
            if name.endswith(".so") or ".so." in name:
                path = Path(tmp) / name.replace("/", "_")
                path.write_bytes(archive.extract(name))
                worst = max(worst, _glibc_versions(path))
    return ".".join(map(str, worst))


def _glibc_versions(path: Path) -> tuple[int, ...]:
    out = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, check=False).stdout
    versions = [tuple(int(x) for x in v.split(".")) for v in re.findall(r"GLIBC_(\d+\.\d+(?:\.\d+)?)", out)]
    return max(versions, default=(0,))


def main() -> None:
    import PyInstaller.__main__

    from gpufleet.version import __version__  # the installed package (never the source tree: no gpufleet.agents)

    arch = platform.machine()
    name = artifact_name(__version__, arch)
    dist = ROOT / "dist"
    PyInstaller.__main__.run(pyinstaller_args(name, dist, ROOT / "build" / "agent-artifact"))
    executable = dist / name
    digest = hashlib.sha256(executable.read_bytes()).hexdigest()
    (dist / f"{name}.sha256").write_text(f"{digest}  {name}\n")
    manifest = {"name": name, "version": __version__, "arch": arch, "sha256": digest,
                "glibc_min": glibc_floor(executable), "python": platform.python_version(),
                "built_on_glibc": platform.libc_ver()[1]}
    (dist / f"{name}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
