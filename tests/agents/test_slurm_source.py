"""`allocation.source: slurm` on a fake /proc and cgroup tree, with the NVML collector on the pynvml fake."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.agents.allocation import Allocation, Holder, Shared, Unknown, build_source
from gpufleet.agents.collectors.base import DeviceView, GpuProcess
from gpufleet.agents.slurm import SlurmSource, device_minors, job_in_cgroup
from gpufleet.config import AllocationConfig
from tests.fakes.fake_pynvml import FakeNvml, h100

V2 = "0::/system.slice/slurmstepd.scope/job_{job}/step_0/user/task_0\n"
V1 = "12:devices:/slurm/uid_1000/job_{job}/step_0\n4:memory:/slurm/uid_1000/job_{job}/step_0\n"


class FakeNode:
    """A /proc and a cgroup tree under `root`."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.cgroup = root / "cgroup"

    def process(self, pid: int, job: int | None, account: str | None = "acme", *, cgroup: str = V2,
                environ: bool = True, user: str = "alice") -> None:
        d = self.proc / str(pid)
        d.mkdir(parents=True)
        (d / "cgroup").write_text("0::/user.slice\n" if job is None else cgroup.format(job=job))
        if environ:
            env = {"PATH": "/bin"} if job is None else {
                "PATH": "/bin", "SLURM_JOB_ID": str(job), "SLURM_JOB_USER": user, "SLURM_JOB_PARTITION": "gpu"}
            if account and job is not None:
                env["SLURM_JOB_ACCOUNT"] = account
            (d / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()) + b"\0")

    def job_cgroup_v1(self, job: int, minors: list[int], pids: list[int]) -> None:
        d = self.cgroup / "devices" / "slurm" / "uid_1000" / f"job_{job}"
        (d / "step_batch").mkdir(parents=True)
        (d / "devices.list").write_text("c 195:255 rw\n" + "".join(f"c 195:{m} rw\n" for m in minors)
                                        + "c 1:3 rwm\n")
        (d / "step_batch" / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))

    def source(self, views: list[DeviceView], **kw: str) -> SlurmSource:
        return SlurmSource(lambda: views, proc_root=self.proc, cgroup_root=self.cgroup, **kw)


def view(index: int, *procs: GpuProcess | int, minor: int | None = None) -> DeviceView:
    ps = tuple(p if isinstance(p, GpuProcess) else GpuProcess(p) for p in procs)
    return DeviceView(index, f"GPU-{index}", index if minor is None else minor, ps)


def test_parsers() -> None:
    assert job_in_cgroup(V2.format(job=42)).job == "42"
    assert job_in_cgroup(V1.format(job=7)).cgroup_dir == "/slurm/uid_1000/job_7"
    assert job_in_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n") is None
    assert device_minors("a *:* rwm\nc 195:255 rw\nc 195:3 rw\nc 195:0 rw\n") == {0, 3}


def test_processes_name_their_jobs_and_tenants(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    node.process(100, 42, "acme")
    node.process(101, 42, "acme")
    node.process(200, 43, "beta", cgroup=V1)
    node.process(300, None)  # an administrator's nvidia-smi: not a job
    views = [view(0, 100, 101), view(1, 200, 300), view(2, 300), view(3)]
    assert node.source(views).read() == {"GPU-0": Allocation("acme", "42"), "GPU-1": Allocation("beta", "43")}
    assert node.source(views, tenant_field="user").read()["GPU-1"] == Allocation("alice", "43")


def test_an_unreadable_environment_is_unknown_unless_another_process_of_the_job_says(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    node.process(100, 42, environ=False, cgroup=V1)
    node.process(101, 42, "acme", cgroup=V1)  # the job's batch shell, in the job's cgroup
    node.job_cgroup_v1(42, [0], [101])
    node.process(200, 43, environ=False)
    src = node.source([view(0, 100), view(1, 200)])
    assert src.read() == {"GPU-0": Allocation("acme", "42"),
                          "GPU-1": Unknown("the tenant of Slurm job 43 on GPU-1 cannot be read")}


def test_a_gpu_held_with_no_process_is_seen_through_the_v1_device_list(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    node.process(500, 9, "gamma", cgroup=V1)  # the job's shell, on no GPU
    node.job_cgroup_v1(9, [2, 3], [500])
    got = node.source([view(0), view(2), view(3, minor=3), DeviceView(4, "GPU-4", 4, None)]).read()
    assert got == {"GPU-2": Allocation("gamma", "9"), "GPU-3": Allocation("gamma", "9"),
                   "GPU-4": Unknown("NVML could not list the processes on GPU-4")}


def test_a_gpu_two_jobs_share_is_split_by_their_utilization_or_evenly(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    node.process(100, 42, "acme")
    node.process(101, 42, "acme")
    node.process(200, 43, "beta")
    shared = view(0, GpuProcess(100, 120.0), GpuProcess(101, 60.0), GpuProcess(200, 60.0))
    assert node.source([shared]).read() == {"GPU-0": Shared((Holder("acme", "42", 180), Holder("beta", "43", 60)))}
    assert node.source([shared], share_by="even").read() == {
        "GPU-0": Shared((Holder("acme", "42", 1), Holder("beta", "43", 1)))}
    unknown_util = view(0, GpuProcess(100, 120.0), GpuProcess(200))
    assert node.source([unknown_util]).read() == {"GPU-0": Shared((Holder("acme", "42"), Holder("beta", "43")))}


def test_through_the_nvml_collector_on_the_fake(tmp_path: Path, make_collector) -> None:
    node = FakeNode(tmp_path)
    node.process(100, 42, "acme")
    node.process(200, 43, "beta")
    fake = FakeNvml([h100("GPU-a", process_pids=[100, 200], process_sm_util={100: 75, 200: 25}),
                     h100("GPU-b", process_pids=[100], minor=5)])
    collector = make_collector(fake)
    collector.open()
    src = build_source(AllocationConfig(source="slurm", proc_root=str(node.proc), cgroup_root=str(node.cgroup)),
                       devices=collector.devices)
    collector.collect(0)
    fake.advance(1.0)
    collector.collect(0)
    assert [d.minor for d in collector.devices()] == [0, 5]
    got = src.read()
    assert got["GPU-b"] == Allocation("acme", "42")
    assert isinstance(got["GPU-a"], Shared)
    weights = {h.tenant: h.weight for h in got["GPU-a"].holders}
    assert weights["acme"] == pytest.approx(3 * weights["beta"], rel=0.01)  # 75 % vs 25 % in every sample
