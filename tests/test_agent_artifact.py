"""The self-contained agent artifact (`make agent-artifact`) runs on this machine without the project's
virtualenv, and `install.sh` installs it (or a hash-pinned wheelhouse) without any index.

The artifact takes about a minute to build, so `.ci/run` builds it before `make test`; here the
artifact tests skip, naming the command, when it is not built. The install tests stage under
DESTDIR, which touches no running system.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from gpufleet.config import load
from gpufleet.version import __version__
from tests.agents.test_dry_run_and_health import check_dry_run_output

pytestmark = pytest.mark.integration  # builds or runs the artifact and install.sh

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "dist" / f"gpufleet-agent-{__version__}-linux-{platform.machine()}"
INSTALL = ROOT / "deploy" / "systemd" / "install.sh"
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
"""No virtualenv, no PYTHONPATH, no GPUFLEET_* and no Python on PATH beyond the system's."""

needs_artifact = pytest.mark.skipif(not ARTIFACT.is_file(),
                                    reason=f"{ARTIFACT.relative_to(ROOT)} is not built: run `make agent-artifact` "
                                           "(.ci/run does, before `make test`)")


@needs_artifact
def test_the_artifact_runs_a_dry_run_without_the_virtualenv(tmp_path: Path) -> None:
    done = subprocess.run([str(ARTIFACT), "agent", "--dry-run", "--backend", "simulated", "--nodes", "2",
                           "--gpus", "2", "--intervals", "2", "--spool-dir", str(tmp_path / "spool")],
                          capture_output=True, cwd=tmp_path, env=CLEAN_ENV, timeout=180, check=False)
    check_dry_run_output(done, nodes=2, intervals=2)
    assert not (tmp_path / "spool").exists()


@needs_artifact
def test_the_artifact_carries_the_agent_only_and_its_manifest_is_true(tmp_path: Path) -> None:
    version = subprocess.run([str(ARTIFACT), "--version"], capture_output=True, text=True, env=CLEAN_ENV,
                             cwd=tmp_path, timeout=120, check=False)
    assert version.stdout.strip() == f"gpufleet, version {__version__}"
    ingest = subprocess.run([str(ARTIFACT), "ingest", "--help"], capture_output=True, text=True, env=CLEAN_ENV,
                            cwd=tmp_path, timeout=120, check=False)
    assert ingest.returncode == 2  # a UsageError (docs/errors.md)
    assert "'gpufleet ingest' needs a part that is not installed (gpufleet.pipeline)" in ingest.stderr
    digest = hashlib.sha256(ARTIFACT.read_bytes()).hexdigest()
    assert Path(f"{ARTIFACT}.sha256").read_text() == f"{digest}  {ARTIFACT.name}\n"
    manifest = json.loads(Path(f"{ARTIFACT}.json").read_text())
    assert (manifest["sha256"], manifest["version"], manifest["arch"]) == (digest, __version__, platform.machine())
    floor = tuple(int(x) for x in manifest["glibc_min"].split("."))
    here = tuple(int(x) for x in platform.libc_ver()[1].split("."))
    assert (2, 17) <= floor <= here  # measured from the bundle; it runs here, so at most this glibc


def run_install(tmp_path: Path, *args: str, dest: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**CLEAN_ENV, "DESTDIR": str(dest or tmp_path / "root")}
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)


def secrets(tmp_path: Path) -> list[str]:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "pw").write_text("s3cret-scram\n")
    return ["--kafka-ca", str(tmp_path / "ca.pem"), "--kafka-password-file", str(tmp_path / "pw")]


@needs_artifact
def test_install_lays_out_the_artifact_config_credential_and_unit(tmp_path: Path) -> None:
    root = tmp_path / "root"
    done = run_install(tmp_path, "--kafka", "k1.internal:9094,k2.internal:9094", "--cluster", 'prod "a" \\b',
                       *secrets(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SHA-256 checked" in done.stdout
    binary = root / "opt/gpufleet/bin/gpufleet"
    assert binary.read_bytes() == ARTIFACT.read_bytes()
    assert oct(binary.stat().st_mode & 0o777) == "0o755"
    cfg = load(root / "etc/gpufleet/agent.yaml")
    assert (cfg.kafka.bootstrap_servers, cfg.agent.cluster) == ("k1.internal:9094,k2.internal:9094", 'prod "a" \\b')
    assert "# EDIT (or pass --cluster to install.sh)" in (root / "etc/gpufleet/agent.yaml").read_text()
    password = root / "etc/gpufleet/kafka-password"
    assert (password.read_text(), oct(password.stat().st_mode & 0o777)) == ("s3cret-scram\n", "0o600")
    assert (root / "etc/gpufleet/kafka-ca.pem").read_text() == "-----BEGIN CERTIFICATE-----\n"
    unit = ROOT / "deploy/systemd/gpufleet-agent.service"
    assert (root / "etc/systemd/system/gpufleet-agent.service").read_text() == unit.read_text()
    # The agent itself checked the config (no GPU here, so it could not collect: a warning, not a failure).
    assert "the agent could not collect yet (the config is valid)" in done.stdout
    assert "s3cret-scram" not in done.stdout + done.stderr
    # Again: the config is kept, the artifact replaced.
    again = run_install(tmp_path, "--cluster", "other")
    assert again.returncode == 0, again.stderr
    assert "keeping existing /etc/gpufleet/agent.yaml" in again.stdout
    assert load(root / "etc/gpufleet/agent.yaml").agent.cluster == 'prod "a" \\b'


@needs_artifact
def test_install_refuses_a_tampered_artifact_and_a_bad_config(tmp_path: Path) -> None:
    copy = tmp_path / ARTIFACT.name
    copy.write_bytes(ARTIFACT.read_bytes() + b"\0")
    Path(f"{copy}.sha256").write_text(Path(f"{ARTIFACT}.sha256").read_text())
    done = run_install(tmp_path, "--artifact", str(copy))
    assert done.returncode == 1
    assert f"{copy} does not match its SHA-256" in done.stderr
    assert not (tmp_path / "root/opt/gpufleet/bin/gpufleet").exists()
    root = tmp_path / "bad"
    (root / "etc/gpufleet").mkdir(parents=True)
    (root / "etc/gpufleet/agent.yaml").write_text("agent:\n  intervall: 1\n")
    bad = run_install(tmp_path, dest=root)
    assert bad.returncode == 1
    assert "unknown field `intervall`" in bad.stderr
    assert "/etc/gpufleet/agent.yaml is not valid" in bad.stderr


def test_install_without_an_artifact_names_the_way_to_build_one(tmp_path: Path) -> None:
    done = run_install(tmp_path, "--artifact", str(tmp_path / "missing"))
    assert done.returncode == 1
    assert "--artifact" in done.stderr
    assert "does not exist" in done.stderr
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "requirements.txt").write_text("gpufleet==0.1.0\n")
    unpinned = run_install(tmp_path, "--wheelhouse", str(wheels))
    assert unpinned.returncode == 1
    assert "requirement without --hash=sha256" in unpinned.stderr


def test_install_from_a_hash_pinned_wheelhouse_without_an_index(tmp_path: Path, wheel: Path) -> None:
    """A wheelhouse of the agent's wheels (built here from the local wheel cache, `make agent-wheelhouse`
    does the same with the whole closure) installs into a virtualenv with --no-index --require-hashes."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    shutil.copy2(wheel, wheels / wheel.name)
    subprocess.run([os.environ.get("PYTHON", "python3"), str(ROOT / "deploy/agent/wheelhouse_requirements.py"),
                    str(wheels)], check=True, timeout=60)
    reqs = (wheels / "requirements.txt").read_text().splitlines()
    (whl,) = wheels.glob("gpufleet-*.whl")
    assert reqs == [f"gpufleet=={__version__} --hash=sha256:{hashlib.sha256(whl.read_bytes()).hexdigest()}"]
    # Without its dependencies in the wheelhouse pip must fail, and it must not reach for an index.
    done = run_install(tmp_path, "--wheelhouse", str(wheels), "--python", "/usr/bin/python3")
    assert done.returncode != 0
    assert "pypi" not in (done.stdout + done.stderr).lower()
