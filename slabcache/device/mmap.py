"""The ``mmap`` engine: pwrite in, copy out of a shared mapping."""

from __future__ import annotations

import mmap
import os
import warnings

import numpy as np
import torch
import xxhash

from ..errors import SlabIOError
from ..format.checksum import CHECKSUM_BLOCK, block_hasher, combine_digests
from ..format.header import Geometry, round_up
from .engine import Engine, cores, read_or_error
from .slabfile import open_slab
from .memory import as_numpy
from .syscalls import preadv_all, pwritev_all


class MmapEngine(Engine):
    """Writes with pwrite, reads by copying out of a shared mapping.

    Writing through pwrite avoids the page-fault cost of a first write into
    a fresh mapping (several times slower on these machines); reading out
    of the mapping is a plain memcpy once pages are cached.
    """

    name = "mmap"
    writes_to_cache = True

    # Below this size one pread beats copying out of the mapping: a cold
    # read is one request (with readahead) instead of a page fault per
    # 4 KiB, and a warm one costs about the same.
    PREAD_BELOW = 4 << 20

    # Large reads copy and hash in steps small enough that the bytes just
    # copied are still in the core's cache when they are hashed: the
    # checksum then reads them from cache (several times faster than from
    # memory) instead of making a second pass over the value.
    FUSED_STEP = 512 << 10

    def __init__(self, path: str, g: Geometry):
        super().__init__(path, g)
        self.fd = open_slab(path, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, g.file_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The whole slab as one uint8 tensor (GPU benchmarks register
            # windows of it with the CUDA driver).
            self.view = torch.frombuffer(self.mm, dtype=torch.uint8)

    def _write_impl(self, offset, parts, n):
        pwritev_all(self.fd, [as_numpy(p) for p in parts], offset)

    def _write_one(self, offset, part, array, n):
        done = os.pwritev(self.fd, [array], offset)
        if done != n:
            pwritev_all(self.fd, [array[done:]], offset + done)

    def _will_need(self, offset: int, n: int) -> None:
        """Start readahead for a whole value, so a cold read is not served
        one faulted page at a time."""
        start = offset & ~(mmap.PAGESIZE - 1)
        self.mm.madvise(mmap.MADV_WILLNEED, start, round_up(offset + n, mmap.PAGESIZE) - start)

    def _read_impl(self, offset, parts, n):
        if n < self.PREAD_BELOW:
            preadv_all(self.fd, [as_numpy(p) for p in parts], offset)
            return
        self._will_need(offset, n)
        pos = offset
        for p in parts:
            k = p.numel()
            if k:
                # torch's copy releases the GIL, so parallel gets overlap.
                p.copy_(self.view[pos:pos + k])
            pos += k

    def _read_hashed(self, offset, parts, n, hashed):
        if len(parts) == 1 and n < self.PREAD_BELOW:
            # The common small read: one pread and, with the bytes still in
            # cache, one hash (a value under one checksum block hashes whole).
            a = as_numpy(parts[0])
            got = os.preadv(self.fd, [a], offset)
            if got != n:
                preadv_all(self.fd, [a[got:]], offset + got)
            return xxhash.xxh3_64_intdigest(a) if hashed else None
        if not (hashed and len(parts) == 1):
            return super()._read_hashed(offset, parts, n, hashed)
        self._will_need(offset, n)
        dst = as_numpy(parts[0])
        src = as_numpy(self.view[offset:offset + n])
        step = self.FUSED_STEP

        def blocks(firsts: range) -> list[bytes]:
            # numpy's copy and xxh3 both release the GIL.
            digests = []
            for b in firsts:
                h = block_hasher()
                for s in range(b, min(n, b + CHECKSUM_BLOCK), step):
                    e = min(n, s + step, b + CHECKSUM_BLOCK)
                    np.copyto(dst[s:e], src[s:e])
                    h.update(dst[s:e])
                digests.append(h.digest())
            return digests

        # Checksum blocks are dealt round-robin to one thread per core, the
        # caller being one of them: copying and hashing are CPU work, and
        # more threads than cores measured slower (cold reads gain nothing
        # either: madvise above already queued the whole value's readahead).
        firsts = range(0, n, CHECKSUM_BLOCK)
        k = max(1, min(len(firsts), cores()))
        futs = [self.submit(blocks, firsts[j::k]) for j in range(1, k)]
        shares = [blocks(firsts[0::k])] + [f.result() for f in futs]
        return combine_digests([shares[i % k][i // k] for i in range(len(firsts))], n)

    def read_many_into(self, slots, parts_list, hashed=False):
        # A batch of small single-buffer reads (a KV chunk each) in one
        # loop: a pread and a hash per value, without read_into's calls.
        g, fd, below = self.geometry, self.fd, self.PREAD_BELOW
        count, room = g.slot_count, g.slot_bytes
        out, total = [], 0
        for slot, parts in zip(slots, parts_list, strict=True):
            n = parts[0].numel() if len(parts) == 1 else below
            if n >= below or n > room or not 0 <= slot < count:
                out.append(read_or_error(self.read_into, slot, parts, hashed))
                continue
            a = as_numpy(parts[0])
            offset = g.slot_offset(slot)
            try:
                got = os.preadv(fd, [a], offset)
                if got != n:
                    preadv_all(fd, [a[got:]], offset + got)
            except OSError as exc:
                out.append(SlabIOError(f"reading slot {slot} of {self.path} failed: {exc}"))
                continue
            total += n
            out.append(xxhash.xxh3_64_intdigest(a) if hashed else None)
        with self._count_lock:
            self.bytes_read += total
        return out

    def sync(self):
        os.fdatasync(self.fd)

    def drop_cache(self):
        # Dirty pages and pages mapped into this process survive fadvise:
        # write back and unmap first.
        os.fdatasync(self.fd)
        self.mm.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _close_impl(self):
        del self.view
        self.mm.close()
        os.close(self.fd)
