"""Vectored positional I/O that moves every byte or raises; whether a page
is in the page cache."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os


def _vector_all(op, fd: int, bufs: list, offset: int, short: str) -> None:
    """Repeat ``op`` (os.preadv / os.pwritev) until every byte moved."""
    bufs = [memoryview(b).cast("B") for b in bufs if len(b)]
    while bufs:
        done = op(fd, bufs[:512], offset)
        if done == 0:
            raise OSError(errno.EIO, short)
        offset += done
        while bufs and done >= len(bufs[0]):
            done -= len(bufs[0])
            bufs.pop(0)
        if done:
            bufs[0] = bufs[0][done:]


def pwritev_all(fd: int, bufs: list, offset: int) -> None:
    _vector_all(os.pwritev, fd, bufs, offset, "short write: device accepted no bytes")


def preadv_all(fd: int, bufs: list, offset: int) -> None:
    _vector_all(os.preadv, fd, bufs, offset, "short read: the slab ends before the slot does")


def _libc_mincore():
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


_MINCORE = _libc_mincore()
PAGE = mmap.PAGESIZE


def mapping_address(mm: mmap.mmap) -> int:
    """Where ``mm`` starts in this process (it stays there until closed)."""
    import numpy as np

    return np.frombuffer(mm, dtype=np.uint8, count=1).__array_interface__["data"][0]


def cached_pages(address: int, length: int) -> bytes | None:
    """mincore's answer for the pages of a file mapping that hold bytes
    ``address`` to ``address + length``: a byte a page, bit 0 set where the
    page is in the page cache; None where mincore cannot say.  It reads
    nothing and starts no readahead (a RWF_NOWAIT read starts one, and where
    the disk answers within the call it reads a cold page and calls it
    cached)."""
    if _MINCORE is None:
        return None
    start = address - address % PAGE
    vec = ctypes.create_string_buffer(max(1, (address + length - start + PAGE - 1) // PAGE))
    if _MINCORE(start, address + length - start, vec) != 0:
        return None
    return vec.raw


def page_cached(address: int) -> bool | None:
    """Whether the page of a file mapping holding ``address`` is in the
    page cache, or None where mincore cannot say (cached_pages)."""
    vec = cached_pages(address, 1)
    return None if vec is None else bool(vec[0] & 1)
