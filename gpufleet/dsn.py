"""ClickHouse DSNs and database names: one parser, the checks and the redaction every layer shares.

A database name goes into DDL as an identifier, so it is restricted to a safe pattern. A DSN is
split by `parse` (which, unlike `urllib.parse.urlsplit`, keeps a password holding an unencoded `/`
or `@` whole) and shown only through `redact`, which hides the password wherever it is written:
in the user-info part or as a `?password=` query parameter. No client import here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from gpufleet.errors import StoreError

_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|api_?key|access_?key", re.IGNORECASE)
"""Query parameters whose value is hidden by `redact` (password, passwd, pwd, access_token, api_key ...)."""
_PARAM = re.compile(r"(^|[&;])([^=&;]*)=([^&;]*)")
MASK = "***"


@dataclass(frozen=True)
class Dsn:
    """A DSN split into its parts, each as written (percent-encoding kept)."""

    scheme: str
    userinfo: str | None
    """Everything before the `@` that ends the user-info part; None when there is none."""
    hostport: str
    tail: str
    """Path, query and fragment: from the first `/`, `?` or `#` after the host on."""

    @property
    def username(self) -> str | None:
        return None if self.userinfo is None else unquote(self.userinfo.partition(":")[0])

    @property
    def raw_password(self) -> str | None:
        """The password as written: in the user-info part, else a `password=` query parameter."""
        if self.userinfo is not None and ":" in self.userinfo:
            return self.userinfo.partition(":")[2]
        params = [v for k, v in query_params(self.tail) if unquote(k).lower() == "password"]
        return params[0] if params else None

    @property
    def password(self) -> str | None:
        raw = self.raw_password
        return None if raw is None else unquote(raw)

    def host_part(self) -> SplitResult:
        """The host and port as `urlsplit` reads them (`.hostname`, `.port`, which checks the port when read)."""
        return urlsplit(f"{self.scheme}://{self.hostport}")

    def secrets(self) -> list[str]:
        """Every form a password in this DSN may take in a message: as written and decoded, each value of a
        secret query parameter too."""
        values = [self.userinfo.partition(":")[2]] if self.userinfo and ":" in self.userinfo else []
        values += [v for k, v in query_params(self.tail) if _SECRET_PARAM.search(unquote(k))]
        found = {form for v in values if v for form in (v, unquote(v))}
        return sorted(found, key=len, reverse=True)


def _split_tail(tail: str) -> tuple[str, str | None, str | None]:
    """A tail as (path, query, fragment), without separators; None for a part that is absent."""
    head, hash_, fragment = tail.partition("#")
    path, mark, query = head.partition("?")
    return path, query if mark else None, fragment if hash_ else None


def query_params(tail: str) -> list[tuple[str, str]]:
    """`(name, value)` of each query parameter in a DSN's tail, as written."""
    return [(m.group(2), m.group(3)) for m in _PARAM.finditer(_split_tail(tail)[1] or "")]


def parse(dsn: str) -> Dsn | None:
    """Split `scheme://[user[:password]@]host[:port][/path][?query][#fragment]`; None without `://`.

    The user-info part ends at the last `@` before the first `?` or `#`, so a password may hold
    an unencoded `/`, `:` or `@` (never `?` or `#`: percent-encode those).
    """
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return None
    before_query = re.split(r"[?#]", rest, maxsplit=1)[0]
    at = before_query.rfind("@")
    userinfo = rest[:at] if at >= 0 else None
    after = rest[at + 1:]
    end = re.search(r"[/?#]", after)
    cut = end.start() if end else len(after)
    return Dsn(scheme.lower(), userinfo, after[:cut], after[cut:])


def redact(dsn: str) -> str:
    """The DSN (or URL) with every password replaced by `***`, safe to log."""
    parts = parse(dsn)
    if parts is None:
        return dsn
    head = f"{dsn.partition('://')[0]}://"
    if parts.userinfo is not None:
        user, colon, _ = parts.userinfo.partition(":")
        head += f"{user}{colon}{MASK if colon else ''}@"
    return head + parts.hostport + _redact_query(parts.tail)


def _redact_query(tail: str) -> str:
    path, query, fragment = _split_tail(tail)

    def param(m: re.Match[str]) -> str:
        hidden = _SECRET_PARAM.search(unquote(m.group(2)))
        return f"{m.group(1)}{m.group(2)}={MASK if hidden else m.group(3)}"

    return (path + ("" if query is None else "?" + _PARAM.sub(param, query))
            + ("" if fragment is None else "#" + fragment))


def scrub(message: str, secrets: list[str]) -> str:
    """`message` with each of `secrets` (longest first) replaced by `***`."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        message = message.replace(secret, MASK)
    return message


def check_database_name(name: str) -> str:
    """Database names go into DDL as identifiers, so they are restricted to a safe pattern."""
    if not _DB_NAME.match(name):
        raise StoreError(
            f"database name {name!r} is not allowed: use letters, digits and '_' (e.g. 'gpufleet')"
        )
    return name
