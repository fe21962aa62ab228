"""Host buffers the engines need: page-aligned memory for O_DIRECT."""

from __future__ import annotations

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
