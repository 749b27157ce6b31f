"""Mutations for the fuzz tests: valid wire messages turned into hostile ones, deterministically from a seed.

Every operator takes a `random.Random`, so hypothesis drives them (`st.randoms()`, shrinkable and
reproducible) and the end-to-end tests draw a fixed list from a seeded generator. Operators work
on bytes (bit flips, truncation, insertion, deletion, splicing) or on the decoded JSON document
(type swaps, dropped and unknown keys, edge values, random JSON), so both the parser and the
validator see what they must refuse, and many mutations stay valid (a digit changed, a ratio of 0).
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from typing import Any

from gpufleet import wire
from tests.builders import T0_MS, gpu, report

Doc = Any
"""A decoded JSON value (dict, list, str, int, float, bool or None)."""

EDGE_VALUES: tuple[object, ...] = (
    0, -1, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30,
    0.0, -0.0, 1.0, 1.0000000001, 1e-310, 1.7976931348623157e308, -1e308, 0.5,
    "", " ", "0", "1", "null", "NaN", "x" * 256, "y" * 257, "z" * 1024, "w" * 1025, "\u0000", "\ud7ff\ue000",
    "'); DROP TABLE x; --", "{placeholder}", "\u202e", True, False, None, [], {}, [None], {"": None},
)
"""Values at and just past the wire contract's limits, plus types no field takes."""


def base_report(node: str, seq: int, n_gpus: int = 2) -> wire.NodeReport:
    """A valid message: `n_gpus` GPUs with a tenant and job, every value fixed by `tests.builders`."""
    gpus = [gpu(i, node, tenant="acme", job=f"job-{seq % 3}", mem_used_bytes=1 << 30, energy_j=1234.5,
                xids=[13] if i == 0 else []) for i in range(n_gpus)]
    return report(node=node, seq=seq, time_ms=T0_MS + 1000 * seq, gpus=gpus)


def flip_bits(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def insert_bytes(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    pool = [b"\x00", b"\xff", b"\xc3\x28", b'"', b"\\", b",", b"{", b"}", b"[", b"]", b"\\u0000", b"\\ud800",
            b"1e400", b"-", b"NaN", rng.randbytes(rng.randint(1, 8))]
    return data[:i] + rng.choice(pool) + data[i:]


def delete_span(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 16):]


def splice(rng: random.Random, data: bytes) -> bytes:
    """Two copies glued at random points: a message with another's tail."""
    i, j = rng.randrange(len(data)), rng.randrange(len(data))
    return data[:i] + data[j:]


BYTE_OPS: tuple[Callable[[random.Random, bytes], bytes], ...] = (flip_bits, truncate, insert_bytes, delete_span, splice)


def _edge(rng: random.Random) -> Any:
    """A fresh copy of an edge value: the shared list and dict values must never be mutated or nested in themselves."""
    return copy.deepcopy(rng.choice(EDGE_VALUES))


def _paths(doc: Doc, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every path to a value inside `doc` (the root excluded)."""
    out: list[tuple[object, ...]] = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


def _at(doc: Doc, path: tuple[object, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _parent(doc: Doc, path: tuple[object, ...]) -> Any:
    return _at(doc, path[:-1])


def swap_value(rng: random.Random, doc: Doc) -> Doc:
    """One value anywhere replaced by an edge value or a value of another type."""
    paths = _paths(doc)
    if not paths:
        return _edge(rng)
    path = rng.choice(paths)
    _parent(doc, path)[path[-1]] = _edge(rng)
    return doc


def drop_key(rng: random.Random, doc: Doc) -> Doc:
    dict_paths = [p for p in _paths(doc) if isinstance(_parent(doc, p), dict)]
    if dict_paths:
        path = rng.choice(dict_paths)
        del _parent(doc, path)[path[-1]]
    return doc


def add_key(rng: random.Random, doc: Doc) -> Doc:
    targets = [doc] + [v for p in _paths(doc) if isinstance(v := _at(doc, p), dict)]
    if not isinstance(doc, dict):
        targets = targets[1:] or [{}]
    rng.choice(targets)[rng.choice(["extra", "Node", "seq ", "__proto__", "gpus"])] = _edge(rng)
    return doc


def duplicate_gpu(rng: random.Random, doc: Doc) -> Doc:
    if isinstance(doc, dict) and isinstance(doc.get("gpus"), list) and doc["gpus"]:
        doc["gpus"].append(json.loads(json.dumps(rng.choice(doc["gpus"]))))
    return doc


def random_json(rng: random.Random, depth: int = 0) -> Doc:
    """Arbitrary JSON, shallow: objects, arrays and scalars (edge values included)."""
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return _edge(rng)
    if kind == 1:
        return rng.uniform(-1e6, 1e6)
    if kind == 2:
        chars = (rng.choice([rng.randint(32, 126), rng.randint(0, 0x10FFFF)]) for _ in range(rng.randint(0, 8)))
        return "".join(map(chr, chars))
    if kind == 3:
        return rng.randint(-(2**70), 2**70)
    if kind == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_json_key(rng): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def random_json_key(rng: random.Random) -> str:
    return rng.choice(["schema_version", "cluster", "node", "boot_id", "seq", "time_ms", "interval_ms", "gpus",
                       "agent", "index", "uuid", "tenant", "k", ""])


DOC_OPS: tuple[Callable[[random.Random, Doc], Doc], ...] = (swap_value, swap_value, drop_key, add_key, duplicate_gpu)


def _json_bytes(doc: Doc) -> bytes:
    """Encode with Python's json (it writes NaN and Infinity, which are not JSON: good test input)."""
    text = json.dumps(doc, ensure_ascii=False, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def mutate(rng: random.Random, valid: bytes) -> bytes:
    """One hostile variant of the valid message `valid`: a byte-level, document-level or random mutation."""
    choice = rng.random()
    if choice < 0.45:
        return rng.choice(BYTE_OPS)(rng, valid)
    if choice < 0.9:
        doc = json.loads(valid)
        for _ in range(rng.randint(1, 3)):
            doc = rng.choice(DOC_OPS)(rng, doc)
        return _json_bytes(doc)
    return _json_bytes(random_json(rng))

