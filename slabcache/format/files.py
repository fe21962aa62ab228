"""Opening a store's files: never through a symbolic link, only regular files.

A store's files are named by format/layout.py.  Whoever can put a link
there could make a repair write a slab header into another file, and a
FIFO there would make an open wait forever (while holding the store's
directory lock): so every file is opened without following links and
without blocking, and checked to be a regular file before it is used.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from ..errors import ConfigError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISLNK, "a symbolic link"))


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def not_regular(path: str, what: str, kind: str) -> ConfigError:
    return ConfigError(
        f"the {what} at {path} is {kind}, not a regular file; slabcache opens only the files it "
        "made there. Move it away (a link: put the file it names in its place), or give the "
        "store another directory"
    )


def open_regular(path: str, flags: int, what: str, mode: int = 0o600) -> int:
    """``os.open(path, flags)`` of a regular file, not following a link at
    ``path`` and never waiting on a FIFO.  Raises ConfigError naming what
    is there instead; OSError (FileNotFoundError, PermissionError) as open."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise not_regular(path, what, "a symbolic link") from None
        if exc.errno == errno.EISDIR:
            raise not_regular(path, what, "a directory") from None
        if exc.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise not_regular(path, what, "a FIFO") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, what, _kind(st.st_mode))
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(path: str, what: str) -> None:
    """Raise ConfigError when something other than a regular file is at
    ``path`` (for files a library opens itself); nothing there is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, what, _kind(st.st_mode))


def check_directory(path: str, what: str) -> None:
    """Raise ConfigError when ``path`` exists and is not a real directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        kind = _kind(st.st_mode) if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode) else "a file"
        raise ConfigError(
            f"the {what} at {path} is {kind}, not a directory; slabcache keeps its own directory "
            "there. Move it away, or give the store another directory"
        )
