"""Use tracking: counters and entry uses, batched into index writes.

A get records its use here instead of in a write transaction of its own:
uses are written with the next write transaction (or a flush every
USE_FLUSH_SECONDS, or after USE_BATCH distinct keys), so a get costs read
transactions only.  Counters are written at most every
COUNTER_FLUSH_SECONDS and at close, so a crash loses at most that much.
"""

from __future__ import annotations

import threading
import time

from ..index import COUNTERS, IndexTxn
from ..index.policy import Policy

USE_BATCH = 256
# Uses kept while the index cannot take them (a full filesystem); past
# this many, those a failed transaction gives back are forgotten.
MAX_PENDING_USES = 1 << 16
USE_FLUSH_SECONDS = 0.2
COUNTER_FLUSH_SECONDS = 1.0


class UseTracker:
    """Counters and uses owed to the index.  It runs first in every write
    transaction (Index.add_prelude): what is due is written there, and
    given back if that transaction aborts.  ``record_uses=False`` (a
    read-only handle, which never writes) keeps counters only."""

    def __init__(self, policy: Policy, refresh_seconds: float = 0.0, record_uses: bool = True):
        self.policy = policy
        self.record_uses = record_uses
        # A read of an entry used less than this long ago moves nothing in
        # the policy's order (CacheLib's LRU refresh time): recording a use
        # is about a quarter of a small read.
        self.refresh = refresh_seconds
        self._lock = threading.Lock()
        self._pending = dict.fromkeys(COUNTERS, 0)
        # ikey -> [count, wall time, slot, generation]
        self._uses: dict[bytes, list] = {}
        now = time.monotonic()
        self._last_counter_flush = now
        self._last_use_flush = now

    def count(self, name: str, n: int = 1) -> bool:
        """Add ``n`` to a counter; True when the counters are due to be
        written (a handle that only misses still writes its share)."""
        with self._lock:
            self._pending[name] += n
        return time.monotonic() - self._last_counter_flush >= COUNTER_FLUSH_SECONDS

    def stored(self, puts: int, nbytes: int, evictions: int = 0) -> None:
        """Count ``puts`` values of ``nbytes`` in all stored, and the
        ``evictions`` that made room for them (one lock for a put's counts)."""
        with self._lock:
            pending = self._pending
            pending["puts"] += puts
            pending["bytes_written"] += nbytes
            if evictions:
                pending["evictions"] += evictions

    def pending_counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._pending)

    def hit(self, e) -> bool:
        """Count a hit and remember a use of ``e`` (an Entry or EntryRef);
        True when the uses or counters are due for a flush."""
        return self.hit_many((e,))

    def hit_many(self, refs) -> bool:
        """:meth:`hit` for each of ``refs``, under one lock."""
        if not refs:
            return False
        pending = self._pending
        if not self.record_uses:
            with self._lock:
                pending["hits"] += len(refs)
                pending["bytes_read"] += sum(e.length for e in refs)
            return False
        now = time.monotonic()
        wall = time.time()
        refresh = self.refresh
        with self._lock:
            pending = self._pending
            pending["hits"] += len(refs)
            pending["bytes_read"] += sum(e.length for e in refs)
            for e in refs:
                if refresh and wall - e.used < refresh:
                    continue
                # A used key goes last: a flush records the uses in this
                # order, and the eviction order follows it.
                u = self._uses.pop(e.ikey, None)
                if u is None or u[2] != e.slot or u[3] != e.generation:
                    # None waiting, or only uses of an entry another process
                    # has replaced since (a flush would drop them, this too).
                    u = [0, wall, e.slot, e.generation]
                u[0] += 1
                u[1] = wall
                self._uses[e.ikey] = u
            n = len(self._uses)
            return (n and (n >= USE_BATCH or now - self._last_use_flush >= USE_FLUSH_SECONDS)
                    or now - self._last_counter_flush >= COUNTER_FLUSH_SECONDS)

    def flush(self, t: IndexTxn):
        """Write batched uses, and counters when due, inside transaction ``t``;
        returns what it took (for :meth:`give_back`), None when nothing.
        (The write that runs this asked for room for ``pending_keys``.)

        Uses of an entry that was evicted or replaced meanwhile are dropped.
        """
        now = time.monotonic()
        if not (self._uses or now - self._last_counter_flush >= COUNTER_FLUSH_SECONDS):
            return  # nothing due (read without the lock: a miss only delays a flush)
        with self._lock:
            uses, self._uses = self._uses, {}
            self._last_use_flush = now
            delta = None
            if now - self._last_counter_flush >= COUNTER_FLUSH_SECONDS:
                delta, self._pending = self._pending, dict.fromkeys(COUNTERS, 0)
                self._last_counter_flush = now
        if uses:
            t.record_uses(uses, self.policy)
        if delta:
            t.add_counters(delta)
        return uses, delta

    def flush_counters(self, t: IndexTxn) -> None:
        """Write the counters now, inside ``t`` (one record: no room asked)."""
        with self._lock:
            delta, self._pending = self._pending, dict.fromkeys(COUNTERS, 0)
            self._last_counter_flush = time.monotonic()
        t.add_counters(delta)

    # The prelude of every write transaction (Index.add_prelude).

    optional = True  # uses can wait while the index has no room for them

    def pending_keys(self) -> int:
        return len(self._uses)

    before_write = flush

    def undo_write(self, taken) -> None:
        self.give_back(taken)

    def give_back(self, taken) -> None:
        """Take back what :meth:`flush` returned when its transaction was
        aborted, so those uses and counts are written by a later flush."""
        if not taken:
            return
        uses, delta = taken
        with self._lock:
            if len(self._uses) + len(uses) > MAX_PENDING_USES:
                uses = {}  # the index keeps refusing them (full): forget the oldest
            # The uses taken back are older than those pending now: first.
            merged = {ikey: list(u) for ikey, u in uses.items()}
            for ikey, u in self._uses.items():
                old = merged.pop(ikey, None)
                if old is not None and old[2:] == u[2:]:  # not a replaced entry's
                    u[0] += old[0]
                merged[ikey] = u
            self._uses = merged
            for name, n in (delta or {}).items():
                self._pending[name] += n
