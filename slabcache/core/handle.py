"""A handle's life: opening a store and assembling its parts, operations
in flight, close, and what a fork does to it.

SlabStore (store.py) is a Handle with the verbs on top.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import weakref

from ..errors import ConfigError, StorageFullError, StoreClosedError, StoreForkedError
from ..index.gate import in_flight
from .allocator import SlotAllocator
from .jobs import Jobs
from .opener import open_store
from .options import StoreOptions
from .reader import Reader
from .uses import UseTracker
from .writer import Writer

log = logging.getLogger(__name__)


class Handle:
    """One open handle on a store (see SlabStore)."""

    def __init__(self, opts: StoreOptions):
        """Open the store ``opts`` describes (validated here); prefer :meth:`open`."""
        opts = opts.validate()
        o = open_store(opts)
        self.options = opts
        self.path = o.paths.root
        self.engine = o.engine
        self.geometry = o.geometry
        self.policy = o.policy
        self.creation_id = o.creation_id
        self.readonly = opts.readonly
        self._index = o.index
        self._records = o.records
        self._lock_files = o.lock
        # A writable handle proves it is alive by a lock on the lock file
        # it holds open (index/owner.py); its pins and reservations are its.
        self._owner = None if opts.readonly else o.index.liveness.claim(o.lock.fd)
        self._uses = UseTracker(o.policy, opts.use_refresh_seconds, record_uses=not opts.readonly)
        self._allocator = self._writer = None
        if not opts.readonly:
            self._allocator = SlotAllocator(o.index, o.records, o.geometry, o.policy, self._owner,
                                            self._uses, self.path,
                                            inline_puts=o.engine.writes_to_cache and not opts.strict)
            self._writer = Writer(o.engine, o.records, self._allocator, opts.checksum, opts.strict,
                                  opts.io_threads)
        self._reader = Reader(o.engine, o.index, self._allocator, self._uses, opts.checksum,
                              o.geometry, self.path)
        self._jobs = Jobs(self, opts)
        self._staging = None
        self._closed = self._closing = False
        self._new_locks()
        self._forked_from: int | None = None
        if not opts.readonly:
            reaped = self._allocator.reap_dead()
            if any(reaped.values()):
                log.info("released what dead processes left in %s: %s", self.path, reaped)
            o.index.add_prelude(self._uses)  # uses and counters go with every write
            with self._index.write() as t:
                t.register_owner(self._owner, writable=True)
        _OPEN.add(self)

    @classmethod
    def open(cls, path: str | os.PathLike, capacity_bytes: int | None = None,
             slot_bytes: int | None = None, policy: str | None = None, io: str = "mmap",
             durability: str = "fast", checksum: bool = True, **options):
        """Open the store at directory ``path``, creating it if needed.

        Creating needs ``capacity_bytes`` and ``slot_bytes``; reopening reads
        them from the slab and raises LayoutMismatchError if given values
        disagree.  ``policy`` defaults to the store's own (``lru`` when new).
        The other options are StoreOptions' fields (``readonly``,
        ``io_threads``, ``max_pending_puts``, ``queue_full``,
        ``index_map_bytes``, ``engine_wrapper``, ``share_group``,
        ``trust_directory``, ``use_refresh_seconds``; see StoreOptions).
        Raises ConfigError for bad arguments or paths, CorruptStoreError
        for a damaged store, StorageFullError when the slab cannot be
        preallocated.
        """
        unknown = sorted(set(options) - StoreOptions.fields())
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; SlabStore.open takes "
                              f"{', '.join(sorted(StoreOptions.fields() - {'path'}))}")
        return cls(StoreOptions(path=path, capacity_bytes=capacity_bytes, slot_bytes=slot_bytes,
                                policy=policy, io=io, durability=durability, checksum=checksum,
                                **options))

    @property
    def durability(self) -> str:
        return self.options.durability

    @property
    def checksum(self) -> bool:
        return self.options.checksum

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def jobs(self) -> Jobs:
        """Queued work as futures: reads before removes before writes."""
        return self._jobs

    def _writable(self) -> Writer:
        if self._writer is None:
            raise ConfigError(f"store at {self.path} was opened read-only; open it without readonly=True to change it")
        return self._writer

    def sync(self) -> None:
        """Make everything written so far durable: payloads, records, index."""
        with self._guard:
            self.engine.sync()
            self._records.sync()
            self._index.sync()

    def close(self, cancel_pending: bool = False) -> None:
        """Finish queued work, flush counters, release this handle's pins, close files.

        With ``cancel_pending`` queued (not yet started) work is cancelled
        instead: its futures report cancelled, nothing half-written becomes
        visible.  Idempotent.
        """
        with self._lock:
            if self._closed or self._closing:
                return
            _OPEN.discard(self)
            # From here the jobs take no new work: what was accepted before
            # is finished (or cancelled) below, while the store still works.
            self._closing = True
        cancelled = self._jobs.shutdown(cancel_pending)
        if cancelled:
            log.info("store %s: cancelled %d queued operations at close", self.path, cancelled)
        with self._lock:
            self._closed = True
        self._guard.wait_idle()
        if self._writer is not None:  # idle now: every batch that used its threads is done
            self._writer.close()
        try:
            if not self.readonly:
                self._close_index_state()
        finally:
            self.engine.close()
            self._records.close()
            self._index.release()
            self._lock_files.close()

    def _close_index_state(self) -> None:
        """Write what this handle owes the index (uses, counters) and drop
        its pins and handle record.  A full index map must not make close()
        fail: the uses are dropped then, and what is left of this handle is
        reaped as a dead handle's later."""
        try:
            try:
                with self._index.write() as t:  # the preludes write uses and orphans first
                    self._uses.flush_counters(t)
                    t.release_owner(self._owner)
                return
            except StorageFullError as exc:
                log.warning("store %s: %s; closing without recording this handle's last uses",
                            self.path, exc)
            self._index.remove_prelude(self._uses)
            try:
                with self._index.write() as t:
                    t.release_owner(self._owner)
            except StorageFullError as exc:
                log.warning("store %s: %s; this handle's pins lapse when it closes", self.path, exc)
        finally:
            self._index.remove_prelude(self._uses)
            self._allocator.close()

    def _forget_after_fork(self, parent: int) -> None:
        """In a forked child: this handle is the parent's.  Its worker
        threads do not exist here and its locks may be held by them, its
        index environment is the parent's (see Index), so it is marked
        closed without touching anything shared; each use raises
        StoreForkedError, and close() is a no-op."""
        self._new_locks()  # threads of the parent may have held them
        self._closed = True
        self._forked_from = parent
        self._jobs.forget_after_fork()
        self._lock_files.forget_after_fork()

    def _new_locks(self) -> None:
        self._lock = threading.Lock()
        # ``with self._guard:`` marks an operation in flight (close waits
        # for it) and refuses to start one on a closed store.
        self._guard = _OpGuard(self)

    def _closed_error(self) -> StoreClosedError:
        if self._forked_from is not None:
            return StoreForkedError(
                f"this handle on {self.path} was opened by process {self._forked_from} before it "
                f"forked this one ({os.getpid()}); a handle cannot cross a fork: open the store "
                "again in this process (SlabStore.open after the fork)")
        return StoreClosedError(f"store at {self.path} is closed; open it again")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.geometry.slot_count} slots"
        return f"<SlabStore {self.path} {self.engine.name} {self.policy.name} {state}>"


class _OpGuard:
    """The in-flight marker behind ``Handle._guard`` (one per handle,
    re-entrant across threads: it only counts).

    Without a lock, as the index's Gate counts transactions: ``next()`` on
    a count is atomic, an operation counts itself in before it looks at
    ``_closed``, and close() sets ``_closed`` before it reads the counts,
    so either close() sees the operation in flight or the operation sees
    the store closed.  (A lock taken on the way in and out cost 0.54 us of
    every call.)"""

    __slots__ = ("_store", "_entered", "_left", "_drained")

    def __init__(self, store: Handle):
        self._store = store
        self._entered, self._left = itertools.count(), itertools.count()
        self._drained = threading.Event()  # an operation ended after close() began

    def __enter__(self) -> None:
        next(self._entered)
        if self._store._closed:
            self._leave()
            raise self._store._closed_error()

    def __exit__(self, *exc) -> None:
        self._leave()

    def _leave(self) -> None:
        next(self._left)
        if self._store._closed:  # only close() waits
            self._drained.set()

    def wait_idle(self) -> None:
        """Return once no operation is in flight (close(), ``_closed`` set)."""
        while True:
            self._drained.clear()  # before counting: an end after the count wakes the wait
            if not in_flight(self._entered, self._left):
                return
            self._drained.wait(0.05)


# Every open handle of this process, for the fork hook below.
_OPEN: "weakref.WeakSet[Handle]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    parent = os.getppid()
    for store in list(_OPEN):
        store._forget_after_fork(parent)
    _OPEN.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
