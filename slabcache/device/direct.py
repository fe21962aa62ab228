"""The ``direct`` engine: O_DIRECT pread/pwrite, bulk data bypasses the page cache."""

from __future__ import annotations

import errno
import os

import torch

from ..errors import ConfigError
from ..format.checksum import CHECKSUM_BLOCK, block_digest, combine_digests
from ..format.header import Geometry, round_up
from .engine import Engine, in_batch
from .memory import AlignedScratch, aligned_empty, as_numpy
from .slabfile import open_slab
from .syscalls import preadv_all, pwritev_all


def _padded(p: torch.Tensor, total: int) -> torch.Tensor:
    """``p`` extended over the padding after its last byte, up to ``total``."""
    return torch.empty(0, dtype=torch.uint8).set_(p.untyped_storage(), p.storage_offset(), (total,), (1,))


class DirectEngine(Engine):
    """O_DIRECT pread/pwrite.

    O_DIRECT needs the file offset, the length and the memory address to be
    aligned; slots are aligned by construction, lengths are padded inside
    the slot, and unaligned caller buffers go through an aligned scratch
    buffer.
    """

    name = "direct"
    # Each read waits for the device: a batch keeps this many in flight
    # (queue depth), most of the time in syscalls that release the GIL.
    parallel_reads = parallel_writes = 8
    # Smaller values of a batch are read side by side too: batches of 32
    # cold reads on the development machines, one after another against 8
    # at once: 64 KiB 176 -> 125 us a value, 128 KiB 216 -> 146 us; at 4
    # KiB 100 against 111 us (the thread hand-off costs what it saves).
    spread_from = 64 << 10

    # Large reads are split into pieces read in parallel (the device sees
    # queue depth > 1) and each piece is hashed as soon as it lands, so the
    # checksum costs almost nothing on top of the transfer.
    SPLIT_PIECE = 2 * CHECKSUM_BLOCK

    def __init__(self, path: str, g: Geometry):
        super().__init__(path, g)
        self.align = g.alignment
        try:
            self.fd = open_slab(path, os.O_RDWR | os.O_DIRECT)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise ConfigError(
                    f"the filesystem holding {path} refuses O_DIRECT; use io='mmap' "
                    "(or use_odirect: false) or put the store on a local disk filesystem"
                ) from exc
            raise
        self._scratch = AlignedScratch(self.align)
        # Some filesystems accept O_DIRECT at open and fail the first I/O:
        # probe now so the error comes at open, never as a silent fallback.
        probe = aligned_empty(self.align, self.align)
        try:
            os.preadv(self.fd, [as_numpy(probe)], 0)
        except OSError as exc:
            os.close(self.fd)
            raise ConfigError(
                f"O_DIRECT reads fail on the filesystem holding {path} ({exc}); use io='mmap'"
            ) from exc

    # Jobs of eight 64 KiB blocks in adjacent slots: 5.9-7.6k blocks/s read
    # one request a block (eight in flight), 12.1-13.7k read as one 512 KiB
    # request.  (The mmap engine reads warm blocks faster one by one: its
    # small reads are copies, not requests.)
    coalesce_below = 1 << 20
    coalesce_writes = True

    def _coalescable(self, parts) -> bool:
        # Read straight into the caller's buffers: each aligned, and each
        # a whole number of blocks (slots are).
        return super()._coalescable(parts) and parts[0].data_ptr() % self.align == 0

    def _direct_ok(self, parts) -> bool:
        """Whether O_DIRECT can move ``parts`` as they are: each aligned, and
        each a whole number of blocks (one value, or a run of whole slots)."""
        return all(p.data_ptr() % self.align == 0 and p.numel() % self.align == 0 for p in parts)

    def empty(self, nbytes: int) -> torch.Tensor:
        # Room for the rounded-up read, so get() reads straight into it.
        room = round_up(nbytes, self.align)
        buf = aligned_empty(room, self.align)[:nbytes]
        buf._slabcache_room = room
        return buf

    def _write_impl(self, offset, parts, n):
        if self._direct_ok(parts):
            pwritev_all(self.fd, [as_numpy(p) for p in parts], offset)
            return
        total = round_up(n, self.align)
        buf = self._scratch.get(total)
        pos = 0
        for p in parts:
            buf[pos:pos + p.numel()].copy_(p)
            pos += p.numel()
        pwritev_all(self.fd, [as_numpy(buf)], offset)

    def _owns_padding(self, p: torch.Tensor, n: int) -> bool:
        # Only buffers from empty() are known to own the padding after their
        # last byte; anyone else's tensor may share that memory.
        return n % self.align == 0 or getattr(p, "_slabcache_room", 0) >= round_up(n, self.align)

    def _read_hashed(self, offset, parts, n, hashed):
        p = parts[0]
        if (len(parts) == 1 and n > self.SPLIT_PIECE and p.data_ptr() % self.align == 0
                and self._owns_padding(p, n) and not in_batch()):
            return self._read_split(offset, p, n, hashed)
        return super()._read_hashed(offset, parts, n, hashed)

    def _read_split(self, offset, p, n, hashed):
        """Read ``p`` in pieces on the helper threads, hashing each piece's
        checksum blocks as soon as it lands."""
        total = round_up(n, self.align)
        full = _padded(p, total)
        piece = self.SPLIT_PIECE

        def work(start):
            end = min(total, start + piece)
            preadv_all(self.fd, [as_numpy(full[start:end])], offset + start)
            stop = min(n, end)
            return [block_digest(as_numpy(p[b:min(stop, b + CHECKSUM_BLOCK)]))
                    for b in range(start, stop, CHECKSUM_BLOCK)] if hashed else []

        futs = [self.submit(work, start) for start in range(0, total, piece)]
        digests = [d for f in futs for d in f.result()]
        return combine_digests(digests, n) if hashed else None

    def _read_impl(self, offset, parts, n):
        total = round_up(n, self.align)
        if len(parts) == 1 and parts[0].data_ptr() % self.align == 0 and self._owns_padding(parts[0], n):
            preadv_all(self.fd, [as_numpy(_padded(parts[0], total))], offset)
            return
        if self._direct_ok(parts):
            preadv_all(self.fd, [as_numpy(p) for p in parts], offset)
            return
        buf = self._scratch.get(total)
        preadv_all(self.fd, [as_numpy(buf)], offset)
        pos = 0
        for p in parts:
            p.copy_(buf[pos:pos + p.numel()])
            pos += p.numel()

    def sync(self):
        os.fdatasync(self.fd)

    def drop_cache(self):
        # Payloads never enter the cache; this drops the slot records' pages.
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _close_impl(self):
        os.close(self.fd)
