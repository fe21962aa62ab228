"""The slab header and the geometry it records.

Slab file layout (all offsets multiples of ``alignment``)::

    [ header area : alignment bytes                                  ]
    [ slot records: slot_count * record_bytes, rounded up to alignment ]
    [ slot 0 | slot 1 | ... | slot slot_count-1  (slot_bytes each)    ]

The records live outside the payload area so that a value of exactly
``slot_bytes`` bytes fits in one slot.  Bump ``FORMAT_VERSION`` when any
on-disk struct in this package changes; a store written by a newer version
is refused at open rather than misread.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ..errors import CorruptStoreError
from .records import MAX_RECORD_BYTES, SLOT_RECORD

# 1: the first layout.  2: the same layout; owners of pins, reservations
# and handles prove they are alive by a lock (index/owner.py) instead of a
# pid and start time, which processes of version 1 would misjudge: a
# writable open upgrades a version 1 store while none of them has it open.
FORMAT_VERSION = 2
SLAB_MAGIC = b"SLABCACH"

# magic, version, header crc, alignment, record_bytes, slot_bytes,
# slot_count, records_offset, data_offset, creation id, reserved.
SLAB_HEADER = struct.Struct("<8sIIIIQQQQ16s64x")
assert SLAB_HEADER.size == 136, "bump FORMAT_VERSION when the header changes"


@dataclass(frozen=True)
class Geometry:
    alignment: int
    record_bytes: int
    slot_bytes: int
    slot_count: int
    records_offset: int
    data_offset: int

    @property
    def capacity_bytes(self) -> int:
        return self.slot_bytes * self.slot_count

    @property
    def file_bytes(self) -> int:
        return self.data_offset + self.capacity_bytes

    def slot_offset(self, slot: int) -> int:
        return self.data_offset + slot * self.slot_bytes

    def record_offset(self, slot: int) -> int:
        return self.records_offset + slot * self.record_bytes


def round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def plan_geometry(capacity_bytes: int, slot_bytes: int, alignment: int) -> Geometry:
    """Lay out a new slab.  Metadata stays within 1% of capacity + 1 MiB."""
    slot_bytes = round_up(slot_bytes, alignment)
    slot_count = capacity_bytes // slot_bytes
    budget = capacity_bytes // 100 + (1 << 20) - 2 * alignment
    record = MAX_RECORD_BYTES
    # The largest power-of-two record that fits the budget, so that keys and
    # value descriptions can be rebuilt from the records; the bare fixed
    # record is the floor (under 1% of the smallest, 4 KiB, slot).
    while record > 64 and record * slot_count > budget:
        record //= 2
    if record * slot_count > budget:
        record = SLOT_RECORD.size
    records_offset = alignment
    data_offset = records_offset + round_up(record * slot_count, alignment)
    return Geometry(alignment, record, slot_bytes, slot_count, records_offset, data_offset)


def pack_header(g: Geometry, creation_id: bytes) -> bytes:
    def build(crc: int) -> bytes:
        return SLAB_HEADER.pack(
            SLAB_MAGIC, FORMAT_VERSION, crc, g.alignment, g.record_bytes,
            g.slot_bytes, g.slot_count, g.records_offset, g.data_offset, creation_id,
        )

    return build(zlib.crc32(build(0)))


def header_version(raw: bytes) -> int:
    """The format version a (verified) header records."""
    return SLAB_HEADER.unpack_from(raw)[1]


def unpack_header(raw: bytes, path: str) -> tuple[Geometry, bytes]:
    """Parse and verify a slab header.  Raises CorruptStoreError."""
    remedy = f"run `slabcache fsck {path}` to inspect it"
    if len(raw) < SLAB_HEADER.size:
        raise CorruptStoreError(f"slab header of {path} is truncated; {remedy}")
    (magic, version, crc, alignment, record, slot_bytes, slot_count,
     rec_off, data_off, creation_id) = SLAB_HEADER.unpack_from(raw)
    if magic != SLAB_MAGIC:
        raise CorruptStoreError(f"{path} is not a slabcache slab (bad magic); {remedy}")
    if version > FORMAT_VERSION:
        raise CorruptStoreError(
            f"{path} has format version {version}, newer than this slabcache "
            f"understands ({FORMAT_VERSION}); upgrade slabcache to open it (if no newer "
            f"version wrote it, the header is damaged: {remedy})"
        )
    zeroed = SLAB_HEADER.pack(magic, version, 0, alignment, record, slot_bytes,
                              slot_count, rec_off, data_off, creation_id)
    if zlib.crc32(zeroed) != crc:
        raise CorruptStoreError(f"slab header of {path} fails its checksum; {remedy}")
    g = Geometry(alignment, record, slot_bytes, slot_count, rec_off, data_off)
    return g, creation_id
