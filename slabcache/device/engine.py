"""The I/O engine interface: how payload bytes move between tensors and slots.

``Engine.write`` / ``Engine.read_into`` are the one checked path: they check
the slot number and length, count bytes, and turn OS errors into
``SlabIOError``; engines override only ``_write_impl`` / ``_read_impl`` (and
``_read_hashed`` where reading and hashing can overlap, ``_write_run_impl``
where a run of slots has a faster path).

Anything that counts, throttles or injects faults wraps the public calls
instead (:class:`~slabcache.device.wrapper.EngineWrapper`), so real engines
carry no test hooks.

Buffers are 1-D ``torch.uint8`` CPU tensors.
"""

from __future__ import annotations

import abc
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch
import xxhash

from ..errors import SlabIOError
from ..format.checksum import CHECKSUM_BLOCK, checksum
from ..format.header import Geometry
from .memory import as_numpy, byte_buffer

# Helper threads per engine: at least this many, so large O_DIRECT reads
# keep several requests in flight even on a 2-core machine.
MIN_HELPERS = 4

# Values of at least this many bytes in a batch are read side by side (up
# to ``Engine.parallel_reads`` at once, the caller among them): their
# copies and hashes release the GIL.  Smaller ones cost less read one
# after another in the caller than a thread hand-off each.
PARALLEL_READ_BYTES = 256 << 10

# The most bytes one request for adjacent slots carries (a coalesced read,
# Engine.coalesce_below, or write, write_many): large enough to amortise a
# syscall and a small request, small enough that its values are still in
# cache when hashed.
COALESCE_BYTES = 1 << 20

_local = threading.local()  # .in_batch: this thread runs one read of a batch


def in_batch() -> bool:
    """True on a thread running one read or write of a batch: it must not
    split its value over helpers in turn (they may all be busy with it)."""
    return getattr(_local, "in_batch", False)


class BatchThread:
    """``with BatchThread():`` marks this thread as running one value of a
    batch spread over threads (see in_batch)."""

    def __enter__(self) -> None:
        _local.in_batch = True

    def __exit__(self, *exc) -> None:
        _local.in_batch = False


def cores() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def read_or_error(read_into: Callable, slot: int, parts: list[torch.Tensor], hashed: bool):
    """``read_into(slot, parts, hashed)``, or the SlabIOError it raised (an
    OSError from a wrapper becomes one): one read of a batch fails alone."""
    try:
        return read_into(slot, parts, hashed)
    except OSError as exc:
        return exc if isinstance(exc, SlabIOError) else SlabIOError(str(exc))


class Engine(abc.ABC):
    """Moves bytes between CPU byte buffers and the slots of one slab."""

    name = ""
    # True when a write lands in the page cache (microseconds), so a put may
    # write while it holds the index's write lock; False when each write
    # waits for the device.
    writes_to_cache = False
    # How many large reads of a batch run at once (see read_many_into), and
    # how many large writes of a batch (core/writer.py).
    parallel_reads = 1
    parallel_writes = 1
    cold_reads = 1  # a batch found out of the page cache (see MmapEngine)
    # A batch's values of this size or more are read side by side.
    spread_from = PARALLEL_READ_BYTES
    # Writes of at least this many bytes go piece by piece, each piece
    # hashed (when asked) as it is written (_write_fused); never by default.
    fuse_writes_from = 1 << 62
    # A batch's values below this size that each fill their slot, in slots
    # that follow one another (a request's blocks are stored together), are
    # read with one request of up to COALESCE_BYTES: one syscall instead of
    # several, and a larger request for the disk.  Off unless an engine
    # gains from it (DirectEngine).
    coalesce_below = 0
    # Whether write_many writes runs of adjacent whole slots as one request.
    coalesce_writes = False

    def __init__(self, path: str, g: Geometry):
        self.path = path
        self.geometry = g
        self.bytes_read = 0
        self.bytes_written = 0
        self._count_lock = threading.Lock()
        self._helpers: ThreadPoolExecutor | None = None
        self._helpers_lock = threading.Lock()

    # -- the checked path --------------------------------------------------

    def _check(self, slot: int, parts: list[torch.Tensor]) -> int:
        g = self.geometry
        if not 0 <= slot < g.slot_count:
            raise SlabIOError(f"slot {slot} is outside 0..{g.slot_count - 1} of {self.path}")
        n = parts[0].numel() if len(parts) == 1 else sum(p.numel() for p in parts)
        if n > g.slot_bytes:
            raise SlabIOError(f"{n} bytes do not fit a slot of {g.slot_bytes} bytes")
        return n

    def write(self, slot: int, parts: list[torch.Tensor], hashed: bool = False) -> int | None:
        """Write ``parts`` to ``slot``; returns their checksum when ``hashed``.

        Large payloads are hashed on a helper thread while the write runs.
        Raises SlabIOError.
        """
        n = self._check(slot, parts)
        if n >= self.fuse_writes_from:
            try:
                digest = self._write_fused(self.geometry.slot_offset(slot), parts, n, hashed)
            except OSError as exc:
                raise SlabIOError(f"writing slot {slot} of {self.path} failed: {exc}") from exc
            with self._count_lock:
                self.bytes_written += n
            return digest
        if len(parts) == 1 and n <= CHECKSUM_BLOCK:
            # The common small write: one buffer conversion serves the write
            # and the hash (a value within one checksum block hashes whole).
            a = byte_buffer(parts[0])
            try:
                self._write_one(self.geometry.slot_offset(slot), parts[0], a, n)
            except OSError as exc:
                raise SlabIOError(f"writing slot {slot} of {self.path} failed: {exc}") from exc
            with self._count_lock:
                self.bytes_written += n
            return xxhash.xxh3_64_intdigest(a) if hashed else None
        pending = None
        if hashed and n > CHECKSUM_BLOCK:
            pending = self.submit(checksum, [as_numpy(p) for p in parts])
        try:
            self._write_impl(self.geometry.slot_offset(slot), parts, n)
        except OSError as exc:
            raise SlabIOError(f"writing slot {slot} of {self.path} failed: {exc}") from exc
        finally:
            digest = pending.result() if pending is not None else None
        with self._count_lock:
            self.bytes_written += n
        if hashed and digest is None:
            digest = checksum([as_numpy(p) for p in parts])
        return digest

    def write_many(self, slots: list[int], parts_list: list[list[torch.Tensor]],
                   hashed: bool = False) -> tuple[list, BaseException | None]:
        """:meth:`write` for each (slot, parts) in order, stopping at the
        first failure: (the checksums of the values written, None each
        unhashed; the exception that stopped it, or None).  With
        ``coalesce_writes``, values that fill slots that follow one another
        are written as one request of up to COALESCE_BYTES (one syscall for
        a run of small puts); a failed run fails all its values."""
        done: list = []
        for run in self._write_runs(slots, parts_list):
            try:
                if len(run) == 1:
                    done.append(self.write(slots[run[0]], parts_list[run[0]], hashed))
                else:
                    done.extend(self._write_run(slots[run[0]], [parts_list[i][0] for i in run], hashed))
            except BaseException as exc:  # the caller gives back what it reserved
                return done, exc
        return done, None

    def coalesces(self, slots, parts_list) -> bool:
        """Whether write_many would write some of these values as one request."""
        return any(len(run) > 1 for run in self._write_runs(slots, parts_list))

    def _write_runs(self, slots, parts_list) -> list[list[int]]:
        """Positions in order, cut into runs of adjacent slots (see write_many)."""
        if not self.coalesce_writes or len(slots) < 2:
            return [[i] for i in range(len(slots))]
        most, count = max(1, COALESCE_BYTES // self.geometry.slot_bytes), self.geometry.slot_count
        runs: list[list[int]] = []
        last, last_joins = -2, False
        for i, (slot, parts) in enumerate(zip(slots, parts_list, strict=True)):
            joins = 0 <= slot < count and self._coalescable(parts)
            if joins and last_joins and slot == last + 1 and len(runs[-1]) < most:
                runs[-1].append(i)
            else:
                runs.append([i])
            last, last_joins = slot, joins
        return runs

    def _write_run(self, first: int, parts: list[torch.Tensor], hashed: bool) -> list:
        """Whole-slot values into ``first``, ``first + 1``, ...: their checksums.  Raises SlabIOError."""
        arrays = [byte_buffer(p) for p in parts]
        # One hash each (a run, at most COALESCE_BYTES, is within a checksum block).
        digests = [xxhash.xxh3_64_intdigest(a) for a in arrays] if hashed else [None] * len(arrays)
        n = len(parts) * self.geometry.slot_bytes
        try:
            self._write_run_impl(self.geometry.slot_offset(first), parts, arrays, n)
        except OSError as exc:
            raise SlabIOError(f"writing slots {first}-{first + len(parts) - 1} of {self.path} "
                              f"failed: {exc}") from exc
        with self._count_lock:
            self.bytes_written += n
        return digests

    def _write_run_impl(self, offset: int, parts: list[torch.Tensor], arrays: list, n: int) -> None:
        self._write_impl(offset, parts, n)  # ``arrays``: the parts' numpy views

    def read_into(self, slot: int, parts: list[torch.Tensor], hashed: bool = False) -> int | None:
        """Fill ``parts`` from ``slot``; returns the bytes' checksum when
        ``hashed``.  Raises SlabIOError."""
        n = self._check(slot, parts)
        try:
            digest = self._read_hashed(self.geometry.slot_offset(slot), parts, n, hashed)
        except OSError as exc:
            raise SlabIOError(f"reading slot {slot} of {self.path} failed: {exc}") from exc
        with self._count_lock:
            self.bytes_read += n
        return digest

    def read_many_into(self, slots: list[int], parts_list: list[list[torch.Tensor]],
                       hashed: bool = False) -> list:
        """:meth:`read_into` for each (slot, parts): per read its checksum
        (None unhashed) or the SlabIOError it raised, so a failed read fails
        only itself.  Values of ``spread_from`` bytes or more are read side by
        side, ``parallel_reads`` at a time (the caller among them); smaller
        ones one after another in the caller (``_read_small_many``)."""
        out: list = [None] * len(slots)
        groups, rest = self._adjacent_groups(slots, parts_list)
        if groups:
            got = self.spread([(slots, parts_list, g, hashed) for g in groups], self._read_group,
                              self.parallel_reads)
            for g, digests in zip(groups, got):
                for i, d in zip(g, digests):
                    out[i] = d
        large, small = [], []
        for i in rest:
            parts = parts_list[i]
            n = parts[0].numel() if len(parts) == 1 else sum(p.numel() for p in parts)
            (large if n >= self.spread_from else small).append(i)
        if small:
            got = self._read_small_many([slots[i] for i in small], [parts_list[i] for i in small], hashed)
            for i, g in zip(small, got):
                out[i] = g
        if len(large) == 1 or (large and self.parallel_reads <= 1):
            for i in large:
                out[i] = read_or_error(self.read_into, slots[i], parts_list[i], hashed)
        elif large:
            got = self._read_large_many([slots[i] for i in large], [parts_list[i] for i in large], hashed)
            for i, g in zip(large, got):
                out[i] = g
        return out

    def _coalescable(self, parts: list[torch.Tensor]) -> bool:
        """Whether a value can be read as part of a larger request (engines
        with alignment rules add theirs)."""
        return len(parts) == 1 and parts[0].numel() == self.geometry.slot_bytes

    def _adjacent_groups(self, slots, parts_list) -> tuple[list[list[int]], list[int]]:
        """(groups of positions whose slots follow one another, in slot
        order, each at most COALESCE_BYTES; every other position)."""
        size = self.geometry.slot_bytes
        if len(slots) < 2 or size >= self.coalesce_below:  # also when off (0)
            return [], list(range(len(slots)))
        count = self.geometry.slot_count
        ok = sorted((slots[i], i) for i, p in enumerate(parts_list)
                    if 0 <= slots[i] < count and self._coalescable(p))
        most = max(1, COALESCE_BYTES // size)
        groups: list[list[int]] = []
        run: list[int] = []
        last = None
        for slot, i in ok:
            if run and (slot != last + 1 or len(run) >= most):
                groups.append(run)
                run = []
            run.append(i)
            last = slot
        if run:
            groups.append(run)
        groups = [g for g in groups if len(g) > 1]
        taken = {i for g in groups for i in g}
        return groups, [i for i in range(len(slots)) if i not in taken]

    def _read_group(self, slots, parts_list, group: list[int], hashed: bool) -> list:
        """Values in adjacent slots read with one request; per value its
        checksum (None unhashed) or the SlabIOError that failed them all."""
        parts = [parts_list[i][0] for i in group]
        n = len(parts) * self.geometry.slot_bytes
        first = slots[group[0]]
        try:
            self._read_impl(self.geometry.slot_offset(first), parts, n)
        except OSError as exc:
            err = SlabIOError(f"reading slots {first}-{first + len(group) - 1} of {self.path} failed: {exc}")
            return [err] * len(group)
        with self._count_lock:
            self.bytes_read += n
        return [checksum([as_numpy(p)]) if hashed else None for p in parts]

    def _read_large_many(self, slots, parts_list, hashed) -> list:
        """The large reads of a batch, side by side."""
        width = self._before_batch(slots, parts_list)
        return self.spread([(slot, parts, hashed) for slot, parts in zip(slots, parts_list)],
                           self._batch_read, width)

    def _read_small_many(self, slots, parts_list, hashed) -> list:
        """Reads of small values, one after another (engines spare them the
        per-call checks)."""
        return [read_or_error(self.read_into, slot, parts, hashed)
                for slot, parts in zip(slots, parts_list, strict=True)]

    def _before_batch(self, slots, parts_list) -> int:
        """Called before the large reads of a batch start (readahead);
        returns how many to run at once."""
        return self.parallel_reads

    def _batch_read(self, slot, parts, hashed):
        _local.in_batch = True
        try:
            return read_or_error(self.read_into, slot, parts, hashed)
        finally:
            _local.in_batch = False

    def spread(self, tasks: list[tuple], fn: Callable, width: int) -> list:
        """``fn(*task)`` for each task, at most ``width`` at once: the caller
        takes tasks too (so a batch never waits on an idle pool), helpers
        the rest; results in task order."""
        if width <= 1 or len(tasks) <= 1:
            return [fn(*t) for t in tasks]
        results: list = [None] * len(tasks)
        lock = threading.Lock()
        nxt = [0]

        def drain() -> None:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(tasks):
                    return
                results[i] = fn(*tasks[i])

        futs = [self.submit(drain) for _ in range(min(width, len(tasks)) - 1)]
        drain()
        for f in futs:
            f.result()
        return results

    def empty(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer this engine reads into without an extra copy."""
        return torch.empty(nbytes, dtype=torch.uint8)

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn`` on this engine's helper threads (hashing beside I/O,
        pieces of large reads)."""
        with self._helpers_lock:
            if self._helpers is None:
                self._helpers = ThreadPoolExecutor(
                    max_workers=max(MIN_HELPERS, cores(), self.parallel_reads, self.cold_reads),
                    thread_name_prefix="slabcache-helper")
            return self._helpers.submit(fn, *args)

    def close(self) -> None:
        """Stop the helper threads and release descriptors and mappings."""
        with self._helpers_lock:
            helpers, self._helpers = self._helpers, None
        if helpers is not None:
            helpers.shutdown(wait=True)
        self._close_impl()

    # -- what engines implement --------------------------------------------

    def _write_one(self, offset: int, part: torch.Tensor, array, n: int) -> None:
        """Write one part whose numpy view is ``array``; engines that can use
        the array directly override this."""
        self._write_impl(offset, [part], n)

    def _write_fused(self, offset: int, parts: list[torch.Tensor], n: int, hashed: bool) -> int | None:
        """Write ``parts`` and return their checksum when ``hashed``; engines
        whose writes pass through the CPU write in pieces, each hashed as it
        is written."""
        self._write_impl(offset, parts, n)
        return checksum([as_numpy(p) for p in parts]) if hashed else None

    def _read_hashed(self, offset: int, parts: list[torch.Tensor], n: int, hashed: bool) -> int | None:
        self._read_impl(offset, parts, n)
        return checksum([as_numpy(p) for p in parts]) if hashed else None

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
    def _close_impl(self) -> None:
        """Release the engine's descriptors and mappings."""
