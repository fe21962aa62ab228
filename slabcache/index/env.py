"""The LMDB environment holding one store's index."""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import threading
import time
from typing import Protocol

import lmdb

from ..errors import (
    ConfigError, CorruptStoreError, SlabIOError, StorageFullError, StoreBusyError, StoreForkedError,
)
from ..format.files import check_directory, check_regular, open_regular
from ..format.layout import LOCK
from .entry import EntryRef, ref_of, slot_gen_of
from .owner import Liveness
from .txn import TABLES, IndexTxn

log = logging.getLogger(__name__)

READER_CHECK_SECONDS = 1.0

# The index is mapped writable over a sparse file: LMDB writes a new page by
# touching it, and on a full filesystem that touch is a SIGBUS, not an
# error.  So the file is allocated ahead of the index's last page, and a
# write that cannot get room fails with StorageFullError first.
# Room allocated past the last page in use: as much again as the index
# holds, at least INDEX_MIN_HEADROOM (what a write needs when no more can
# be had) and at most INDEX_HEADROOM, so a small store takes a megabyte or
# two and a large one 64 MiB.
INDEX_HEADROOM = 64 << 20
INDEX_MIN_HEADROOM = 1 << 20
ROOM_PER_KEY = 8192  # pages a changed key may copy (a leaf of each table it is in)
ROOM_FREE_KEYS = 16  # transactions changing fewer keys fit the headroom kept anyway
SPACE_CHECK_WRITES = 16  # write transactions between checks of the headroom

# What LMDB raises on a damaged file (a transaction that hit one of these
# is unusable afterwards: BadTxnError).
_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.InvalidError,
           lmdb.VersionMismatchError, lmdb.PageFullError, lmdb.CursorFullError, lmdb.BadTxnError)


class Index:
    """One LMDB environment holding a store's index.

    LMDB allows one environment per file per process, while a process may
    open the same store several times (LMCache can build its backends
    twice): ``Index.acquire`` shares one environment per path, reference
    counted, and ``release`` closes it with the last user.
    """

    _registry: dict[str, "Index"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def acquire(cls, path: str, *, map_size: int, readonly: bool = False,
                create: bool = False, file_mode: int = 0o600, dir_mode: int = 0o700) -> "Index":
        """The shared environment at ``path``.  Raises CorruptStoreError when
        it cannot be opened, ConfigError when this process has it read-only
        and a writer asks for it."""
        key = os.path.realpath(path)
        if key in _INHERITED:
            raise StoreForkedError(
                f"this process was forked while a thread of its parent was inside a transaction "
                f"on the index at {path} (for over {FORK_WAIT_SECONDS:.0f} s), so it cannot open "
                "that store; fork when no store operation is running, or start workers with "
                "multiprocessing's 'spawn' or 'forkserver'"
            )
        with cls._registry_lock:
            idx = cls._registry.get(key)
            if idx is not None:
                if idx.readonly and not readonly:
                    raise ConfigError(
                        f"the index at {path} is open read-only in this process; close "
                        "that handle before opening the store for writing"
                    )
                idx._refs += 1
                return idx
            idx = cls(path, map_size=map_size, readonly=readonly, create=create,
                      file_mode=file_mode, dir_mode=dir_mode)
            cls._registry[key] = idx
            return idx

    def release(self) -> None:
        if self._forked_from is not None:
            return  # the parent's to close; see _after_fork_in_child
        with Index._registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            Index._registry.pop(os.path.realpath(self.path), None)
            self._close_env()

    def _close_env(self) -> None:
        self.env.close()
        self.env = None
        self._close_fds()

    def _close_fds(self) -> None:
        """After the environment is closed (see __init__ on the lock file)."""
        self.liveness.close()
        for name in ("_data_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def ensure_room(self, keys: int = 0, adds: int = 0) -> None:
        """Allocate the index's file ahead of its last page in use (see
        INDEX_HEADROOM), and more for a large transaction to come: one that
        changes ``keys`` keys copies at most that many pages a key and never
        more than the index holds, and the ``adds`` bytes of records it
        inserts take at most twice that in half-full pages.
        Raises StorageFullError when not even INDEX_MIN_HEADROOM can be had."""
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self._page_bytes
        extra = 0
        if keys > ROOM_FREE_KEYS or adds > INDEX_MIN_HEADROOM // 4:
            extra = min(keys * ROOM_PER_KEY, used) + 2 * adds
        ahead = max(INDEX_MIN_HEADROOM, min(used, INDEX_HEADROOM)) + extra
        end = min(info["map_size"], used + ahead)
        self._writes_to_check = SPACE_CHECK_WRITES
        # Allocated in steps: only once half the room ahead is used.
        if min(info["map_size"], used + ahead // 2) <= self._reserved_to:
            return
        try:
            _fallocate(self._data_fd, used, end - used)
            self._reserved_to = end
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise SlabIOError(f"cannot allocate room for the index at {self.path}: {exc}") from exc
        self._writes_to_check = 0  # low on room: check before every write
        low = min(info["map_size"], used + INDEX_MIN_HEADROOM + extra)
        try:
            _fallocate(self._data_fd, used, low - used)
        except OSError as exc:
            raise StorageFullError(
                f"the filesystem holding {self.path} is full: the index has no room to record "
                "this change. Free space on that filesystem; what is stored stays readable, and "
                "writes work again once there is room"
            ) from exc

    def __init__(self, path: str, *, map_size: int, readonly: bool = False,
                 create: bool = False, file_mode: int = 0o600, dir_mode: int = 0o700):
        self.path = path
        self.readonly = readonly
        self._refs = 1
        self._forked_from: int | None = None
        store_dir = os.path.dirname(path)
        # LMDB opens its files itself, following links: look first.
        check_directory(path, "index directory")
        for name in ("data.mdb", "lock.mdb"):
            check_regular(os.path.join(path, name), "index file")
        made = create and not os.path.exists(path)
        if made:
            # Made here rather than by LMDB, with exactly these modes.
            os.mkdir(path, dir_mode)
            os.chmod(path, dir_mode)
        try:
            # No sync at commit: strict handles call sync() after their
            # commits, so fast and strict handles can share one environment.
            self.env = lmdb.open(
                path, map_size=map_size, max_dbs=len(TABLES) + 1, subdir=True, mode=file_mode,
                sync=False, metasync=False, readahead=False, max_readers=1024,
                writemap=not readonly, map_async=True,
                # A cached read transaction keeps its reader slot across
                # fork(), and a child closing its inherited copy would free
                # the parent's slot (see _forget_after_fork).
                max_spare_txns=0,
                readonly=readonly, create=create, lock=True, meminit=False,
            )
        except lmdb.LockError as exc:
            raise _pid_clash(store_dir, exc) from exc
        except lmdb.Error as exc:
            raise CorruptStoreError(
                f"cannot open the index at {path}: {exc}; run `slabcache fsck "
                f"{store_dir} --rebuild-index` to rebuild it from the slab"
            ) from exc
        if made:
            for name in os.listdir(path):  # LMDB's files, less the umask: exactly file_mode
                os.chmod(os.path.join(path, name), file_mode)
        self.dbs = {}
        try:
            for name in TABLES:
                # py-lmdb opens handles of a read-only environment in its own
                # read transaction; passing one of ours leaves them unusable.
                self.dbs[name] = self.env.open_db(name.encode(), create=not readonly)
        except lmdb.Error as exc:
            self.env.close()
            raise CorruptStoreError(
                f"the index at {path} is incomplete ({exc}); run `slabcache fsck "
                f"{store_dir} --rebuild-index`"
            ) from exc
        self.liveness = Liveness(os.path.join(store_dir, LOCK))
        self.alive = self.liveness.is_alive
        self._new_locks()
        self._fork_safe = True
        self._last_reader_check = 0.0
        self._data_fd: int | None = None
        self._lock_fd: int | None = None
        self._writes_to_check = 0
        self._reserved_to = 0
        try:
            # Reader slots are written through a map of the lock file too.
            # Its descriptor stays open until the environment is closed:
            # closing any descriptor of that file would drop the fcntl locks
            # LMDB holds on it for this process.
            lock_file = os.path.join(path, "lock.mdb")
            self._lock_fd = _open_rw(lock_file)
            if self._lock_fd is not None:
                _back_whole_file(self._lock_fd, lock_file)
            if not readonly:
                self._page_bytes = self.env.stat()["psize"]
                self._data_fd = open_regular(os.path.join(path, "data.mdb"), os.O_RDWR, "index file")
                self.ensure_room()
        except BaseException:
            self._close_env()
            raise
        if not readonly:
            self.clear_stale_readers(force=True)

    # Fork safety.  A child may not use the parent's environment, and
    # py-lmdb refuses a second environment on the same files in one process
    # while the inherited one is open; closing the inherited one in the
    # child is safe only if nothing was in flight when it forked (closing
    # aborts the transactions it knows of, and LMDB's abort frees the
    # reader slot in the shared lock file, which is the parent's).  So a
    # fork waits for the index's transactions to finish and holds new ones
    # back until it is done; the child then closes its copy and can open
    # the store afresh.

    # On every transaction, so without a lock: ``next()`` on a count is
    # atomic, and a thread counts itself in before it looks at _paused,
    # while a pause sets _paused before it looks at the counts, so either
    # the pause sees the thread in flight or the thread sees the pause.
    # Pauses are taken by a fork (above) and by a thread that follows a map
    # another process grew (_follow_map), which also needs none in flight.

    def _new_locks(self) -> None:
        self._wlock = threading.Lock()  # see _Write
        # Transactions in flight, so a pause can wait for none.
        self._entered, self._left = itertools.count(), itertools.count()
        self._paused = False
        self._pauses = 0
        self._pause_lock = threading.Lock()
        self._resumed = threading.Event()
        self._resumed.set()
        self._map_lock = threading.Lock()
        self._preludes: tuple = ()  # see add_prelude

    def _enter(self) -> None:
        next(self._entered)
        if self._paused:
            self._wait_while_paused()

    def _leave(self) -> None:
        next(self._left)

    def _wait_while_paused(self) -> None:
        next(self._left)
        while True:
            self._resumed.wait()
            next(self._entered)
            if not self._paused:
                return
            next(self._left)

    def _inflight(self) -> int:
        return _value(self._entered) - _value(self._left)

    def _pause(self, deadline: float) -> bool:
        """Hold new transactions back and wait (until ``deadline``) for
        those in flight; True when none is left.  End with _unpause."""
        with self._pause_lock:
            self._pauses += 1
            self._resumed.clear()
            self._paused = True
        while self._inflight() and time.monotonic() < deadline:
            time.sleep(0.0005)  # lets the threads in flight finish
        return not self._inflight()

    def _unpause(self) -> None:
        with self._pause_lock:
            self._pauses -= 1
            if self._pauses == 0:
                self._paused = False
                self._resumed.set()

    def _quiesce(self, deadline: float) -> None:
        self._fork_safe = self._pause(deadline)
        if not self._fork_safe:
            log.warning("index %s: a transaction was still open when the process forked; "
                        "the child cannot reopen this store", self.path)

    _resume = _unpause

    def _follow_map(self) -> None:
        """Another process grew the index's map past this environment's
        (LMDB's MDB_MAP_RESIZED): adopt its size.  LMDB allows that only
        with no transaction of this process open, so new ones wait here
        while those in flight finish.  Called outside any transaction.
        Raises StoreBusyError when one stays open past FOLLOW_MAP_SECONDS."""
        with self._map_lock:  # one thread follows; the others find it done
            try:
                if not self._pause(time.monotonic() + FOLLOW_MAP_SECONDS):
                    raise StoreBusyError(
                        f"another process grew the index map of {os.path.dirname(self.path)}, and "
                        f"this process kept a transaction open for over {FOLLOW_MAP_SECONDS:.0f} s "
                        "(a long snapshot or listing), so it could not follow; retry once that "
                        "transaction ends")
                before = self.env.info()["map_size"]
                self.env.set_mapsize(0)  # 0: the size the other process recorded
                if self.env.info()["map_size"] < before:
                    self.env.set_mapsize(before)
                self._reserved_to = 0  # the headroom is measured again
                self._writes_to_check = 0
            finally:
                self._unpause()
        log.info("index %s: followed a map grown by another process to %d bytes",
                 self.path, self.env.info()["map_size"])

    def _forget_after_fork(self, parent: int) -> None:
        """In a forked child: this environment belongs to ``parent``; every
        use here raises StoreForkedError."""
        env = self.env
        self.env = _ForkedEnv(self.path, parent)
        self._forked_from = parent
        self._new_locks()  # threads of the parent may have held them
        if self._fork_safe:
            env.close()  # nothing was in flight: frees nothing of the parent's
            self._close_fds()
        else:
            # Never closed here; and this process cannot open the index again.
            _INHERITED[os.path.realpath(self.path)] = (env, self._data_fd, self._lock_fd)

    def read(self) -> "_Read":
        """A read transaction: ``with index.read() as t:`` (t is an IndexTxn)."""
        return _Read(self)

    def write(self, durable: bool = False, keys: int = 0, adds: int = 0) -> "_Write":
        """A write transaction; ``durable`` syncs it to disk before returning.
        ``keys``: how many keys it will change, ``adds``: about how many
        bytes of records it will insert (room is made for them, and for
        what the preludes will write, first; see ensure_room).  Every
        registered prelude runs first inside it (see add_prelude).

        Raises StorageFullError when the index's map is full or its
        filesystem has no room.
        """
        return _Write(self, durable, keys, adds)

    def add_prelude(self, prelude: "Prelude") -> None:
        """Run ``prelude`` first in every write transaction of this process
        on this index, and undo what it took when the transaction aborts
        (owed work of a handle: uses to record, reservations to give back)."""
        with self._pause_lock:
            self._preludes = (*self._preludes, prelude)

    def remove_prelude(self, prelude: "Prelude") -> None:
        with self._pause_lock:
            self._preludes = tuple(p for p in self._preludes if p is not prelude)

    def flush(self) -> None:
        """A write transaction that only runs the preludes (owed work due)."""
        with self.write():
            pass

    # The hot path: one lookup in its own read transaction, without the
    # IndexTxn wrapper.

    def ref(self, ikey: bytes, canon: bytes) -> EntryRef | None:
        with _Lookup(self) as txn:
            raw = txn.get(ikey)
            return None if raw is None else ref_of(ikey, raw, canon)

    def slot_gen(self, ikey: bytes) -> tuple[int, int] | None:
        with _Lookup(self) as txn:
            raw = txn.get(ikey)
            return None if raw is None else slot_gen_of(raw)

    def refs(self, keys) -> list[EntryRef | None]:
        """:meth:`ref` for each (index key, canonical key), in one transaction."""
        with _Lookup(self) as txn:
            out = []
            for ikey, canon in keys:
                raw = txn.get(ikey)
                out.append(None if raw is None else ref_of(ikey, raw, canon))
            return out

    def slot_gens(self, ikeys) -> list[tuple[int, int] | None]:
        """:meth:`slot_gen` for each index key, in one transaction."""
        with _Lookup(self) as txn:
            out = []
            for ikey in ikeys:
                raw = txn.get(ikey)
                out.append(None if raw is None else slot_gen_of(raw))
            return out

    def failure(self, exc: lmdb.Error) -> Exception:
        """The slabcache error for what LMDB raised (``exc`` itself when it
        is none of these: a bug, not a condition of the store)."""
        if isinstance(exc, lmdb.MapFullError):
            return self.map_full(exc)
        if isinstance(exc, _DAMAGE):
            store = os.path.dirname(self.path)
            return CorruptStoreError(
                f"the index of {store} is damaged ({type(exc).__name__}: {exc}); run "
                f"`slabcache fsck {store} --repair`, which rebuilds it from the slab"
            )
        if isinstance(exc, lmdb.LockError):
            return _pid_clash(os.path.dirname(self.path), exc)
        if isinstance(exc, lmdb.ReadersFullError):
            return StoreBusyError(
                f"the index of {os.path.dirname(self.path)} has no free reader slot (more than "
                "1024 threads and processes reading at once); use fewer, or run `slabcache fsck "
                "--repair` to free slots of dead processes"
            )
        return exc

    def fail(self, exc: lmdb.Error):
        """Raise :meth:`failure` of ``exc``, caused by it."""
        err = self.failure(exc)
        if err is exc:
            raise exc
        raise err from exc

    def map_full(self, exc: Exception) -> StorageFullError:
        return StorageFullError(
            f"the index at {self.path} reached its map size "
            f"({self.env.info()['map_size']} bytes). Space is held by very long keys, or by "
            "the snapshot of a process killed inside a read (run `slabcache fsck "
            f"{os.path.dirname(self.path)} --repair` to free it); otherwise reopen with a "
            "larger index_map_bytes"
        )

    def clear_stale_readers(self, force: bool = False) -> int:
        """Free the reader slots of processes that died inside a read
        transaction (killed mid-get).  Such a slot pins the snapshot it saw:
        every page freed since stays allocated, and the index grows until
        it is full.  Rate-limited to once a second unless ``force``.
        Returns how many slots were freed."""
        now = time.monotonic()
        if not force and now - self._last_reader_check < READER_CHECK_SECONDS:
            return 0
        self._last_reader_check = now
        self._enter()
        try:
            freed = self.env.reader_check()
        finally:
            self._leave()
        if freed:
            log.warning("index %s: freed %d reader slot(s) left by dead processes", self.path, freed)
        return freed

    def sync(self) -> None:
        """Flush every committed transaction to disk."""
        self._enter()  # a fork must not find this in flight (see _before_fork)
        try:
            self.env.sync(True)
        finally:
            self._leave()


class _ForkedEnv:
    """Stands in for an environment inherited through fork()."""

    def __init__(self, path: str, parent: int):
        self._path = path
        self._parent = parent

    def __getattr__(self, name):
        raise StoreForkedError(
            f"the store at {os.path.dirname(self._path)} was opened by process {self._parent} "
            f"before it forked this one ({os.getpid()}); a handle cannot cross a fork: open the "
            "store again in this process (SlabStore.open after the fork)"
        )


# Environments a child inherited while a transaction was in flight: kept
# referenced so they are never closed or collected there.
_INHERITED: dict[str, tuple] = {}

FORK_WAIT_SECONDS = 5.0  # for transactions in flight when a process forks
FOLLOW_MAP_SECONDS = 5.0  # for transactions in flight when a map must grow


def _before_fork() -> None:
    Index._registry_lock.acquire()  # no open or close half done at the fork
    deadline = time.monotonic() + FORK_WAIT_SECONDS
    for idx in Index._registry.values():
        idx._quiesce(deadline)


def _after_fork_in_parent() -> None:
    for idx in Index._registry.values():
        idx._resume()
    Index._registry_lock.release()


def _after_fork_in_child() -> None:
    # Fresh opens in the child build their own environments.
    Index._registry_lock = threading.Lock()
    parent = os.getppid()
    for idx in Index._registry.values():
        idx._forget_after_fork(parent)
    Index._registry = {}


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


class _Read:
    """``with index.read() as t``: a read-only IndexTxn (a class rather than
    a generator context manager: this runs on every operation)."""

    __slots__ = ("_index", "_txn")

    def __init__(self, index: Index):
        self._index = index

    def __enter__(self) -> IndexTxn:
        self._txn = self._begin(None)
        return IndexTxn(self._txn, self._index.dbs, self._index.alive)

    def _begin(self, db):
        idx = self._index
        for follow in (True, False):
            idx._enter()
            try:
                return idx.env.begin(db=db, write=False)
            except lmdb.MapResizedError:
                idx._leave()
                if not follow:
                    raise
            except BaseException as exc:
                idx._leave()
                if isinstance(exc, lmdb.Error):
                    idx.fail(exc)
                raise
            idx._follow_map()  # another process grew the map: adopt it, then again

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._txn.abort()
        finally:
            self._index._leave()
        if exc_type is not None and issubclass(exc_type, lmdb.Error):
            self._index.fail(exc)


class _Lookup(_Read):
    """``with _Lookup(index) as txn``: the bare LMDB read transaction on the
    entries table (the hot path's lookups, without the IndexTxn wrapper)."""

    __slots__ = ()

    def __enter__(self) -> lmdb.Transaction:
        self._txn = self._begin(self._index.dbs["entries"])
        return self._txn


class Prelude(Protocol):
    """Work a handle owes the index, done first in each write transaction."""

    # True when the work may wait for a later transaction (it is skipped
    # when the index has no room for it but has room for the caller's).
    optional: bool

    def pending_keys(self) -> int:
        """About how many keys the next run will change (room is made first)."""

    def before_write(self, t: IndexTxn):
        """Do the owed work in ``t``; returns what it took (None: nothing)."""

    def undo_write(self, taken) -> None:
        """``t`` aborted: take back ``taken`` so a later transaction does it."""


class _Write:
    """``with index.write() as t``: the preludes, then the caller's work;
    commit on success, abort (and undo the preludes) on error."""

    __slots__ = ("_index", "_durable", "_keys", "_adds", "_txn", "_taken", "_preludes")

    def __init__(self, index: Index, durable: bool, keys: int, adds: int):
        self._index = index
        self._durable = durable
        self._keys = keys
        self._adds = adds
        self._taken: list = []

    def __enter__(self) -> IndexTxn:
        idx = self._index
        # Writers free the reader slots of killed readers as they go (at
        # most once a second), so a long-lived writer beside crashing
        # readers keeps its index small.
        idx.clear_stale_readers()
        if not self._open(follow=True):
            idx._follow_map()  # another process grew the map: adopt it, then again
            self._open(follow=False)
        t = IndexTxn(self._txn, idx.dbs, idx.alive)
        self._taken = []
        try:
            for p in self._preludes:
                self._taken.append((p, p.before_write(t)))
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return t

    def _open(self, follow: bool) -> bool:
        """Begin the transaction; False when the map must be followed first."""
        # One writer per process at a time: LMDB serialises writers across
        # processes itself; this keeps threads of one process queueing here.
        idx = self._index
        idx._enter()
        idx._wlock.acquire()
        try:
            self._preludes = idx._preludes
            keys = self._keys + sum(p.pending_keys() for p in self._preludes)
            idx._writes_to_check -= 1
            if idx._writes_to_check < 0 or keys > ROOM_FREE_KEYS or self._adds:
                try:
                    idx.ensure_room(keys, self._adds)
                except StorageFullError:
                    # Owed work that can wait (recording uses) must not
                    # keep a write that fits from happening.
                    self._preludes = tuple(p for p in self._preludes if not p.optional)
                    keys = self._keys + sum(p.pending_keys() for p in self._preludes)
                    idx.ensure_room(keys, self._adds)
            self._txn = idx.env.begin(write=True)
            return True
        except BaseException as exc:
            idx._wlock.release()
            idx._leave()
            if follow and isinstance(exc, lmdb.MapResizedError):
                return False
            if isinstance(exc, lmdb.Error):
                idx.fail(exc)
            raise

    def _undo(self) -> None:
        for p, taken in reversed(self._taken):
            if taken is not None:
                p.undo_write(taken)
        self._taken = []

    def __exit__(self, exc_type, exc, tb) -> bool:
        idx = self._index
        try:
            if exc_type is None:
                try:
                    self._txn.commit()
                except lmdb.Error as err:
                    self._txn.abort()
                    self._undo()
                    idx.fail(err)
            else:
                self._txn.abort()
                self._undo()
                if issubclass(exc_type, lmdb.Error):
                    idx.fail(exc)
        finally:
            idx._wlock.release()
            idx._leave()
        if exc_type is None and self._durable:
            idx.sync()
        return False


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _fallocate(fd: int, offset: int, length: int) -> None:
    """fallocate(2), without the zero-writing fallback of posix_fallocate:
    writing zeros into the index's file would race other processes'
    writes through their maps.  A filesystem without fallocate is left
    as it is (the index then grows as LMDB writes it)."""
    if length <= 0:
        return
    if _libc.fallocate(fd, 0, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))


def _pid_clash(store: str, exc: lmdb.Error) -> ConfigError:
    """LMDB locks one byte of its lock file at each user's pid; that lock is
    taken: a process with this pid in another PID namespace (another
    container) has the index open."""
    return ConfigError(
        f"cannot share the index of {store} ({exc}): a process with this process's pid "
        f"({os.getpid()}) in another PID namespace, such as another container, has it open, "
        "and LMDB tells the processes sharing an index apart by pid. Run the processes that "
        "share a store in one PID namespace (docker run --pid=host, or one Kubernetes pod with "
        "shareProcessNamespace: true), or give each PID namespace its own store path"
    )


def _value(count: itertools.count) -> int:
    """The next number ``count`` will give (there is no accessor)."""
    return int(repr(count)[6:-1])


def _open_rw(path: str) -> int | None:
    """A descriptor of ``path`` for writing; None where it cannot be had
    (read-only media or permissions: nothing is written there either)."""
    try:
        return open_regular(path, os.O_RDWR, "index lock file")
    except OSError:
        return None


def _back_whole_file(fd: int, path: str) -> None:
    """Back every byte of the file with disk blocks."""
    try:
        _fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError(
                f"the filesystem holding {path} is full; free space on it to open the store"
            ) from exc
        log.warning("cannot allocate %s ahead (%s); a full filesystem may stop the process", path, exc)


def default_map_size(slot_count: int) -> int:
    """Room for the index of ``slot_count`` slots with long keys."""
    return max(1 << 30, slot_count * 8192)
