"""Process identity for pins, reservations and open handles.

A pid alone is reused by the kernel; pairing it with the process start time
(from /proc) names one process for its whole life, so a pin or reservation
left by a dead process can be told apart from one held by a live process
that happens to have the same pid.
"""

from __future__ import annotations

import itertools
import os
import struct

OWNER = struct.Struct(">IQ")  # pid, start time in clock ticks since boot


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


_cache: dict[int, bytes] = {}


def current() -> bytes:
    """This process's owner id (recomputed after fork)."""
    pid = os.getpid()
    own = _cache.get(pid)
    if own is None:
        own = OWNER.pack(pid, _start_time(pid) or 0)
        _cache.clear()
        _cache[pid] = own
    return own


_handles = itertools.count(1)


def new_handle() -> bytes:
    """A fresh owner id for one open store in this process.

    It is the process part plus a 4-byte handle number, so two stores opened
    on one path by one process (LMCache may build its backends twice) keep
    their pins apart.
    """
    return current() + struct.pack(">I", next(_handles) & 0xFFFFFFFF)


def pid_of(owner: bytes) -> int:
    return OWNER.unpack_from(owner)[0]


def is_alive(owner: bytes) -> bool:
    """True while the process that owns ``owner`` is still running."""
    pid, start = OWNER.unpack_from(owner)
    if owner[:OWNER.size] == current():
        return True
    st = _start_time(pid)
    return st is not None and (start == 0 or st == start)
