"""Which tenant and job hold each GPU of this node: the allocation sources the agent reads every interval.

Design notes: docs/design-notes.md#agents-allocation-py.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol, runtime_checkable

import msgspec

from gpufleet.config import AllocationConfig, ConfigError
from gpufleet.errors import USAGE, GpufleetError
from gpufleet.wire import MAX_SHARE_WEIGHT, MAX_SHARES, GpuSample, Share

log = logging.getLogger(__name__)

_INDEX = re.compile(r"[0-9]{1,4}")
_UUID_PREFIXES = ("GPU-", "MIG-")


@dataclass(frozen=True, slots=True)
class Allocation:
    """The tenant (and job, when known) holding one GPU."""

    tenant: str
    job: str | None = None


@dataclass(frozen=True, slots=True)
class Holder:
    """One of several jobs holding one device, and its weight in the split of the device's time."""

    tenant: str
    job: str | None = None
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Shared:
    """Several jobs hold one device (time-slicing replicas, MPS, processes of several Slurm jobs)."""

    holders: tuple[Holder, ...]


@dataclass(frozen=True, slots=True)
class Unknown:
    """The source cannot say who holds this device now; `reason` says why (logged, never billed)."""

    reason: str


Answer = Allocation | Shared | Unknown
Key = int | str
"""A GPU index, or a device UUID (`GPU-...`, `MIG-...`)."""


@runtime_checkable
class AllocationSource(Protocol):
    """Answers which GPUs of this node are allocated, to whom, right now."""

    def read(self) -> Mapping[Key, Answer]:
        """GPU index or device UUID -> answer; a device with no answer is unallocated.
        Raises `AllocationUnknown` (only) when it cannot say anything this interval."""
        ...


class AllocationUnknown(RuntimeError):
    """The source cannot say who holds any GPU this interval (e.g. the kubelet does not answer): a signal to
    the agent, which sends the interval with every GPU's allocation unknown."""


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
    devices: Callable[[], Any] | None = None,
) -> AllocationSource:
    """The source `agent.allocation` asks for; `ConfigError` (naming the key and the fix) when the
    section is inconsistent. `uuid_index` (GPU UUID -> index) lets files name GPUs by UUID; `devices`
    (the collector's `devices`, what NVML says runs on each GPU) feeds `slurm`."""
    source = cfg.source
    _check_scheduler_keys(cfg)
    if source in ("file", "dcgm_job_dir") and not cfg.path:
        what = "the scheduler's allocation JSON file" if source == "file" else "dcgm-exporter's job-mapping directory"
        raise ConfigError(
            f"agent.allocation.source is {source!r} but agent.allocation.path is not set: set it to {what}"
        )
    if source in ("none", "static", "kubernetes", "slurm") and cfg.path:
        raise ConfigError(
            f"agent.allocation.path is set but agent.allocation.source is {source!r}, which reads no file: "
            "set source to 'file' or 'dcgm_job_dir', or remove path"
        )
    if source != "static" and cfg.static:
        raise ConfigError(
            f"agent.allocation.static is only read with source: static (source is {source!r}): "
            "set source: static or remove static"
        )
    if source == "kubernetes":
        return _kubernetes(cfg, uuid_index)
    if source == "slurm":
        from gpufleet.agents.slurm import SlurmSource

        return SlurmSource(devices or tuple, proc_root=cfg.proc_root, cgroup_root=cfg.cgroup_root,
                           tenant_field=cfg.slurm_tenant, share_by=cfg.share_by)
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


# -- stamping samples ----------------------------------------------------------------------------


def answer_for(gpu: GpuSample, allocation: Mapping[Key, Answer]) -> Answer | None:
    """The answer for one sample: by its UUID, then (a MIG instance) its parent's UUID, then its index."""
    found = allocation.get(gpu.uuid)
    if found is None and gpu.parent_uuid is not None:
        found = allocation.get(gpu.parent_uuid)
    return allocation.get(gpu.index) if found is None else found


def merged(holders: Iterable[Holder]) -> tuple[Holder, ...]:
    """Holders with the same tenant and job as one (weights added), in first-seen order."""
    weights: dict[tuple[str, str | None], int] = {}
    for h in holders:
        weights[(h.tenant, h.job)] = weights.get((h.tenant, h.job), 0) + h.weight
    return tuple(Holder(t, j, w) for (t, j), w in weights.items())


def attribution_fields(answer: Answer | None) -> dict[str, Any]:
    """The sample fields an answer sets: tenant, job, shares, allocation_unknown (wire rules: a shared
    GPU names the holder of the largest weight, the first of equals)."""
    if answer is None:
        return {"tenant": None, "job": None, "shares": [], "allocation_unknown": False}
    if isinstance(answer, Unknown):
        return {"tenant": None, "job": None, "shares": [], "allocation_unknown": True}
    if isinstance(answer, Shared):
        holders = merged(answer.holders)
        if len(holders) > 1:
            shares = [Share(h.tenant, h.job, max(1, min(h.weight, MAX_SHARE_WEIGHT))) for h in holders[:MAX_SHARES]]
            top = max(shares, key=lambda s: s.weight)
            return {"tenant": top.tenant, "job": top.job, "shares": shares, "allocation_unknown": False}
        if not holders:
            return attribution_fields(None)
        answer = Allocation(holders[0].tenant, holders[0].job)
    return {"tenant": answer.tenant, "job": answer.job, "shares": [], "allocation_unknown": False}


_K8S_KEYS = ("namespace_tenants", "tenant_label", "tenant_annotation", "job_label")


def _check_scheduler_keys(cfg: AllocationConfig) -> None:
    """Kubernetes keys belong to `source: kubernetes` only."""
    given = [k for k in _K8S_KEYS if getattr(cfg, k)]
    if given and cfg.source != "kubernetes":
        raise ConfigError(f"agent.allocation.{given[0]} is only read with source: kubernetes (source is "
                          f"{cfg.source!r}): set source: kubernetes or remove it")


def _kubernetes(cfg: AllocationConfig, uuid_index: Mapping[str, int] | None) -> AllocationSource:
    try:
        from gpufleet.agents.kubelet.source import KubeletSource
        from gpufleet.agents.kubelet.tenants import TenantResolver, TenantRules
    except ImportError as exc:
        raise ConfigError(f"agent.allocation.source 'kubernetes' needs grpcio ({exc}): install the agent with the "
                          "extra gpufleet[kubernetes] (the DaemonSet's image has it)") from None
    rules = TenantRules(dict(cfg.namespace_tenants), cfg.tenant_label, cfg.tenant_annotation, cfg.job_label,
                        cfg.pod_metadata_ttl_s)
    if rules.needs_api:
        import importlib.util

        if importlib.util.find_spec("kubernetes") is None:
            raise ConfigError("agent.allocation.tenant_label, tenant_annotation and job_label are read through the "
                              "Kubernetes API: install the extra gpufleet[kubernetes]")
    return KubeletSource(cfg.kubelet_socket, TenantResolver(rules), timeout_s=cfg.kubelet_timeout_s,
                         uuid_index=uuid_index)
