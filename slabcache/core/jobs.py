"""Queued work on a store: ``store.jobs``.

What a caller need not wait for runs on the store's worker threads and
answers with a Future, in priority order (runtime/workers.py): reads
someone waits on (prefetch, and the parallel reads of a large batch)
before removes, removes before writes.  At most ``max_pending_puts``
queued writes hold their callers' buffers; when full, ``queue_full``
decides (``reject``: QueueFullError, counted; ``wait``: block).  Keys,
values and sizes are checked when the work is queued, not in a worker.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Callable, Sequence

from ..errors import QueueFullError
from ..format.keys import make_key
from ..runtime.workers import Priority, WorkerPool
from .options import StoreOptions


class Jobs:
    """Futures over a store's verbs (``store.jobs``); see the module doc."""

    def __init__(self, store, opts: StoreOptions):
        """``store``: the SlabStore whose verbs the jobs run."""
        self._store = store
        self._opts = opts
        self._pool: WorkerPool | None = None

    def _workers(self) -> WorkerPool:
        s = self._store
        with s._lock:
            if s._closed or s._closing:
                raise s._closed_error()
            if self._pool is None:
                o = self._opts
                self._pool = WorkerPool(o.io_threads, o.max_pending_puts, o.queue_full)
            return self._pool

    def _queue_write(self, fn: Callable, *args, weight: int = 1) -> Future:
        try:
            return self._workers().submit(Priority.PUT, fn, *args, weight=weight)
        except QueueFullError:
            self._store._uses.count("queue_rejections")
            raise

    def put(self, key: str | bytes, value, *, extra: bytes = b"") -> "Future[bool]":
        """Queue :meth:`SlabStore.put`; the Future gives what it returns.

        The value's tensors are held, not copied (a non-contiguous one is
        made contiguous first); do not modify them until the Future is done.
        CUDA tensors are copied out after the work queued so far on the
        caller's current stream (what produced them).  The entry becomes
        visible only once written and committed.  Bad keys and values raise
        here, at once; so does QueueFullError.
        """
        s = self._store
        s._writable()
        item, where = s._tensor_item(make_key(key), value, extra, hold=True)
        return self._queue_write(s._put_tensor_item, item, where)

    def put_many(self, keys: Sequence[str | bytes], values: Sequence, *,
                 extra: bytes = b"") -> "Future[list[bool]]":
        """Queue :meth:`SlabStore.put_many` as one task (it weighs as many
        puts as it holds)."""
        s = self._store
        s._writable()
        items, device = s._tensor_items(keys, values, extra, hold=True)
        return self._queue_write(s._put_tensor_items, items, device, weight=max(1, len(items)))

    def write(self, keys: Sequence[str | bytes], datas: Sequence,
              descs: Sequence) -> "Future[list[bool]]":
        """Queue :meth:`SlabStore.write` as one task; ``datas`` are held, not
        copied, until the Future is done."""
        s = self._store
        s._writable()
        items = s._raw_items(keys, datas, descs)
        return self._queue_write(s._put_items, items, weight=max(1, len(items)))

    def prefetch(self, keys: Sequence[str | bytes]) -> "Future[list]":
        """Read ``keys`` ahead of every queued write, one task a key (a
        worker never waits on another); the Future gives each value or
        None, as :meth:`SlabStore.get_many` does."""
        keys = list(keys)
        for k in keys:
            make_key(k)  # bad keys raise here, not inside a worker
        pool = self._workers()
        return gather([pool.submit(Priority.PREFETCH, self._store.get, k) for k in keys])

    def remove(self, key: str | bytes, force: bool = False) -> "Future[bool]":
        """Queue :meth:`SlabStore.remove` (after reads, before writes)."""
        make_key(key)
        return self._workers().submit(Priority.DELETE, self._store.remove, key, force)

    def read(self, fn: Callable, *args) -> Future:
        """Run a read on the workers, ahead of removes and writes (the
        store's large batches read this way, several requests in flight)."""
        return self._workers().submit(Priority.PREFETCH, fn, *args)

    def queued(self) -> int:
        """Tasks waiting for a worker."""
        pool = self._pool
        return pool.queued() if pool is not None else 0

    def shutdown(self, cancel_pending: bool = False) -> int:
        """Finish (or cancel) what is queued; returns how many were cancelled.
        Called by close(), after which nothing more is accepted."""
        with self._store._lock:
            pool, self._pool = self._pool, None
        return pool.shutdown(cancel_pending) if pool is not None else 0

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's threads do not exist here."""
        self._pool = None


def gather(futs: list[Future]) -> Future:
    """One Future for the list of results of ``futs`` (first exception wins)."""
    out: Future = Future()
    if not futs:
        out.set_result([])
        return out
    remaining = [len(futs)]
    lock = threading.Lock()

    def done(_f: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            try:
                out.set_result([f.result() for f in futs])
            except BaseException as exc:
                out.set_exception(exc)

    for f in futs:
        f.add_done_callback(done)
    return out
