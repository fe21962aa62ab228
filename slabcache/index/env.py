"""The LMDB environment holding one store's index."""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import threading
import time

import lmdb

from ..errors import (
    ConfigError, CorruptStoreError, SlabIOError, StorageFullError, StoreBusyError, StoreForkedError,
)
from .entry import EntryRef, ref_of, slot_gen_of
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
ROOM_PER_KEY = 8192  # what a batch may need per key: a few copied pages
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
        for name in ("_data_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def ensure_room(self, extra: int = 0) -> None:
        """Allocate the index's file ahead of its last page in use (see
        INDEX_HEADROOM; ``extra`` more for a large transaction to come).
        Raises StorageFullError when not even INDEX_MIN_HEADROOM can be had."""
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self._page_bytes
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
                self._data_fd = os.open(os.path.join(path, "data.mdb"), os.O_RDWR | os.O_CLOEXEC)
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
    # atomic, and a thread counts itself in before it looks at _forking,
    # while a fork sets _forking before it looks at the counts, so either
    # the fork sees the thread in flight or the thread sees the fork.

    def _new_locks(self) -> None:
        self._wlock = threading.Lock()  # see _Write
        # Transactions in flight, so a fork can wait for none (see
        # _before_fork); a fork in progress holds new ones back.
        self._entered, self._left = itertools.count(), itertools.count()
        self._forking = False
        self._fork_done = threading.Event()
        self._fork_done.set()

    def _enter(self) -> None:
        next(self._entered)
        if self._forking:
            self._wait_for_fork()

    def _leave(self) -> None:
        next(self._left)

    def _wait_for_fork(self) -> None:
        next(self._left)
        while True:
            self._fork_done.wait()
            next(self._entered)
            if not self._forking:
                return
            next(self._left)

    def _inflight(self) -> int:
        return _value(self._entered) - _value(self._left)

    def _quiesce(self, deadline: float) -> None:
        self._fork_done.clear()
        self._forking = True
        while self._inflight() and time.monotonic() < deadline:
            time.sleep(0.0005)  # lets the threads in flight finish
        self._fork_safe = not self._inflight()
        if not self._fork_safe:
            log.warning("index %s: a transaction was still open when the process forked; "
                        "the child cannot reopen this store", self.path)

    def _resume(self) -> None:
        self._forking = False
        self._fork_done.set()

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

    def write(self, durable: bool = False, keys: int = 0) -> "_Write":
        """A write transaction; ``durable`` syncs it to disk before returning.
        ``keys``: how many keys it will change, when a batch (room is made
        for them first).

        Raises StorageFullError when the index's map is full or its
        filesystem has no room.
        """
        return _Write(self, durable, keys * ROOM_PER_KEY if keys > 16 else 0)

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
        return IndexTxn(self._txn, self._index.dbs)

    def _begin(self, db):
        idx = self._index
        idx._enter()
        try:
            return idx.env.begin(db=db, write=False)
        except BaseException as exc:
            idx._leave()
            if isinstance(exc, lmdb.Error):
                idx.fail(exc)
            raise

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


class _Write:
    """``with index.write() as t``: commit on success, abort on error."""

    __slots__ = ("_index", "_durable", "_room", "_txn")

    def __init__(self, index: Index, durable: bool, room: int):
        self._index = index
        self._durable = durable
        self._room = room

    def __enter__(self) -> IndexTxn:
        # One writer per process at a time: LMDB serialises writers across
        # processes itself; this keeps threads of one process queueing here.
        idx = self._index
        idx._enter()
        idx._wlock.acquire()
        try:
            idx._writes_to_check -= 1
            if idx._writes_to_check < 0 or self._room:
                idx.ensure_room(self._room)
            self._txn = idx.env.begin(write=True)
        except BaseException as exc:
            idx._wlock.release()
            idx._leave()
            if isinstance(exc, lmdb.Error):
                idx.fail(exc)
            raise
        return IndexTxn(self._txn, idx.dbs)

    def __exit__(self, exc_type, exc, tb) -> bool:
        idx = self._index
        try:
            if exc_type is None:
                try:
                    self._txn.commit()
                except lmdb.Error as err:
                    self._txn.abort()
                    idx.fail(err)
            else:
                self._txn.abort()
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


def _value(count: itertools.count) -> int:
    """The next number ``count`` will give (there is no accessor)."""
    return int(repr(count)[6:-1])


def _open_rw(path: str) -> int | None:
    """A descriptor of ``path`` for writing; None where it cannot be had
    (read-only media or permissions: nothing is written there either)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
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
