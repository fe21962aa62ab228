"""I/O engines: how payload bytes move between tensors and slots.

``Engine.write`` / ``Engine.read_into`` are the one checked path: they check
the slot number and length, count bytes, and turn OS errors into
``SlabIOError``; engines override only ``_write_impl`` / ``_read_impl``
(a fault-injecting engine for tests does the same).

Buffers are 1-D ``torch.uint8`` CPU tensors.
"""

from __future__ import annotations

import abc
import errno
import mmap
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import ConfigError, SlabIOError
from .format import CHECKSUM_BLOCK, Geometry, block_digest, block_hasher, checksum, combine_digests, round_up

ENGINES = ("mmap", "direct")

_assist_pool: ThreadPoolExecutor | None = None
_assist_lock = threading.Lock()


def _assist() -> ThreadPoolExecutor:
    """Helper threads for hashing beside I/O and for split large reads."""
    global _assist_pool
    with _assist_lock:
        if _assist_pool is None:
            _assist_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="slabcache-assist")
        return _assist_pool


def _cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def _np(t: torch.Tensor):
    """A buffer-protocol view of a uint8 CPU tensor (no copy)."""
    return t.numpy()


class Engine(abc.ABC):
    name = ""

    def __init__(self, path: str, g: Geometry):
        self.path = path
        self.g = g
        self.bytes_read = 0
        self.bytes_written = 0
        self._count_lock = threading.Lock()

    # -- the checked path --------------------------------------------------

    def _check(self, slot: int, parts: list[torch.Tensor]) -> int:
        if not 0 <= slot < self.g.slot_count:
            raise SlabIOError(f"slot {slot} is outside 0..{self.g.slot_count - 1} of {self.path}")
        n = sum(p.numel() for p in parts)
        if n > self.g.slot_bytes:
            raise SlabIOError(f"{n} bytes do not fit a slot of {self.g.slot_bytes} bytes")
        return n

    def write(self, slot: int, parts: list[torch.Tensor], hashed: bool = False) -> int | None:
        """Write ``parts`` to ``slot``; returns their checksum when ``hashed``.

        Large payloads are hashed on a helper thread while the write runs.
        """
        n = self._check(slot, parts)
        pending = None
        if hashed and n > CHECKSUM_BLOCK:
            pending = _assist().submit(checksum, [_np(p) for p in parts])
        try:
            self._write_impl(self.g.slot_offset(slot), parts, n)
        except OSError as exc:
            raise SlabIOError(f"writing slot {slot} of {self.path} failed: {exc}") from exc
        finally:
            digest = pending.result() if pending is not None else None
        with self._count_lock:
            self.bytes_written += n
        if hashed and digest is None:
            digest = checksum([_np(p) for p in parts])
        return digest

    def read_into(self, slot: int, parts: list[torch.Tensor], hashed: bool = False) -> int | None:
        """Fill ``parts`` from ``slot``; returns the bytes' checksum when ``hashed``."""
        n = self._check(slot, parts)
        try:
            digest = self._read_hashed(self.g.slot_offset(slot), parts, n, hashed)
        except OSError as exc:
            raise SlabIOError(f"reading slot {slot} of {self.path} failed: {exc}") from exc
        with self._count_lock:
            self.bytes_read += n
        return digest

    def _read_hashed(self, offset: int, parts: list[torch.Tensor], n: int, hashed: bool) -> int | None:
        self._read_impl(offset, parts, n)
        return checksum([_np(p) for p in parts]) if hashed else None

    def empty(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer this engine reads into without an extra copy."""
        return torch.empty(nbytes, dtype=torch.uint8)

    # -- what engines implement --------------------------------------------

    @abc.abstractmethod
    def _write_impl(self, offset: int, parts: list[torch.Tensor], n: int) -> None:
        """Write ``n`` bytes of ``parts`` at file ``offset``; OSError on failure."""

    @abc.abstractmethod
    def _read_impl(self, offset: int, parts: list[torch.Tensor], n: int) -> None:
        """Fill ``parts`` (``n`` bytes) from file ``offset``; OSError on failure."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Make written payloads durable (fdatasync)."""

    @abc.abstractmethod
    def drop_cache(self) -> None:
        """Ask the kernel to drop the slab's cached pages (cold-read benchmarks)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the engine's descriptors and mappings."""


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


def _fill_pieces(p: torch.Tensor, n: int, total: int, piece: int, fill, hashed: bool) -> int | None:
    """Fill ``p[:total]`` piece by piece on the helper threads, hashing each
    piece's checksum blocks as soon as it lands; returns the checksum of
    ``p[:n]`` when ``hashed``.  Pieces are multiples of CHECKSUM_BLOCK."""

    def work(start):
        end = min(total, start + piece)
        fill(start, end)
        stop = min(n, end)
        return [block_digest(_np(p[b:min(stop, b + CHECKSUM_BLOCK)]))
                for b in range(start, stop, CHECKSUM_BLOCK)] if hashed else []

    futs = [_assist().submit(work, start) for start in range(0, total, piece)]
    digests = [d for f in futs for d in f.result()]
    return combine_digests(digests, n) if hashed else None


def _pwritev_all(fd: int, bufs: list, offset: int) -> None:
    _vector_all(os.pwritev, fd, bufs, offset, "short write: device accepted no bytes")


def _preadv_all(fd: int, bufs: list, offset: int) -> None:
    _vector_all(os.preadv, fd, bufs, offset, "short read: the slab ends before the slot does")


class MmapEngine(Engine):
    """Writes with pwrite, reads by copying out of a shared mapping.

    Writing through pwrite avoids the page-fault cost of a first write into
    a fresh mapping (several times slower on these machines); reading out
    of the mapping is a plain memcpy once pages are cached.
    """

    name = "mmap"

    def __init__(self, path: str, g: Geometry):
        super().__init__(path, g)
        self.fd = os.open(path, os.O_RDWR)
        self.mm = mmap.mmap(self.fd, g.file_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._view = torch.frombuffer(self.mm, dtype=torch.uint8)

    def _write_impl(self, offset, parts, n):
        _pwritev_all(self.fd, [_np(p) for p in parts], offset)

    # Below this size one pread beats copying out of the mapping: a cold
    # read is one request (with readahead) instead of a page fault per
    # 4 KiB, and a warm one costs about the same.
    PREAD_BELOW = 4 << 20

    def _will_need(self, offset: int, n: int) -> None:
        """Start readahead for a whole value, so a cold read is not served
        one faulted page at a time."""
        start = offset & ~(mmap.PAGESIZE - 1)
        self.mm.madvise(mmap.MADV_WILLNEED, start, round_up(offset + n, mmap.PAGESIZE) - start)

    def _read_impl(self, offset, parts, n):
        if n < self.PREAD_BELOW:
            _preadv_all(self.fd, [_np(p) for p in parts], offset)
            return
        self._will_need(offset, n)
        pos = offset
        for p in parts:
            k = p.numel()
            if k:
                # torch's copy releases the GIL, so parallel gets overlap.
                p.copy_(self._view[pos:pos + k])
            pos += k

    # Large reads copy and hash in steps small enough that the bytes just
    # copied are still in the core's cache when they are hashed: the
    # checksum then reads them from cache (several times faster than from
    # memory) instead of making a second pass over the value.
    FUSED_STEP = 512 << 10

    def _read_hashed(self, offset, parts, n, hashed):
        if not (hashed and len(parts) == 1 and n >= self.PREAD_BELOW):
            return super()._read_hashed(offset, parts, n, hashed)
        self._will_need(offset, n)
        dst = _np(parts[0])
        src = _np(self._view[offset:offset + n])
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
        k = max(1, min(len(firsts), _cores()))
        futs = [_assist().submit(blocks, firsts[j::k]) for j in range(1, k)]
        shares = [blocks(firsts[0::k])] + [f.result() for f in futs]
        return combine_digests([shares[i % k][i // k] for i in range(len(firsts))], n)

    def sync(self):
        os.fdatasync(self.fd)

    def drop_cache(self):
        # Dirty pages and pages mapped into this process survive fadvise:
        # write back and unmap first.
        os.fdatasync(self.fd)
        self.mm.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self):
        del self._view
        self.mm.close()
        os.close(self.fd)


class _Aligned:
    """Page-aligned anonymous memory (for O_DIRECT), per thread, grown on demand."""

    def __init__(self):
        self._local = threading.local()

    def get(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = aligned_empty(max(nbytes, 1 << 20))
            self._local.buf = buf
        return buf[:nbytes]


def aligned_empty(nbytes: int, alignment: int = 4096) -> torch.Tensor:
    """A uint8 CPU tensor whose first byte is ``alignment``-aligned."""
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % alignment
    return raw[skip:skip + nbytes]


class DirectEngine(Engine):
    """O_DIRECT pread/pwrite: bulk data bypasses the page cache.

    O_DIRECT needs the file offset, the length and the memory address to be
    aligned; slots are aligned by construction, lengths are padded inside
    the slot, and unaligned caller buffers go through an aligned staging
    buffer.
    """

    name = "direct"

    def __init__(self, path: str, g: Geometry):
        super().__init__(path, g)
        self.align = g.alignment
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise ConfigError(
                    f"the filesystem holding {path} refuses O_DIRECT; use io='mmap' "
                    "(or use_odirect: false) or put the store on a local disk filesystem"
                ) from exc
            raise
        self._staging = _Aligned()
        # Some filesystems accept O_DIRECT at open and fail the first I/O:
        # probe now so the error comes at open, never as a silent fallback.
        probe = aligned_empty(self.align, self.align)
        try:
            os.preadv(self.fd, [_np(probe)], 0)
        except OSError as exc:
            os.close(self.fd)
            raise ConfigError(
                f"O_DIRECT reads fail on the filesystem holding {path} ({exc}); use io='mmap'"
            ) from exc

    def _direct_ok(self, parts, n) -> bool:
        return (len(parts) == 1 and parts[0].data_ptr() % self.align == 0
                and parts[0].numel() % self.align == 0)

    def empty(self, nbytes: int) -> torch.Tensor:
        # Room for the rounded-up read, so get() reads straight into it.
        room = round_up(nbytes, self.align)
        buf = aligned_empty(room, self.align)[:nbytes]
        buf._slabcache_room = room
        return buf

    def _write_impl(self, offset, parts, n):
        if self._direct_ok(parts, n):
            _pwritev_all(self.fd, [_np(parts[0])], offset)
            return
        total = round_up(n, self.align)
        buf = self._staging.get(total)
        pos = 0
        for p in parts:
            buf[pos:pos + p.numel()].copy_(p)
            pos += p.numel()
        _pwritev_all(self.fd, [_np(buf)], offset)

    # Large reads are split into pieces read in parallel (the device sees
    # queue depth > 1) and each piece is hashed as soon as it lands, so the
    # checksum costs almost nothing on top of the transfer.
    SPLIT_PIECE = 2 * CHECKSUM_BLOCK

    def _read_hashed(self, offset, parts, n, hashed):
        p = parts[0]
        if (len(parts) == 1 and n > self.SPLIT_PIECE and p.data_ptr() % self.align == 0
                and (n % self.align == 0 or getattr(p, "_slabcache_room", 0) >= round_up(n, self.align))):
            return self._read_split(offset, p, n, hashed)
        return super()._read_hashed(offset, parts, n, hashed)

    def _read_split(self, offset, p, n, hashed):
        total = round_up(n, self.align)
        full = torch.empty(0, dtype=torch.uint8).set_(p.untyped_storage(), p.storage_offset(), (total,), (1,))

        def fill(start, end):
            _preadv_all(self.fd, [_np(full[start:end])], offset + start)

        return _fill_pieces(p, n, total, self.SPLIT_PIECE, fill, hashed)

    def _read_impl(self, offset, parts, n):
        total = round_up(n, self.align)
        if len(parts) == 1 and parts[0].data_ptr() % self.align == 0:
            p = parts[0]
            if n == total:
                _preadv_all(self.fd, [_np(p)], offset)
                return
            # Only buffers from empty() are known to own the padding after
            # their last byte; anyone else's tensor may share that memory.
            if getattr(p, "_slabcache_room", 0) >= total:
                full = torch.empty(0, dtype=torch.uint8).set_(
                    p.untyped_storage(), p.storage_offset(), (total,), (1,))
                _preadv_all(self.fd, [_np(full)], offset)
                return
        buf = self._staging.get(total)
        _preadv_all(self.fd, [_np(buf)], offset)
        pos = 0
        for p in parts:
            p.copy_(buf[pos:pos + p.numel()])
            pos += p.numel()

    def sync(self):
        os.fdatasync(self.fd)

    def drop_cache(self):
        # Payloads never enter the cache; this drops the slot records' pages.
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self):
        os.close(self.fd)


def make_engine(name: str, path: str, g: Geometry) -> Engine:
    if name == "mmap":
        return MmapEngine(path, g)
    if name == "direct":
        return DirectEngine(path, g)
    raise ConfigError(f"unknown io engine {name!r}; use one of {', '.join(ENGINES)}")
