"""Allocation sources: the scheduler's file, dcgm-exporter's job directory, static config, the factory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from gpufleet.agents.allocation import (
    Allocation,
    AllocationSource,
    DcgmJobDirSource,
    NoAllocationSource,
    SchedulerFileSource,
    StaticSource,
    build_source,
)
from gpufleet.config import AllocationConfig, ConfigError, parse

UUID0 = "GPU-8f0c2d4e-6a1b-4c3d-9e8f-001122334455"
UUID1 = "GPU-11111111-2222-3333-4444-555555555555"


def write(path: Path, text: str) -> None:
    """Replace `path` atomically and make sure its stat changes (mtime granularity is not a test's business)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    st = path.stat() if path.exists() else None
    if st is not None:
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    tmp.replace(path)


# -- the scheduler's file --------------------------------------------------------------------------


def test_file_source_reads_indexes_uuids_numbers_and_nulls(tmp_path):
    path = tmp_path / "alloc.json"
    write(
        path,
        '{"version": 1, "written_at": "2026-01-01T00:00:00Z", "gpus": {'
        '"0": {"tenant": "acme", "job": "123"},'
        '"1": {"tenant": "acme", "job": 124},'
        f'"{UUID0}": {{"tenant": "beta"}},'
        f'"{UUID1}": {{"tenant": "gamma", "job": "x"}},'
        '"3": null}}',
    )
    source = SchedulerFileSource(path, uuid_index={UUID0: 2})
    assert isinstance(source, AllocationSource)
    assert source.read() == {0: Allocation("acme", "123"), 1: Allocation("acme", "124"), 2: Allocation("beta", None)}


def test_file_source_missing_file_is_unallocated_and_logged_once(tmp_path, caplog):
    path = tmp_path / "alloc.json"
    source = SchedulerFileSource(path)
    with caplog.at_level(logging.WARNING, logger="gpufleet.agents.allocation"):
        assert source.read() == {}
        assert source.read() == {}
    assert [r.getMessage() for r in caplog.records] == [
        f"allocation file {path} does not exist: reporting every GPU unallocated"
    ]
    write(path, '{"version": 1, "gpus": {"4": {"tenant": "acme", "job": "9"}}}')
    assert source.read() == {4: Allocation("acme", "9")}
    path.unlink()
    assert source.read() == {}  # gone again: nothing allocated


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"version": 1, "gpus": {"0": {"tenant": "acme"', "is not valid JSON"),
        ('{"version": 2, "gpus": {}}', "has version 2; this agent reads version 1"),
        ('{"version": 1, "gpus": {"0": {"job": "7"}}}', "missing required field `tenant`"),
        ('{"version": 1, "gpus": {"0": {"tenant": ""}}}', "does not follow the allocation format"),
        ('{"version": 1, "gpus": {"gpu0": {"tenant": "acme"}}}', "has GPU key 'gpu0'"),
        (
            f'{{"version": 1, "gpus": {{"0": {{"tenant": "a"}}, "{UUID0}": {{"tenant": "b"}}}}}}',
            "gives GPU 0 two different allocations",
        ),
    ],
)
def test_malformed_file_keeps_the_last_good_allocation(tmp_path, caplog, content, problem):
    path = tmp_path / "alloc.json"
    write(path, '{"version": 1, "gpus": {"0": {"tenant": "acme", "job": "1"}}}')
    source = SchedulerFileSource(path, uuid_index={UUID0: 0})
    good = {0: Allocation("acme", "1")}
    assert source.read() == good
    write(path, content)
    with caplog.at_level(logging.WARNING, logger="gpufleet.agents.allocation"):
        assert source.read() == good
        assert source.read() == good  # unchanged file: not parsed (or logged) again
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert str(path) in message
    assert problem in message
    assert "keeping the last good allocation (1 GPUs allocated)" in message
    write(path, '{"version": 1, "gpus": {"1": {"tenant": "beta", "job": "2"}}}')
    assert source.read() == {1: Allocation("beta", "2")}  # fixed: picked up at once


def test_file_source_parses_only_when_the_file_changes(tmp_path):
    path = tmp_path / "alloc.json"
    write(path, '{"version": 1, "gpus": {"0": {"tenant": "acme", "job": "1"}}}')
    source = SchedulerFileSource(path)
    assert source.read() == {0: Allocation("acme", "1")}
    st = path.stat()
    path.write_text('{"version": 1, "gpus": {"0": {"tenant": "ACME", "job": "1"}}}')  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and same mtime: same stat signature
    assert source.read() == {0: Allocation("acme", "1")}
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert source.read() == {0: Allocation("ACME", "1")}


def test_read_returns_a_copy(tmp_path):
    path = tmp_path / "alloc.json"
    write(path, '{"version": 1, "gpus": {"0": {"tenant": "acme"}}}')
    source = SchedulerFileSource(path)
    source.read().clear()
    assert source.read() == {0: Allocation("acme")}


# -- dcgm-exporter's job-mapping directory ---------------------------------------------------------


def prolog(job_dir: Path, gpus: list[int], line: str) -> None:
    """What a site's dcgm-exporter Slurm prolog does: `echo $SLURM_JOB_ID > $DIR/$gpu` per GPU."""
    job_dir.mkdir(exist_ok=True)
    for g in gpus:
        (job_dir / str(g)).write_text(line + "\n")


def epilog(job_dir: Path, gpus: list[int]) -> None:
    for g in gpus:
        (job_dir / str(g)).unlink(missing_ok=True)


def test_dcgm_dir_follows_prolog_and_epilog(tmp_path):
    job_dir = tmp_path / "dcgm-job-map"
    source = DcgmJobDirSource(job_dir, default_tenant="research")
    assert source.read() == {}  # directory not created yet
    prolog(job_dir, [0, 1], "4711")
    prolog(job_dir, [2], "4712 1001")  # dcgm-exporter's "jobid uid" form
    prolog(job_dir, [3], "acme:4713")  # opt-in account prefix names the tenant
    assert source.read() == {
        0: Allocation("research", "4711"),
        1: Allocation("research", "4711"),
        2: Allocation("research", "4712"),
        3: Allocation("acme", "4713"),
    }
    epilog(job_dir, [0, 1])
    assert source.read() == {2: Allocation("research", "4712"), 3: Allocation("acme", "4713")}
    prolog(job_dir, [3], "beta:4800")  # same file rewritten in place
    assert source.read()[3] == Allocation("beta", "4800")


def test_dcgm_dir_first_job_wins_and_odd_files_are_ignored(tmp_path, caplog):
    job_dir = tmp_path / "map"
    job_dir.mkdir()
    (job_dir / "0").write_text("100\n200\n")  # shared GPU
    (job_dir / "1").write_text("")  # truncated: unallocated
    (job_dir / "2.11").write_text("300\n")  # MIG instance: not ours
    (job_dir / ".0.swp").write_text("junk")
    (job_dir / "subdir").mkdir()
    (job_dir / UUID1).write_text("400\n")  # by UUID
    source = DcgmJobDirSource(job_dir, uuid_index={UUID1: 5})
    with caplog.at_level(logging.WARNING, logger="gpufleet.agents.allocation"):
        assert source.read() == {0: Allocation("default", "100"), 5: Allocation("default", "400")}
    assert any("GPU 0 lists 2 jobs" in r.getMessage() and "first (100)" in r.getMessage() for r in caplog.records)


def test_dcgm_dir_tenant_from_callable_then_default(tmp_path):
    job_dir = tmp_path / "map"
    prolog(job_dir, [0], "9001")
    prolog(job_dir, [1], "7002")
    prolog(job_dir, [2], "acct:7003")

    def tenant_of(job: str) -> str | None:
        return "big-co" if job.startswith("9") else None

    source = DcgmJobDirSource(job_dir, tenant_of=tenant_of, default_tenant="misc")
    assert source.read() == {
        0: Allocation("big-co", "9001"),
        1: Allocation("misc", "7002"),
        2: Allocation("acct", "7003"),
    }


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_dcgm_dir_unreadable_file_keeps_that_gpus_last_reading(tmp_path, caplog):
    job_dir = tmp_path / "map"
    prolog(job_dir, [0, 1], "55")
    source = DcgmJobDirSource(job_dir)
    assert source.read() == {0: Allocation("default", "55"), 1: Allocation("default", "55")}
    (job_dir / "0").unlink()
    (job_dir / "0").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO), even as root
    prolog(job_dir, [1], "57")
    with caplog.at_level(logging.WARNING, logger="gpufleet.agents.allocation"):
        assert source.read() == {0: Allocation("default", "55"), 1: Allocation("default", "57")}
    assert any(f"{job_dir / '0'} cannot be read" in r.getMessage() for r in caplog.records)


# -- static and the factory ------------------------------------------------------------------------


def test_static_source():
    source = StaticSource({"0": "acme/train-42", "1": "acme", "7": " beta / x "})
    assert source.read() == {0: Allocation("acme", "train-42"), 1: Allocation("acme", None), 7: Allocation("beta", "x")}
    with pytest.raises(ValueError, match="key 'gpu0' must be a GPU index"):
        StaticSource({"gpu0": "acme"})
    with pytest.raises(ValueError, match='GPU 0 maps to "/job"'.replace('"', "'")):
        StaticSource({"0": "/job"})


def test_build_source_from_config(tmp_path):
    cfg = parse({"agent": {"allocation": {"source": "file", "path": str(tmp_path / "a.json")}}}).agent.allocation
    assert isinstance(build_source(cfg), SchedulerFileSource)
    cfg = parse(
        {"agent": {"allocation": {"source": "dcgm_job_dir", "path": str(tmp_path), "default_tenant": "r"}}}
    ).agent.allocation
    prolog(tmp_path, [0], "12")
    assert build_source(cfg).read() == {0: Allocation("r", "12")}
    cfg = parse({"agent": {"allocation": {"source": "static", "static": {"0": "a/b"}}}}).agent.allocation
    assert build_source(cfg).read() == {0: Allocation("a", "b")}
    assert isinstance(build_source(AllocationConfig()), NoAllocationSource)
    assert build_source(AllocationConfig()).read() == {}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"source": "file"}, "agent.allocation.source is 'file' but agent.allocation.path is not set"),
        ({"source": "dcgm_job_dir"}, "set it to dcgm-exporter's job-mapping directory"),
        ({"source": "none", "path": "/x"}, "agent.allocation.path is set but agent.allocation.source is 'none'"),
        ({"source": "static"}, "agent.allocation.static is empty"),
        ({"source": "static", "static": {"x": "a"}}, "key 'x' must be a GPU index"),
        ({"source": "file", "path": "/x", "static": {"0": "a"}}, "only read with source: static"),
    ],
)
def test_build_source_refuses_inconsistent_config(section, message):
    cfg = AllocationConfig(**section)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_source(cfg)
