"""Index entries: what the index knows about one stored key, and its codec.

Bump FORMAT_VERSION (format/header.py) when ``_ENTRY`` changes.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import CorruptStoreError
from ..format.values import ValueDesc
from .policy import UseStats

_U32 = struct.Struct("<I")
# slot, generation, length, checksum, tick, hits, inserted, created, used, meta len
_ENTRY = struct.Struct("<QIQQQQQddI")
_SLOT_GEN = struct.Struct("<QI")  # the head of _ENTRY


@dataclass(frozen=True)
class Entry:
    ikey: bytes
    canon: bytes
    slot: int
    generation: int
    length: int
    checksum: int
    use: UseStats
    created: float
    used: float
    meta_raw: bytes  # ValueDesc.encode(); decoded on first use of .meta

    @functools.cached_property
    def meta(self) -> ValueDesc:
        return ValueDesc.decode(self.meta_raw)

    def encode(self) -> bytes:
        return encode_entry(self.slot, self.generation, self.length, self.checksum, self.use,
                            self.created, self.used, self.meta_raw, self.canon)

    @classmethod
    def decode(cls, ikey: bytes, raw: bytes) -> "Entry":
        try:
            slot, gen, length, csum, tick, hits, ins, created, used, mlen = _ENTRY.unpack_from(raw)
        except struct.error as exc:
            raise CorruptStoreError(
                "an index entry is truncated; run `slabcache fsck --repair`"
            ) from exc
        meta_raw = raw[_ENTRY.size:_ENTRY.size + mlen]
        canon = bytes(raw[_ENTRY.size + mlen:])
        return cls(ikey, canon, slot, gen, length, csum, UseStats(tick, hits, ins),
                   created, used, bytes(meta_raw))


def encode_entry(slot: int, generation: int, length: int, checksum: int, use: UseStats,
                 created: float, used: float, meta_raw: bytes, canon: bytes) -> bytes:
    """The encoding of an entry with these fields."""
    head = _ENTRY.pack(slot, generation, length, checksum, use.tick, use.hits, use.inserted,
                       created, used, len(meta_raw))
    return head + meta_raw + canon


class EntryRef(NamedTuple):
    """What a read needs of an entry, decoded from its fixed head only (the
    hot path): which slot and generation hold which bytes."""

    ikey: bytes
    canon: bytes
    slot: int
    generation: int
    length: int
    checksum: int
    meta_raw: bytes
    used: float = 0.0  # wall time of the last recorded use


_HEAD = struct.Struct("<QIQQ")  # slot, generation, length, checksum: the start of _ENTRY
_MLEN_AT = _ENTRY.size - 4


def ref_of(ikey: bytes, raw, canon: bytes | None = None) -> EntryRef | None:
    """An EntryRef from an encoded entry; None when ``canon`` is given and
    the entry holds another key (a hash collision of long keys).  Raises
    CorruptStoreError when it is too short to be an entry."""
    try:
        mlen = _U32.unpack_from(raw, _MLEN_AT)[0]
    except struct.error as exc:
        raise CorruptStoreError(
            "an index entry is truncated; run `slabcache fsck --repair`"
        ) from exc
    start = _ENTRY.size + mlen
    stored = bytes(raw[start:])
    if canon is not None and stored != canon:
        return None
    slot, gen, length, csum = _HEAD.unpack_from(raw)
    return EntryRef(ikey, stored, slot, gen, length, csum, bytes(raw[_ENTRY.size:start]),
                    _USED.unpack_from(raw, _USED_AT)[0])


_USE = struct.Struct("<QQQ")  # tick, hits, inserted
_USE_AT = 28
_USED = struct.Struct("<d")
_USED_AT = 60
assert _ENTRY.size == 72 and _USE_AT == _HEAD.size and _USED_AT == _USE_AT + _USE.size + 8


def use_of(raw) -> UseStats:
    """The use statistics of an encoded entry."""
    return UseStats(*_USE.unpack_from(raw, _USE_AT))


def with_use(raw, use: UseStats, used: float) -> bytearray:
    """A copy of an encoded entry with new use statistics (nothing else is
    decoded or re-encoded)."""
    out = bytearray(raw)
    _USE.pack_into(out, _USE_AT, use.tick, use.hits, use.inserted)
    _USED.pack_into(out, _USED_AT, used)
    return out


def canon_of(raw: bytes) -> bytes:
    """The full key stored in an encoded entry, without decoding the rest."""
    mlen = _U32.unpack_from(raw, _ENTRY.size - 4)[0]
    return bytes(raw[_ENTRY.size + mlen:])


def slot_gen_of(raw: bytes) -> tuple[int, int] | None:
    """(slot, generation) of an encoded entry, without decoding the rest;
    None for one too short to be an entry (no read validates against it)."""
    try:
        return _SLOT_GEN.unpack_from(raw)
    except struct.error:
        return None
