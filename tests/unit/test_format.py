"""On-disk formats on their own: no slab, no index, no store."""

import pytest
import torch

from slabcache import CorruptStoreError, InvalidKeyError
from slabcache.format.checksum import CHECKSUM_BLOCK, checksum
from slabcache.format.header import FORMAT_VERSION, pack_header, plan_geometry, unpack_header
from slabcache.format.keys import MAX_INLINE_KEY, canonical_key, decode_key, index_key, key_hash
from slabcache.format.layout import StorePaths
from slabcache.format.records import SlotRecord, pack_record, record_meta, unpack_record, unpack_record_meta
from slabcache.format.values import ValueDesc


def test_geometry_is_aligned_and_within_its_metadata_budget():
    g = plan_geometry(100 << 20, 5000, 4096)
    assert g.slot_bytes == 8192 and g.slot_count == (100 << 20) // 8192
    assert g.records_offset % 4096 == 0 and g.data_offset % 4096 == 0
    assert g.data_offset <= (100 << 20) // 100 + (1 << 20)
    assert g.slot_offset(3) == g.data_offset + 3 * 8192


def test_header_round_trip_and_damage():
    g = plan_geometry(1 << 20, 4096, 4096)
    raw = pack_header(g, b"x" * 16)
    assert unpack_header(raw, "p") == (g, b"x" * 16)
    bad = bytearray(raw)
    bad[40] ^= 1
    with pytest.raises(CorruptStoreError, match="fails its checksum"):
        unpack_header(bytes(bad), "p")
    newer = bytearray(raw)
    newer[8:12] = (FORMAT_VERSION + 1).to_bytes(4, "little")
    with pytest.raises(CorruptStoreError, match="newer than this slabcache"):
        unpack_header(bytes(newer), "p")


def test_record_round_trip_keeps_key_and_description_when_they_fit():
    desc = ValueDesc(True, ("bfloat16", "int8"), ((2, 3), (5,)), (12, 5), b"extra")
    meta = record_meta(b"skey", desc.encode())
    rec = SlotRecord(7, 17, 123, key_hash(b"skey"), meta)
    assert unpack_record(pack_record(rec, 4096)) == rec
    assert unpack_record_meta(meta) == (b"skey", desc)
    small = unpack_record(pack_record(rec, 40))  # no room: the fixed part only
    assert small.meta == b"" and small.generation == 7
    raw = bytearray(pack_record(rec, 4096))
    raw[20] ^= 0xFF
    assert unpack_record(bytes(raw)) is None  # damage is no record, never a wrong one


def test_value_description_round_trip_and_damage():
    desc = ValueDesc(False, ("float8_e4m3fn",), ((4, 0, 2),), (0,), b"")
    assert ValueDesc.decode(desc.encode()) == desc and desc.length == 0
    with pytest.raises(CorruptStoreError, match="fsck"):
        ValueDesc.decode(desc.encode()[:5])


def test_keys_are_typed_and_long_ones_hashed():
    assert canonical_key("a") != canonical_key(b"a")
    assert decode_key(canonical_key("é")) == "é" and decode_key(canonical_key(b"\0")) == b"\0"
    long = canonical_key("k" * (MAX_INLINE_KEY + 1))
    assert len(index_key(long)) < 64 and index_key(canonical_key("short")) == canonical_key("short")
    for bad in ("", b"", 3, None):
        with pytest.raises(InvalidKeyError):
            canonical_key(bad)


def test_block_checksum_depends_on_every_block():
    data = bytearray(CHECKSUM_BLOCK * 2 + 10)
    base = checksum([data])
    for pos in (0, CHECKSUM_BLOCK + 1, len(data) - 1):
        data[pos] ^= 1
        assert checksum([data]) != base
        data[pos] ^= 1
    # Split into parts anywhere, the checksum is the same.
    view = memoryview(data)
    assert checksum([view[:3], view[3:CHECKSUM_BLOCK + 5], view[CHECKSUM_BLOCK + 5:]]) == base


def test_store_paths_name_every_file():
    p = StorePaths("/x/store")
    assert p.slab == "/x/store/slab" and p.lmdb_data == "/x/store/index/data.mdb"
    assert p.lock == "/x/store/lock" and p.compact_marker.startswith("/x/store/")


def test_dtype_sizes_match_torch():
    from slabcache.format.values import DTYPE_NAMES, DTYPE_SIZES

    assert len(DTYPE_SIZES) == len(DTYPE_NAMES)
    for name, size in zip(DTYPE_NAMES, DTYPE_SIZES):
        assert getattr(torch, name).itemsize == size, name


def test_a_description_whose_sizes_disagree_with_its_shapes_is_corrupt():
    from slabcache.errors import CorruptStoreError
    from slabcache.format.values import ValueDesc

    good = ValueDesc(False, ("float32",), ((2, 3),), (24,))
    assert ValueDesc.decode(good.encode()) == good
    for bad in (ValueDesc(False, ("float32",), ((2, 3),), (25,)),
                ValueDesc(False, ("float32",), ((1 << 40, 3),), (24,)),
                ValueDesc(False, ("float32", "int8"), ((2, 3), (1,)), (24, 1))):
        with pytest.raises(CorruptStoreError, match="slabcache fsck"):
            ValueDesc.decode(bad.encode())
    with pytest.raises(CorruptStoreError):
        ValueDesc.decode(good.encode() + b"\0")  # trailing bytes
