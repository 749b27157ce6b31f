"""OTLP/HTTP bodies in and out (pure): decompress with a size cap, parse protobuf or JSON, encode replies.

Requests: `application/x-protobuf` (binary protobuf) or `application/json` (the OTLP/JSON
mapping: protobuf's JSON mapping, unknown fields ignored), optionally `Content-Encoding: gzip`
or `deflate`. Replies use the request's encoding: `ExportMetricsServiceResponse` (with
`partial_success` when points were rejected) on success, a `google.rpc.Status` on errors, as
the OTLP specification asks. Exemplars are dropped before JSON parsing: OTLP/JSON writes their
trace ids in hex where protobuf's JSON mapping expects base64, and the agent does not use them.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Final

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from gpufleet.flops_contract import JSON, PROTOBUF

ENCODINGS: Final = ("identity", "gzip", "deflate")
MEDIA_TYPES: Final = (PROTOBUF, JSON)


class BodyError(ValueError):
    """The request body cannot be read; `status` is the HTTP status to answer with, the text says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP reply: status, a one-line reason, the body and its content type, extra headers."""

    status: int
    reason: str
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def media_type(content_type: str | None) -> str:
    """`application/json; charset=utf-8` -> `application/json`."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """Undo `Content-Encoding`, refusing to inflate past `max_bytes` (a gzip bomb gets 413, not memory)."""
    enc = encoding.strip().lower() or "identity"
    if enc == "identity":
        return body
    if enc not in ENCODINGS:
        raise BodyError(415, f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    wbits = 16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise BodyError(400, f"body is not valid {enc} data: {exc}") from None
    if len(out) > max_bytes:
        raise BodyError(413, f"body inflates to more than {max_bytes} bytes; send smaller batches")
    if not inflater.eof:
        raise BodyError(400, f"body is truncated {enc} data")
    return out


def parse_request(body: bytes, media: str) -> ExportMetricsServiceRequest:
    """Parse an uncompressed body as an `ExportMetricsServiceRequest`; `BodyError(400)` names the problem."""
    if media == PROTOBUF:
        return _parse_protobuf(body)
    if media == JSON:
        return _parse_json(body)
    raise BodyError(415, f"Content-Type {media!r} is not supported; use {PROTOBUF} or {JSON}")


def _parse_protobuf(body: bytes) -> ExportMetricsServiceRequest:
    try:
        request = ExportMetricsServiceRequest.FromString(body)
    except DecodeError:
        raise BodyError(400, "body is not a valid protobuf ExportMetricsServiceRequest (wire format corrupt)") from None
    if body and not request.resource_metrics and len(UnknownFieldSet(request)):
        raise BodyError(400, "body is protobuf but not an ExportMetricsServiceRequest (no resource_metrics)")
    return request


def _parse_json(body: bytes) -> ExportMetricsServiceRequest:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BodyError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BodyError(400, f"body must be a JSON object (ExportMetricsServiceRequest), got {type(doc).__name__}")
    _drop_exemplars(doc)
    try:
        return json_format.ParseDict(doc, ExportMetricsServiceRequest(), ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, TypeError, ValueError) as exc:
        raise BodyError(400, f"body is not a valid OTLP/JSON ExportMetricsServiceRequest: {exc}") from None


def _drop_exemplars(node: object) -> None:
    """Remove every `exemplars` list in place (iteratively: a hostile document cannot recurse us out)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            item.pop("exemplars", None)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def encode(message: Message, media: str) -> bytes:
    if media == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


def success(media: str, rejected: int = 0, message: str = "") -> Reply:
    """200 with an `ExportMetricsServiceResponse`; `partial_success` set when points were rejected."""
    response = ExportMetricsServiceResponse()
    if rejected:
        response.partial_success.rejected_data_points = rejected
        response.partial_success.error_message = message
    return Reply(200, "OK", encode(response, media), media)


_GRPC_CODE: Final = {400: 3, 404: 12, 405: 12, 411: 3, 413: 8, 415: 3, 429: 8, 500: 13, 503: 14}
"""HTTP status -> google.rpc.Code carried in the Status body (INVALID_ARGUMENT, UNIMPLEMENTED, ...)."""


def failure(status: int, message: str, media: str, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """An error reply: a `google.rpc.Status` in the request's encoding, plain text when that is unknown.

    The reason phrase carries the message too, because OTel exporters log the reason phrase.
    """
    reason = " ".join(message.split())[:200].encode("ascii", "replace").decode()
    if media in MEDIA_TYPES:
        body = encode(Status(code=_GRPC_CODE.get(status, 2), message=message), media)
        return Reply(status, reason, body, media, headers)
    return Reply(status, reason, (message + "\n").encode(), "text/plain; charset=utf-8", headers)
