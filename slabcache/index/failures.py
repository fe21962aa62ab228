"""LMDB's errors, as slabcache errors that say what to do."""

from __future__ import annotations

import os

import lmdb

from ..errors import ConfigError, CorruptStoreError, StorageFullError, StoreBusyError

# What LMDB raises on a damaged file (a transaction that hit one of these
# is unusable afterwards: BadTxnError).
_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.InvalidError,
           lmdb.VersionMismatchError, lmdb.PageFullError, lmdb.CursorFullError, lmdb.BadTxnError)


class Failures:
    """Translating what LMDB raises (a mixin of Index)."""

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
            return pid_clash(os.path.dirname(self.path), exc)
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


def pid_clash(store: str, exc: lmdb.Error) -> ConfigError:
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
