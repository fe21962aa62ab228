"""The slab file: created once, preallocated, aligned, never resized in use.

This module owns the file's life (create, verify the header and size) and
the slot records; payload bytes go through an I/O engine.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid

from ..errors import ConfigError, CorruptStoreError, LayoutMismatchError, StorageFullError
from ..format.files import open_regular
from ..format.header import SLAB_HEADER, Geometry, pack_header, plan_geometry, round_up, unpack_header
from ..format.records import EMPTY_RECORD, SlotRecord, pack_record, pack_record_fields, unpack_record
from .memory import AlignedScratch, as_numpy
from .syscalls import pwritev_all

log = logging.getLogger(__name__)

_ZEROS: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    """n zero bytes, one object per size (records pad to their full size)."""
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytes(n)
    return z


def copy_mode_and_owner(src: str, dst: str) -> None:
    """Give ``dst`` the permission bits (and, where allowed, the owner and
    group) of ``src``: a rewritten file keeps what the operator set."""
    st = os.stat(src)
    os.chmod(dst, st.st_mode & 0o7777)
    try:
        os.chown(dst, st.st_uid, st.st_gid)
    except PermissionError:
        pass  # not root: the files stay ours, which they already were


def alignment_for(directory: str) -> int:
    """4 KiB or the filesystem block size, whichever is larger."""
    try:
        bsize = os.statvfs(directory).f_bsize
    except OSError:
        bsize = 4096
    return max(4096, bsize)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_slab(path: str, capacity_bytes: int, slot_bytes: int,
                file_mode: int = 0o600) -> tuple[Geometry, bytes]:
    """Create and preallocate a slab at ``path`` atomically (temp file + rename).

    Raises StorageFullError (nothing left behind) when the blocks cannot be
    reserved, ConfigError when the geometry is impossible.
    """
    directory = os.path.dirname(path)
    g = plan_geometry(capacity_bytes, slot_bytes, alignment_for(directory))
    if g.slot_count < 1:
        raise ConfigError(
            f"capacity_bytes={capacity_bytes} is smaller than one slot of {g.slot_bytes} "
            "bytes; raise capacity_bytes or lower slot_bytes"
        )
    creation_id = uuid.uuid4().bytes
    tmp = f"{path}.creating.{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, file_mode)
    os.fchmod(fd, file_mode)  # exactly this mode, whatever the umask
    try:
        try:
            os.posix_fallocate(fd, 0, g.file_bytes)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StorageFullError(
                    f"cannot preallocate {g.file_bytes} bytes for the slab at {path}: "
                    f"{os.strerror(exc.errno)}; free space there or lower capacity_bytes"
                ) from exc
            raise
        header = pack_header(g, creation_id)
        os.pwrite(fd, header.ljust(g.alignment, b"\0"), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(directory)
    log.info("created slab %s: %d slots of %d bytes", path, g.slot_count, g.slot_bytes)
    return g, creation_id


def open_slab(path: str, flags: int) -> int:
    """A descriptor of the slab at ``path`` (a regular file, never through
    a link).  Raises ConfigError when something else is there."""
    return open_regular(path, flags, "slab")


def read_header_bytes(path: str) -> bytes:
    fd = open_slab(path, os.O_RDONLY)
    try:
        return os.pread(fd, SLAB_HEADER.size, 0)
    finally:
        os.close(fd)


def write_header_bytes(path: str, raw: bytes) -> None:
    """Overwrite the header (fsck restoring it from the index's copy)."""
    fd = open_slab(path, os.O_RDWR)
    try:
        os.pwrite(fd, raw, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def extend_slab(path: str, file_bytes: int) -> None:
    """Give a truncated slab its full size back (fsck --repair)."""
    fd = open_slab(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, file_bytes)
    finally:
        os.close(fd)


def read_slab_header(path: str) -> tuple[Geometry, bytes]:
    """Geometry and creation id of an existing slab; checks the file size too."""
    fd = open_slab(path, os.O_RDONLY)
    try:
        raw = os.pread(fd, SLAB_HEADER.size, 0)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    g, creation_id = unpack_header(raw, path)
    if size < g.file_bytes:
        raise CorruptStoreError(
            f"slab {path} is truncated: {size} bytes, its header says {g.file_bytes}; "
            f"run `slabcache fsck {os.path.dirname(path)} --repair` to drop entries past the end"
        )
    return g, creation_id


def check_geometry(g: Geometry, path: str, capacity_bytes: int | None,
                   slot_bytes: int | None) -> None:
    """Raise LayoutMismatchError when requested sizes disagree with the slab."""
    if slot_bytes is not None and round_up(slot_bytes, g.alignment) != g.slot_bytes:
        raise LayoutMismatchError(
            f"store at {path} has slots of {g.slot_bytes} bytes, not {slot_bytes}; "
            "open it without slot_bytes, or re-slot it with `slabcache compact --slot-bytes`"
        )
    if capacity_bytes is not None and capacity_bytes // g.slot_bytes != g.slot_count:
        raise LayoutMismatchError(
            f"store at {path} holds {g.slot_count} slots ({g.capacity_bytes} bytes), "
            f"not capacity_bytes={capacity_bytes}; open it without capacity_bytes, or "
            "resize it with `slabcache compact --capacity`"
        )


class SlotRecords:
    """Reads and writes the per-slot records through their own descriptor.

    With ``direct`` (a store whose payloads move with O_DIRECT), records
    that each fill whole blocks are written with O_DIRECT too.  A buffered
    write takes the file's inode lock exclusively, and ext4 holds it shared
    through every O_DIRECT read and write in flight: a 256-byte buffered
    write beside four 8 MiB O_DIRECT reads took 32-35 ms here (0.01 ms
    into another file), and new reads queue behind it.  With O_DIRECT
    records, reads beside a thread of puts (4 x 8 MiB each) ran 1.10x and
    1.14x as fast, the puts 0.90x and 0.84x (benchmarks/direct_records.py,
    two runs of 8 rounds): loads, which a host waits for, go first.  Puts
    alone, 16 batches queued: level (1.00x, 1.01x; 1.09x and 1.10x in two
    earlier runs).  The cost is a second request to the device after each
    payload: where one batch runs alone it waits for it (vLLM's churn, one
    job of 8 x 1 MiB at a time: 0.90x; its store jobs queued at once: 1.10x).
    Records smaller than a block (slots under about 400 KiB) share blocks
    with their neighbours and stay buffered: an O_DIRECT write of one would
    rewrite the others.
    """

    def __init__(self, path: str, g: Geometry, writable: bool, direct: bool = False):
        self.path = path
        self.g = g
        self._fd = open_slab(path, os.O_RDWR if writable else os.O_RDONLY)
        self._direct_fd = None
        if direct and writable and g.record_bytes % g.alignment == 0:
            try:
                self._direct_fd = open_slab(path, os.O_RDWR | os.O_DIRECT)
            except BaseException:
                os.close(self._fd)
                raise
            self._scratch = AlignedScratch(g.alignment)

    @property
    def direct(self) -> bool:
        """Whether records are written with O_DIRECT (see the class)."""
        return self._direct_fd is not None

    def _put(self, raw: bytes, slot: int) -> None:
        """One record's bytes into ``slot``'s record."""
        offset = self.g.record_offset(slot)
        if self._direct_fd is None:
            os.pwrite(self._fd, raw, offset)
        else:
            self._put_direct([raw], offset, self.g.record_bytes)

    def _put_direct(self, pieces: list[bytes], offset: int, total: int) -> None:
        """``pieces`` at ``offset`` with O_DIRECT, through an aligned buffer
        padded with zeros to ``total`` bytes (whole records)."""
        buf = as_numpy(self._scratch.get(total))
        pos = 0
        for p in pieces:
            buf[pos:pos + len(p)] = memoryview(p).cast("B")
            pos += len(p)
        buf[pos:] = 0
        pwritev_all(self._direct_fd, [buf], offset)

    def write(self, slot: int, rec: SlotRecord) -> None:
        self._put(pack_record(rec, self.g.record_bytes), slot)

    def write_fields(self, slot: int, generation: int, length: int, checksum: int,
                     key_hash: bytes, meta: bytes) -> None:
        """:meth:`write` of a record with these fields."""
        self._put(pack_record_fields(generation, length, checksum, key_hash, meta, self.g.record_bytes),
                  slot)

    def write_many(self, rows: list[tuple[int, int, int, int, bytes, bytes]]) -> None:
        """:meth:`write_fields` for each (slot, generation, length, checksum,
        key hash, meta), records of slots that follow one another with one
        request (each padded to its full size)."""
        rb = self.g.record_bytes
        run: list = []
        first = last = -2
        for slot, gen, length, csum, khash, meta in rows:
            raw = pack_record_fields(gen, length, csum, khash, meta, rb)
            if slot != last + 1 and run:
                self._write_run(run, first, last)
                run = []
            if not run:
                first = slot
            run.append(raw)
            if len(raw) < rb:
                run.append(_zeros(rb - len(raw)))
            last = slot
        if run:
            self._write_run(run, first, last)

    def _write_run(self, run: list[bytes], first: int, last: int) -> None:
        """The padded records of slots ``first`` to ``last``: with O_DIRECT,
        one request; buffered, one pwritev when the run has few enough pieces
        (IOV_MAX), the rest after a short write; pwritev_all otherwise."""
        offset = self.g.record_offset(first)
        if self._direct_fd is not None:
            self._put_direct(run, offset, (last - first + 1) * self.g.record_bytes)
            return
        if len(run) > 512:
            pwritev_all(self._fd, run, offset)
            return
        done = os.pwritev(self._fd, run, offset)
        if done != (last - first + 1) * self.g.record_bytes:
            pwritev_all(self._fd, [b"".join(run)[done:]], offset + done)

    def read(self, slot: int) -> SlotRecord | None:
        raw = os.pread(self._fd, self.g.record_bytes, self.g.record_offset(slot))
        return unpack_record(raw)

    def clear(self, slot: int) -> None:
        self._put(EMPTY_RECORD, slot)

    def clear_many(self, slots) -> None:
        """:meth:`clear` each of ``slots``: the whole records of slots that
        follow one another zeroed with one request (an eviction ahead of
        need in a store filled in order frees such runs)."""
        runs: list[list[int]] = []
        for slot in sorted(set(slots)):
            if runs and slot == runs[-1][1] + 1:
                runs[-1][1] = slot
            else:
                runs.append([slot, slot])
        rb = self.g.record_bytes
        for first, last in runs:
            if first == last:
                self._put(EMPTY_RECORD, first)
            elif self._direct_fd is None:
                pwritev_all(self._fd, [_zeros((last - first + 1) * rb)], self.g.record_offset(first))
            else:
                self._put_direct([], self.g.record_offset(first), (last - first + 1) * rb)

    def read_payload(self, slot: int, length: int) -> bytes:
        """A slot's payload bytes through the buffered descriptor (fsck, compact)."""
        return os.pread(self._fd, length, self.g.slot_offset(slot)) if length else b""

    def file_size(self) -> int:
        return os.fstat(self._fd).st_size

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        os.close(self._fd)

    def __enter__(self) -> "SlotRecords":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
