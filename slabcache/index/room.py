"""Room for the index on its filesystem, allocated before it is needed.

The index is mapped writable over a sparse file: LMDB writes a new page by
touching it, and on a full filesystem that touch is a SIGBUS, not an
error.  So the file is allocated ahead of the index's last page, and a
write that cannot get room fails with StorageFullError first.
Room allocated past the last page in use: as much again as the index
holds, at least INDEX_MIN_HEADROOM (what a write needs when no more can
be had) and at most INDEX_HEADROOM, so a small store takes a megabyte or
two and a large one 64 MiB.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

from ..errors import SlabIOError, StorageFullError
from ..format.files import open_regular

log = logging.getLogger(__name__)

INDEX_HEADROOM = 64 << 20
INDEX_MIN_HEADROOM = 1 << 20
ROOM_PER_KEY = 8192  # pages a changed key may copy (a leaf of each table it is in)
ROOM_FREE_KEYS = 16  # transactions changing fewer keys fit the headroom kept anyway
SPACE_CHECK_WRITES = 16  # write transactions between checks of the headroom


class Headroom:
    """Allocating the index's file ahead of its last page (a mixin of Index)."""

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


def open_rw(path: str) -> int | None:
    """A descriptor of ``path`` for writing; None where it cannot be had
    (read-only media or permissions: nothing is written there either)."""
    try:
        return open_regular(path, os.O_RDWR, "index lock file")
    except OSError:
        return None


def back_whole_file(fd: int, path: str) -> None:
    """Back every byte of the file with disk blocks."""
    try:
        _fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFullError(
                f"the filesystem holding {path} is full; free space on it to open the store"
            ) from exc
        log.warning("cannot allocate %s ahead (%s); a full filesystem may stop the process", path, exc)
