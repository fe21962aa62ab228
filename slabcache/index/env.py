"""The LMDB environment holding one store's index: opened once per store
per process and shared, its transactions (txns.py), what runs in flight
(gate.py), the room it is given on disk (room.py), and what LMDB's errors
mean (failures.py)."""

from __future__ import annotations

import logging
import os
import threading
import time

import lmdb

from ..errors import ConfigError, CorruptStoreError, StoreBusyError, StoreForkedError
from ..format.files import check_directory, check_regular, open_regular
from ..format.layout import LOCK
from .entry import EntryRef, canon_of, ref_of, slot_gen_of
from .failures import Failures, pid_clash
from .gate import Gate
from .owner import Liveness
from .room import Headroom, back_whole_file, open_rw
from .txn import TABLES
from .txns import Prelude, ReadTxn, WriteTxn, begin_lookup, end_read

log = logging.getLogger(__name__)

READER_CHECK_SECONDS = 1.0

class Index(Gate, Headroom, Failures):
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
            raise pid_clash(store_dir, exc) from exc
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
        self.entries_db = self.dbs["entries"]  # every lookup's (txns.begin_lookup)
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
            self._lock_fd = open_rw(lock_file)
            if self._lock_fd is not None:
                back_whole_file(self._lock_fd, lock_file)
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

    def _new_locks(self) -> None:
        self._wlock = threading.Lock()  # see WriteTxn
        self._new_gate()
        self._map_lock = threading.Lock()
        self._preludes: tuple = ()  # see add_prelude

    def _quiesce(self, deadline: float) -> None:
        self._fork_safe = self._pause(deadline)
        if not self._fork_safe:
            log.warning("index %s: a transaction was still open when the process forked; "
                        "the child cannot reopen this store", self.path)

    def _resume(self) -> None:
        self._unpause()

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

    def read(self) -> "ReadTxn":
        """A read transaction: ``with index.read() as t:`` (t is an IndexTxn)."""
        return ReadTxn(self)

    def write(self, durable: bool = False, keys: int = 0, adds: int = 0) -> "WriteTxn":
        """A write transaction; ``durable`` syncs it to disk before returning.
        ``keys``: how many keys it will change, ``adds``: about how many
        bytes of records it will insert (room is made for them, and for
        what the preludes will write, first; see ensure_room).  Every
        registered prelude runs first inside it (see add_prelude).

        Raises StorageFullError when the index's map is full or its
        filesystem has no room.
        """
        return WriteTxn(self, durable, keys, adds)

    def add_prelude(self, prelude: Prelude) -> None:
        """Run ``prelude`` first in every write transaction of this process
        on this index, and undo what it took when the transaction aborts
        (owed work of a handle: uses to record, reservations to give back)."""
        with self._pause_lock:
            self._preludes = (*self._preludes, prelude)

    def remove_prelude(self, prelude: Prelude) -> None:
        with self._pause_lock:
            self._preludes = tuple(p for p in self._preludes if p is not prelude)

    def flush(self) -> None:
        """A write transaction that only runs the preludes (owed work due)."""
        with self.write():
            pass  # entering ran the preludes; nothing else to write

    # The hot path: lookups in their own read transaction, without the
    # IndexTxn wrapper.

    def raw_entry(self, ikey: bytes) -> bytes | None:
        """The stored entry of an index key, or None, in its own read
        transaction (a get takes two: no list for one key)."""
        txn = begin_lookup(self)
        try:
            raw = txn.get(ikey)
        except BaseException as exc:
            end_read(self, txn, exc)
            raise
        end_read(self, txn)
        return raw

    def raw_entries(self, ikeys) -> list[bytes | None]:
        """:meth:`raw_entry` for each index key, in one read transaction."""
        txn = begin_lookup(self)
        try:
            raws = [txn.get(k) for k in ikeys]
        except BaseException as exc:
            end_read(self, txn, exc)
            raise
        end_read(self, txn)
        return raws

    def ref(self, ikey: bytes, canon: bytes) -> EntryRef | None:
        raw = self.raw_entry(ikey)
        return None if raw is None else ref_of(ikey, raw, canon)

    def has(self, ikey: bytes, canon: bytes) -> bool:
        """Whether ``canon`` is stored, in its own read transaction."""
        raw = self.raw_entry(ikey)
        return raw is not None and (ikey == canon or canon_of(raw) == canon)

    def slot_gen(self, ikey: bytes) -> tuple[int, int] | None:
        raw = self.raw_entry(ikey)
        return None if raw is None else slot_gen_of(raw)

    def refs(self, keys) -> list[EntryRef | None]:
        """:meth:`ref` for each Key (canonical key, index key), in one transaction."""
        raws = self.raw_entries([ikey for _canon, ikey in keys])
        return [None if raw is None else ref_of(ikey, raw, canon)
                for (canon, ikey), raw in zip(keys, raws)]

    def slot_gens(self, ikeys) -> list[tuple[int, int] | None]:
        """:meth:`slot_gen` for each index key, in one transaction."""
        return [None if raw is None else slot_gen_of(raw) for raw in self.raw_entries(ikeys)]

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


def default_map_size(slot_count: int) -> int:
    """Room for the index of ``slot_count`` slots with long keys."""
    return max(1 << 30, slot_count * 8192)
