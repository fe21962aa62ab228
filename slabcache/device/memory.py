"""Host buffers the engines need: page-aligned memory for O_DIRECT."""

from __future__ import annotations

import ctypes
import threading

import torch


def aligned_empty(nbytes: int, alignment: int = 4096) -> torch.Tensor:
    """A uint8 CPU tensor whose first byte is ``alignment``-aligned."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % alignment
    return raw[skip:skip + nbytes]


class AlignedScratch:
    """One page-aligned scratch buffer per thread, grown on demand."""

    def __init__(self, alignment: int = 4096):
        self._alignment = alignment
        self._local = threading.local()

    def get(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = aligned_empty(max(nbytes, 1 << 20), self._alignment)
            self._local.buf = buf
        return buf[:nbytes]


def as_numpy(t: torch.Tensor):
    """A buffer-protocol view of a uint8 CPU tensor (no copy)."""
    return t.numpy()


# ctypes array types by length, for byte_buffer (a batch's values share one).
_BUFFER_TYPES: dict[int, type] = {}
_BUFFER_TYPES_MAX = 256


def byte_buffer(t: torch.Tensor):
    """A buffer-protocol view of a byte part (a 1-D contiguous uint8 CPU
    tensor: the store builds its parts and checks its outs so), for
    os.preadv/pwritev and xxhash: a ctypes array at its address, about
    0.47 us a tensor here against t.numpy()'s 0.70, and a batch's values
    take one each.  The view holds ``t``, so the memory outlives it."""
    n = t.numel()
    if n == 0 or not t.is_cpu:  # no address to view; numpy names a wrong device
        return t.numpy()
    kind = _BUFFER_TYPES.get(n)
    if kind is None:
        if len(_BUFFER_TYPES) >= _BUFFER_TYPES_MAX:
            _BUFFER_TYPES.clear()
        kind = _BUFFER_TYPES[n] = ctypes.c_ubyte * n
    buf = kind.from_address(t.data_ptr())
    buf.tensor = t
    return buf


class Span:
    """A value's bytes held in several buffers (a page's K and V, each
    layer's rows), seen as one run of bytes: the buffers that cover any
    byte range of it, as views (no copy)."""

    __slots__ = ("arrays", "_ends")

    def __init__(self, parts):
        self.arrays = [as_numpy(p) for p in parts]
        ends, total = [], 0
        for a in self.arrays:
            total += len(a)
            ends.append(total)
        self._ends = ends

    def range(self, s: int, e: int) -> list:
        """Views of bytes ``s:e`` of the value, in order."""
        if len(self.arrays) == 1:
            return [self.arrays[0][s:e]]
        out, start = [], 0
        for a, end in zip(self.arrays, self._ends):
            if end > s and start < e:
                out.append(a[max(s, start) - start:min(e, end) - start])
            if end >= e:
                break
            start = end
        return out
