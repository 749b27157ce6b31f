"""The funnel every NVML device call goes through: one place that counts calls and classifies errors.

Design notes: docs/design-notes.md#agents-collectors-nvml-funnel-py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Final

log = logging.getLogger(__name__)

NOT_FOUND: Final = object()
"""What `Funnel.call` returns when the call answered NotFound and the caller said that is expected."""


class GpuLost(Exception):
    """The GPU itself is gone (fallen off the bus, reset required); abandons that GPU for the interval."""


class LibraryDown(Exception):
    """NVML as a whole is unusable (uninitialized, driver not loaded, library and driver differ)."""


@dataclass
class Counters:
    """NVML calls and failures of one GPU since the collector last took them (thread-safe)."""

    calls: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, calls: int = 0, errors: int = 0) -> None:
        with self.lock:
            self.calls += calls
            self.errors += errors

    def take(self) -> tuple[int, int]:
        with self.lock:
            out = (self.calls, self.errors)
            self.calls = self.errors = 0
        return out


@dataclass
class CallCache:
    """Per-GPU memory of what NVML refused for good, and what is being called right now."""

    unsupported: set[Hashable] = field(default_factory=set)
    """Keys that answered NotSupported (or an absent-kind error): never asked again."""
    denied: set[Hashable] = field(default_factory=set)
    """Keys that answered NoPermission: never asked again (logged once)."""
    counters: Counters = field(default_factory=Counters)
    current: str | None = None
    """The NVML call in flight for this GPU (named in the error when a read misses its deadline)."""

    def skip(self, key: Hashable) -> bool:
        return key in self.unsupported or key in self.denied

    def forget_unsupported(self) -> None:
        """A GPU came back or its MIG mode changed: what it did not support may differ now."""
        self.unsupported.clear()


class Funnel:
    """Calls NVML functions for one GPU at a time and turns their errors into the outcomes above."""

    def __init__(self, nvml: Any, label: Callable[[], str] = lambda: "GPU") -> None:
        self.nvml = nvml
        self.absent: tuple[type[BaseException], ...] = (
            nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound, nvml.NVMLLibraryMismatchError)
        self.denied: tuple[type[BaseException], ...] = (nvml.NVMLError_NoPermission,)
        self.lost: tuple[type[BaseException], ...] = (nvml.NVMLError_GpuIsLost, nvml.NVMLError_ResetRequired)
        self.library: tuple[type[BaseException], ...] = (
            nvml.NVMLError_Uninitialized, nvml.NVMLError_DriverNotLoaded, nvml.NVMLError_LibRmVersionMismatch,
            nvml.NVMLError_LibraryNotFound)

    def call(  # noqa: PLR0911 - one return per outcome of the table in the module text
        self,
        cache: CallCache,
        errors: list[str],
        func: str,
        *args: Any,
        key: Hashable | None = None,
        absent: tuple[type[BaseException], ...] = (),
        expected: tuple[type[BaseException], ...] = (),
    ) -> Any:
        """Call the pynvml function named `func`; the only place device reads meet NVML errors.

        `key` names the value for the caches (default: the name plus every argument after the first,
        the handle); `absent` adds error types that also mean "does not exist here"; an error in
        `expected` (e.g. NotFound for "no new samples") returns `NOT_FOUND`. Failures are appended
        to `errors` (the caller's list for this interval).
        """
        if key is None:
            key = (func, *args[1:])
        if cache.skip(key):
            return None
        fn = getattr(self.nvml, func, None)
        if fn is None:  # an nvidia-ml-py release that predates the call
            cache.unsupported.add(key)
            return None
        cache.current = func
        cache.counters.add(calls=1)
        try:
            return fn(*args)
        except self.absent + absent:
            cache.unsupported.add(key)
            return None
        except expected:
            return NOT_FOUND
        except self.denied:
            self.deny(cache, key, func)
            return None
        except self.lost as exc:
            cache.counters.add(errors=1)
            raise GpuLost(f"{exc} ({func})") from exc
        except self.library as exc:
            cache.counters.add(errors=1)
            raise LibraryDown(f"{exc} ({func})") from exc
        except self.nvml.NVMLError as exc:
            cache.counters.add(errors=1)
            errors.append(f"{func}: {exc}")
            return None
        finally:
            cache.current = None

    def deny(self, cache: CallCache, key: Hashable, func: str) -> None:
        """Remember a NoPermission answer; the first one per (GPU, key) is logged."""
        if key not in cache.denied:
            cache.denied.add(key)
            log.warning("NVML refused %s (insufficient permissions) for %s; not asked again until NVML restarts. "
                        "Run the agent with access to it, or accept the value as unavailable", func, key)

    def classify_return(self, code: int) -> type[BaseException] | None:
        """The NVMLError subclass an entry's `nvmlReturn` stands for (None for success)."""
        if code == self.nvml.NVML_SUCCESS:
            return None
        return type(self.nvml.NVMLError(code))


def first_supported(funnel: Funnel, cache: CallCache, errors: list[str], *calls: tuple[Any, ...]) -> Any:
    """The first of several equivalent calls (newest API first) that this GPU and driver support."""
    for func, *args in calls:
        value = funnel.call(cache, errors, func, *args)
        if not cache.skip((func, *args[1:])):
            return value
    return None
