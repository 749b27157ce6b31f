"""The installed distribution adds one import name, `gpufleet`, and the job-side helper installs light.

The repository keeps `agents/`, `pipeline/`, `dashboards/` and `embedded/` at the top; pyproject
maps them to `gpufleet.agents` and so on. These tests build the real wheel and look inside it,
and install it the way a GPU node does (no extras) into a fresh virtual environment.
"""

from __future__ import annotations

import ast
import subprocess
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

import gpufleet

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"gpufleet": "gpufleet", "agents": "gpufleet.agents", "pipeline": "gpufleet.pipeline",
           "dashboards": "gpufleet.dashboards", "embedded": "gpufleet.embedded"}
OLD_NAMES = {"agents", "pipeline", "dashboards", "embedded"}


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
        names = set(z.namelist())
    assert tops == {"gpufleet"}
    for module in ("gpufleet/agents/collectors/nvml.py", "gpufleet/pipeline/ingest/ingester.py",
                   "gpufleet/pipeline/store/migrations/0001_raw_samples.sql", "gpufleet/embedded/demo/stack.py",
                   "gpufleet/pipeline/alerts/default_rules.yaml", "gpufleet/dashboards/build.py",
                   "gpufleet/report_flops.py"):
        assert module in names, module


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == listed


def test_public_surface_of_the_core() -> None:
    assert sorted(gpufleet.__all__) == ["GpufleetError", "__version__"]
    from gpufleet import report_flops

    assert callable(report_flops.init)
    assert callable(report_flops.report_flops)
    assert sorted(report_flops.__all__) == ["Reporter", "gpu_attributes", "init", "report_flops",
                                            "report_samples", "report_tokens", "shutdown"]


def _imported_top_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
    return out


def test_nothing_imports_the_folders_by_their_repository_names() -> None:
    bad = []
    for folder in (*FOLDERS, "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if used := _imported_top_names(path) & OLD_NAMES:
                bad.append(f"{path.relative_to(ROOT)}: {sorted(used)}")
    assert bad == []


def test_agents_never_import_the_pipeline_and_the_core_imports_neither() -> None:
    """Dependencies point one way: core <- agents, core <- pipeline <- embedded; library code never imports CLI."""
    bad = []
    for path in (ROOT / "agents").rglob("*.py"):
        if any(m.startswith(("gpufleet.pipeline", "gpufleet.embedded", "gpufleet.dashboards"))
               for m in _modules(path)):
            bad.append(str(path.relative_to(ROOT)))
    for path in (ROOT / "gpufleet").glob("*.py"):
        if any(m.startswith(("gpufleet.pipeline", "gpufleet.agents", "gpufleet.embedded", "gpufleet.dashboards"))
               for m in _modules(path)) and path.name != "cli.py":  # cli.py names commands as strings only
            bad.append(str(path.relative_to(ROOT)))
    for folder in ("pipeline", "embedded", "dashboards", "agents"):
        for path in (ROOT / folder).rglob("*.py"):
            cli_module = "commands" in path.parts or path.name == "command.py"
            if not cli_module and any(m.startswith("gpufleet.pipeline.commands") or m.endswith(".command")
                                      for m in _modules(path)):
                bad.append(f"{path.relative_to(ROOT)} imports a CLI module")
    assert bad == []


def _modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.slow
def test_the_light_agent_install_has_the_job_helper_and_no_clickhouse(wheel: Path, tmp_path: Path) -> None:
    """`pip install gpufleet` (no extras), as on a GPU node: report_flops and the agent import, chdb and
    clickhouse-connect are not installed."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), str(wheel)],
                   check=True, timeout=300)
    code = ("import importlib.util as u, sys\n"
            "from gpufleet import report_flops\n"
            "import gpufleet.agents.command\n"
            "assert u.find_spec('chdb') is None and u.find_spec('clickhouse_connect') is None\n"
            "print(' '.join(n for n in ('agents', 'pipeline', 'dashboards', 'embedded') if u.find_spec(n)))\n")
    out = subprocess.run([str(py), "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
