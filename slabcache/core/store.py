"""SlabStore: the facade tying slab, index, allocator, reader and workers together.

Crash protocol (why each step is where it is):

1. In one index transaction: take a free slot, or evict the policy's victim
   (its entry is deleted in that same transaction), bump the slot's
   generation and mark it reserved by this process.  From here on no
   reader can reach the slot's old bytes through the index.
2. Write the payload and the slot's record (and fdatasync in strict mode).
3. In a second transaction: insert the entry and drop the reservation.

A crash after 1 leaves a reservation by a dead process, released at the
next open; a crash after 2 leaves the same, with orphan bytes nobody points
at.  Reads are validated after copying (see ``reader.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

from ..errors import (
    ConfigError, CorruptStoreError, EntryTooLargeError, QueueFullError, SlabIOError, StorageFullError,
    StoreClosedError, StoreForkedError,
)
from ..format.keys import canonical_key, decode_key, display_key, index_key, key_hash
from ..format.records import record_meta
from ..format.values import ValueDesc
from ..index import Entry, IndexTxn
from ..index.entry import EntryRef
from ..runtime.workers import Priority, WorkerPool
from .allocator import PutStatus, Reservation, SlotAllocator
from .opener import open_store
from .options import StoreOptions
from .reader import Reader
from .uses import UseTracker
from .values import (
    Plan, as_bytes, as_list, check_disjoint, described, direct_parts, host_parts, match_out, on_cuda,
    out_bytes, plan_for, split,
)

log = logging.getLogger(__name__)

# Batches of at least PARALLEL_IO_BYTES in all, of values of at least
# PARALLEL_VALUE_BYTES each on average, read on the worker threads and write
# on the writer threads, several requests in flight.  Below that a thread
# hand-off (tens of microseconds here) costs more than the I/O it overlaps.
PARALLEL_IO_BYTES = 1 << 20
PARALLEL_VALUE_BYTES = 256 << 10


# A single put of at most this many bytes writes its payload inside its one
# index write transaction when a slot is free (SlotAllocator.put_inline):
# other writers wait for that write, which at this size is a few tens of
# microseconds into the page cache, about what the second transaction it
# saves would cost.  Not with engines that wait for the device on each
# write (direct), nor with strict durability (which syncs the payload).
INLINE_PUT_BYTES = 256 << 10


def _parallel(count: int, total: int) -> bool:
    return count > 1 and total >= PARALLEL_IO_BYTES and total >= count * PARALLEL_VALUE_BYTES


class SlabStore:
    """A key -> tensor(s) store in one preallocated slab file plus an LMDB index.

    Open with :meth:`SlabStore.open`.  Thread-safe; several processes may
    open the same path at once.
    """

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
        self._inline_puts = o.engine.writes_to_cache and not opts.strict
        self._allocator = None if opts.readonly else SlotAllocator(
            o.index, o.records, o.geometry, o.policy, self._owner, self._uses, self.path,
            inline_puts=self._inline_puts)
        self._reader = Reader(o.engine, o.index, self._allocator, self._uses, opts.checksum, self.path)
        self._new_locks()
        self._closed = False
        # ``with self._guard:`` marks an operation in flight (close waits
        # for it) and refuses to start one on a closed store.
        self._guard = _OpGuard(self)
        self._closing = False
        self._forked_from: int | None = None
        self._pool: WorkerPool | None = None
        self._writers: ThreadPoolExecutor | None = None
        self._staging = None
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
             durability: str = "fast", checksum: bool = True, *, readonly: bool = False,
             io_threads: int = 4, max_pending_puts: int = 64, queue_full: str = "reject",
             index_map_bytes: int | None = None, engine_wrapper=None, share_group: bool = False,
             trust_directory: bool = False, use_refresh_seconds: float = 0.0) -> "SlabStore":
        """Open the store at directory ``path``, creating it if needed.

        Creating needs ``capacity_bytes`` and ``slot_bytes``; reopening reads
        them from the slab and raises LayoutMismatchError if given values
        disagree.  ``policy`` defaults to the store's own (``lru`` when new).
        ``io_threads`` worker threads serve put_async, prefetch and get_many;
        at most ``max_pending_puts`` asynchronous puts are queued, and when
        full ``queue_full`` ('reject' or 'wait') decides what put_async does.
        ``engine_wrapper`` wraps the I/O engine (monitoring, fault injection;
        see StoreOptions).  Files are created 0600 and directories 0700
        (0660 / 0770 with ``share_group``); an existing directory owned by
        another user, or writable by others (or by its group, unless
        ``share_group``), is refused unless ``trust_directory``.
        ``use_refresh_seconds`` > 0 records a read as a use (its move in the
        policy's order) only if the entry was not used in that many seconds
        (hits are still counted): reads cost less, LRU/LFU become
        approximate to that resolution.  Raises
        ConfigError for bad arguments or paths,
        CorruptStoreError for a damaged store, StorageFullError when the slab
        cannot be preallocated.
        """
        return cls(StoreOptions(
            path=path, capacity_bytes=capacity_bytes, slot_bytes=slot_bytes, policy=policy,
            io=io, durability=durability, checksum=checksum, readonly=readonly,
            io_threads=io_threads, max_pending_puts=max_pending_puts, queue_full=queue_full,
            index_map_bytes=index_map_bytes, engine_wrapper=engine_wrapper,
            share_group=share_group, trust_directory=trust_directory,
            use_refresh_seconds=use_refresh_seconds))

    # ------------------------------------------------------------------ life

    @property
    def durability(self) -> str:
        return self.options.durability

    @property
    def checksum(self) -> bool:
        return self.options.checksum

    def _writable(self) -> SlotAllocator:
        if self._allocator is None:
            raise ConfigError(f"store at {self.path} was opened read-only; open it without readonly=True to change it")
        return self._allocator

    def close(self, cancel_pending: bool = False) -> None:
        """Finish queued puts, flush counters, release this handle's pins, close files.

        With ``cancel_pending`` queued (not yet started) asynchronous work is
        cancelled instead: its futures report cancelled, nothing half-written
        becomes visible.  Idempotent.
        """
        with self._lock:
            if self._closed or self._closing:
                return
            _OPEN.discard(self)
            # From here no new worker pool is made (see _workers): work
            # accepted before this point is finished (or cancelled) below.
            self._closing = True
            pool, self._pool = self._pool, None
        if pool is not None:
            # Before marking closed: queued puts still need the store.
            cancelled = pool.shutdown(cancel_pending)
            if cancelled:
                log.info("store %s: cancelled %d queued operations at close", self.path, cancelled)
        with self._lock:
            self._closed = True
            while self._active:
                self._idle.wait()
            writers, self._writers = self._writers, None
        if writers is not None:  # idle now: every batch that used them is done
            writers.shutdown(wait=True)
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
        reaped as a dead process's later."""
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
        self._pool = self._writers = None
        self._lock_files.forget_after_fork()

    def _new_locks(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0  # operations in flight (see _OpGuard)

    def _closed_error(self) -> StoreClosedError:
        if self._forked_from is not None:
            return StoreForkedError(
                f"this handle on {self.path} was opened by process {self._forked_from} before it "
                f"forked this one ({os.getpid()}); a handle cannot cross a fork: open the store "
                "again in this process (SlabStore.open after the fork)")
        return StoreClosedError(f"store at {self.path} is closed; open it again")

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "SlabStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.geometry.slot_count} slots"
        return f"<SlabStore {self.path} {self.engine.name} {self.policy.name} {state}>"

    def sync(self) -> None:
        """Make everything written so far durable: payloads, records, index."""
        with self._guard:
            self.engine.sync()
            self._records.sync()
            self._index.sync()

    # ------------------------------------------------------------------ keys

    @staticmethod
    def _keys(key) -> tuple[bytes, bytes]:
        canon = canonical_key(key)
        return canon, index_key(canon)

    # ------------------------------------------------------------------ put

    def put(self, key: str | bytes, value, *, extra: bytes = b"") -> bool:
        """Store ``value`` (a tensor or list of tensors) under ``key``.

        Returns True when stored or already present (then it counts as a use
        and is not rewritten), False when no slot is free and every entry is
        pinned.  Raises EntryTooLargeError, InvalidKeyError,
        UnsupportedValueError, SlabIOError (nothing stored is lost).
        """
        canon, ikey = self._keys(key)
        tensors, is_list = as_list(value)
        desc, meta_raw = described(tensors, is_list, extra)
        return self._put_tensors(canon, ikey, tensors, desc, meta_raw)

    def put_many(self, keys: Sequence[str | bytes], values: Sequence, *,
                 extra: bytes = b"") -> list[bool]:
        """:meth:`put` for each (key, value) pair, with one index transaction
        to reserve every slot and one to commit every entry.

        Every key and value is checked before anything is reserved.  If a
        write fails, the entries written without error are still committed
        (a small batch stops writing at the failure; a large one, written
        side by side, has written the rest too) and the SlabIOError is raised.
        """
        keys, values = list(keys), list(values)
        if len(keys) != len(values):
            raise ValueError(f"put_many got {len(keys)} keys but {len(values)} values; pass one value per key")
        items = []
        for key, value in zip(keys, values):
            canon, ikey = self._keys(key)
            tensors, is_list = as_list(value)
            desc, meta_raw = described(tensors, is_list, extra)
            self._check_size(desc)
            items.append((canon, ikey, tensors, desc, meta_raw))
        if any(on_cuda(it[2]) for it in items):
            # Device values go through pinned staging one at a time.
            return [self._put_tensors(*it) for it in items]
        return self._put_batch([(c, i, host_parts(t), d, m) for c, i, t, d, m in items])

    def put_raw(self, key: str | bytes, data, desc: ValueDesc) -> bool:
        """Store bytes that already hold a value described by ``desc`` (from
        ``slabcache.core.values.describe``, or another store's entry): the
        entry then reports ``desc``'s dtypes and shapes.  ``data`` is a CPU
        tensor or buffer of exactly ``desc.length`` bytes.  Returns what
        :meth:`put` returns; raises the same errors.
        """
        canon, ikey = self._keys(key)
        return self._put_parts(canon, ikey, _raw_parts(data, desc), desc, desc.encoded)

    def put_many_raw(self, keys: Sequence[str | bytes], datas: Sequence,
                     descs: Sequence[ValueDesc]) -> list[bool]:
        """:meth:`put_raw` for many keys, batched like :meth:`put_many`."""
        items = []
        for key, data, desc in zip(keys, datas, descs, strict=True):
            canon, ikey = self._keys(key)
            self._check_size(desc)
            items.append((canon, ikey, _raw_parts(data, desc), desc, desc.encoded))
        return self._put_batch(items)

    def _put_tensors(self, canon: bytes, ikey: bytes, tensors: list[torch.Tensor],
                     desc: ValueDesc, meta_raw: bytes, marks: dict | None = None) -> bool:
        if not on_cuda(tensors):
            return self._put_parts(canon, ikey, host_parts(tensors), desc, meta_raw)
        from ..runtime.transfer import to_host

        self._check_size(desc)
        pool = self._staging_pool()
        parts, buf = to_host(tensors, pool, marks)
        try:
            return self._put_parts(canon, ikey, parts, desc, meta_raw)
        finally:
            pool.release(buf)

    def _check_size(self, meta: ValueDesc) -> None:
        if meta.length > self.geometry.slot_bytes:
            raise EntryTooLargeError(
                f"value of {meta.length} bytes does not fit a slot of "
                f"{self.geometry.slot_bytes} bytes; split it, or re-slot the store with "
                "`slabcache compact --slot-bytes`"
            )

    def _staging_pool(self):
        from ..runtime.transfer import StagingPool

        with self._lock:
            if self._staging is None:
                self._staging = StagingPool(count=2 * self.options.io_threads)
            return self._staging

    def _write_slot(self, slot: int, generation: int, canon: bytes, parts: list[torch.Tensor],
                    length: int, meta_raw: bytes) -> int:
        """Payload, then the slot's record; returns the payload checksum."""
        csum = self.engine.write(slot, parts, hashed=self.checksum) or 0
        self._records.write_fields(slot, generation, length, csum, key_hash(canon),
                                   record_meta(canon, meta_raw))
        return csum

    def _put_parts(self, canon: bytes, ikey: bytes, parts: list[torch.Tensor],
                   desc: ValueDesc, meta_raw: bytes) -> bool:
        self._check_size(desc)
        alloc = self._writable()
        with self._guard:
            if desc.length <= INLINE_PUT_BYTES and self._inline_puts:
                got = alloc.put_inline(canon, ikey, desc.length, meta_raw, lambda slot, gen: (
                    self._write_slot(slot, gen, canon, parts, desc.length, meta_raw)))
                if got is not None:
                    return got.ok
            r = alloc.reserve(canon, ikey)
            if isinstance(r, PutStatus):
                return r.ok
            try:
                csum = self._write_slot(r.slot, r.generation, canon, parts, desc.length, meta_raw)
                strict = self.options.strict
                if strict:
                    self.engine.sync()
                return r.commit(canon, ikey, csum, meta_raw, desc.length, durable=strict).ok
            except BaseException:
                r.abort()  # nothing stays reserved by a failed put
                raise

    def _writer_pool(self) -> ThreadPoolExecutor:
        """Threads that write the slots of one large batch side by side.
        Separate from the workers (a batch runs on one and waits for these)
        and from the engine's helpers (these wait for those), so no thread
        ever waits on its own pool."""
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._writers is None:
                self._writers = ThreadPoolExecutor(max_workers=self.options.io_threads,
                                                   thread_name_prefix="slabcache-writer")
            return self._writers

    def _write_slots(self, todo) -> list:
        """Write each (reservation, item) of a batch.  Returns, per item, its
        checksum, the exception its write raised, or None when it was not
        tried: written one after another, a batch stops at its first
        failure; a large batch is written side by side, all of it."""
        if _parallel(len(todo), sum(it[3].length for _r, it in todo)):
            pool = self._writer_pool()
            futs = [pool.submit(self._write_slot, r.slot, r.generation, it[0], it[2], it[3].length, it[4])
                    for r, it in todo]
            out = []
            for f in futs:
                try:
                    out.append(f.result())
                except BaseException as exc:  # every write is waited for first
                    out.append(exc)
            return out
        out: list = []
        failed = False
        for r, it in todo:
            if failed:  # stop at the first failure: the rest are not tried
                out.append(None)
                continue
            try:
                out.append(self._write_slot(r.slot, r.generation, it[0], it[2], it[3].length, it[4]))
            except BaseException as exc:
                out.append(exc)
                failed = True
        return out

    def _put_batch(self, items) -> list[bool]:
        """items: (canon, ikey, parts, desc, meta_raw), already checked."""
        alloc = self._writable()
        with self._guard:
            got = alloc.reserve_many([(c, i) for c, i, *_ in items])
            todo = [(r, it) for r, it in zip(got, items) if isinstance(r, Reservation)]
            done, failed, error = [], [], None
            for (r, (canon, ikey, _parts, desc, meta_raw)), res in zip(todo, self._write_slots(todo)):
                if isinstance(res, int):
                    done.append((r, canon, ikey, res, meta_raw, desc.length))
                else:
                    failed.append(r)
                    error = error or res
            if error is not None and not isinstance(error, SlabIOError):
                alloc.abandon([d[0] for d in done] + failed)
                raise error
            alloc.abandon(failed)
            try:
                if done and self.options.strict:
                    self.engine.sync()
                statuses = alloc.commit_many(done, durable=self.options.strict) if done else []
            except BaseException:
                alloc.abandon([d[0] for d in done])
                raise
        by_slot = {d[0].slot: st for d, st in zip(done, statuses)}
        out = []
        for r in got:
            if isinstance(r, int):  # a repeated key shares its first occurrence's outcome
                out.append(out[r])
            else:
                out.append(r.ok if isinstance(r, PutStatus) else by_slot.get(r.slot, PutStatus.LOST).ok)
        if error is not None:
            raise error
        return out

    # ------------------------------------------------------------------ get

    def _ref(self, key) -> EntryRef | None:
        canon = canonical_key(key)
        return self._index.ref(index_key(canon), canon)

    def _plan(self, e: EntryRef) -> Plan:
        """The entry's Plan, once what the index says is bounded by the
        slab: a damaged entry must never make a read allocate or copy more
        than its slot.  Raises CorruptStoreError."""
        plan = plan_for(e.meta_raw)
        g = self.geometry
        if plan.length != e.length or e.length > g.slot_bytes or e.slot >= g.slot_count:
            raise CorruptStoreError(
                f"the index entry of {display_key(e.canon)!r} in {self.path} is damaged (slot "
                f"{e.slot} of {g.slot_count}, {e.length} bytes, slots of {g.slot_bytes}); run "
                f"`slabcache fsck {self.path} --repair`")
        return plan

    def get(self, key: str | bytes):
        """The stored value (same dtypes, shapes, bytes), or None on a miss.

        A checksum mismatch is a miss (counted in ``checksum_failures``, the
        entry dropped); wrong bytes are never returned.
        """
        with self._guard:
            e = self._ref(key)
            if e is None:
                self._uses.count("misses")
                return None
            value, parts = self._plan(e).allocate(self.engine.empty)
            return value if self._reader.read(e, parts) else None

    def get_into(self, key: str | bytes, out) -> bool:
        """Read the value into ``out`` (same dtypes and shapes).  False on a miss.

        When False is returned the contents of ``out`` are unspecified.
        Raises UnsupportedValueError when ``out`` does not match the entry.
        """
        return self._get_into(key, out, None)

    def get_raw_into(self, key: str | bytes, out: torch.Tensor) -> ValueDesc | None:
        """Read the value's bytes into the 1-D uint8 CPU tensor ``out`` (at
        least as long as the value).  Returns the value's description, or
        None on a miss (``out``'s contents then unspecified)."""
        with self._guard:
            e = self._ref(key)
            if e is None:
                self._uses.count("misses")
                return None
            buf = out_bytes(out)
            if buf.numel() < e.length:
                raise ValueError(f"out holds {buf.numel()} bytes, the value {e.length}; pass a larger out")
            desc = self._plan(e).desc
            return desc if self._reader.read(e, [buf[:e.length]]) else None

    def _get_into(self, key: str | bytes, out, marks: dict | None) -> bool:
        with self._guard:
            e = self._ref(key)
            if e is None:
                self._uses.count("misses")
                return False
            plan = self._plan(e)
            parts, copy, outs = self._target(plan, out)
            if parts is None:
                return self._read_to_cuda(e, plan, outs, marks)
            ok = self._reader.read(e, parts)
            if ok and copy is not None:
                _copy_back(copy)
            return ok

    def _target(self, plan: Plan, out):
        """Where a read into ``out`` lands: (parts, copy, outs).  ``parts``
        are out's own bytes when it is dense CPU memory; otherwise fresh
        buffers, and ``copy`` says what to copy into out after the read.
        ``parts`` is None when out is on CUDA (``outs`` are its tensors).
        Raises UnsupportedValueError when out does not match the value."""
        parts = plan.direct_parts(out)
        if parts is not None:
            return parts, None, None
        outs = match_out(out, plan.desc)
        parts = direct_parts(outs)
        if parts is not None:
            return parts, None, outs
        if on_cuda(outs):
            return None, None, outs
        value, parts = plan.allocate(self.engine.empty)
        return parts, (outs, value if plan.desc.is_list else [value]), outs

    def _read_to_cuda(self, e: EntryRef, plan: Plan, outs: list[torch.Tensor], marks: dict | None) -> bool:
        from ..runtime.transfer import from_host

        pool = self._staging_pool()
        buf = pool.acquire(max(1, e.length))
        try:
            parts = split(buf, plan.desc.nbytes)
            if not self._reader.read(e, parts):
                return False
            from_host(parts, outs, pool, marks)
            return True
        finally:
            pool.release(buf)

    # ------------------------------------------------------------------ async

    def _workers(self) -> WorkerPool:
        with self._lock:
            if self._closed or self._closing:
                raise self._closed_error()
            if self._pool is None:
                o = self.options
                self._pool = WorkerPool(o.io_threads, o.max_pending_puts, o.queue_full)
            return self._pool

    def put_async(self, key: str | bytes, value, *, extra: bytes = b"") -> "Future[bool]":
        """Queue a put; the Future resolves to what :meth:`put` returns.

        The value's tensors are held, not copied (a non-contiguous one is
        made contiguous first); do not modify them until the Future is done.
        CUDA tensors are copied out after the work queued so far on the
        caller's current stream (what produced them).  The entry becomes
        visible only once written and committed.  Bad keys and values raise
        here, at once.  Raises QueueFullError when
        ``max_pending_puts`` puts are queued and ``queue_full='reject'``.
        """
        self._writable()
        canon, ikey = self._keys(key)
        tensors, is_list = as_list(value)
        desc, meta_raw = described(tensors, is_list, extra)
        self._check_size(desc)
        marks = _caller_marks(tensors)
        if marks is None:
            tensors = [t.detach().contiguous() for t in tensors]
        try:
            return self._workers().submit(Priority.PUT, self._put_tensors, canon, ikey, tensors,
                                          desc, meta_raw, marks)
        except QueueFullError:
            self._uses.count("queue_rejections")
            raise

    def put_raw_async(self, key: str | bytes, data, desc: ValueDesc) -> "Future[bool]":
        """Queue a :meth:`put_raw`; ``data`` is held, not copied, until the
        Future is done.  Raises like :meth:`put_async`."""
        self._writable()
        canon, ikey = self._keys(key)
        parts = _raw_parts(data, desc)
        self._check_size(desc)
        try:
            return self._workers().submit(Priority.PUT, self._put_parts, canon, ikey, parts, desc,
                                          desc.encoded)
        except QueueFullError:
            self._uses.count("queue_rejections")
            raise

    def put_many_raw_async(self, keys: Sequence[str | bytes], datas: Sequence,
                           descs: Sequence[ValueDesc]) -> "Future[list[bool]]":
        """Queue one :meth:`put_many_raw` for the whole batch (it weighs
        ``len(keys)`` against ``max_pending_puts``); ``datas`` are held, not
        copied, until the Future is done.  Bad keys and sizes raise here."""
        self._writable()
        items = []
        for key, data, desc in zip(keys, datas, descs, strict=True):
            canon, ikey = self._keys(key)
            self._check_size(desc)
            items.append((canon, ikey, _raw_parts(data, desc), desc, desc.encoded))
        try:
            return self._workers().submit(Priority.PUT, self._put_batch, items, weight=max(1, len(items)))
        except QueueFullError:
            self._uses.count("queue_rejections")
            raise

    def get_many(self, keys: Sequence[str | bytes]) -> list:
        """Values for ``keys`` (None for misses): one lookup transaction and
        one validation transaction for the batch; large reads run in
        parallel on the workers."""
        found = self.lookup_many(keys)
        hits = [i for i, f in enumerate(found) if f is not None]
        values, parts = {}, []
        for i in hits:
            values[i], p = found[i].plan.allocate(self.engine.empty)
            parts.append(p)
        oks = self._read_found([found[i] for i in hits], parts)
        out: list = [None] * len(found)
        for i, ok in zip(hits, oks):
            if ok:
                out[i] = values[i]
        return out

    def prefetch(self, keys: Sequence[str | bytes]) -> "Future[list]":
        """Read ``keys`` ahead of every queued put; the Future gives get()'s results."""
        keys = list(keys)
        for k in keys:
            canonical_key(k)  # bad keys raise here, not inside a worker
        pool = self._workers()
        futs = [pool.submit(Priority.PREFETCH, self.get, k) for k in keys]
        return _gather(futs)

    def get_many_into(self, keys: Sequence[str | bytes], outs: Sequence) -> list[bool]:
        """get_into for each (key, out) pair, batched like :meth:`get_many`.
        CUDA outs go through pinned staging on the workers so disk reads and
        device copies overlap, and are written only after the work queued so
        far on the caller's current stream (which may still be using them)."""
        keys, outs = list(keys), list(outs)
        if len(keys) != len(outs):
            raise ValueError(f"get_many_into got {len(keys)} keys but {len(outs)} outs; pass one out per key")
        flat = [t for o in outs for t in as_list(o)[0]]
        if len(flat) > 1:
            check_disjoint(flat)
        marks = _caller_marks(flat)
        if marks is not None:
            pool = self._workers()
            futs = [pool.submit(Priority.PREFETCH, self._get_into, k, o, marks) for k, o in zip(keys, outs)]
            return _gather(futs).result()
        found = self.lookup_many(keys)
        jobs, parts, copies = [], [], {}
        for i, (f, out) in enumerate(zip(found, outs)):
            if f is not None:
                p, copies[i], _outs = self._target(f.plan, out)  # host outs only: CUDA went above
                jobs.append(i)
                parts.append(p)
        oks = self._read_found([found[i] for i in jobs], parts)
        out = [False] * len(keys)
        for i, ok in zip(jobs, oks):
            if ok and copies[i] is not None:
                _copy_back(copies[i])
            out[i] = ok
        return out

    def get_many_raw_into(self, keys: Sequence[str | bytes], outs: Sequence[torch.Tensor]) -> list:
        """:meth:`get_raw_into` for each (key, out) pair, batched like
        :meth:`get_many`; returns the value descriptions (None for misses)."""
        keys, outs = list(keys), list(outs)
        if len(keys) != len(outs):
            raise ValueError(f"get_many_raw_into got {len(keys)} keys but {len(outs)} outs; pass one out per key")
        found = self.lookup_many(keys)
        return self.read_many_raw_into(found, [o if f is not None else None for f, o in zip(found, outs)])

    def lookup_many(self, keys: Sequence[str | bytes]) -> list["Found | None"]:
        """What is stored under each key (None for misses), in one read
        transaction, without reading payloads: each Found carries the value's
        description (``.desc``) and byte length (``.length``), so a caller can
        allocate before :meth:`read_many_raw_into`.  Misses are counted."""
        pairs = [self._keys(k) for k in keys]
        with self._guard:
            refs = self._index.refs([(ikey, canon) for canon, ikey in pairs])
        found = [None if r is None else Found(r, self._plan(r)) for r in refs]
        misses = sum(1 for f in found if f is None)
        if misses:
            self._uses.count("misses", misses)
        return found

    def read_many_raw_into(self, found: Sequence["Found | None"], outs: Sequence) -> list:
        """Read what :meth:`lookup_many` found into 1-D uint8 CPU ``outs``
        (each at least ``found[i].length`` bytes; ignored where found[i] is
        None).  Returns each value's description, or None where it was not
        found or is no longer the entry that was looked up (evicted or
        replaced since: validated after reading, as every read is)."""
        jobs, parts = [], []
        bufs = [None if f is None else out_bytes(o, f"outs[{i}]")
                for i, (f, o) in enumerate(zip(found, outs, strict=True))]
        check_disjoint([b for b in bufs if b is not None])
        for i, (f, buf) in enumerate(zip(found, bufs)):
            if f is None:
                continue
            room = buf.numel()
            if room < f.length:
                raise ValueError(f"outs[{i}] holds {room} bytes, the value {f.length}; pass a larger out")
            jobs.append(i)
            parts.append([buf if room == f.length else buf[:f.length]])
        oks = self._read_found([found[i] for i in jobs], parts)
        res: list = [None] * len(found)
        for i, ok in zip(jobs, oks):
            if ok:
                res[i] = found[i].desc
        return res

    def _read_found(self, found: list["Found"], parts: list[list[torch.Tensor]]) -> list[bool]:
        if not found:
            return []
        total = sum(f.length for f in found)
        with self._guard:
            # Large batches go to the workers (several requests in flight for
            # the device); small ones cost less here than a thread hand-off.
            submit = None
            if _parallel(len(found), total):
                pool = self._workers()
                submit = lambda fn, *args: pool.submit(Priority.PREFETCH, fn, *args)  # noqa: E731
            return self._reader.read_many([f.ref for f in found], parts, submit)

    def remove_async(self, key: str | bytes, force: bool = False) -> "Future[bool]":
        """Queue a remove (after prefetches, before puts)."""
        canonical_key(key)
        return self._workers().submit(Priority.DELETE, self.remove, key, force)

    # ------------------------------------------------------------------ lookups

    def contains(self, key: str | bytes) -> bool:
        """True if ``key`` is stored.  Does not count as a use."""
        canon, ikey = self._keys(key)
        with self._guard, self._index.read() as t:
            return t.has(ikey, canon)

    __contains__ = contains

    def contains_many(self, keys: Iterable[str | bytes]) -> list[bool]:
        """:meth:`contains` for each key, in one read transaction."""
        pairs = [self._keys(k) for k in keys]
        with self._guard, self._index.read() as t:
            return [t.has(ikey, canon) for canon, ikey in pairs]

    def pin_prefix(self, keys: Iterable[str | bytes]) -> int:
        """Pin the leading stored keys, stopping at the first that is not
        stored, in one write transaction; returns how many were pinned
        (LMCache's prefix lookup with ``pin=True``)."""
        pairs = [self._keys(k) for k in keys]
        self._writable()
        n = 0
        with self._guard, self._index.write(keys=len(pairs)) as t:
            for canon, ikey in pairs:
                if not t.has(ikey, canon):
                    break
                t.pin(ikey, self._owner)
                n += 1
        return n

    def batched_contains(self, keys: Iterable[str | bytes]) -> int:
        """How many leading keys are stored (stops at the first miss)."""
        n = 0
        with self._guard, self._index.read() as t:
            for key in keys:
                canon, ikey = self._keys(key)
                if not t.has(ikey, canon):
                    break
                n += 1
        return n

    def touch(self, keys: Iterable[str | bytes]) -> None:
        """Count a use of each stored key (missing keys are ignored)."""
        if isinstance(keys, (str, bytes)):
            keys = [keys]
        pairs = [self._keys(k) for k in keys]
        self._writable()
        now = time.time()
        with self._guard, self._index.write(keys=len(pairs)) as t:
            uses: dict[bytes, tuple] = {}
            for canon, ikey in pairs:
                e = t.ref(ikey, canon)
                if e is not None:  # a repeated key counts twice and ends up latest, as in order
                    count = uses.pop(ikey, (0,))[0] + 1
                    uses[ikey] = (count, now, e.slot, e.generation)
            t.record_uses(uses, self.policy)

    def describe(self, key: str | bytes) -> ValueDesc | None:
        """Dtypes, shapes and sizes of a stored value, without reading it."""
        with self._guard:
            e = self._ref(key)
        return None if e is None else self._plan(e).desc

    def entry(self, key: str | bytes) -> Entry | None:
        """The index entry for ``key`` (slot, generation, use stats); a peek."""
        canon, ikey = self._keys(key)
        with self._guard, self._index.read() as t:
            return t.entry(ikey, canon)

    # ------------------------------------------------------------------ pins

    def pin(self, key: str | bytes) -> bool:
        """Protect ``key`` from eviction until unpinned (or this process ends).

        Pins nest.  Returns False if the key is not stored.
        """
        canon, ikey = self._keys(key)
        self._writable()
        with self._guard, self._index.write() as t:
            if not t.has(ikey, canon):
                return False
            t.pin(ikey, self._owner)
            return True

    def unpin(self, key: str | bytes) -> bool:
        """Release one pin this handle took.  False if it held none."""
        canon, ikey = self._keys(key)
        self._writable()
        with self._guard, self._index.write() as t:
            return t.unpin(ikey, self._owner)

    def unpin_many(self, keys: Iterable[str | bytes]) -> int:
        """:meth:`unpin` for each key, in one write transaction; returns how
        many pins were released."""
        pairs = [self._keys(k) for k in keys]
        self._writable()
        with self._guard, self._index.write(keys=len(pairs)) as t:
            return sum(t.unpin(ikey, self._owner) for _canon, ikey in pairs)

    def pin_count(self, key: str | bytes) -> int:
        """Pins held on ``key`` by live processes."""
        canon, ikey = self._keys(key)
        with self._guard, self._index.read() as t:
            return t.pin_count(ikey) if t.has(ikey, canon) else 0

    # ------------------------------------------------------------------ remove

    def remove(self, key: str | bytes, force: bool = False) -> bool:
        """Delete ``key``; its slot is free at once.  False if absent.

        A pinned entry is kept (False) unless ``force`` is True.
        """
        canon, ikey = self._keys(key)
        alloc = self._writable()
        with self._guard, self._index.write() as t:
            e = t.entry(ikey, canon)
            if e is None:
                return False
            if not force and t.pin_count(ikey) > 0:
                return False
            alloc.free(t, e)
            return True

    def clear(self) -> int:
        """Remove every entry, pinned or not.  Returns how many were removed."""
        alloc = self._writable()
        with self._guard, self._index.write(keys=len(self)) as t:
            entries = list(t.entries())
            for e in entries:
                alloc.free(t, e)
            return len(entries)

    # ------------------------------------------------------------------ listing

    def keys(self) -> list[str | bytes]:
        with self._guard, self._index.read() as t:
            return [decode_key(e.canon) for e in t.entries()]

    def __len__(self) -> int:
        with self._guard, self._index.read() as t:
            return t.entry_count()

    def __iter__(self):
        return iter(self.keys())

    @contextmanager
    def snapshot(self) -> Iterator["Snapshot"]:
        """A consistent read-only view of the index (for reports): nothing is
        recorded as a use."""
        with self._guard, self._index.read() as t:
            yield Snapshot(t)

    def stats(self) -> dict:
        """Geometry, occupancy and counters (totals over every process)."""
        g = self.geometry
        with self._guard, self._index.read() as t:
            counters = t.counters()
            used = t.entry_count()
            free = t.free_count(g.slot_count)
            reserved = len(t.reservations())
            pinned = len({ikey for ikey, who, _ in t.all_pins() if t.alive(who)})
        for k, v in self._uses.pending_counters().items():
            counters[k] += v
        return {
            "path": self.path,
            "slots_total": g.slot_count,
            "slots_used": used,
            "slots_free": free,
            "slots_reserved": reserved,
            "slot_bytes": g.slot_bytes,
            "capacity_bytes": g.capacity_bytes,
            "file_bytes": g.file_bytes,
            "alignment": g.alignment,
            "pinned": pinned,
            "policy": self.policy.name,
            "io": self.engine.name,
            "durability": self.durability,
            "checksum": self.checksum,
            "io_threads": self.options.io_threads,
            "queued": self._pool.queued() if self._pool else 0,
            **counters,
        }


def _copy_back(copy) -> None:
    """After a read into fresh buffers: copy them into the caller's outs."""
    outs, values = copy
    for dst, src in zip(outs, values):
        dst.copy_(src)


class Found:
    """What :meth:`SlabStore.lookup_many` found for one key."""

    __slots__ = ("ref", "plan")

    def __init__(self, ref: EntryRef, plan: Plan):
        self.ref = ref
        self.plan = plan

    @property
    def desc(self) -> ValueDesc:
        return self.plan.desc

    @property
    def length(self) -> int:
        return self.ref.length


# Every open handle of this process, for the fork hook below.
_OPEN: "weakref.WeakSet[SlabStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    parent = os.getppid()
    for store in list(_OPEN):
        store._forget_after_fork(parent)
    _OPEN.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _OpGuard:
    """The in-flight marker behind ``SlabStore._guard`` (one per store,
    re-entrant across threads: it only counts)."""

    __slots__ = ("_store",)

    def __init__(self, store: SlabStore):
        self._store = store

    def __enter__(self) -> None:
        s = self._store
        with s._lock:
            if s._closed:
                raise s._closed_error()
            s._active += 1

    def __exit__(self, *exc) -> None:
        s = self._store
        with s._lock:
            s._active -= 1
            if s._closed and s._active == 0:  # only close() waits
                s._idle.notify_all()


class Snapshot:
    """What :meth:`SlabStore.snapshot` yields: entries and who holds them."""

    def __init__(self, t: IndexTxn):
        self._t = t

    def entries(self) -> Iterator[Entry]:
        return self._t.entries()

    def pinned(self) -> set[bytes]:
        """Index keys pinned by live processes."""
        return {ikey for ikey, who, _n in self._t.all_pins() if self._t.alive(who)}

    def open_pids(self) -> list[int]:
        return self._t.live_pids()


def _raw_parts(data, desc: ValueDesc) -> list[torch.Tensor]:
    """``data`` split into ``desc``'s tensors' bytes.  Raises TypeError /
    ValueError when ``desc`` is not a description of exactly these bytes."""
    if not isinstance(desc, ValueDesc):
        raise TypeError(f"desc must be a ValueDesc, got {type(desc).__name__}")
    buf = as_bytes(data)
    if buf.numel() != desc.length:
        raise ValueError(f"data holds {buf.numel()} bytes but desc describes {desc.length}; "
                         "pass exactly the described bytes")
    return split(buf, desc.nbytes)


def _caller_marks(tensors: list[torch.Tensor]) -> dict | None:
    """For work handed to worker threads: events marking the caller's CUDA
    streams (see transfer.caller_marks), or None when no tensor is on CUDA
    (torch.cuda stays untouched)."""
    if not on_cuda(tensors):
        return None
    from ..runtime.transfer import caller_marks

    return caller_marks(tensors)


def _gather(futs: list[Future]) -> Future:
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
