"""Writing values into slots, in the order the crash protocol needs.

1. A slot is taken from the allocator (a free one inside the index's write
   transaction for a small put, or a reservation: a free slot or the
   policy's victim, evicted in that transaction).
2. The payload, then the slot's record, are written (and fdatasync'd in
   strict mode).
3. The entry is committed; a failed write gives the slot back.

A small batch takes the free slots it finds inside one transaction and
writes them before that transaction commits, as a small put does (the
keys no slot was free for are reserved afterwards); any other batch takes
one transaction to reserve every slot and one to commit every entry.  A
batch's slots are written one after another, runs of adjacent
slots as one request (stopping at the first failure), or, when large and
without such runs, side by side on the writer threads (all of them).  The
entries written without error are committed either way.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ..device import Engine
from ..device.engine import BatchThread
from ..device.slabfile import SlotRecords
from ..errors import SlabIOError
from ..format.keys import key_hash
from ..format.records import record_meta
from .allocator import PutStatus, Reservation, SlotAllocator
from .items import Item

log = logging.getLogger(__name__)

# Batches of at least PARALLEL_IO_BYTES in all, of values of at least
# PARALLEL_VALUE_BYTES each on average, are read on the worker threads and
# written on the writer threads, several requests in flight.  Below that a
# thread hand-off (tens of microseconds here) costs more than the I/O it
# overlaps.
PARALLEL_IO_BYTES = 1 << 20
PARALLEL_VALUE_BYTES = 256 << 10

# A single put of at most this many bytes writes its payload inside its one
# index write transaction when a slot is free (SlotAllocator.claim_free):
# other writers wait for that write, which at this size is a few tens of
# microseconds into the page cache, about what the second transaction it
# saves would cost (benchmarks/lock_hold.py measures both).  Not with
# engines that wait for the device on each write (direct), nor with strict
# durability (which syncs the payload).
INLINE_PUT_BYTES = 256 << 10


# A batch of values of at most INLINE_PUT_BYTES is written in groups of at
# most this many bytes, each inside the transaction that claims free slots
# for it (Writer._put_many_free), as a single small put is: other writers
# wait for up to this many bytes into the page cache, and each key saves
# its reservation (three index operations) and its share of a transaction.
# put_many of 32 x 64 KiB (benchmarks/lock_hold.py): 1 MiB groups hold the
# lock 279-291 us at the median; 2 MiB groups 527-549 us, saving 1.4-2.1 us
# of a key's 20-22.5.
INLINE_BATCH_BYTES = 1 << 20


def _inline_groups(items: Sequence[Item]) -> list[tuple[int, int]] | None:
    """The batch cut into (start, end) groups of at most INLINE_BATCH_BYTES
    in all, or None when a value is larger than INLINE_PUT_BYTES."""
    groups, lo, total = [], 0, 0
    for i, it in enumerate(items):
        n = it.desc.length
        if n > INLINE_PUT_BYTES:
            return None
        if total + n > INLINE_BATCH_BYTES:
            groups.append((lo, i))
            lo, total = i, 0
        total += n
    groups.append((lo, len(items)))
    return groups


def _outcomes(results) -> tuple[list[tuple[int, int]], list[int], BaseException | None]:
    """Split _write_all's results: (position, checksum) of each write that
    succeeded, positions of the others, and the first exception raised."""
    done, failed, error = [], [], None
    for i, res in enumerate(results):
        if isinstance(res, int):
            done.append((i, res))
        else:
            failed.append(i)
            error = error or res
    return done, failed, error


def parallel(count: int, total: int) -> bool:
    """Whether a batch of ``count`` values, ``total`` bytes, goes to threads."""
    return count > 1 and total >= PARALLEL_IO_BYTES and total >= count * PARALLEL_VALUE_BYTES


class Writer:
    def __init__(self, engine: Engine, records: SlotRecords, allocator: SlotAllocator,
                 checksum: bool, strict: bool, threads: int):
        self.engine = engine
        self.records = records
        self.allocator = allocator
        self.checksum = checksum
        self.strict = strict
        self.inline = engine.writes_to_cache and not strict
        # Large writes of a batch in flight at once: the store's io_threads,
        # or more where each write waits for the device (O_DIRECT).
        self._threads = max(threads, engine.parallel_writes)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def put(self, item: Item) -> bool:
        """Store one value: True when stored or already present (a use),
        False when every slot is pinned.  Raises SlabIOError (the slot is
        given back)."""
        if self.inline and item.desc.length <= INLINE_PUT_BYTES:
            with self.allocator.claim_free(item.key) as free:
                if free.slot is not None:
                    free.commit(item.desc.length, self.write_slot(free.slot, free.generation, item),
                                item.desc.encoded)
            if free.status is not None:
                return free.status.ok
        r = self.allocator.reserve(item.key)
        if isinstance(r, PutStatus):
            return r.ok
        try:
            csum = self.write_slot(r.slot, r.generation, item)
            if self.strict:
                self.engine.sync()
            return r.commit(item, csum, durable=self.strict).ok
        except BaseException:
            r.abort()  # nothing stays reserved by a failed put
            raise

    def put_many(self, items: Sequence[Item]) -> list[bool]:
        """:meth:`put` for each item: a small batch written inside one
        transaction where slots are free, the rest (or a large batch) with one
        transaction to reserve and one to commit.  If a write fails, the
        entries written without error are committed and the SlabIOError is
        raised."""
        groups = _inline_groups(items) if self.inline and len(items) > 1 else None
        if groups is None:
            return self._put_many_reserved(items)
        out: list[bool] = []
        # Index keys of the batch's entries so far, stored before or by it:
        # none is evicted for a later key of the batch (as none is where a
        # batch reserves every slot in one transaction).
        kept: set[bytes] = set()
        for j, (lo, hi) in enumerate(groups):  # one after another: a failure stops the rest
            out.extend(self._put_many_free(items[lo:hi], kept, j + 1 < len(groups)))
        return out

    def _put_many_free(self, items: Sequence[Item], kept: set[bytes], more: bool) -> list[bool]:
        """Items with a free slot written and committed inside the one write
        transaction that claims the slots (claim_free_many); the others, if
        any, reserved afterwards.  ``kept`` (see put_many) gains this
        group's entries where a part of the batch follows (``more``, or the
        keys left to reserve)."""
        with self.allocator.claim_free_many(items, kept) as c:
            todo = [(cl[0], cl[1], items[i]) for i, cl in enumerate(c.claims) if type(cl) is tuple]
            done, failed, error = _outcomes(self._write_all(todo) if todo else ())
            if error is not None and not isinstance(error, SlabIOError):
                raise error  # aborts the transaction: every claimed slot stays free
            c.commit([(*todo[i], csum) for i, csum in done])
            c.give_back([todo[i][:2] for i in failed])
        if error is not None:
            raise error  # the rest are not tried, as in _put_many_reserved
        rest = [i for i, cl in enumerate(c.claims) if cl is None]
        if rest or more:
            kept.update(todo[i][2].key.ikey for i, _csum in done)
        rest_out = dict(zip(rest, self._put_many_reserved([items[i] for i in rest], kept))) if rest else {}
        if more:
            kept.update(items[i].key.ikey for i, ok in rest_out.items() if ok)
        out: list[bool] = []
        for i, cl in enumerate(c.claims):
            if cl is None:
                out.append(rest_out[i])
            elif type(cl) is int:  # a repeated key shares its first occurrence's outcome
                out.append(out[cl])
            else:
                out.append(True)  # PRESENT, or written and committed
        return out

    def _put_many_reserved(self, items: Sequence[Item], kept=()) -> list[bool]:
        """put_many with one transaction to reserve every slot and one to
        commit every entry written (``kept``: see reserve_many)."""
        alloc = self.allocator
        got = alloc.reserve_many([it.key for it in items], kept)
        todo = [(r, it) for r, it in zip(got, items) if isinstance(r, Reservation)]
        ok, bad, error = _outcomes(self._write_all([(r.slot, r.generation, it) for r, it in todo]))
        done = [(*todo[i], csum) for i, csum in ok]
        failed = [todo[i][0] for i in bad]
        if error is not None and not isinstance(error, SlabIOError):
            alloc.abandon([d[0] for d in done] + failed)
            raise error
        alloc.abandon(failed)
        try:
            if done and self.strict:
                self.engine.sync()
            statuses = alloc.commit_many(done, durable=self.strict) if done else []
        except BaseException:
            alloc.abandon([d[0] for d in done])
            raise
        by_slot = {d[0].slot: st for d, st in zip(done, statuses)}
        out: list[bool] = []
        for r in got:
            if isinstance(r, int):  # a repeated key shares its first occurrence's outcome
                out.append(out[r])
            else:
                out.append(r.ok if isinstance(r, PutStatus) else by_slot.get(r.slot, PutStatus.LOST).ok)
        if error is not None:
            raise error
        return out

    def write_slot(self, slot: int, generation: int, item: Item) -> int:
        """Payload, then the slot's record; returns the payload checksum."""
        csum = self.engine.write(slot, item.parts, hashed=self.checksum) or 0
        canon = item.key.canon
        self.records.write_fields(slot, generation, item.desc.length, csum, key_hash(canon),
                                  record_meta(canon, item.desc.encoded))
        return csum

    def _write_all(self, todo: list[tuple[int, int, Item]]) -> list:
        """Per (slot, generation, item): its checksum, the exception its write
        raised, or None when it was not tried."""
        slots, parts = [slot for slot, _g, _it in todo], [it.parts for _s, _g, it in todo]
        # Runs of adjacent slots go as one request each, in the caller; only
        # batches without runs go to the threads.  Batches of 4 x 256 KiB:
        # direct 1.0 GB/s on the threads, 1.3 as one run; mmap 1.6 and 3.2.
        # On the threads, each value's record goes straight after its
        # payload.  A thread's records held back until no payload was left
        # to take (a 4 KiB O_DIRECT record waits 11-13 ms behind 8 MiB
        # payloads here, its thread meanwhile with none in flight) was level,
        # in turn with this (direct, 8 rounds): 64 x 8 MiB 1.01x, 16 x 32
        # MiB 0.99x, 8 x 8 MiB 0.99x, 32 x 1 MiB 0.95x.
        if parallel(len(todo), sum(it.desc.length for _s, _g, it in todo)) and \
                not self.engine.coalesces(slots, parts):
            futs = [self._threads_pool().submit(self._write_in_batch, *row) for row in todo]
            out = []
            for f in futs:
                try:
                    out.append(f.result())
                except BaseException as exc:  # every write is waited for first
                    out.append(exc)
            return out
        # One after another, stopping at the first failure (the rest are not
        # tried): every payload, then every slot record, so that runs of
        # adjacent slots are written with one request each.
        digests, error = self.engine.write_many(slots, parts, hashed=self.checksum)
        out: list = [d or 0 for d in digests]
        written = todo[:len(out)]
        try:
            self.records.write_many([(slot, gen, it.desc.length, d, key_hash(it.key.canon),
                                      record_meta(it.key.canon, it.desc.encoded))
                                     for (slot, gen, it), d in zip(written, out)])
        except BaseException as exc:
            out = [exc] * len(out)
        if error is not None:
            out.append(error)
        return out + [None] * (len(todo) - len(out))

    def _write_in_batch(self, slot: int, generation: int, item: Item) -> int:
        with BatchThread():  # the batch is already spread: its values are not
            return self.write_slot(slot, generation, item)

    def _threads_pool(self) -> ThreadPoolExecutor:
        """Threads that write the slots of one large batch side by side.
        Separate from the store's workers (a batch runs on one and waits for
        these) and from the engine's helpers (these wait for those), so no
        thread ever waits on its own pool."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._threads,
                                                thread_name_prefix="slabcache-writer")
            return self._pool

    def close(self) -> None:
        """Wait for the writer threads (no batch is in flight: the store is idle)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
