"""I/O worker threads fed by one priority queue.

Prefetches run before deletes, deletes before puts: a read someone waits on
must not queue behind writes that nobody waits on.  Within one priority,
tasks run first-in-first-out.  Puts are bounded (they hold the caller's
buffers until written), so memory never grows without bound.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from concurrent.futures import Future
from enum import IntEnum
from typing import Callable

from ..errors import ConfigError, QueueFullError, StoreClosedError

log = logging.getLogger(__name__)

ON_FULL = ("reject", "wait")


class Priority(IntEnum):
    """Lower runs first."""

    PREFETCH = 0
    DELETE = 1
    PUT = 2


# More threads than this only contend: an NVMe drive is saturated by a few
# dozen requests in flight.
MAX_THREADS = 256


class WorkerPool:
    """A fixed set of threads draining a priority queue of callables."""

    @staticmethod
    def check_settings(threads, max_pending_puts, on_full) -> None:
        """Raise ConfigError for settings the pool would refuse."""
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise ConfigError(f"io_threads must be a whole number from 1 to {MAX_THREADS}, got {threads!r}")
        if isinstance(max_pending_puts, bool) or not isinstance(max_pending_puts, int) or max_pending_puts < 1:
            raise ConfigError(f"max_pending_puts must be a positive int, got {max_pending_puts!r}")
        if on_full not in ON_FULL:
            raise ConfigError(f"queue_full must be 'reject' or 'wait', got {on_full!r}")

    def __init__(self, threads: int = 4, max_pending_puts: int = 64, on_full: str = "reject",
                 name: str = "slabcache-io"):
        self.check_settings(threads, max_pending_puts, on_full)
        self.max_pending_puts = max_pending_puts
        self.on_full = on_full
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._pending_puts = 0  # queued or running
        self._closing = False
        self.rejected = 0
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(self, priority: Priority, fn: Callable, *args, weight: int = 1) -> Future:
        """Queue ``fn(*args)``; its result or exception lands in the Future.

        A PUT task counts ``weight`` puts against ``max_pending_puts`` (a
        batch of puts weighs as many as it holds; one larger than the whole
        limit waits for an empty queue instead of never running).  Raises
        QueueFullError (put queue full, reject mode) or StoreClosedError
        (pool shut down).
        """
        fut: Future = Future()
        with self._cv:
            if self._closing:
                raise StoreClosedError("the store is closing; open it again to queue work")
            if priority == Priority.PUT:
                while self._pending_puts and self._pending_puts + weight > self.max_pending_puts:
                    if self.on_full == "reject":
                        self.rejected += 1
                        raise QueueFullError(
                            f"{self._pending_puts} puts are already queued (max_pending_puts="
                            f"{self.max_pending_puts}); retry later, raise max_pending_puts, "
                            "or open the store with queue_full='wait'"
                        )
                    self._cv.wait()
                    if self._closing:
                        raise StoreClosedError("the store closed while this put waited for room")
                self._pending_puts += weight
            heapq.heappush(self._heap, (int(priority), next(self._seq), fut, fn, args, weight))
            self._cv.notify_all()
        return fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closing:
                    self._cv.wait()
                if not self._heap:
                    return
                prio, _seq, fut, fn, args, weight = heapq.heappop(self._heap)
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as exc:  # delivered to the caller
                        fut.set_exception(exc)
            finally:
                if prio == Priority.PUT:
                    with self._cv:
                        self._pending_puts -= weight
                        self._cv.notify_all()

    def queued(self) -> int:
        with self._cv:
            return len(self._heap)

    def shutdown(self, cancel_pending: bool = False) -> int:
        """Stop accepting work; finish (or cancel) what is queued.  Returns cancelled count."""
        cancelled = 0
        with self._cv:
            self._closing = True
            if cancel_pending:
                keep = []
                for item in self._heap:
                    if item[2].cancel():
                        cancelled += 1
                        if item[0] == Priority.PUT:
                            self._pending_puts -= item[5]
                    else:
                        keep.append(item)
                self._heap = keep
                heapq.heapify(self._heap)
            self._cv.notify_all()
        for t in self._threads:
            t.join()
        return cancelled
