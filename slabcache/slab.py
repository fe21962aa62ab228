"""The slab file: created once, preallocated, aligned, never resized in use.

This module owns the file's life (create, open, verify the header) and the
slot records; payload bytes go through an I/O engine (``io.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import uuid

from .errors import ConfigError, CorruptStoreError, LayoutMismatchError, StorageFullError
from .format import (
    SLAB_HEADER, Geometry, SlotRecord, pack_header, pack_record, plan_geometry, round_up,
    unpack_header, unpack_record,
)

log = logging.getLogger(__name__)

SLAB_NAME = "slab"


def alignment_for(directory: str) -> int:
    """4 KiB or the filesystem block size, whichever is larger."""
    try:
        bsize = os.statvfs(directory).f_bsize
    except OSError:
        bsize = 4096
    return max(4096, bsize)


def create_slab(path: str, capacity_bytes: int, slot_bytes: int) -> tuple[Geometry, bytes]:
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
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
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
    _fsync_dir(directory)
    log.info("created slab %s: %d slots of %d bytes", path, g.slot_count, g.slot_bytes)
    return g, creation_id


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_slab_header(path: str) -> tuple[Geometry, bytes]:
    """Geometry and creation id of an existing slab; checks the file size too."""
    with open(path, "rb") as f:
        raw = f.read(SLAB_HEADER.size)
        size = os.fstat(f.fileno()).st_size
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
    """Reads and writes the per-slot records through a buffered descriptor."""

    def __init__(self, fd: int, g: Geometry):
        self.fd = fd
        self.g = g

    def write(self, slot: int, rec: SlotRecord) -> None:
        raw = pack_record(rec, self.g.record_bytes)
        os.pwrite(self.fd, raw, self.g.record_offset(slot))

    def read(self, slot: int) -> SlotRecord | None:
        raw = os.pread(self.fd, self.g.record_bytes, self.g.record_offset(slot))
        return unpack_record(raw)

    def clear(self, slot: int) -> None:
        os.pwrite(self.fd, b"\0" * 40, self.g.record_offset(slot))
