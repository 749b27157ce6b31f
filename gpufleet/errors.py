"""The error tree: every failure gpufleet reports to a user is a `GpufleetError`.

Each subclass says what went wrong in one line that names the fix, and carries the exit code the
CLI returns (`gpufleet.cli` is the one place that turns them into output; docs/errors.md lists
the codes). Library code raises these; it never prints or exits. The classes that belong to one
part (`MigrationError`, `BillingError`, `RulesError`, `SpoolError` ...) live in that part's
module and derive from the classes here.
"""

from __future__ import annotations

__all__ = ["ConfigError", "GpufleetError", "ServiceError", "StoreError", "UsageError", "first_line"]

USAGE = 2
"""Exit code of a problem the user fixes by running the command differently: configuration, options,
a service that cannot be reached, a store that is missing or not migrated."""
FAILURE = 1
"""Exit code of an operation that was tried and failed (or refused), and of unexpected errors."""


class GpufleetError(Exception):
    """Base of every error gpufleet reports; `str()` is the one line a user sees."""

    exit_code: int = FAILURE
    label: str = ""
    """Prefix of the line the CLI prints (`gpufleet: <label>: <message>`); empty for none."""


class ConfigError(GpufleetError, ValueError):
    """The configuration (file, option or environment) is wrong; the message names the key and the fix."""

    exit_code = USAGE
    label = "configuration error"


class UsageError(GpufleetError, ValueError):
    """The command cannot do what it was asked here (e.g. tenant users on chDB); the message says what can."""

    exit_code = USAGE


class ServiceError(GpufleetError, RuntimeError):
    """A service gpufleet talks to (Grafana, Alertmanager, the broker) cannot be reached or refused."""

    exit_code = USAGE


class StoreError(ServiceError):
    """ClickHouse could not be opened, reached or read; the message names the DSN (redacted) and why."""


def first_line(exc: BaseException) -> str:
    """The first line of another library's exception, or its type when it has no text: what a
    `GpufleetError` quotes of the failure it wraps (database and HTTP errors may span many lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
