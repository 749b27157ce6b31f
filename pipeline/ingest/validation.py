"""What the ingester admits: a message that follows the wire contract, keyed by its node, dated inside
the time window around the ingester's clock. Anything else is dead-lettered with the reason these
functions return (docs/security.md, "Bad input"; docs/reliability.md, G14).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import msgspec

from gpufleet import wire
from gpufleet.config import Config

DAY_MS = 86_400_000


def validate(key: bytes | None, value: bytes | None) -> wire.NodeReport | str:
    """The report, or the reason it is dead-lettered."""
    if value is None:
        return "empty message (tombstone): agents never send one"
    try:
        report = wire.decode(value)
    except wire.WireError as exc:
        return str(exc)
    if key is None:
        return "message has no key: agents key each message by node name"
    try:
        node = key.decode("utf-8")
    except UnicodeDecodeError:
        return "message key is not UTF-8: agents key each message by node name"
    if node != report.node:
        return f"message key {node!r} does not match its node {report.node!r}"
    return report


def validate_for_staging(
    decoder: msgspec.json.Decoder[wire.NodeReport], key: bytes | None, value: bytes | None
) -> tuple[wire.NodeReport | str, bool]:
    """`validate`, first trying the staging path's bounded decoder: (result, whether JSON may carry it).

    The bounded decoder admits a subset of what `wire.decode` admits, with the same values; the checks
    `wire.decode` and `validate` make after decoding are repeated here, and anything that fails any
    of them goes through `validate` itself, so dead-letter reasons are exactly `validate`'s.
    """
    if value is not None and key is not None and len(value) <= wire.MAX_MESSAGE_BYTES:
        try:
            report = decoder.decode(value)
        except (msgspec.DecodeError, UnicodeDecodeError):
            pass
        else:
            gpus = report.gpus
            if (report.schema_version == wire.SCHEMA_VERSION and key == report.node.encode()
                    and len({g.uuid for g in gpus}) == len(gpus)):
                return report, True
    return validate(key, value), False


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class TimeWindow:
    """The sample times the ingester stores, relative to its clock: `[now - max_past_ms, now + max_future_ms]`.

    The past bound is the raw samples' TTL: an older sample would be dropped from `gpu_samples` and
    `agent_reports` by the TTL at once while the rollups (kept for good) billed it. The future bound
    is the clock skew tolerated between an agent and the ingester: a later sample would be billed in
    an hour that has not happened yet, and would move every "newest sample" reading (status, lag).
    """

    max_future_ms: int
    max_past_ms: int

    @classmethod
    def from_config(cls, cfg: Config) -> TimeWindow:
        return cls(cfg.ingest.max_future_s * 1000, cfg.clickhouse.raw_ttl_days * DAY_MS)

    def check(self, time_ms: int, now_ms: int) -> str | None:
        """None when `time_ms` is inside the window around `now_ms`, else the dead-letter reason."""
        if time_ms > now_ms + self.max_future_ms:
            return (f"time_ms {time_ms} ({_iso(time_ms)}) is more than ingest.max_future_s = "
                    f"{self.max_future_ms // 1000} s ahead of the ingester's clock ({_iso(now_ms)}): "
                    "fix the agent's clock (NTP), or raise ingest.max_future_s")
        if time_ms < now_ms - self.max_past_ms:
            return (f"time_ms {time_ms} ({_iso(time_ms)}) is older than clickhouse.raw_ttl_days = "
                    f"{self.max_past_ms // DAY_MS} days before the ingester's clock ({_iso(now_ms)}): raw samples "
                    "that old are dropped on arrival; fix the agent's clock, or raise clickhouse.raw_ttl_days "
                    "to ingest an older backlog")
        return None
