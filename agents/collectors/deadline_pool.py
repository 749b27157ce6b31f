"""A small pool of daemon threads that runs one task per key at a time, so callers can wait with a deadline.

The collector reads each GPU on its own worker and waits for all of them until the interval's
deadline; a GPU whose NVML call hangs (GSP timeouts, XID 119/120) keeps its worker busy, and until
it returns that GPU gets no new task (`submit` answers None), so a hung GPU can never take the
other GPUs' workers. Threads are daemons: a call that never returns cannot keep the process from
exiting (a `ThreadPoolExecutor` would join it at exit). The pool grows to the number of keys it
is asked to serve and never shrinks; its queue is bounded by that number.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, Final

log = logging.getLogger(__name__)

MAX_WORKERS: Final = 64
"""More GPUs than this on one node share workers (no node has that many today)."""

_Task = tuple[Future[Any], Callable[[], Any]]


class DeadlinePool:
    """Daemon workers; at most one outstanding task per key."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.Queue[_Task | None] = queue.Queue(maxsize=MAX_WORKERS)
        self._threads: list[threading.Thread] = []
        self._busy: dict[Hashable, Future[Any]] = {}
        self._lock = threading.Lock()

    def ensure(self, workers: int) -> None:
        """At least `workers` threads (capped at MAX_WORKERS)."""
        while len(self._threads) < min(max(1, workers), MAX_WORKERS):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, key: Hashable, fn: Callable[[], Any]) -> Future[Any] | None:
        """Run `fn` for `key`; None while `key`'s previous task is still running (or the queue is full)."""
        with self._lock:
            previous = self._busy.get(key)
            if previous is not None and not previous.done():
                return None
            future: Future[Any] = Future()
            try:
                self._queue.put_nowait((future, fn))
            except queue.Full:
                return None
            self._busy[key] = future
        return future

    def busy(self, key: Hashable) -> bool:
        with self._lock:
            previous = self._busy.get(key)
            return previous is not None and not previous.done()

    def close(self) -> None:
        """Ask idle workers to exit (a hung one exits when its call returns, or with the process)."""
        for _ in self._threads:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            future, fn = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the waiter, who decides what it means
                future.set_exception(exc)
