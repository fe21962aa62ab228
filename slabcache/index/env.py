"""The LMDB environment holding one store's index."""

from __future__ import annotations

import logging
import os
import threading
import time

import lmdb

from ..errors import ConfigError, CorruptStoreError, StorageFullError
from .entry import EntryRef, ref_of, slot_gen_of
from .txn import TABLES, IndexTxn

log = logging.getLogger(__name__)

READER_CHECK_SECONDS = 1.0


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
        with Index._registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            Index._registry.pop(os.path.realpath(self.path), None)
            self.env.close()
            self.env = None

    def __init__(self, path: str, *, map_size: int, readonly: bool = False,
                 create: bool = False, file_mode: int = 0o600, dir_mode: int = 0o700):
        self.path = path
        self.readonly = readonly
        self._refs = 1
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
        self._wlock = threading.Lock()  # see _Write
        self._last_reader_check = 0.0
        if not readonly:
            self.clear_stale_readers(force=True)

    def read(self) -> "_Read":
        """A read transaction: ``with index.read() as t:`` (t is an IndexTxn)."""
        return _Read(self)

    def write(self, durable: bool = False) -> "_Write":
        """A write transaction; ``durable`` syncs it to disk before returning.

        Raises StorageFullError when the index's map is full.
        """
        return _Write(self, durable)

    # The hot path: one lookup in its own read transaction, without the
    # IndexTxn wrapper.

    def ref(self, ikey: bytes, canon: bytes) -> EntryRef | None:
        with self.env.begin(db=self.dbs["entries"]) as txn:
            raw = txn.get(ikey)
            return None if raw is None else ref_of(ikey, raw, canon)

    def slot_gen(self, ikey: bytes) -> tuple[int, int] | None:
        with self.env.begin(db=self.dbs["entries"]) as txn:
            raw = txn.get(ikey)
            return None if raw is None else slot_gen_of(raw)

    def refs(self, keys) -> list[EntryRef | None]:
        """:meth:`ref` for each (index key, canonical key), in one transaction."""
        with self.env.begin(db=self.dbs["entries"]) as txn:
            out = []
            for ikey, canon in keys:
                raw = txn.get(ikey)
                out.append(None if raw is None else ref_of(ikey, raw, canon))
            return out

    def slot_gens(self, ikeys) -> list[tuple[int, int] | None]:
        """:meth:`slot_gen` for each index key, in one transaction."""
        with self.env.begin(db=self.dbs["entries"]) as txn:
            out = []
            for ikey in ikeys:
                raw = txn.get(ikey)
                out.append(None if raw is None else slot_gen_of(raw))
            return out

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
        freed = self.env.reader_check()
        if freed:
            log.warning("index %s: freed %d reader slot(s) left by dead processes", self.path, freed)
        return freed

    def sync(self) -> None:
        """Flush every committed transaction to disk."""
        self.env.sync(True)


class _Read:
    """``with index.read() as t``: a read-only IndexTxn (a class rather than
    a generator context manager: this runs on every operation)."""

    __slots__ = ("_index", "_txn")

    def __init__(self, index: Index):
        self._index = index

    def __enter__(self) -> IndexTxn:
        self._txn = self._index.env.begin(write=False)
        return IndexTxn(self._txn, self._index.dbs)

    def __exit__(self, *exc) -> None:
        self._txn.abort()


class _Write:
    """``with index.write() as t``: commit on success, abort on error."""

    __slots__ = ("_index", "_durable", "_txn")

    def __init__(self, index: Index, durable: bool):
        self._index = index
        self._durable = durable

    def __enter__(self) -> IndexTxn:
        # One writer per process at a time: LMDB serialises writers across
        # processes itself; this keeps threads of one process queueing here.
        self._index._wlock.acquire()
        try:
            self._txn = self._index.env.begin(write=True)
        except BaseException:
            self._index._wlock.release()
            raise
        return IndexTxn(self._txn, self._index.dbs)

    def __exit__(self, exc_type, exc, tb) -> bool:
        idx = self._index
        try:
            if exc_type is None:
                try:
                    self._txn.commit()
                except lmdb.MapFullError as full:
                    self._txn.abort()
                    raise idx.map_full(full) from full
            else:
                self._txn.abort()
                if issubclass(exc_type, lmdb.MapFullError):
                    raise idx.map_full(exc) from exc
        finally:
            idx._wlock.release()
        if exc_type is None and self._durable:
            idx.sync()
        return False


def default_map_size(slot_count: int) -> int:
    """Room for the index of ``slot_count`` slots with long keys."""
    return max(1 << 30, slot_count * 8192)
