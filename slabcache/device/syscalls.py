"""Vectored positional I/O that moves every byte or raises."""

from __future__ import annotations

import errno
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
