"""SlabStore: the facade tying slab, index, policy and I/O engine together.

Crash protocol (why each step is where it is):

1. In one index transaction: take a free slot, or evict the policy's victim
   (its entry is deleted in that same transaction), bump the slot's
   generation and mark it reserved by this process.  From here on no
   reader can reach the slot's old bytes through the index.
2. Write the payload and the slot's record (and fdatasync in strict mode).
3. In a second transaction: insert the entry and drop the reservation.

A crash after 1 leaves a reservation by a dead process, released at the
next open; a crash after 2 leaves the same, with orphan bytes nobody points
at.  Readers look an entry up, copy its bytes, then check in the index that
the entry still names the same slot and generation: a slot is rewritten only
after its entry is gone and with a new generation, so a read that passes
that check saw no rewrite, and a read that fails it is a miss.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

from . import owner as owners
from .errors import (
    ConfigError, CorruptStoreError, EntryTooLargeError, QueueFullError, StoreClosedError,
)
from .format import (
    EntryMeta, SlotRecord, canonical_key, decode_key, index_key, key_hash, pack_header,
    pack_record_meta,
)
from .index import COUNTERS, Entry, Index, IndexTxn
from .io import ENGINES, Engine, make_engine
from .policy import Policy, UseStats, make_policy
from .slab import SLAB_NAME, SlotRecords, check_geometry, create_slab, read_slab_header
from .values import (
    allocate, as_list, direct_parts, host_parts, match_out, meta_for, on_cuda,
)
from .workers import Priority, WorkerPool

log = logging.getLogger(__name__)

INDEX_NAME = "index"
LOCK_NAME = "lock"
DURABILITY = ("fast", "strict")
USE_BATCH = 256
USE_FLUSH_SECONDS = 0.2
COUNTER_FLUSH_SECONDS = 1.0


def _positive_int(name: str, v) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{name} must be an int number of bytes, got {type(v).__name__} {v!r}")
    if v <= 0:
        raise ConfigError(f"{name} must be positive, got {v}")
    return v


class SlabStore:
    """A key -> tensor(s) store in one preallocated slab file plus an LMDB index.

    Open with :meth:`SlabStore.open`.  Thread-safe; several processes may
    open the same path at once.
    """

    def __init__(self, *, path: str, engine: Engine, index: Index, records: SlotRecords,
                 policy: Policy, geometry, creation_id: bytes, durability: str,
                 checksum: bool, lock_fd: int, readonly: bool, io_threads: int = 4,
                 max_pending_puts: int = 64, queue_full: str = "reject"):
        self.path = path
        self.engine = engine
        self.index = index
        self.records = records
        self.policy = policy
        self.geometry = geometry
        self.creation_id = creation_id
        self.durability = durability
        self.checksum = checksum
        self.readonly = readonly
        self._lock_fd = lock_fd
        self._owner = owners.new_handle()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._closed = False
        self._pending = dict.fromkeys(COUNTERS, 0)
        # Uses seen by get() are batched into the next write transaction (or
        # a flush every USE_FLUSH_SECONDS): a get then costs two read
        # transactions instead of a write.  ikey -> [count, time, slot, gen]
        self._uses: dict[bytes, list] = {}
        self._last_counter_flush = time.monotonic()
        self._last_use_flush = time.monotonic()
        # Test hook: called between copying a slot's bytes and validating
        # them, so a race with eviction can be forced deterministically.
        self._after_read_hook = None
        self._pool_settings = (io_threads, max_pending_puts, queue_full)
        self._pool: WorkerPool | None = None
        self._staging = None

    # ------------------------------------------------------------------ open

    @classmethod
    def open(cls, path: str | os.PathLike, capacity_bytes: int | None = None,
             slot_bytes: int | None = None, policy: str | None = None, io: str = "mmap",
             durability: str = "fast", checksum: bool = True, *, readonly: bool = False,
             io_threads: int = 4, max_pending_puts: int = 64, queue_full: str = "reject",
             index_map_bytes: int | None = None) -> "SlabStore":
        """Open the store at directory ``path``, creating it if needed.

        Creating needs ``capacity_bytes`` and ``slot_bytes``; reopening reads
        them from the slab and raises LayoutMismatchError if given values
        disagree.  ``policy`` defaults to the store's own (``lru`` when new).
        ``io_threads`` worker threads serve put_async, prefetch and get_many;
        at most ``max_pending_puts`` asynchronous puts are queued, and when
        full ``queue_full`` ('reject' or 'wait') decides what put_async does.
        Raises ConfigError for bad arguments or paths, CorruptStoreError for a
        damaged store, StorageFullError when the slab cannot be preallocated.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        path = os.path.abspath(os.fspath(path))
        capacity_bytes = _positive_int("capacity_bytes", capacity_bytes)
        slot_bytes = _positive_int("slot_bytes", slot_bytes)
        index_map_bytes = _positive_int("index_map_bytes", index_map_bytes)
        pol = make_policy(policy) if policy is not None else None
        if io not in ENGINES:
            raise ConfigError(f"unknown io engine {io!r}; use one of {', '.join(ENGINES)}")
        if durability not in DURABILITY:
            raise ConfigError(f"unknown durability {durability!r}; use 'fast' or 'strict'")
        if not isinstance(checksum, bool):
            raise ConfigError(f"checksum must be True or False, got {checksum!r}")
        WorkerPool.check_settings(io_threads, max_pending_puts, queue_full)

        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"{path} exists and is not a directory; give a directory for the store")
        slab_path = os.path.join(path, SLAB_NAME)
        if readonly:
            if not os.path.exists(slab_path):
                raise ConfigError(f"no slabcache store at {path} (no {SLAB_NAME} file)")
        else:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create store directory {path}: {exc.strerror}") from exc
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"store directory {path} is not writable; fix its permissions or choose another path")

        dir_fd, lock_fd = cls._lock_store(path, readonly)
        try:
            return cls._open_locked(path, slab_path, capacity_bytes, slot_bytes, pol, io,
                                    durability, checksum, readonly, index_map_bytes, lock_fd,
                                    (io_threads, max_pending_puts, queue_full))
        except BaseException:
            os.close(lock_fd)
            raise
        finally:
            os.close(dir_fd)

    @staticmethod
    def _lock_store(path: str, readonly: bool) -> tuple[int, int]:
        """Serialise opens on ``path``: (directory fd, lifetime lock fd).

        The directory itself is locked exclusively while a store is created or
        validated, so two processes never create one at once.  The ``lock``
        file is then held shared for the handle's life, which lets
        ``slabcache fsck --repair`` see that someone has the store open.
        Closing the directory fd ends the open's exclusive section.
        """
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            lock_path = os.path.join(path, LOCK_NAME)
            if readonly and not os.path.exists(lock_path):
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            else:
                fd = os.open(lock_path, os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            return dir_fd, fd
        except BaseException:
            os.close(dir_fd)
            raise

    @classmethod
    def _open_locked(cls, path, slab_path, capacity_bytes, slot_bytes, pol, io, durability,
                     checksum, readonly, index_map_bytes, lock_fd, pool_settings) -> "SlabStore":
        if not readonly:
            from .compact import recover

            recover(path)  # finish or undo a compaction a crash interrupted
        index_path = os.path.join(path, INDEX_NAME)
        created = False
        if os.path.exists(slab_path):
            g, creation_id = read_slab_header(slab_path)
            check_geometry(g, path, capacity_bytes, slot_bytes)
            if not os.path.exists(os.path.join(index_path, "data.mdb")):
                raise CorruptStoreError(
                    f"the index of {path} is missing; run `slabcache fsck {path} "
                    "--rebuild-index` to rebuild it from the slab"
                )
        else:
            if capacity_bytes is None or slot_bytes is None:
                raise ConfigError(
                    f"no store at {path} yet: pass capacity_bytes and slot_bytes to create one"
                )
            # An index without a slab is a creation that never finished.
            shutil.rmtree(index_path, ignore_errors=True)
            g, creation_id = create_slab(slab_path + ".new", capacity_bytes, slot_bytes)
            created = True

        map_size = index_map_bytes or max(1 << 30, g.slot_count * 8192)
        try:
            index = Index.acquire(index_path, map_size=map_size, readonly=readonly,
                                  create=not readonly)
        except BaseException:
            if created:
                os.unlink(slab_path + ".new")
            raise
        try:
            if created:
                with index.write() as t:
                    t.meta_put("creation_id", creation_id)
                    # A copy of the slab header lets fsck repair a damaged one.
                    t.meta_put("header", pack_header(g, creation_id))
                    t.meta_put("policy", (pol.name if pol else "lru").encode())
                os.rename(slab_path + ".new", slab_path)
            pol = cls._settle_policy(index, pol, path, readonly)
            with index.read() as t:
                if t.meta_get("creation_id") != creation_id:
                    raise CorruptStoreError(
                        f"the index of {path} belongs to another slab (creation ids differ); "
                        f"run `slabcache fsck {path} --rebuild-index`"
                    )
            engine = make_engine(io, slab_path, g)
        except BaseException:
            index.release()
            raise
        rec_fd = os.open(slab_path, os.O_RDONLY if readonly else os.O_RDWR)
        store = cls(path=path, engine=engine, index=index, records=SlotRecords(rec_fd, g),
                    policy=pol, geometry=g, creation_id=creation_id, durability=durability,
                    checksum=checksum, lock_fd=lock_fd, readonly=readonly,
                    io_threads=pool_settings[0], max_pending_puts=pool_settings[1],
                    queue_full=pool_settings[2])
        if not readonly:
            with index.write() as t:
                reaped = t.reap_dead()
                t.register_owner(store._owner, writable=True)
            if any(reaped.values()):
                log.info("released what dead processes left in %s: %s", path, reaped)
        return store

    @staticmethod
    def _settle_policy(index: Index, pol: Policy | None, path: str, readonly: bool) -> Policy:
        with index.read() as t:
            stored = (t.meta_get("policy") or b"lru").decode()
            others = [o for o in t.owners() if owners.is_alive(o[0])]
        if pol is None or pol.name == stored:
            return make_policy(stored)
        if readonly or others:
            raise ConfigError(
                f"store at {path} uses policy {stored!r} and is open elsewhere "
                f"(pids {sorted({owners.pid_of(o[0]) for o in others})}); open it with "
                f"policy={stored!r} or None, or change the policy while no one else has it open"
            )
        old = make_policy(stored)
        with index.write() as t:
            t.rekey_order(old, pol)
            t.meta_put("policy", pol.name.encode())
        log.info("store %s: eviction policy changed from %s to %s", path, stored, pol.name)
        return pol

    # ------------------------------------------------------------------ life

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

    def _write_op(self):
        if self.readonly:
            raise ConfigError(f"store at {self.path} was opened read-only; open it without readonly=True to change it")
        return self._op()

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
                with self.index.write() as t:
                    self._flush(t, force=True)
                    for ikey, who, _n in t.all_pins():
                        if who == self._owner:
                            t.delete_pin(ikey, who)
                    t.unregister_owner(self._owner)
        finally:
            self.engine.close()
            os.close(self.records.fd)
            self.index.release()
            os.close(self._lock_fd)

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

    # ------------------------------------------------------------------ counters

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._pending[name] += n

    def _flush(self, t: IndexTxn, force: bool = False) -> None:
        """Write batched uses, and counters when due, inside transaction ``t``.

        Uses of an entry that was evicted or replaced meanwhile are dropped.
        Counters are written at most every COUNTER_FLUSH_SECONDS (and at
        close), so a crash loses at most that much of them.
        """
        now = time.monotonic()
        with self._lock:
            uses, self._uses = self._uses, {}
            self._last_use_flush = now
            delta = None
            if force or now - self._last_counter_flush >= COUNTER_FLUSH_SECONDS:
                delta, self._pending = self._pending, dict.fromkeys(COUNTERS, 0)
                self._last_counter_flush = now
        for ikey, (count, when, slot, gen) in uses.items():
            e = t.entry_at(ikey)
            if e is not None and e.slot == slot and e.generation == gen:
                t.record_use(e, self.policy, when, count)
        if delta:
            t.add_counters(delta)

    def _note_use(self, e: Entry) -> None:
        now = time.monotonic()
        with self._lock:
            u = self._uses.get(e.ikey)
            if u is None:
                self._uses[e.ikey] = [1, time.time(), e.slot, e.generation]
            else:
                u[0] += 1
                u[1] = time.time()
            due = len(self._uses) >= USE_BATCH or now - self._last_use_flush >= USE_FLUSH_SECONDS
        if due:
            with self.index.write() as t:
                self._flush(t)

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

    def _put_tensors(self, canon: bytes, ikey: bytes, tensors: list[torch.Tensor],
                     meta: EntryMeta, marks: dict | None = None) -> bool:
        if not on_cuda(tensors):
            return self._put_parts(canon, ikey, host_parts(tensors), meta)
        from .transfer import to_host

        self._check_size(meta)
        parts, buf = to_host(tensors, self._staging_pool(), marks)
        try:
            return self._put_parts(canon, ikey, parts, meta)
        finally:
            self._staging.release(buf)

    def _check_size(self, meta: EntryMeta) -> None:
        if meta.length > self.geometry.slot_bytes:
            raise EntryTooLargeError(
                f"value of {meta.length} bytes does not fit a slot of "
                f"{self.geometry.slot_bytes} bytes; split it, or re-slot the store with "
                "`slabcache compact --slot-bytes`"
            )

    def _staging_pool(self):
        from .transfer import StagingPool

        with self._lock:
            if self._staging is None:
                self._staging = StagingPool(count=2 * self._pool_settings[0])
            return self._staging

    def _put_parts(self, canon: bytes, ikey: bytes, parts: list[torch.Tensor],
                   meta: EntryMeta) -> bool:
        self._check_size(meta)
        with self._write_op():
            got = self._reserve(canon, ikey)
            if got is None or got is True:
                return got is True
            slot, gen = got
            try:
                csum = self.engine.write(slot, parts, hashed=self.checksum) or 0
                self.records.write(slot, SlotRecord(
                    gen, meta.length, csum, key_hash(canon), pack_record_meta(canon, meta)))
                if self.durability == "strict":
                    self.engine.sync()
            except BaseException:
                with self.index.write() as t:
                    if t.reservation(slot) == (gen, self._owner):
                        t.unreserve(slot)
                        t.release_slot(slot, gen)
                raise
            return self._commit(canon, ikey, slot, gen, csum, meta)

    def _reserve(self, canon: bytes, ikey: bytes):
        """True if present (used), None if no slot can be had, else (slot, gen)."""
        with self.index.write() as t:
            self._flush(t)
            e = t.get_entry(ikey, canon)
            if e is not None:
                t.record_use(e, self.policy, time.time())
                return True
            got = t.take_free_slot(self.geometry.slot_count)
            if got is None:
                t.reap_dead()
                got = t.take_free_slot(self.geometry.slot_count)
            if got is None:
                victim = t.find_victim(self.policy)
                if victim is None:
                    self._count("rejected_puts")
                    return None
                t.delete_entry(victim, self.policy)
                self._count("evictions")
                got = (victim.slot, victim.generation)
            slot, gen = got
            gen = (gen + 1) & 0xFFFFFFFF or 1
            t.reserve(slot, gen, self._owner)
            return slot, gen

    def _commit(self, canon, ikey, slot, gen, csum, meta) -> bool:
        now = time.time()
        with self.index.write(durable=self.durability == "strict") as t:
            if t.reservation(slot) != (gen, self._owner):
                log.warning("slot %d of %s was taken from this put (repair?); dropping it", slot, self.path)
                return False
            t.unreserve(slot)
            old = t.entry_at(ikey)
            if old is not None and old.canon == canon:
                # Another thread or process stored the same key meanwhile.
                t.release_slot(slot, gen)
                return True
            if old is not None:  # a different key with the same hash: replace it
                t.delete_entry(old, self.policy)
                t.drop_pins(ikey)
                t.release_slot(old.slot, old.generation)
            tick = t.next_tick()
            t.put_entry(Entry(ikey, canon, slot, gen, meta.length, csum,
                              UseStats(tick, 0, tick), now, now, meta.encode()), self.policy)
        self._count("puts")
        return True

    # ------------------------------------------------------------------ get

    def _lookup(self, key) -> Entry | None:
        canon, ikey = self._keys(key)
        with self.index.read() as t:
            return t.get_entry(ikey, canon)

    def get(self, key: str | bytes):
        """The stored value (same dtypes, shapes, bytes), or None on a miss.

        A checksum mismatch is a miss (counted in ``checksum_failures``, the
        entry dropped); wrong bytes are never returned.
        """
        with self._op():
            e = self._lookup(key)
            if e is None:
                self._count("misses")
                return None
            value, parts = allocate(e.meta, self.engine.empty)
            return value if self._read_checked(e, parts) else None

    def get_into(self, key: str | bytes, out) -> bool:
        """Read the value into ``out`` (same dtypes and shapes).  False on a miss.

        When False is returned the contents of ``out`` are unspecified.
        Raises UnsupportedValueError when ``out`` does not match the entry.
        """
        return self._get_into(key, out, None)

    def _get_into(self, key: str | bytes, out, marks: dict | None) -> bool:
        with self._op():
            e = self._lookup(key)
            if e is None:
                self._count("misses")
                return False
            outs = match_out(out, e.meta)
            parts = direct_parts(outs)
            if parts is not None:
                return self._read_checked(e, parts)
            if on_cuda(outs):
                return self._read_to_cuda(e, outs, marks)
            value, parts = allocate(e.meta, self.engine.empty)
            if not self._read_checked(e, parts):
                return False
            for dst, src in zip(outs, value if e.meta.is_list else [value]):
                dst.copy_(src)
            return True

    def _read_to_cuda(self, e: Entry, outs: list[torch.Tensor], marks: dict | None) -> bool:
        from .transfer import from_host

        pool = self._staging_pool()
        buf = pool.acquire(max(1, e.length))
        try:
            parts, pos = [], 0
            for n in e.meta.nbytes:
                parts.append(buf[pos:pos + n])
                pos += n
            if not self._read_checked(e, parts):
                return False
            from_host(parts, outs, pool, marks)
            return True
        finally:
            pool.release(buf)

    def _read_checked(self, e: Entry, parts: list[torch.Tensor]) -> bool:
        try:
            digest = self.engine.read_into(e.slot, parts, hashed=self.checksum)
        except OSError as exc:
            log.error("%s; serving a miss", exc)
            self._count("misses")
            self._count("io_errors")
            return False
        if self._after_read_hook is not None:
            self._after_read_hook(e)
        # A checksum of 0 marks an entry written with checksum=False.
        bad = self.checksum and e.checksum != 0 and digest != e.checksum
        if self.readonly:
            # A read-only handle cannot record uses or drop entries; it only
            # refuses to serve bytes that fail either check.
            with self.index.read() as t:
                cur = t.entry_at(e.ikey)
            ok = (cur is not None and cur.slot == e.slot and cur.generation == e.generation
                  and not bad)
            self._count("hits" if ok else "misses")
            return ok
        with self.index.read() as t:
            now_at = t.slot_gen(e.ikey)
        if now_at != (e.slot, e.generation):
            self._count("misses")  # evicted or replaced while we read
            return False
        if bad:
            self._drop_corrupt(e)
            return False
        self._count("hits")
        self._note_use(e)
        return True

    def _drop_corrupt(self, e: Entry) -> None:
        log.warning("checksum mismatch in slot %d of %s (key %r); dropping the entry",
                    e.slot, self.path, decode_key(e.canon))
        self._count("misses")
        self._count("checksum_failures")
        with self.index.write() as t:
            cur = t.entry_at(e.ikey)
            if cur is not None and cur.slot == e.slot and cur.generation == e.generation:
                t.delete_entry(cur, self.policy)
                t.drop_pins(cur.ikey)
                t.release_slot(cur.slot, cur.generation)

    # ------------------------------------------------------------------ async

    def _workers(self) -> WorkerPool:
        with self._lock:
            if self._closed:
                raise StoreClosedError(f"store at {self.path} is closed; open it again")
            if self._pool is None:
                threads, max_puts, on_full = self._pool_settings
                self._pool = WorkerPool(threads, max_puts, on_full)
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
        if self.readonly:
            raise ConfigError(f"store at {self.path} was opened read-only; open it without readonly=True to change it")
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
            self._count("queue_rejections")
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

    def remove_async(self, key: str | bytes, force: bool = False) -> "Future[bool]":
        """Queue a remove (after prefetches, before puts)."""
        canonical_key(key)
        return self._workers().submit(Priority.DELETE, self.remove, key, force)

    # ------------------------------------------------------------------ lookups

    def contains(self, key: str | bytes) -> bool:
        """True if ``key`` is stored.  Does not count as a use."""
        canon, ikey = self._keys(key)
        with self._op(), self.index.read() as t:
            return t.has(ikey, canon)

    __contains__ = contains

    def batched_contains(self, keys: Iterable[str | bytes]) -> int:
        """How many leading keys are stored (stops at the first miss)."""
        n = 0
        with self._op(), self.index.read() as t:
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
        now = time.time()
        with self._write_op(), self.index.write() as t:
            self._flush(t)
            for canon, ikey in pairs:
                e = t.get_entry(ikey, canon)
                if e is not None:
                    t.record_use(e, self.policy, now)

    def describe(self, key: str | bytes) -> EntryMeta | None:
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
        with self._write_op(), self.index.write() as t:
            if not t.has(ikey, canon):
                return False
            t.pin(ikey, self._owner)
            return True

    def unpin(self, key: str | bytes) -> bool:
        """Release one pin this handle took.  False if it held none."""
        canon, ikey = self._keys(key)
        with self._write_op(), self.index.write() as t:
            return t.unpin(ikey, self._owner)

    def pin_count(self, key: str | bytes) -> int:
        """Pins held on ``key`` by live processes."""
        canon, ikey = self._keys(key)
        with self._op(), self.index.read() as t:
            return t.pin_count(ikey) if t.has(ikey, canon) else 0

    # ------------------------------------------------------------------ remove

    def remove(self, key: str | bytes, force: bool = False) -> bool:
        """Delete ``key``; its slot is free at once.  False if absent.

        A pinned entry is kept (False) unless ``force`` is True.
        """
        canon, ikey = self._keys(key)
        with self._write_op(), self.index.write() as t:
            e = t.get_entry(ikey, canon)
            if e is None:
                return False
            if not force and t.pin_count(ikey) > 0:
                return False
            t.delete_entry(e, self.policy)
            t.drop_pins(ikey)
            # Clear the slot's record while the write lock keeps the slot
            # from being reused, so an index rebuild does not bring back
            # what was removed.
            self.records.clear(e.slot)
            t.release_slot(e.slot, e.generation)
            return True

    def clear(self) -> int:
        """Remove every entry, pinned or not.  Returns how many were removed."""
        with self._write_op(), self.index.write() as t:
            entries = list(t.entries())
            for e in entries:
                t.delete_entry(e, self.policy)
                t.drop_pins(e.ikey)
                self.records.clear(e.slot)
                t.release_slot(e.slot, e.generation)
            return len(entries)

    # ------------------------------------------------------------------ listing

    def keys(self) -> list[str | bytes]:
        with self._op(), self.index.read() as t:
            return [decode_key(e.canon) for e in t.entries()]

    def __len__(self) -> int:
        with self._op(), self.index.read() as t:
            return t.entry_count()

    def __iter__(self):
        return iter(self.keys())

    def stats(self) -> dict:
        """Geometry, occupancy and counters (totals over every process)."""
        g = self.geometry
        with self._op(), self.index.read() as t:
            counters = t.counters()
            used = t.entry_count()
            free = t.free_count(g.slot_count)
            reserved = len(t.reservations())
            pinned = len({ikey for ikey, who, _ in t.all_pins() if owners.is_alive(who)})
        with self._lock:
            for k, v in self._pending.items():
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
            "io_threads": self._pool_settings[0],
            "queued": self._pool.queued() if self._pool else 0,
            **counters,
        }


def _caller_marks(tensors: list[torch.Tensor]) -> dict | None:
    """For work handed to worker threads: events marking the caller's CUDA
    streams (see transfer.caller_marks), or None when no tensor is on CUDA
    (torch.cuda stays untouched)."""
    if not on_cuda(tensors):
        return None
    from .transfer import caller_marks

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
