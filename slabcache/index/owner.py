"""Who holds pins, reservations and open handles, and whether they are alive.

An owner id names one open handle: its pid (for people reading reports),
a random 64-bit token, and a handle number.  The handle proves it is alive
by holding a lock on one byte of the store's ``lock`` file at the token's
offset: an open-file-description lock (``F_OFD_SETLK``), which the kernel
drops when the handle closes the file or its process dies, however it
dies.  Anyone asks through a descriptor that holds no lock
(``F_OFD_GETLK``).

A lock is on the file, not on a process: two containers sharing a disk
see each other's locks although each has its own pids and its own
``/proc``, where a pid or a start time read from ``/proc`` names another
process or none at all.

Owners recorded by format version 1 (no token bit) are judged as they
were then, by pid and start time in ``/proc``; a store is upgraded to
version 2 only while none of them is alive (core/opener.py).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import secrets
import struct

OWNER = struct.Struct(">IQI")  # pid, token (or a v1 start time), handle number
# Set in every token; version 1 wrote a start time in clock ticks here,
# which never reaches it.
TOKEN_BIT = 1 << 63
# Lock offsets are positive off_t values: the token's low 62 bits.
_OFFSET_MASK = (1 << 62) - 1
_V1 = struct.Struct(">IQ")


class _Flock(ctypes.Structure):
    """struct flock (the same layout on every 64-bit Linux)."""

    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int32)]


def _flock(kind: int, offset: int) -> bytes:
    return bytes(_Flock(kind, os.SEEK_SET, offset, 1, 0))


_handles = itertools.count(1)


def pid_of(owner: bytes) -> int:
    """The pid an owner was opened by, as its own PID namespace saw it."""
    return OWNER.unpack_from(owner)[0]


class Liveness:
    """Proof of life through one store's lock file (see the module doc)."""

    def __init__(self, lock_path: str):
        self.lock_path = lock_path
        self._probe: int | None = None

    def claim(self, fd: int) -> bytes:
        """A new owner id whose life is the lock this takes on ``fd`` (a
        descriptor of the lock file the handle keeps open)."""
        while True:
            token = secrets.randbits(64) | TOKEN_BIT
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, token & _OFFSET_MASK))
            except OSError as exc:  # another handle drew the same byte: draw again
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                continue
            return OWNER.pack(os.getpid(), token, next(_handles) & 0xFFFFFFFF)

    def is_alive(self, owner: bytes) -> bool:
        """True while the handle that recorded ``owner`` is open."""
        token = OWNER.unpack_from(owner)[1]
        if not token & TOKEN_BIT:
            return _v1_alive(owner)
        probe = self._probe_fd()
        if probe is None:  # no lock file: nobody can hold a lock on it
            return False
        got = _Flock.from_buffer_copy(
            fcntl.fcntl(probe, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, token & _OFFSET_MASK)))
        return got.l_type != fcntl.F_UNLCK

    def _probe_fd(self) -> int | None:
        if self._probe is None:
            try:
                self._probe = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                return None
        return self._probe

    def close(self) -> None:
        if self._probe is not None:
            os.close(self._probe)
            self._probe = None


# ---------------------------------------------------------------- version 1


def is_v1(owner: bytes) -> bool:
    """True for an owner recorded by format version 1 (pid + start time)."""
    return not OWNER.unpack_from(owner)[1] & TOKEN_BIT


def _start_time(pid: int) -> int | None:
    """Start time of a running process; None if gone (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split
    # after the last ')' so field positions are reliable.
    fields = raw[raw.rfind(b")") + 2:].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])  # field 22 overall: starttime
    except (IndexError, ValueError):
        return None


def _v1_alive(owner: bytes) -> bool:
    pid, start = _V1.unpack_from(owner)
    st = _start_time(pid)
    return st is not None and (start == 0 or st == start)


def v1_owner(pid: int, start: int) -> bytes:
    """An owner id as format version 1 wrote it (tests, upgrade checks)."""
    return _V1.pack(pid, start) + b"\0\0\0\1"
