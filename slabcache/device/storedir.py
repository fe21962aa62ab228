"""The store directory: who may use it, and the compaction switch.

Locks (``flock``, released by the kernel when a process dies):

- the directory itself, exclusively, while a store is created, validated
  or switched, so two processes never create one at once;
- the ``lock`` file, shared for the life of every open handle and
  exclusively by repair and compaction, so those can tell that someone has
  the store open.

The compaction switch moves a fully built store from ``compact.new`` into
place.  A marker file commits it: whoever opens the store next finishes a
switch whose marker exists and discards a half-built store whose marker
does not, so a crash at any point leaves the old or the new store.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time

from ..errors import StoreBusyError
from ..format.files import open_regular
from ..format.layout import SWAPPED, StorePaths
from .slabfile import copy_mode_and_owner, fsync_dir

log = logging.getLogger(__name__)


class OpenLock:
    """The locks an open handle holds: entered with the directory locked
    exclusively, which ``release_directory`` ends once the open is done; the
    ``lock`` file stays locked shared until ``close``."""

    def __init__(self, paths: StorePaths, readonly: bool, file_mode: int = 0o600):
        self._dir_fd: int | None = os.open(paths.root, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._dir_fd, fcntl.LOCK_EX)
        self._fd: int | None = None
        try:
            if readonly and not os.path.exists(paths.lock):
                # A store copied or restored without its lock file: a
                # read-only handle must not create one, and a shared lock on
                # another descriptor of the directory would wait forever on
                # the exclusive one held above.  It goes without a lifetime
                # lock; it writes nothing, so repair cannot hurt it.
                return
            fd = open_lock_file(paths, os.O_RDONLY if readonly else os.O_RDWR, file_mode)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._fd = fd
        except BaseException:
            self.release_directory()
            raise

    @property
    def fd(self) -> int | None:
        """The lock file's descriptor, kept open for the handle's life."""
        return self._fd

    def release_directory(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def close(self) -> None:
        self.release_directory()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # A forked child shares the parent's open file descriptions, and so its
    # flock: closing the child's copies leaves the parent's locks held,
    # while keeping them would hold the store "open" after the parent
    # closed it (repair and compaction would wait for the child).
    forget_after_fork = close


def open_lock_file(paths: StorePaths, flags: int, file_mode: int) -> int:
    """A descriptor of the store's ``lock`` file, made with exactly
    ``file_mode`` (whatever the umask) when it is missing and ``flags``
    allow writing.  Raises ConfigError when it is not a regular file."""
    if flags & (os.O_RDWR | os.O_WRONLY):
        try:
            fd = open_regular(paths.lock, flags | os.O_CREAT | os.O_EXCL, "lock file", file_mode)
        except FileExistsError:
            pass  # another opener made it: open it as it is, below
        else:
            os.fchmod(fd, file_mode)  # a group-shared store's members must all open it
            return fd
    return open_regular(paths.lock, flags, "lock file")


def _mode_of(path: str) -> int:
    """The read/write bits of an existing store file, 0600 when there is none."""
    try:
        return os.stat(path).st_mode & 0o666
    except OSError:
        return 0o600


class ExclusiveLock:
    """The store locked against every other user (repair, compaction).

    Raises StoreBusyError when someone has it open; ``users`` names them.
    """

    def __init__(self, paths: StorePaths, users=lambda: []):
        self._dir_fd = os.open(paths.root, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._dir_fd, fcntl.LOCK_EX)
        try:
            self._fd = open_lock_file(paths, os.O_RDWR, _mode_of(paths.slab))
        except BaseException:
            os.close(self._dir_fd)
            raise
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            os.close(self._dir_fd)
            pids = ", ".join(map(str, users())) or "?"
            raise StoreBusyError(
                f"store at {paths.root} is open by pid(s) {pids}; stop them "
                "(or run without --repair to only check)"
            ) from None

    def close(self) -> None:
        os.close(self._fd)
        os.close(self._dir_fd)

    def __enter__(self) -> "ExclusiveLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def commit_switch(paths: StorePaths) -> None:
    """Commit the store built in ``compact.new`` and switch to it.

    The caller holds the directory exclusively and has made the new store
    durable.  A crash from here on is finished by the next open.
    """
    fsync_dir(paths.compact_new)
    with open(paths.compact_marker, "w") as f:
        json.dump({"started": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(paths.root)


def keep_modes(paths: StorePaths, new_root: str) -> None:
    """Before a switch: the new slab and index get the current ones' modes
    and owners (an operator's choices survive compaction)."""
    for part in SWAPPED:
        keep_modes_of(os.path.join(paths.root, part), os.path.join(new_root, part))


def keep_modes_of(cur: str, new: str) -> None:
    """``new`` (a file, or a directory and the files in it) takes the modes
    and owners of ``cur``'s counterparts, where they exist."""
    if not (os.path.exists(cur) and os.path.exists(new)):
        return
    copy_mode_and_owner(cur, new)
    if os.path.isdir(new):
        for name in os.listdir(new):
            if os.path.exists(os.path.join(cur, name)):
                copy_mode_and_owner(os.path.join(cur, name), os.path.join(new, name))


def finish_switch(paths: StorePaths) -> bool:
    """Finish a committed switch, discard an uncommitted one (caller holds
    the directory lock).  True when a committed switch was finished."""
    finished = False
    if os.path.exists(paths.compact_marker):
        os.makedirs(paths.compact_old, exist_ok=True)
        for part in SWAPPED:
            src = os.path.join(paths.compact_new, part)
            if os.path.exists(src):
                cur = os.path.join(paths.root, part)
                if os.path.exists(cur):
                    os.rename(cur, os.path.join(paths.compact_old, part))
                os.rename(src, cur)
        fsync_dir(paths.root)
        os.unlink(paths.compact_marker)
        fsync_dir(paths.root)
        finished = True
    for d in (paths.compact_new, paths.compact_old):
        if os.path.exists(d):
            shutil.rmtree(d)
    return finished


def recover_interrupted(paths: StorePaths) -> None:
    """At open: finish or undo a compaction that a crash interrupted."""
    if finish_switch(paths):
        log.warning("store %s: finished an interrupted compaction", paths.root)
