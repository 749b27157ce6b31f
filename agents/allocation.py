"""Which tenant and job hold each GPU of this node: the allocation sources the agent reads every interval.

Design notes: docs/design-notes.md#agents-allocation-py.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol, runtime_checkable

import msgspec

from gpufleet.config import AllocationConfig, ConfigError
from gpufleet.errors import USAGE, GpufleetError

log = logging.getLogger(__name__)

_INDEX = re.compile(r"[0-9]{1,4}")
_UUID_PREFIXES = ("GPU-", "MIG-")


@dataclass(frozen=True, slots=True)
class Allocation:
    """The tenant (and job, when known) holding one GPU."""

    tenant: str
    job: str | None = None


@runtime_checkable
class AllocationSource(Protocol):
    """Answers which GPUs of this node are allocated, to whom, right now."""

    def read(self) -> dict[int, Allocation]:
        """GPU index -> allocation; an absent index is unallocated. Never raises."""
        ...


class AllocationFileError(GpufleetError, ValueError):
    """An allocation file that cannot be used; the text says what is wrong."""

    exit_code = USAGE


class NoAllocationSource:
    """`source: none`: nothing is allocated."""

    def read(self) -> dict[int, Allocation]:
        return {}


class StaticSource:
    """`source: static`: a fixed mapping from config, GPU index string -> "tenant/job" or "tenant"."""

    def __init__(self, mapping: Mapping[str, str]) -> None:
        self._allocations = parse_static(mapping)

    def read(self) -> dict[int, Allocation]:
        return dict(self._allocations)


def parse_static(mapping: Mapping[str, str]) -> dict[int, Allocation]:
    """Validate `agent.allocation.static`; raises ValueError naming the bad entry."""
    out = {}
    for k, v in mapping.items():
        if not _INDEX.fullmatch(str(k)):
            raise ValueError(f'agent.allocation.static: key {k!r} must be a GPU index such as "0"')
        tenant, _, job = str(v).partition("/")
        if not tenant.strip():
            raise ValueError(f'agent.allocation.static: GPU {k} maps to {v!r}; write "tenant/job" or "tenant"')
        out[int(k)] = Allocation(tenant.strip(), job.strip() or None)
    return out


# -- the scheduler's JSON file --------------------------------------------------------------------

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class _FileEntry(msgspec.Struct):
    tenant: Text
    job: Text | int | None = None


class _FileDoc(msgspec.Struct):
    version: int
    gpus: dict[str, _FileEntry | None] = {}


FILE_VERSION = 1


def parse_scheduler_file(
    data: bytes, uuid_index: Mapping[str, int] | None = None
) -> tuple[dict[int, Allocation], list[str]]:
    """Parse the scheduler's file: (allocations by GPU index, UUID keys not on this node).
    Raises `AllocationFileError` naming what is wrong."""
    try:
        doc = msgspec.json.decode(data, type=_FileDoc)
    except msgspec.ValidationError as exc:
        raise AllocationFileError(f"does not follow the allocation format: {exc}") from None
    except msgspec.DecodeError as exc:
        raise AllocationFileError(f"is not valid JSON: {exc}") from None
    if doc.version != FILE_VERSION:
        raise AllocationFileError(f"has version {doc.version}; this agent reads version {FILE_VERSION}")
    out: dict[int, Allocation] = {}
    unknown: list[str] = []
    for k, entry in doc.gpus.items():
        if _INDEX.fullmatch(k):
            index: int | None = int(k)
        elif k.startswith(_UUID_PREFIXES):
            index = (uuid_index or {}).get(k)
            if index is None:
                unknown.append(k)
                continue
        else:
            raise AllocationFileError(f'has GPU key {k!r}, which is neither an index ("0") nor a UUID ("GPU-...")')
        if entry is None:
            continue
        alloc = Allocation(entry.tenant, None if entry.job is None else str(entry.job))
        if out.get(index, alloc) != alloc:
            raise AllocationFileError(f"gives GPU {index} two different allocations (by index and by UUID)")
        out[index] = alloc
    return out, unknown


class SchedulerFileSource:
    """`source: file`: the scheduler's JSON file, re-parsed only when its stat changes."""

    def __init__(self, path: str | os.PathLike[str], *, uuid_index: Mapping[str, int] | None = None) -> None:
        self.path = Path(path)
        self._uuid_index = dict(uuid_index or {})
        self._signature: tuple[int, ...] | str | None = None
        self._current: dict[int, Allocation] = {}

    def read(self) -> dict[int, Allocation]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            if self._signature != "missing":
                log.warning("allocation file %s does not exist: reporting every GPU unallocated", self.path)
                self._signature = "missing"
                self._current = {}
            return {}
        except OSError as exc:
            self._warn_once(f"stat:{exc.errno}", f"cannot stat it ({exc.strerror})")
            return dict(self._current)
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature != self._signature:
            self._signature = signature
            self._reload()
        return dict(self._current)

    def _reload(self) -> None:
        try:
            allocations, unknown = parse_scheduler_file(self.path.read_bytes(), self._uuid_index)
        except FileNotFoundError:
            return  # replaced between stat and read: the next read sees the new file
        except OSError as exc:
            self._warn(f"cannot be read ({exc.strerror})")
            return
        except AllocationFileError as exc:
            self._warn(str(exc))
            return
        if unknown:
            log.warning(
                "allocation file %s: %d GPU UUID(s) are not on this node and were ignored (e.g. %s)",
                self.path,
                len(unknown),
                unknown[0],
            )
        self._current = allocations

    def _warn(self, problem: str) -> None:
        log.warning(
            "allocation file %s %s; keeping the last good allocation (%d GPUs allocated). "
            "Fix the file; the scheduler should write it atomically (temp file + rename).",
            self.path,
            problem,
            len(self._current),
        )

    def _warn_once(self, tag: str, problem: str) -> None:
        if self._signature != tag:
            self._signature = tag
            self._warn(problem)


# -- dcgm-exporter's HPC job-mapping directory ---------------------------------------------------


def parse_job_line(line: str) -> tuple[str | None, str] | None:
    """One line of a job-mapping file -> (tenant or None, job id), or None for a blank line.
    Accepts `jobid`, dcgm-exporter's `jobid uid`, and `account:jobid`."""
    words = line.split()
    if not words:
        return None
    account, sep, job = words[0].partition(":")
    if sep and account and job:
        return account, job
    return None, words[0]


class DcgmJobDirSource:
    """`source: dcgm_job_dir`: one file per GPU in dcgm-exporter's job-mapping directory."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        default_tenant: str = "default",
        tenant_of: Callable[[str], str | None] | None = None,
        uuid_index: Mapping[str, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self._default_tenant = default_tenant
        self._tenant_of = tenant_of
        self._uuid_index = dict(uuid_index or {})
        self._signature: tuple[tuple[str, int, int, int], ...] | str | None = None
        self._current: dict[int, Allocation] = {}
        self._warned: set[str] = set()

    def read(self) -> dict[int, Allocation]:
        try:
            files = self._listing()
        except FileNotFoundError:
            if self._signature != "missing":
                log.warning("job-mapping directory %s does not exist: reporting every GPU unallocated", self.path)
                self._signature = "missing"
                self._current = {}
            return {}
        except OSError as exc:
            self._warn_once(f"dir:{exc.errno}", f"job-mapping directory {self.path} cannot be listed ({exc.strerror})")
            return dict(self._current)
        signature = tuple(files)
        if signature != self._signature:
            self._signature = signature
            self._current = self._parse(files)
        return dict(self._current)

    def _listing(self) -> list[tuple[str, int, int, int]]:
        out = []
        with os.scandir(self.path) as it:
            for entry in it:
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except OSError:
                    continue  # removed while listing (epilog): gone next time too
                out.append((entry.name, st.st_mtime_ns, st.st_size, st.st_ino))
        out.sort()
        return out

    def _index_of(self, name: str) -> int | None:
        if _INDEX.fullmatch(name):
            return int(name)
        if name.startswith("GPU-"):
            return self._uuid_index.get(name)
        return None  # MIG instances ("2.11", "MIG-..."), editor and temp files: not ours

    def _parse(self, files: list[tuple[str, int, int, int]]) -> dict[int, Allocation]:
        out: dict[int, Allocation] = {}
        for name, *_ in files:
            index = self._index_of(name)
            if index is None:
                continue
            try:
                text = (self.path / name).read_text(errors="replace")
            except FileNotFoundError:
                continue  # epilog removed it: unallocated
            except OSError as exc:
                self._warn_once(f"file:{name}", f"job-mapping file {self.path / name} cannot be read ({exc.strerror})")
                if index in self._current:
                    out[index] = self._current[index]  # keep this GPU's last good reading
                continue
            jobs = [p for p in (parse_job_line(line) for line in text.splitlines()) if p is not None]
            if not jobs:
                continue  # empty file: nothing allocated
            if len(jobs) > 1:
                self._warn_once(
                    f"shared:{name}:{len(jobs)}",
                    f"GPU {index} lists {len(jobs)} jobs in {self.path / name}; billing it to the first ({jobs[0][1]})",
                )
            self._warned.discard(f"file:{name}")
            account, job = jobs[0]
            out[index] = Allocation(account or self._tenant(job), job)
        return out

    def _tenant(self, job: str) -> str:
        if self._tenant_of is not None:
            try:
                tenant = self._tenant_of(job)
            except Exception:
                log.exception("tenant_of(%r) failed; using the default tenant", job)
                tenant = None
            if tenant:
                return tenant
        return self._default_tenant

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            log.warning("%s", message)


# -- factory -------------------------------------------------------------------------------------


def build_source(
    cfg: AllocationConfig,
    *,
    uuid_index: Mapping[str, int] | None = None,
    tenant_of: Callable[[str], str | None] | None = None,
) -> AllocationSource:
    """The source `agent.allocation` asks for; `ConfigError` (naming the key and the fix) when the
    section is inconsistent. `uuid_index` (GPU UUID -> index) lets files name GPUs by UUID."""
    source = cfg.source
    if source in ("file", "dcgm_job_dir") and not cfg.path:
        what = "the scheduler's allocation JSON file" if source == "file" else "dcgm-exporter's job-mapping directory"
        raise ConfigError(
            f"agent.allocation.source is {source!r} but agent.allocation.path is not set: set it to {what}"
        )
    if source in ("none", "static") and cfg.path:
        raise ConfigError(
            f"agent.allocation.path is set but agent.allocation.source is {source!r}, which reads no file: "
            "set source to 'file' or 'dcgm_job_dir', or remove path"
        )
    if source != "static" and cfg.static:
        raise ConfigError(
            f"agent.allocation.static is only read with source: static (source is {source!r}): "
            "set source: static or remove static"
        )
    if source == "file":
        return SchedulerFileSource(cfg.path or "", uuid_index=uuid_index)
    if source == "dcgm_job_dir":
        return DcgmJobDirSource(
            cfg.path or "", default_tenant=cfg.default_tenant, tenant_of=tenant_of, uuid_index=uuid_index
        )
    if source == "static":
        if not cfg.static:
            raise ConfigError(
                "agent.allocation.source is 'static' but agent.allocation.static is empty: "
                'map GPU indexes to "tenant/job", e.g. static: {"0": "acme/train-1"}'
            )
        try:
            return StaticSource(cfg.static)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return NoAllocationSource()
