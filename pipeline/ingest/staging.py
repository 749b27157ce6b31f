"""The fast insert path: validated message bytes go to ClickHouse as they arrived, unnested by a view.

Design notes: docs/design-notes.md#pipeline-ingest-staging-py.
"""

from __future__ import annotations

import hashlib
import logging
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from gpufleet.pipeline.ingest.rows import SAMPLE_COLUMNS, Derived, share_of_peak
from gpufleet.wire import GPU_FIELDS, GpuSample, NodeReport

if TYPE_CHECKING:
    from gpufleet.pipeline.store import Store

log = logging.getLogger(__name__)

FLOAT32_MAX = 3.4028234663852886e38
INT64_MAX = 2**63 - 1
_UINT_BITS = {"UInt8": 8, "UInt16": 16, "UInt32": 32, "UInt64": 64}
_RENAMED = {"index": "gpu_index", "uuid": "gpu_uuid"}
_DEFAULTED = ("model", "tenant", "job", "error", "parent_uuid", "mig_profile")
"""Nullable on the wire, '' in gpu_samples."""
_REPORT_BOUNDS = {"seq": INT64_MAX, "time_ms": INT64_MAX}
_SAMPLE_COLUMNS = "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = 'gpu_samples'"
_STAGING_TABLES = "SELECT name FROM system.tables WHERE database = {db:String} AND name LIKE 'gpu_samples_json_%'"
"""gpu_samples.seq is UInt64 and time DateTime64(3) (Int64 milliseconds); msgspec bounds stop at int64."""

INSERT_SETTINGS: Mapping[str, object] = {
    "precise_float_parsing": 1,
    "input_format_parallel_parsing": 0,
    "input_format_skip_unknown_fields": 1,
    "input_format_json_named_tuples_as_objects": 1,
    "input_format_json_defaults_for_missing_elements_in_named_tuple": 1,
    "compile_expressions": 0,
    "max_insert_block_size": 10_000_000,
    "max_block_size": 10_000_000,
}
"""`skip_unknown_fields` only skips what the staging table leaves out on purpose (`schema_version`,
`agent`): the decoder already refused any key the wire contract does not define."""

_model_of = operator.attrgetter("model")


class StagingUnsupported(RuntimeError):
    """gpu_samples has a column type the staging path does not map; the column path is used."""


def _unwrap(kind: str, wrapper: str) -> tuple[str, bool]:
    if kind.startswith(wrapper + "(") and kind.endswith(")"):
        return kind[len(wrapper) + 1:-1], True
    return kind, False


def _bounded(info: Any, *, le: float | None = None, ge: float | None = None) -> Any:
    """The Python type of an msgspec Int/FloatType, with its constraints tightened to [ge, le]."""
    if isinstance(info, msgspec.inspect.UnionType):
        inner = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
        if len(inner) != 1 or len(info.types) != 2:
            raise StagingUnsupported(f"cannot bound the union {info}")
        return _bounded(inner[0], le=le, ge=ge) | None
    base = {msgspec.inspect.IntType: int, msgspec.inspect.FloatType: float}.get(type(info))
    if base is None:
        raise StagingUnsupported(f"cannot bound {info}")
    new_le = le if info.le is None else (info.le if le is None else min(info.le, le))
    new_ge = ge if info.ge is None else (info.ge if ge is None else max(info.ge, ge))
    return Annotated[base, msgspec.Meta(ge=new_ge, le=new_le, gt=info.gt, lt=info.lt,
                                        multiple_of=info.multiple_of)]


def _field_default(f: Any) -> Any:
    if f.default is not msgspec.NODEFAULT:
        return f.default
    if f.default_factory is not msgspec.NODEFAULT:
        return msgspec.field(default_factory=f.default_factory)
    return msgspec.NODEFAULT


def bounded_report_type(gpu_bounds: Mapping[str, tuple[float | None, float | None]]) -> type[NodeReport]:
    """A subclass of `NodeReport` (and of `GpuSample` for its GPUs) whose fields in `gpu_bounds`
    (name -> (ge, le)) and `seq`/`time_ms` are bounded; everything else is the wire contract's."""
    overrides: list[tuple[Any, ...]] = []
    for f in msgspec.inspect.type_info(GpuSample).fields:
        if f.name in gpu_bounds:
            ge, le = gpu_bounds[f.name]
            default = _field_default(f)
            spec = (f.name, _bounded(f.type, ge=ge, le=le))
            overrides.append(spec if default is msgspec.NODEFAULT else (*spec, default))
    options = {"forbid_unknown_fields": True, "omit_defaults": True}
    gpu = msgspec.defstruct("GpuSample", overrides, bases=(GpuSample,), **options)
    report_fields: list[tuple[Any, ...]] = [("gpus", list[gpu])]  # type: ignore[valid-type]
    for f in msgspec.inspect.type_info(NodeReport).fields:
        if f.name in _REPORT_BOUNDS:
            report_fields.append((f.name, _bounded(f.type, le=_REPORT_BOUNDS[f.name])))
    return msgspec.defstruct("NodeReport", report_fields, bases=(NodeReport,), **options)


@dataclass(frozen=True)
class Staging:
    """The staging table of one database, the SQL that made it, and the decoder that admits messages to it."""

    table: str
    view: str
    statements: tuple[str, ...]
    decoder: msgspec.json.Decoder[NodeReport] = field(repr=False, compare=False)


def plan(database: str, column_types: Mapping[str, str], cluster: str | None = None) -> Staging:
    """The staging table and view for `gpu_samples` with these column types (pure: no I/O)."""
    gpu_types: list[str] = []
    by_column: dict[str, str] = {}
    bounds: dict[str, tuple[float | None, float | None]] = {}
    for f in GPU_FIELDS:
        column = _RENAMED.get(f, f)
        target = column_types.get(column)
        if target is None:
            raise StagingUnsupported(f"gpu_samples has no column {column!r} for wire field {f!r}")
        inner, nullable = _unwrap(target, "Nullable")
        inner = _unwrap(inner, "LowCardinality")[0]
        expr = f"g.{f}"
        if f in _DEFAULTED:
            if inner != "String":
                raise StagingUnsupported(f"gpu_samples.{column} is {target}, expected a String")
            stage = "Nullable(String)"
            expr = "if(ifNull(g.tenant, '') = '', '', ifNull(g.job, ''))" if f == "job" else f"ifNull(g.{f}, '')"
        elif inner in _UINT_BITS:
            stage = f"Nullable({inner})" if nullable else inner
            bounds[f] = (None, min(2 ** _UINT_BITS[inner] - 1, INT64_MAX))  # msgspec bounds stop at int64
        elif inner == "Float32":
            stage = "Nullable(Float64)" if nullable else "Float64"
            bounds[f] = (-FLOAT32_MAX, FLOAT32_MAX)
        elif inner in ("Float64", "Bool", "String", "Array(UInt16)") or inner.startswith("Array(Tuple("):
            stage = f"Nullable({inner})" if nullable else inner
        else:
            raise StagingUnsupported(f"gpu_samples.{column} has type {target}, which the JSON path does not map")
        gpu_types.append(f"{f} {stage}")
        by_column[column] = f"{expr} AS {column}"
    derived = {
        "time": "fromUnixTimestamp64Milli(time_ms, 'UTC') AS time",
        "interval_ms": "interval_ms",
        "claimed_ms": "d_claimed AS claimed_ms",
        "claim_start": "fromUnixTimestamp64Milli(d_claim_start, 'UTC') AS claim_start",
        "ingest_time": "fromUnixTimestamp64Milli(_t, 'UTC') AS ingest_time",
        "cluster": "cluster", "node": "node", "boot_id": "boot_id", "seq": "seq",
        "peak_flops": "d_peak AS peak_flops",
        "flops_estimated": ("if(d_peak IS NULL OR g.tensor_active_ratio IS NULL OR ifNull(g.error, '') != '', NULL, "
                            "g.tensor_active_ratio * d_peak * interval_ms / 1000.) AS flops_estimated"),
        "health": "d_health AS health", "health_reasons": "d_reasons AS health_reasons",
        "health_change": "d_change AS health_change",
    }
    columns = [derived.get(c) or by_column[c] for c in SAMPLE_COLUMNS]
    structure = (
        "cluster String, node String, boot_id String, seq UInt64, time_ms Int64, interval_ms UInt32, "
        f"gpus Array(Tuple({', '.join(gpu_types)})), "
        "_p Array(Nullable(Float64)), _h Array(UInt8), _r Array(Array(String)), "
        "_c Array(UInt32), _s Array(Int64), _k Array(UInt8), _t Int64"
    )
    select = (f"SELECT {', '.join(columns)} FROM {{table}} "
              "ARRAY JOIN gpus AS g, _p AS d_peak, _h AS d_health, _r AS d_reasons, "
              "if(empty(_c), arrayWithConstant(length(gpus), interval_ms), _c) AS d_claimed, "
              "if(empty(_s), arrayWithConstant(length(gpus), time_ms - interval_ms), _s) AS d_claim_start, "
              "if(empty(_k), arrayWithConstant(length(gpus), toUInt8(0)), _k) AS d_change")
    digest = hashlib.sha256(f"{structure}\n{select}".encode()).hexdigest()[:10]
    table = f"{database}.gpu_samples_json_{digest}"
    view = f"{table}_mv"
    on_cluster = f" ON CLUSTER '{cluster}'" if cluster else ""
    statements = (
        f"CREATE TABLE IF NOT EXISTS {table}{on_cluster} ({structure}) ENGINE = Null "
        "COMMENT 'gpufleet ingester staging (pipeline/ingest/staging.py): stores nothing'",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view}{on_cluster} TO {database}.gpu_samples AS "
        + select.format(table=table),
    )
    return Staging(table, view, statements, msgspec.json.Decoder(bounded_report_type(bounds)))


def ensure(store: Store, cluster: str | None = None) -> Staging:
    """Create (if missing) the staging table and view in the store's database; raises if it cannot."""
    staging = plan(store.database, dict(store.rows(_SAMPLE_COLUMNS)), cluster)
    for statement in staging.statements:
        store.command(statement)
    names = {store.table(n) for (n,) in store.rows(_STAGING_TABLES)}
    if not {staging.table, staging.view} <= names:
        raise StagingUnsupported(f"{staging.table} or its view did not appear after CREATE")
    return staging


_TABLE_COLUMNS = ("SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {table:String} "
                  "ORDER BY position")


def adopt(store: Store, table: str, cluster: str | None = None) -> Staging | None:
    """The staging table `table` (`db.name`, recorded with a batch another ingester planned) as this ingester's
    to send through, when it takes exactly the input this version's splicer writes; None otherwise.

    Its view may differ from this version's: it then turns the rows into what the version that planned the
    batch wrote, which is what repeating that batch exactly needs."""
    ours = ensure(store, cluster)
    if table == ours.table:
        return ours
    database, _, name = table.partition(".")
    ours_db, _, ours_name = ours.table.partition(".")
    theirs = store.rows(_TABLE_COLUMNS, {"db": database, "table": name})
    mine = store.rows(_TABLE_COLUMNS, {"db": ours_db, "table": ours_name})
    if not theirs or [tuple(c) for c in theirs] != [tuple(c) for c in mine]:
        return None
    return Staging(table, f"{table}_mv", (), ours.decoder)


_TRAILING_WS = b" \t\r\n"


class Splicer:
    """Builds the JSONEachRow block: each message's bytes with the derived arrays added.

    The arrays repeat from message to message (same models, all GPUs healthy), so their encodings
    are cached: the common message costs a slice, two dictionary lookups and a join.
    """

    MAX_CACHED = 4096

    def __init__(self, peak: Callable[[str | None], float | None]) -> None:
        self._peak = peak
        self._peaks: dict[tuple[object, ...], bytes] = {}
        self._healthy: dict[int, bytes] = {}
        self._encode = msgspec.json.Encoder().encode
        self._buf = bytearray()

    def _peaks_part(self, gpus: list[GpuSample]) -> bytes:
        """Each sample's peak FLOP/s (a MIG instance's share of its model's), cached by models (and shares)."""
        mig = any(g.slices is not None for g in gpus)
        key: tuple[object, ...] = tuple(map(_model_of, gpus)) if not mig else tuple(
            (g.model, g.slices, g.slices_total) for g in gpus)
        part = self._peaks.get(key)
        if part is None:
            if len(self._peaks) >= self.MAX_CACHED:
                self._peaks.clear()
            part = self._peaks[key] = b',"_p":' + self._encode([share_of_peak(self._peak(g.model), g) for g in gpus])
        return part

    def _health_part(self, health: list[int], reasons: list[list[str]]) -> bytes:
        if any(health):
            return b',"_h":' + self._encode(health) + b',"_r":' + self._encode(reasons)
        n = len(health)
        part = self._healthy.get(n)
        if part is None:
            part = self._healthy[n] = b',"_h":' + self._encode([0] * n) + b',"_r":' + self._encode([[]] * n)
        return part

    def _changes_part(self, changes: list[int]) -> bytes:
        """Nothing when every sample is `same` as the GPU's previous one (the view fills that in), else `_k`."""
        return b',"_k":' + self._encode(changes) if any(changes) else b""

    def _claims_part(self, report: NodeReport, claimed: list[int], starts: list[int]) -> bytes:
        """Nothing when every sample claims its whole interval (the view fills that in), else `_c` and `_s`."""
        if claimed.count(report.interval_ms) == len(claimed):
            return b""
        return b',"_c":' + self._encode(claimed) + b',"_s":' + self._encode(starts)

    def block(self, derived: Derived, raw_of: Mapping[int, bytes], keep: Sequence[bool],
              ingest_ms: int) -> memoryview:
        """JSONEachRow rows for the kept reports of `derived`; `raw_of` maps id(report) to its bytes.

        The rows are written into one buffer the splicer keeps and reuses: a fresh buffer of tens
        of MB per batch costs more in page faults than the copy itself. The view is valid until
        the next call (the ingester inserts it before building the next batch).
        """
        tail = b',"_t":%d}\n' % ingest_ms
        health, reasons, claimed, starts = derived.health, derived.reasons, derived.claimed, derived.claim_start
        changes = derived.changes
        parts: list[bytes | memoryview] = []
        add = parts.append
        size = pos = 0
        for report, n, k in zip(derived.reports, derived.counts, keep, strict=True):
            end = pos + n
            if k:
                raw = raw_of[id(report)].rstrip(_TRAILING_WS)
                peaks = self._peaks_part(report.gpus)
                state = self._health_part(health[pos:end], reasons[pos:end])
                claims = self._claims_part(report, claimed[pos:end], starts[pos:end])
                marks = self._changes_part(changes[pos:end])
                add(memoryview(raw)[:-1])
                add(peaks)
                add(state)
                if claims:
                    add(claims)
                if marks:
                    add(marks)
                add(tail)
                size += len(raw) - 1 + len(peaks) + len(state) + len(claims) + len(marks) + len(tail)
            pos = end
        buf = self._buf
        if size > len(buf):
            buf = self._buf = bytearray(max(size, 2 * len(buf)))  # the old one lives on while a view holds it
        at = 0
        for part in parts:
            n = len(part)
            buf[at:at + n] = part
            at += n
        return memoryview(buf)[:at]


def insert(store: Store, staging: Staging, block: memoryview, settings: Mapping[str, object] | None = None) -> None:
    """Send a `Splicer.block` through the staging table (its view writes gpu_samples); `settings` add to
    `INSERT_SETTINGS` (the ingester's dedup token)."""
    if len(block):
        store.client.raw_insert(staging.table, insert_block=block, fmt="JSONEachRow",
                          settings={**INSERT_SETTINGS, **(settings or {})})
