"""`gpufleet agent --backend simulated` reads any allocation source, and `--dry-run` shows the attribution:
the simulated fleet publishes its GPU UUIDs, a test kubelet serves pods on them, the printed messages say
who holds what (or that nobody can say)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.agents.test_dry_run_and_health import check_dry_run_output, dry_run
from tests.fakes.fake_kubelet import FakeKubelet, gpu_devices

pytestmark = pytest.mark.integration  # runs the agent as a process

SIM = ["--backend", "simulated", "--nodes", "1", "--gpus", "3", "--seed", "7"]


def _config(tmp_path: Path, allocation: dict[str, object]) -> str:
    path = tmp_path / f"agent-{allocation['source']}.yaml"
    path.write_text(yaml.safe_dump({"agent": {"cluster": "sim", "allocation": allocation}}))
    return str(path)


def _uuids(tmp_path: Path) -> list[str]:
    out = tmp_path / "uuids.json"
    cfg = _config(tmp_path, {"source": "none"})  # the same cluster: simulated UUIDs depend on it
    check_dry_run_output(dry_run([*SIM, "--config", cfg, "--intervals", "1", "--publish-uuids", str(out)],
                                 tmp_path), 1, 1)
    (uuids,) = json.loads(out.read_text())["nodes"].values()
    return uuids


def test_a_test_kubelet_serving_the_published_uuids_decides_the_tenants(tmp_path: Path) -> None:
    g0, g1, g2 = _uuids(tmp_path)
    sock = tmp_path / "kubelet.sock"
    cfg = _config(tmp_path, {"source": "kubernetes", "kubelet_socket": str(sock), "kubelet_timeout_s": 5.0,
                             "namespace_tenants": {"team-a": "acme"}})
    with FakeKubelet(sock, {"nvidia.com/gpu": [g0, *gpu_devices([g1], replicas=2), g2]}) as kubelet:
        kubelet.schedule("team-a", "train", {"nvidia.com/gpu": [g0]})
        kubelet.schedule("team-b", "infer-1", {"nvidia.com/gpu": [f"{g1}::0"]})
        kubelet.schedule("team-c", "infer-2", {"nvidia.com/gpu": [f"{g1}::1"]})
        reports = check_dry_run_output(dry_run([*SIM, "--config", cfg, "--intervals", "2"], tmp_path), 1, 2)
    for r in reports:
        by_uuid = {g.uuid: g for g in r.gpus}
        assert (by_uuid[g0].tenant, by_uuid[g0].job) == ("acme", "team-a/train")
        assert [(s.tenant, s.job, s.weight) for s in by_uuid[g1].shares] == [
            ("team-b", "team-b/infer-1", 1), ("team-c", "team-c/infer-2", 1)]
        assert (by_uuid[g2].tenant, by_uuid[g2].allocation_unknown) == (None, False)
    # no kubelet: every GPU is unknown (not unallocated), and the agent says so once
    done = dry_run([*SIM, "--config", cfg, "--intervals", "2"], tmp_path)
    reports = check_dry_run_output(done, 1, 2)
    assert all(g.allocation_unknown and g.tenant is None for r in reports for g in r.gpus)
    assert reports[-1].agent.allocation_unknown_total == 6
    assert done.stderr.decode().count("does not exist") == 1


@pytest.mark.parametrize(("allocation", "tenants"), [
    ({"source": "static", "static": {"1": "acme/j9"}}, [None, "acme", None]),
    ({"source": "slurm"}, [None, None, None]),  # the simulator runs no processes: nothing to attribute
])
def test_every_other_source_is_accepted(tmp_path: Path, allocation: dict[str, object],
                                        tenants: list[str | None]) -> None:
    if allocation["source"] == "slurm":
        allocation = {**allocation, "proc_root": str(tmp_path / "proc"), "cgroup_root": str(tmp_path / "cg")}
    reports = check_dry_run_output(dry_run([*SIM, "--config", _config(tmp_path, allocation), "--intervals", "1"],
                                           tmp_path), 1, 1)
    assert [g.tenant for g in reports[0].gpus] == tenants
