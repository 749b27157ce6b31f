"""The error tree: every failure gpufleet reports to a user is a `GpufleetError`.

Each subclass says what went wrong in one line that names the fix, and carries the exit code the
CLI returns (`gpufleet.cli.main` is the one place that turns them into output). Library code
raises these; it never prints or exits.
"""

from __future__ import annotations


class GpufleetError(Exception):
    """Base of every error gpufleet reports; `str()` is the one line a user sees."""

    exit_code: int = 1


class ConfigError(GpufleetError, ValueError):
    """The configuration (file, option or environment) is wrong; the message names the key and the fix."""

    exit_code = 2


class StoreError(GpufleetError, RuntimeError):
    """ClickHouse could not be opened, reached or read; the message names the DSN (redacted) and why."""

    exit_code = 2
