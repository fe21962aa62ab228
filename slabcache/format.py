"""On-disk formats: the slab header, per-slot records, value descriptions, keys.

Everything here is a fixed, versioned layout.  Bump ``FORMAT_VERSION`` when
any struct below changes; a store written by a newer version is refused at
open rather than misread.

Slab file layout (all offsets multiples of ``alignment``)::

    [ header area : alignment bytes                                  ]
    [ slot records: slot_count * record_bytes, rounded up to alignment ]
    [ slot 0 | slot 1 | ... | slot slot_count-1  (slot_bytes each)    ]

The records live outside the payload area so that a value of exactly
``slot_bytes`` bytes fits in one slot.  Each record describes its slot well
enough (key hash, generation, length, checksum and, when it fits, the full
key and value description) to rebuild the index from the slab alone.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Sequence

import xxhash

from .errors import CorruptStoreError, InvalidKeyError

FORMAT_VERSION = 1
SLAB_MAGIC = b"SLABCACH"
RECORD_MAGIC = 0x534C  # "SL"

# magic, version, header crc, alignment, record_bytes, slot_bytes,
# slot_count, records_offset, data_offset, creation id, reserved.
SLAB_HEADER = struct.Struct("<8sIIIIQQQQ16s64x")
assert SLAB_HEADER.size == 136, "bump FORMAT_VERSION when the header changes"

# magic, flags, generation, length, payload checksum, key hash,
# meta length, record crc.  Followed by ``meta`` bytes when they fit.
SLOT_RECORD = struct.Struct("<HHIQQ8sII")
assert SLOT_RECORD.size == 40, "bump FORMAT_VERSION when the record changes"
MAX_RECORD_BYTES = 4096

RECORD_FLAG_META = 1  # the record carries the full key and value description


# Payloads longer than one block are checksummed as the xxh3-64 of their
# blocks' xxh3-64 digests, so blocks can be hashed in parallel and while
# later blocks are still being read.  Changing this changes the format.
CHECKSUM_BLOCK = 4 << 20


def block_digest(buf) -> bytes:
    """Digest of one checksum block (xxh3 releases the GIL on large buffers)."""
    return xxhash.xxh3_64_digest(buf)


def block_hasher():
    """A streaming hasher whose ``digest()`` equals ``block_digest`` of the
    bytes fed to it (for hashing a block piece by piece as it is copied)."""
    return xxhash.xxh3_64()


def combine_digests(digests: Sequence[bytes], total: int) -> int:
    if total <= CHECKSUM_BLOCK:
        return int.from_bytes(digests[0], "big") if digests else xxhash.xxh3_64_intdigest(b"")
    return xxhash.xxh3_64_intdigest(b"".join(digests))


def checksum(parts: Sequence) -> int:
    """Payload checksum over the concatenation of ``parts`` (buffer objects)."""
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(len(v) for v in views)
    if total <= CHECKSUM_BLOCK:
        h = xxhash.xxh3_64()
        for v in views:
            h.update(v)
        return h.intdigest()
    digests, h, filled = [], xxhash.xxh3_64(), 0
    for v in views:
        while len(v):
            take = min(len(v), CHECKSUM_BLOCK - filled)
            h.update(v[:take])
            v = v[take:]
            filled += take
            if filled == CHECKSUM_BLOCK:
                digests.append(h.digest())
                h, filled = xxhash.xxh3_64(), 0
    if filled:
        digests.append(h.digest())
    return combine_digests(digests, total)


# ---------------------------------------------------------------- geometry


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


# ---------------------------------------------------------------- slot records


@dataclass(frozen=True)
class SlotRecord:
    generation: int
    length: int
    checksum: int
    key_hash: bytes
    meta: bytes  # EntryMeta.encode() output, or b"" when it did not fit


def pack_record(rec: SlotRecord, record_bytes: int) -> bytes:
    meta = rec.meta if SLOT_RECORD.size + len(rec.meta) <= record_bytes else b""
    flags = RECORD_FLAG_META if meta else 0
    head = SLOT_RECORD.pack(RECORD_MAGIC, flags, rec.generation, rec.length,
                            rec.checksum, rec.key_hash, len(meta), 0)
    crc = zlib.crc32(meta, zlib.crc32(head))
    head = SLOT_RECORD.pack(RECORD_MAGIC, flags, rec.generation, rec.length,
                            rec.checksum, rec.key_hash, len(meta), crc)
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


def pack_record_meta(canon: bytes, meta: "EntryMeta") -> bytes:
    """The part of a slot record that lets fsck rebuild the index entry."""
    return struct.pack("<I", len(canon)) + canon + meta.encode()


def unpack_record_meta(raw: bytes) -> tuple[bytes, "EntryMeta"]:
    (klen,) = struct.unpack_from("<I", raw)
    return bytes(raw[4:4 + klen]), EntryMeta.decode(raw[4 + klen:])


# ---------------------------------------------------------------- keys

# Keys up to this many bytes are used verbatim as LMDB keys (LMDB's limit is
# 511); longer ones are replaced by a hash and the full key is kept in the
# entry to detect collisions.
MAX_INLINE_KEY = 400


def canonical_key(key: str | bytes) -> bytes:
    """Type-tagged key bytes: ``"a"`` and ``b"a"`` are different keys."""
    if isinstance(key, str):
        if not key:
            raise InvalidKeyError("key is an empty string; use a non-empty str or bytes key")
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, (bytes, bytearray, memoryview)):
        b = bytes(key)
        if not b:
            raise InvalidKeyError("key is empty bytes; use a non-empty str or bytes key")
        return b"b" + b
    raise InvalidKeyError(
        f"key must be str or bytes, got {type(key).__name__}; convert it (e.g. key.to_string())"
    )


def decode_key(canon: bytes) -> str | bytes:
    if canon[:1] == b"s":
        return canon[1:].decode("utf-8", "surrogatepass")
    return canon[1:]


def index_key(canon: bytes) -> bytes:
    if len(canon) <= MAX_INLINE_KEY:
        return canon
    return b"#" + hashlib.blake2b(canon, digest_size=32).digest()


def key_hash(canon: bytes) -> bytes:
    return hashlib.blake2b(canon, digest_size=8).digest()


# ---------------------------------------------------------------- value meta

# Stable codes for dtypes: append only, never reorder (they are on disk).
DTYPE_NAMES = (
    "float32", "float64", "float16", "bfloat16",
    "int8", "int16", "int32", "int64", "uint8", "bool",
    "complex64", "complex128", "complex32",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "uint16", "uint32", "uint64", "float8_e8m0fnu",
)
DTYPE_CODES = {n: i for i, n in enumerate(DTYPE_NAMES)}

_META_HEAD = struct.Struct("<BBHI")  # version, is_list, tensor count, extra length
_TENSOR_HEAD = struct.Struct("<BB")  # dtype code, ndim


@dataclass(frozen=True)
class EntryMeta:
    """What a stored value looks like: enough to rebuild the tensors."""

    is_list: bool
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    nbytes: tuple[int, ...]
    extra: bytes = b""  # opaque, caller-defined (e.g. LMCache's format tag)

    @property
    def length(self) -> int:
        return sum(self.nbytes)

    def encode(self) -> bytes:
        out = [_META_HEAD.pack(1, self.is_list, len(self.dtypes), len(self.extra))]
        for dt, shape in zip(self.dtypes, self.shapes):
            out.append(_TENSOR_HEAD.pack(DTYPE_CODES[dt], len(shape)))
            out.append(struct.pack(f"<{len(shape)}Q", *shape))
        out.append(struct.pack(f"<{len(self.nbytes)}Q", *self.nbytes))
        out.append(self.extra)
        return b"".join(out)

    @classmethod
    def decode(cls, raw: bytes) -> "EntryMeta":
        try:
            ver, is_list, n, elen = _META_HEAD.unpack_from(raw)
            pos = _META_HEAD.size
            dtypes, shapes = [], []
            for _ in range(n):
                code, ndim = _TENSOR_HEAD.unpack_from(raw, pos)
                pos += _TENSOR_HEAD.size
                shapes.append(struct.unpack_from(f"<{ndim}Q", raw, pos))
                pos += 8 * ndim
                dtypes.append(DTYPE_NAMES[code])
            nbytes = struct.unpack_from(f"<{n}Q", raw, pos)
            pos += 8 * n
            extra = bytes(raw[pos:pos + elen])
            if ver != 1 or len(extra) != elen:
                raise ValueError("bad meta")
        except (struct.error, IndexError, ValueError) as exc:
            raise CorruptStoreError(
                "an index entry's value description is unreadable; run `slabcache fsck --repair`"
            ) from exc
        return cls(bool(is_list), tuple(dtypes), tuple(shapes), tuple(nbytes), extra)
