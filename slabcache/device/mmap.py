"""The ``mmap`` engine: buffered pwrite in, buffered pread out.

The slab is also mapped (GPU benchmarks register windows of it with the
CUDA driver), but reads go through ``preadv``: measured on the development
machines, copying out of the mapping and preadv cost the same warm, while
cold a preadv is served by readahead where a mapping faults a page at a
time (``benchmarks/engines.py``).  Measured again for warm batches of 4 x 8
MiB, hashed, in turn in one process (16 rounds): 3.30 ms copying out of
the mapping (numpy, pages mapped first with MADV_POPULATE_READ), 2.83 ms
through preadv in hashed pieces.  And a third time, copying out of the
mapping only a value whose every page mincore finds cached (numpy, a
checksum block at a time, then hashed), in turn with preadv in one process
(8 rounds, medians): one thread alone copies 8 MiB out of the mapping at
17.8 GB/s against preadv's 7.6, but the store's reads rarely run alone:
get_into of 256 KiB / 1 / 8 / 32 MiB values ran 0.96x / 1.16x / 1.27x /
1.16x as fast, get_many_into 1.11x / 1.14x / 0.92x / 0.88x (two cores
copying at once reach the memory's rate either way); inside LMCache,
warm retrieves of 8 MiB chunks level within the noise (12 rounds: 0.90x
against 0.78x of LocalDiskBackend, ranges 0.66-1.04 and 0.70-1.08).  A
mapping also turns a disk error into a SIGBUS where preadv returns EIO,
which is served as a miss.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import warnings

import torch
import xxhash

from ..format.checksum import CHECKSUM_BLOCK, block_hasher, combine_digests
from ..format.header import Geometry
from ..errors import SlabIOError
from .engine import Engine, cores, in_batch, read_or_error
from .memory import Span, as_numpy, byte_buffer
from .slabfile import open_slab
from .syscalls import PAGE, mapping_address, page_cached, preadv_all, pwritev_all

# A value read in one piece below this (one preadv, then one hash); at and
# above it, read and hashed in FUSED_STEP pieces.
FUSE_FROM = 1 << 20
# Pieces small enough that the bytes just read are still in the core's
# cache when they are hashed: the checksum then reads them from cache
# instead of making a second pass over memory.
FUSED_STEP = 512 << 10
# Out of the page cache, values of this size or more are each read whole
# (one preadv the size of the value lets the kernel's readahead keep all of
# it in flight), then hashed, COLD_WHOLE_READS at once, each through its
# thread's own open of the slab (MmapEngine._reader_fd).  4 x 32 MiB cold
# inside LMCache's engine: 11.0-14.5 prompts/s four at once, 4.2-6.3 one
# after another (LMCache's own backend: 11.8-14.3, four files at once); at
# 8 MiB the batch path below (readahead for all, 512 KiB pieces) was level.
COLD_WHOLE_FROM = 16 << 20
COLD_WHOLE_READS = 4
# Not kept: reading cold values of 2 MiB or more with O_DIRECT (a second
# open of the slab, the direct engine's path).  In vLLM's tier, cold loads
# of 2 / 4 / 8 MiB blocks took 704 / 451 / 197 blocks/s against 616 / 391 /
# 172 buffered (the same process, contenders in turn); inside LMCache's
# engine, cold retrieves of 4 x 8 / 32 MiB took 33.4 / 8.7 prompts/s against
# 46.7 / 14.8, and churn at 32 MiB 11.3 against 25.5 (bytes read with
# O_DIRECT never become warm).  Dropping the readahead request for large
# cold batches (_before_batch) was level in vLLM's tier: 166 against 160.
# Buffers of this size or more are hashed with xxhash's streaming hasher,
# which releases the GIL (its one-shot digest of a buffer holds it).
STREAM_HASH_FROM = 64 << 10


def _hash(a) -> int:
    if len(a) < STREAM_HASH_FROM:
        return xxhash.xxh3_64_intdigest(a)
    h = xxhash.xxh3_64()
    h.update(a)
    return h.intdigest()


def _digest(span: Span, n: int) -> int:
    """The format checksum of ``span`` (``n`` bytes), block by block with
    the streaming hasher, which releases the GIL."""
    digests = []
    for b in range(0, n, CHECKSUM_BLOCK):
        h = block_hasher()
        for piece in span.range(b, min(n, b + CHECKSUM_BLOCK)):
            h.update(piece)
        digests.append(h.digest())
    return combine_digests(digests, n)


class MmapEngine(Engine):
    """Buffered pwrite and preadv over the page cache."""

    name = "mmap"
    writes_to_cache = True
    # Copying and hashing are CPU work, but inside LMCache's engine, 4 x 32
    # MiB warm retrieves ran 22.4 ms a prompt reading 4 values at once and
    # 24.5 ms reading 2 (2 cores; 8 MiB: 8.8 against 9.2 ms), as LMCache's
    # own backend reads on 4 threads.  Cold reads also get their queue
    # depth from readahead (a value found out of the page cache asks for
    # all of it at once).
    parallel_reads = max(4, cores())
    parallel_writes = cores()
    # Values under 2 MiB in a batch are read one after another in the caller
    # (cold, the whole batch is asked for first: _read_small_many): warm 4 x
    # 256 KiB batches took 239 us so and 419 us side by side, 4 x 1 MiB 472
    # against 667 (2 MiB: level; 4 MiB: 3152 against 2466).  Inside
    # LMCache's engine at 256 KiB chunks (6 rounds, vs LocalDiskBackend):
    # warm 1.04 -> 1.17x, cold 0.80 -> 1.55x; vLLM's tier, 1 MiB blocks:
    # warm loads 3.00 -> 5.37x of fs, cold level.
    spread_from = 2 << 20
    coalesce_writes = True
    # A batch found out of the page cache waits on the disk, not the CPU:
    # more reads in flight (fio on these machines: 1.3 GB/s at queue
    # depth 1, 2.6 GB/s at 16, for 8 MiB random reads).
    cold_reads = 8

    def __init__(self, path: str, g: Geometry):
        super().__init__(path, g)
        self.fd = open_slab(path, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, g.file_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.view = torch.frombuffer(self.mm, dtype=torch.uint8)
        self._base = mapping_address(self.mm)  # what mincore is asked about (_is_cold)
        self._nowait = hasattr(os, "RWF_NOWAIT")  # cleared if the filesystem refuses it
        self._readers = threading.local()  # a thread's own open of the slab (_reader_fd)
        self._reader_fds: list[int] = []
        self._reader_lock = threading.Lock()

    def _write_impl(self, offset, parts, n):
        pwritev_all(self.fd, [as_numpy(p) for p in parts], offset)

    # A value of at least FUSE_FROM is written piece by piece: each piece
    # is hashed while pwrite has just read it into the cache.  Unhashed
    # values too: one pwritev of a whole large value into the page cache now
    # and then took twenty times as long here (4 threads writing 4 x 8 MiB
    # values at a time to one file, 8 such batches a run: 3 runs in 18 at
    # 9-19 batches a second against 120-210, none of 18 in FUSED_STEP
    # pieces; inside LMCache with checksums off, stores of 8 / 32 MiB chunks
    # at 17.0 / 2.7 prompts/s against 74.4 / 26.0 hashed).
    fuse_writes_from = FUSE_FROM

    def _write_fused(self, offset, parts, n, hashed):
        span = Span(parts)  # the pieces below may straddle parts
        firsts = range(0, n, CHECKSUM_BLOCK)
        k = 1 if in_batch() else min(len(firsts), self.parallel_writes)
        shares = self.spread([(firsts[j::k], span, offset, n, hashed) for j in range(k)],
                             self._write_blocks, k)
        if not hashed:
            return None
        return combine_digests([shares[i % k][i // k] for i in range(len(firsts))], n)

    def _write_blocks(self, blocks, span, offset, n, hashed):
        digests = []
        for b in blocks:
            h = block_hasher() if hashed else None
            for s in range(b, min(n, b + CHECKSUM_BLOCK), FUSED_STEP):
                e = min(n, s + FUSED_STEP, b + CHECKSUM_BLOCK)
                pieces = span.range(s, e)
                if h is not None:
                    for piece in pieces:
                        h.update(piece)
                done = os.pwritev(self.fd, pieces, offset + s)
                if done != e - s:
                    pwritev_all(self.fd, Span(pieces).range(done, e - s), offset + s + done)
            digests.append(h.digest() if h is not None else None)
        return digests

    def _write_run_impl(self, offset, parts, arrays, n):
        self._pwritev(offset, parts, arrays, n)

    def _write_one(self, offset, part, array, n):
        self._pwritev(offset, [part], [array], n)

    def _pwritev(self, offset, parts, arrays, n):
        """One pwritev of ``arrays`` (the parts' numpy views, far fewer than
        IOV_MAX); after a short write, the rest."""
        done = os.pwritev(self.fd, arrays, offset)
        if done != n:
            pwritev_all(self.fd, Span(parts).range(done, n), offset + done)

    def _read_impl(self, offset, parts, n):
        preadv_all(self.fd, [as_numpy(p) for p in parts], offset)

    def _cached(self, dst: list, offset: int) -> int:
        """Read what of the buffers ``dst`` the page cache holds, without
        waiting for the disk; the bytes read (0 when none is cached)."""
        if self._nowait:
            try:
                return os.preadv(self.fd, dst, offset, os.RWF_NOWAIT)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return 0
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False  # this filesystem cannot say: always wait
        return os.preadv(self.fd, dst, offset)

    def _readahead(self, offset: int, n: int) -> None:
        """Ask the kernel for a whole value at once (readahead for the rest
        of it in flight while its first pieces are copied)."""
        os.posix_fadvise(self.fd, offset, n, os.POSIX_FADV_WILLNEED)

    def _read_hashed(self, offset, parts, n, hashed):
        if n < FUSE_FROM:
            if len(parts) != 1:  # one preadv into every part, one streaming hash
                return super()._read_hashed(offset, parts, n, hashed)
            dst = byte_buffer(parts[0])
            got = os.preadv(self.fd, [dst], offset)
            if got != n:
                preadv_all(self.fd, [memoryview(dst)[got:]], offset + got)
            return _hash(dst) if hashed else None
        dst = Span(parts)  # the pieces below may straddle parts
        # A large value: read and hashed piece by piece, each piece hashed
        # while it is in cache; its checksum blocks spread over the cores
        # unless this read is one of a batch already spread.
        firsts = range(0, n, CHECKSUM_BLOCK)
        k = 1 if in_batch() else min(len(firsts), self.parallel_reads)
        got = self._cached(dst.range(0, min(n, FUSED_STEP)), offset)
        if got < min(n, FUSED_STEP):
            self._readahead(offset + got, n - got)
        tasks = [(firsts[j::k], dst, offset, n, hashed, got if j == 0 else 0) for j in range(k)]
        shares = self.spread(tasks, self._read_blocks, k)
        if not hashed:
            return None
        return combine_digests([shares[i % k][i // k] for i in range(len(firsts))], n)

    def _read_blocks(self, blocks, dst, offset, n, hashed, done):
        """Read (and hash) the checksum blocks starting at ``blocks``; the
        first ``done`` bytes of the value are already read."""
        if len(dst.arrays) == 1:
            return self._read_blocks_flat(blocks, dst.arrays[0], offset, n, hashed, done)
        digests = []
        for b in blocks:
            h = block_hasher() if hashed else None
            for s in range(b, min(n, b + CHECKSUM_BLOCK), FUSED_STEP):
                e = min(n, s + FUSED_STEP, b + CHECKSUM_BLOCK)
                if e > done:
                    r = max(s, done)
                    got = os.preadv(self.fd, dst.range(r, e), offset + r)
                    if got != e - r:
                        preadv_all(self.fd, dst.range(r + got, e), offset + r + got)
                if h is not None:
                    for piece in dst.range(s, e):
                        h.update(piece)
            digests.append(h.digest() if h is not None else None)
        return digests

    def _read_blocks_flat(self, blocks, a, offset, n, hashed, done):
        """:meth:`_read_blocks` into one buffer ``a`` (the common case), with
        as little Python a piece as can be: each piece runs it holding the
        GIL, which the other readers of a batch wait for.  Warm retrieves of
        4 x 32 MiB inside LMCache's engine spent 11.7 ms in the disk tier
        this way, 12.3 through Span.range (10 rounds in turn; 8 MiB: level)."""
        fd, step, preadv = self.fd, FUSED_STEP, os.preadv
        digests = []
        for b in blocks:
            h = block_hasher() if hashed else None
            end = min(n, b + CHECKSUM_BLOCK)
            for s in range(b, end, step):
                e = min(end, s + step)
                piece = a[s:e]
                if e > done:
                    r = s if s >= done else done
                    got = preadv(fd, [piece if r == s else a[r:e]], offset + r)
                    if got != e - r:
                        preadv_all(fd, [a[r + got:e]], offset + r + got)
                if h is not None:
                    h.update(piece)
            digests.append(None if h is None else h.digest())
        return digests

    def _is_cold(self, slot, parts, page: str = "first") -> bool:
        """Whether the ``page`` ("first" or "last") of the value in ``slot``
        is out of the page cache: asked with mincore, which reads nothing;
        where it cannot say, with a RWF_NOWAIT read of the page into
        ``parts``; False where neither can.  (A RWF_NOWAIT read starts
        readahead, and where the disk answers within the call, it read a
        cold page and called it cached: here one cold batch in six or so
        was judged warm.)  A head found cached usually means the
        kernel's readahead is streaming through these slots, and the
        values are best read plainly behind it; but a value of
        COLD_WHOLE_FROM or more is judged by its last page, since readahead
        past the end of one value caches only the first megabytes of the
        next, and such a value found warm by its head was then read cold in
        small pieces (4 x 32 MiB inside LMCache: 100-130 ms a prompt
        against 60-70)."""
        n = parts[0].numel() if len(parts) == 1 else sum(p.numel() for p in parts)
        g = self.geometry
        if not 0 < n <= g.slot_bytes or not 0 <= slot < g.slot_count:
            return False
        start = (n - 1) // PAGE * PAGE if page == "last" else 0
        cached = page_cached(self._base + g.slot_offset(slot) + start)
        if cached is not None:
            return not cached
        if not self._nowait:
            return False
        n = n if page == "last" else min(n, PAGE)
        dst = Span(parts).range(start, n)
        return self._cached(dst, g.slot_offset(slot) + start) < n - start

    def _read_large_many(self, slots, parts_list, hashed):
        if (all(sum(t.numel() for t in p) >= COLD_WHOLE_FROM for p in parts_list)
                and self._is_cold(slots[0], parts_list[0], page="last")):
            return self._read_whole_many(slots, parts_list, hashed)
        return super()._read_large_many(slots, parts_list, hashed)

    def _read_whole_many(self, slots, parts_list, hashed):
        """Cold large values: each read whole, then hashed, several at once
        (COLD_WHOLE_READS)."""
        return self.spread([(slot, parts, hashed) for slot, parts in zip(slots, parts_list)],
                           self._read_whole, COLD_WHOLE_READS)

    def _reader_fd(self) -> int:
        """This thread's own open file description of the slab.  The
        kernel's readahead state lives in the open file: cold values read
        side by side through one descriptor disturb each other's windows
        (4 x 32 MiB cold here: 1.2-1.4 GB/s through one, 2.0 through one
        each)."""
        fd = getattr(self._readers, "fd", None)
        if fd is None:
            try:
                fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = self.fd  # no /proc: share the store's own
            with self._reader_lock:
                if fd != self.fd:
                    self._reader_fds.append(fd)
            self._readers.fd = fd
        return fd

    def _read_whole(self, slot, parts, hashed):
        try:
            n = self._check(slot, parts)
            dst = Span(parts)
            try:
                preadv_all(self._reader_fd(), dst.arrays, self.geometry.slot_offset(slot))
            except OSError as exc:
                raise SlabIOError(f"reading slot {slot} of {self.path} failed: {exc}") from exc
        except SlabIOError as exc:
            return exc
        with self._count_lock:
            self.bytes_read += n
        return _digest(dst, n) if hashed else None

    def _ask_all_if_cold(self, slots, parts_list) -> bool:
        """Whether the batch's first value is out of the page cache; if so,
        every value of the batch is asked for at once, so the disk sees all
        of its reads in flight rather than the few the cores are copying."""
        # Measured against the alternatives: asking for nothing, leaving it
        # to the kernel's readahead, halved vLLM's cold loads of 64 KiB
        # blocks (0.42x of fs against 0.84x, each in its own run); it was
        # faster inside LMCache's benchmark only while that read prompts in
        # the order they were stored, readahead streaming into the next
        # (256 KiB chunks, in turn in one run: 1041 against 664 prompts/s).
        # Prompts of 4 x 256 KiB in a shuffled order, cold, in turn in one
        # process (8 rounds, ms a prompt): 1.12 asking for all, 1.64 asking
        # for nothing, 1.45 the four read side by side on threads, 1.07 for
        # LMCache's way (a file each, read on four threads).  Asking for all
        # but the first value was level (571 against 642 prompts/s).
        if not self._is_cold(slots[0], parts_list[0]):
            return False
        g = self.geometry
        for slot, parts in zip(slots, parts_list):
            if 0 <= slot < g.slot_count:
                self._readahead(g.slot_offset(slot), min(g.slot_bytes, sum(p.numel() for p in parts)))
        return True

    def _before_batch(self, slots, parts_list) -> int:
        # A cold batch waits on the disk, not the cores: more threads.
        return self.cold_reads if self._ask_all_if_cold(slots, parts_list) else self.parallel_reads

    def _read_small_many(self, slots, parts_list, hashed):
        # A batch of small single-buffer reads (a KV block each) in one
        # loop: a pread and a hash per value, without read_into's calls.
        g, fd = self.geometry, self.fd
        count, room = g.slot_count, g.slot_bytes
        if len(slots) > 1:
            # Cold 64 KiB loads in vLLM's tier: 9.1k -> 13.7k blocks/s with
            # the whole batch asked for at once, against one at a time.
            self._ask_all_if_cold(slots, parts_list)
        out, total = [], 0
        for slot, parts in zip(slots, parts_list, strict=True):
            n = parts[0].numel() if len(parts) == 1 else room + 1
            # One hash is the format's checksum only up to one checksum block.
            if n > room or n > CHECKSUM_BLOCK or not 0 <= slot < count:
                out.append(read_or_error(self.read_into, slot, parts, hashed))
                continue
            a = byte_buffer(parts[0])
            offset = g.slot_offset(slot)
            try:
                got = os.preadv(fd, [a], offset)
                if got != n:
                    preadv_all(fd, [memoryview(a)[got:]], offset + got)
            except OSError as exc:
                out.append(SlabIOError(f"reading slot {slot} of {self.path} failed: {exc}"))
                continue
            total += n
            out.append(_hash(a) if hashed else None)
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
        with self._reader_lock:
            readers, self._reader_fds = self._reader_fds, []
        for fd in readers:
            os.close(fd)
        os.close(self.fd)
