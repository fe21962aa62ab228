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
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

from ..errors import ConfigError, EntryTooLargeError, QueueFullError, StoreClosedError
from ..format.keys import canonical_key, decode_key, index_key, key_hash
from ..format.records import SlotRecord, pack_record_meta
from ..format.values import ValueDesc
from ..index import Entry, IndexTxn
from ..index import owner as owners
from ..runtime.workers import Priority, WorkerPool
from .allocator import PutStatus, SlotAllocator
from .opener import open_store
from .options import StoreOptions
from .reader import Reader
from .uses import UseTracker
from .values import (
    allocate, as_bytes, as_list, direct_parts, host_parts, match_out, meta_for, on_cuda, split,
)

log = logging.getLogger(__name__)


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
        self._owner = owners.new_handle()
        self._uses = UseTracker(o.policy)
        self._allocator = None if opts.readonly else SlotAllocator(
            o.index, o.records, o.geometry, o.policy, self._owner, self._uses, self.path)
        self._reader = Reader(o.engine, o.index, self._allocator, self._uses, opts.checksum, self.path)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._closed = False
        self._pool: WorkerPool | None = None
        self._staging = None
        if not opts.readonly:
            with self._index.write() as t:
                reaped = t.reap_dead()
                t.register_owner(self._owner, writable=True)
            if any(reaped.values()):
                log.info("released what dead processes left in %s: %s", self.path, reaped)

    @classmethod
    def open(cls, path: str | os.PathLike, capacity_bytes: int | None = None,
             slot_bytes: int | None = None, policy: str | None = None, io: str = "mmap",
             durability: str = "fast", checksum: bool = True, *, readonly: bool = False,
             io_threads: int = 4, max_pending_puts: int = 64, queue_full: str = "reject",
             index_map_bytes: int | None = None, engine_wrapper=None) -> "SlabStore":
        """Open the store at directory ``path``, creating it if needed.

        Creating needs ``capacity_bytes`` and ``slot_bytes``; reopening reads
        them from the slab and raises LayoutMismatchError if given values
        disagree.  ``policy`` defaults to the store's own (``lru`` when new).
        ``io_threads`` worker threads serve put_async, prefetch and get_many;
        at most ``max_pending_puts`` asynchronous puts are queued, and when
        full ``queue_full`` ('reject' or 'wait') decides what put_async does.
        ``engine_wrapper`` wraps the I/O engine (monitoring, fault injection;
        see StoreOptions).  Raises ConfigError for bad arguments or paths,
        CorruptStoreError for a damaged store, StorageFullError when the slab
        cannot be preallocated.
        """
        return cls(StoreOptions(
            path=path, capacity_bytes=capacity_bytes, slot_bytes=slot_bytes, policy=policy,
            io=io, durability=durability, checksum=checksum, readonly=readonly,
            io_threads=io_threads, max_pending_puts=max_pending_puts, queue_full=queue_full,
            index_map_bytes=index_map_bytes, engine_wrapper=engine_wrapper))

    # ------------------------------------------------------------------ life

    @property
    def durability(self) -> str:
        return self.options.durability

    @property
    def checksum(self) -> bool:
        return self.options.checksum

    @contextmanager
    def _op(self) -> Iterator[None]:
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"store at {self.path} is closed; open it again")
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._idle.notify_all()

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
            if self._closed:
                return
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
        try:
            if not self.readonly:
                with self._index.write() as t:
                    self._uses.flush(t, force=True)
                    t.release_owner(self._owner)
        finally:
            self.engine.close()
            self._records.close()
            self._index.release()
            self._lock_files.close()

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
        with self._op():
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
        meta = meta_for(tensors, is_list, extra)
        return self._put_tensors(canon, ikey, tensors, meta)

    def put_raw(self, key: str | bytes, data, desc: ValueDesc) -> bool:
        """Store bytes that already hold a value described by ``desc`` (from
        ``slabcache.core.values.describe``, or another store's entry): the
        entry then reports ``desc``'s dtypes and shapes.  ``data`` is a CPU
        tensor or buffer of exactly ``desc.length`` bytes.  Returns what
        :meth:`put` returns; raises the same errors.
        """
        canon, ikey = self._keys(key)
        return self._put_parts(canon, ikey, _raw_parts(data, desc), desc)

    def _put_tensors(self, canon: bytes, ikey: bytes, tensors: list[torch.Tensor],
                     meta: ValueDesc, marks: dict | None = None) -> bool:
        if not on_cuda(tensors):
            return self._put_parts(canon, ikey, host_parts(tensors), meta)
        from ..runtime.transfer import to_host

        self._check_size(meta)
        pool = self._staging_pool()
        parts, buf = to_host(tensors, pool, marks)
        try:
            return self._put_parts(canon, ikey, parts, meta)
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

    def _put_parts(self, canon: bytes, ikey: bytes, parts: list[torch.Tensor],
                   meta: ValueDesc) -> bool:
        self._check_size(meta)
        alloc = self._writable()
        with self._op():
            r = alloc.reserve(canon, ikey)
            if isinstance(r, PutStatus):
                return r.ok
            meta_raw = meta.encode()
            try:
                csum = self.engine.write(r.slot, parts, hashed=self.checksum) or 0
                self._records.write(r.slot, SlotRecord(
                    r.generation, meta.length, csum, key_hash(canon), pack_record_meta(canon, meta)))
                if self.options.strict:
                    self.engine.sync()
            except BaseException:
                r.abort()
                raise
            return r.commit(canon, ikey, csum, meta_raw, meta.length,
                            durable=self.options.strict).ok

    # ------------------------------------------------------------------ get

    def _lookup(self, key) -> Entry | None:
        canon, ikey = self._keys(key)
        with self._index.read() as t:
            return t.get_entry(ikey, canon)

    def get(self, key: str | bytes):
        """The stored value (same dtypes, shapes, bytes), or None on a miss.

        A checksum mismatch is a miss (counted in ``checksum_failures``, the
        entry dropped); wrong bytes are never returned.
        """
        with self._op():
            e = self._lookup(key)
            if e is None:
                self._uses.count("misses")
                return None
            value, parts = allocate(e.meta, self.engine.empty)
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
        with self._op():
            e = self._lookup(key)
            if e is None:
                self._uses.count("misses")
                return None
            buf = as_bytes(out)
            if buf.numel() < e.length:
                raise ValueError(f"out holds {buf.numel()} bytes, the value {e.length}; pass a larger out")
            return e.meta if self._reader.read(e, [buf[:e.length]]) else None

    def _get_into(self, key: str | bytes, out, marks: dict | None) -> bool:
        with self._op():
            e = self._lookup(key)
            if e is None:
                self._uses.count("misses")
                return False
            outs = match_out(out, e.meta)
            parts = direct_parts(outs)
            if parts is not None:
                return self._reader.read(e, parts)
            if on_cuda(outs):
                return self._read_to_cuda(e, outs, marks)
            value, parts = allocate(e.meta, self.engine.empty)
            if not self._reader.read(e, parts):
                return False
            for dst, src in zip(outs, value if e.meta.is_list else [value]):
                dst.copy_(src)
            return True

    def _read_to_cuda(self, e: Entry, outs: list[torch.Tensor], marks: dict | None) -> bool:
        from ..runtime.transfer import from_host

        pool = self._staging_pool()
        buf = pool.acquire(max(1, e.length))
        try:
            parts = split(buf, e.meta.nbytes)
            if not self._reader.read(e, parts):
                return False
            from_host(parts, outs, pool, marks)
            return True
        finally:
            pool.release(buf)

    # ------------------------------------------------------------------ async

    def _workers(self) -> WorkerPool:
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"store at {self.path} is closed; open it again")
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
        meta = meta_for(tensors, is_list, extra)
        self._check_size(meta)
        marks = _caller_marks(tensors)
        if marks is None:
            tensors = [t.detach().contiguous() for t in tensors]
        try:
            return self._workers().submit(Priority.PUT, self._put_tensors, canon, ikey, tensors, meta, marks)
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
            return self._workers().submit(Priority.PUT, self._put_parts, canon, ikey, parts, desc)
        except QueueFullError:
            self._uses.count("queue_rejections")
            raise

    def get_many(self, keys: Sequence[str | bytes]) -> list:
        """Values for ``keys`` (None for misses), read in parallel by the workers."""
        return self.prefetch(keys).result()

    def prefetch(self, keys: Sequence[str | bytes]) -> "Future[list]":
        """Read ``keys`` ahead of every queued put; the Future gives get()'s results."""
        keys = list(keys)
        for k in keys:
            canonical_key(k)  # bad keys raise here, not inside a worker
        pool = self._workers()
        futs = [pool.submit(Priority.PREFETCH, self.get, k) for k in keys]
        return _gather(futs)

    def get_many_into(self, keys: Sequence[str | bytes], outs: Sequence) -> list[bool]:
        """get_into for each (key, out) pair in parallel; CUDA outs go through
        pinned staging so disk reads and device copies overlap, and are
        written only after the work queued so far on the caller's current
        stream (which may still be using them)."""
        keys, outs = list(keys), list(outs)
        if len(keys) != len(outs):
            raise ValueError(f"get_many_into got {len(keys)} keys but {len(outs)} outs; pass one out per key")
        pool = self._workers()
        marks = _caller_marks([t for o in outs for t in as_list(o)[0]])
        futs = [pool.submit(Priority.PREFETCH, self._get_into, k, o, marks) for k, o in zip(keys, outs)]
        return _gather(futs).result()

    def get_many_raw_into(self, keys: Sequence[str | bytes], outs: Sequence[torch.Tensor]) -> list:
        """:meth:`get_raw_into` for each (key, out) pair in parallel."""
        keys, outs = list(keys), list(outs)
        if len(keys) != len(outs):
            raise ValueError(f"get_many_raw_into got {len(keys)} keys but {len(outs)} outs; pass one out per key")
        pool = self._workers()
        futs = [pool.submit(Priority.PREFETCH, self.get_raw_into, k, o) for k, o in zip(keys, outs)]
        return _gather(futs).result()

    def remove_async(self, key: str | bytes, force: bool = False) -> "Future[bool]":
        """Queue a remove (after prefetches, before puts)."""
        canonical_key(key)
        return self._workers().submit(Priority.DELETE, self.remove, key, force)

    # ------------------------------------------------------------------ lookups

    def contains(self, key: str | bytes) -> bool:
        """True if ``key`` is stored.  Does not count as a use."""
        canon, ikey = self._keys(key)
        with self._op(), self._index.read() as t:
            return t.has(ikey, canon)

    __contains__ = contains

    def batched_contains(self, keys: Iterable[str | bytes]) -> int:
        """How many leading keys are stored (stops at the first miss)."""
        n = 0
        with self._op(), self._index.read() as t:
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
        with self._op(), self._index.write() as t:
            self._uses.flush(t)
            for canon, ikey in pairs:
                e = t.get_entry(ikey, canon)
                if e is not None:
                    t.record_use(e, self.policy, now)

    def describe(self, key: str | bytes) -> ValueDesc | None:
        """Dtypes, shapes and sizes of a stored value, without reading it."""
        with self._op():
            e = self._lookup(key)
        return None if e is None else e.meta

    def entry(self, key: str | bytes) -> Entry | None:
        """The index entry for ``key`` (slot, generation, use stats); a peek."""
        with self._op():
            return self._lookup(key)

    # ------------------------------------------------------------------ pins

    def pin(self, key: str | bytes) -> bool:
        """Protect ``key`` from eviction until unpinned (or this process ends).

        Pins nest.  Returns False if the key is not stored.
        """
        canon, ikey = self._keys(key)
        self._writable()
        with self._op(), self._index.write() as t:
            if not t.has(ikey, canon):
                return False
            t.pin(ikey, self._owner)
            return True

    def unpin(self, key: str | bytes) -> bool:
        """Release one pin this handle took.  False if it held none."""
        canon, ikey = self._keys(key)
        self._writable()
        with self._op(), self._index.write() as t:
            return t.unpin(ikey, self._owner)

    def pin_count(self, key: str | bytes) -> int:
        """Pins held on ``key`` by live processes."""
        canon, ikey = self._keys(key)
        with self._op(), self._index.read() as t:
            return t.pin_count(ikey) if t.has(ikey, canon) else 0

    # ------------------------------------------------------------------ remove

    def remove(self, key: str | bytes, force: bool = False) -> bool:
        """Delete ``key``; its slot is free at once.  False if absent.

        A pinned entry is kept (False) unless ``force`` is True.
        """
        canon, ikey = self._keys(key)
        alloc = self._writable()
        with self._op(), self._index.write() as t:
            e = t.get_entry(ikey, canon)
            if e is None:
                return False
            if not force and t.pin_count(ikey) > 0:
                return False
            alloc.free(t, e)
            return True

    def clear(self) -> int:
        """Remove every entry, pinned or not.  Returns how many were removed."""
        alloc = self._writable()
        with self._op(), self._index.write() as t:
            entries = list(t.entries())
            for e in entries:
                alloc.free(t, e)
            return len(entries)

    # ------------------------------------------------------------------ listing

    def keys(self) -> list[str | bytes]:
        with self._op(), self._index.read() as t:
            return [decode_key(e.canon) for e in t.entries()]

    def __len__(self) -> int:
        with self._op(), self._index.read() as t:
            return t.entry_count()

    def __iter__(self):
        return iter(self.keys())

    @contextmanager
    def snapshot(self) -> Iterator["Snapshot"]:
        """A consistent read-only view of the index (for reports): nothing is
        recorded as a use."""
        with self._op(), self._index.read() as t:
            yield Snapshot(t)

    def stats(self) -> dict:
        """Geometry, occupancy and counters (totals over every process)."""
        g = self.geometry
        with self._op(), self._index.read() as t:
            counters = t.counters()
            used = t.entry_count()
            free = t.free_count(g.slot_count)
            reserved = len(t.reservations())
            pinned = len({ikey for ikey, who, _ in t.all_pins() if owners.is_alive(who)})
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
            "bytes_read": self.engine.bytes_read,
            "bytes_written": self.engine.bytes_written,
            "io_threads": self.options.io_threads,
            "queued": self._pool.queued() if self._pool else 0,
            **counters,
        }


class Snapshot:
    """What :meth:`SlabStore.snapshot` yields: entries and who holds them."""

    def __init__(self, t: IndexTxn):
        self._t = t

    def entries(self) -> Iterator[Entry]:
        return self._t.entries()

    def pinned(self) -> set[bytes]:
        """Index keys pinned by live processes."""
        return {ikey for ikey, who, _n in self._t.all_pins() if owners.is_alive(who)}

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
