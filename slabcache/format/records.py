"""Per-slot records: what each slot says about itself.

A record describes its slot well enough (key hash, generation, length,
checksum and, when it fits, the full key and value description) to rebuild
the index from the slab alone.  Bump FORMAT_VERSION (header.py) when the
record changes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .values import ValueDesc

RECORD_MAGIC = 0x534C  # "SL"

# magic, flags, generation, length, payload checksum, key hash,
# meta length, record crc.  Followed by ``meta`` bytes when they fit.
SLOT_RECORD = struct.Struct("<HHIQQ8sII")
assert SLOT_RECORD.size == 40, "bump FORMAT_VERSION when the record changes"
MAX_RECORD_BYTES = 4096
# What clearing a record writes: a record that never parses.
EMPTY_RECORD = bytes(SLOT_RECORD.size)

RECORD_FLAG_META = 1  # the record carries the full key and value description


@dataclass(frozen=True)
class SlotRecord:
    generation: int
    length: int
    checksum: int
    key_hash: bytes
    meta: bytes  # ValueDesc.encode() output, or b"" when it did not fit


def pack_record(rec: SlotRecord, record_bytes: int) -> bytes:
    return pack_record_fields(rec.generation, rec.length, rec.checksum, rec.key_hash, rec.meta,
                              record_bytes)


def pack_record_fields(generation: int, length: int, checksum: int, key_hash: bytes, meta: bytes,
                       record_bytes: int) -> bytes:
    """:func:`pack_record` of a record with these fields (the put path
    builds no SlotRecord)."""
    if SLOT_RECORD.size + len(meta) > record_bytes:
        meta = b""
    flags = RECORD_FLAG_META if meta else 0
    head = SLOT_RECORD.pack(RECORD_MAGIC, flags, generation, length, checksum, key_hash,
                            len(meta), 0)
    crc = zlib.crc32(meta, zlib.crc32(head))
    head = SLOT_RECORD.pack(RECORD_MAGIC, flags, generation, length, checksum, key_hash,
                            len(meta), crc)
    return head + meta


def unpack_record(raw: bytes) -> SlotRecord | None:
    """Parse a slot record; None when the slot was never written or is damaged."""
    if len(raw) < SLOT_RECORD.size:
        return None
    magic, flags, gen, length, csum, khash, mlen, crc = SLOT_RECORD.unpack_from(raw)
    if magic != RECORD_MAGIC or SLOT_RECORD.size + mlen > len(raw):
        return None
    meta = bytes(raw[SLOT_RECORD.size:SLOT_RECORD.size + mlen])
    head = SLOT_RECORD.pack(magic, flags, gen, length, csum, khash, mlen, 0)
    if zlib.crc32(meta, zlib.crc32(head)) != crc:
        return None
    return SlotRecord(gen, length, csum, khash, meta)


_KEY_LEN = struct.Struct("<I")


def record_meta(canon: bytes, meta_raw: bytes) -> bytes:
    """The part of a slot record that lets fsck rebuild the index entry
    (``meta_raw`` is the value description's encoding)."""
    return _KEY_LEN.pack(len(canon)) + canon + meta_raw



def unpack_record_meta(raw: bytes) -> tuple[bytes, ValueDesc]:
    (klen,) = struct.unpack_from("<I", raw)
    return bytes(raw[4:4 + klen]), ValueDesc.decode(raw[4 + klen:])
