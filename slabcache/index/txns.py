"""The transactions of an Index: ``with index.read() as t`` and
``with index.write() as t`` (t an IndexTxn), and the bare lookup of the hot
path.  Classes rather than generator context managers: these run on every
operation."""

from __future__ import annotations

from typing import Protocol

import lmdb

from ..errors import StorageFullError
from .room import ROOM_FREE_KEYS
from .txn import IndexTxn


class ReadTxn:
    """``with index.read() as t``: a read-only IndexTxn (a class rather than
    a generator context manager: this runs on every operation)."""

    __slots__ = ("_index", "_txn")

    def __init__(self, index):
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
        end_read(self._index, self._txn, exc)


def begin_lookup(index) -> lmdb.Transaction:
    """The bare LMDB read transaction on the entries table, the gate
    entered (the hot path's lookups, without the IndexTxn wrapper or a
    context object: those were half of a lookup's cost, 1.14 us against
    0.62, and every get takes two); end it with :func:`end_read`.  A begin
    that fails takes ReadTxn's careful path (a map another process grew,
    what LMDB's errors mean)."""
    index._enter()
    try:
        return index.env.begin(db=index.entries_db)
    except lmdb.Error:
        index._leave()
    except BaseException:
        index._leave()
        raise
    return ReadTxn(index)._begin(index.entries_db)


def end_read(index, txn: lmdb.Transaction, exc: BaseException | None = None) -> None:
    """Abort a read transaction and leave the gate; then, when ``exc`` is
    one of LMDB's errors, raise what it means (Index.fail)."""
    try:
        txn.abort()
    finally:
        index._leave()
    if exc is not None and isinstance(exc, lmdb.Error):
        index.fail(exc)


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


class WriteTxn:
    """``with index.write() as t``: the preludes, then the caller's work;
    commit on success, abort (and undo the preludes) on error."""

    __slots__ = ("_index", "_durable", "_keys", "_adds", "_txn", "_taken", "_preludes")

    def __init__(self, index, durable: bool, keys: int, adds: int):
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
