"""The device layer on its own: a slab file and its engines, no index."""

import pytest
import torch

from slabcache import LayoutMismatchError, SlabIOError
from slabcache.device import EngineWrapper, make_engine
from slabcache.device.slabfile import SlotRecords, check_geometry, create_slab, read_slab_header
from slabcache.format.checksum import checksum
from slabcache.format.records import SlotRecord


@pytest.fixture
def slab(tmp_path):
    path = str(tmp_path / "slab")
    g, cid = create_slab(path, 8 * 8192, 8192)
    return path, g


@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_engine_round_trip_with_checksums(slab, io):
    path, g = slab
    eng = make_engine(io, path, g)
    try:
        data = torch.randint(0, 256, (5000,), dtype=torch.uint8)
        parts = [data[:1234], data[1234:]]
        digest = eng.write(3, parts, hashed=True)
        assert digest == checksum([data.numpy()])
        out = eng.empty(5000)
        assert eng.read_into(3, [out], hashed=True) == digest and torch.equal(out, data)
        assert eng.bytes_written == 5000 and eng.bytes_read == 5000
    finally:
        eng.close()


@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_engine_checks_bounds(slab, io):
    path, g = slab
    eng = make_engine(io, path, g)
    try:
        with pytest.raises(SlabIOError, match="outside"):
            eng.write(g.slot_count, [torch.zeros(10, dtype=torch.uint8)])
        with pytest.raises(SlabIOError, match="do not fit"):
            eng.write(0, [torch.zeros(g.slot_bytes + 1, dtype=torch.uint8)])
    finally:
        eng.close()


def test_wrapper_sees_every_public_call(slab):
    path, g = slab
    calls = []

    class Counting(EngineWrapper):
        def write(self, slot, parts, hashed=False):
            calls.append(("write", slot))
            return super().write(slot, parts, hashed)

    eng = Counting(make_engine("mmap", path, g))
    try:
        eng.write(1, [torch.ones(8, dtype=torch.uint8)])
        out = eng.empty(8)
        eng.read_into(1, [out])
        assert calls == [("write", 1)] and out.sum() == 8 and eng.name == "mmap"
    finally:
        eng.close()


def test_engine_close_stops_its_helper_threads(slab):
    import threading

    path, g = slab
    eng = make_engine("mmap", path, g)
    before = set(threading.enumerate())
    eng.submit(lambda: None).result()
    mine = [t for t in set(threading.enumerate()) - before if t.name.startswith("slabcache-helper")]
    assert mine
    eng.close()
    assert not any(t.is_alive() for t in mine)


def test_slab_header_and_records(slab):
    path, g = slab
    assert read_slab_header(path)[0] == g
    with pytest.raises(LayoutMismatchError, match="compact --slot-bytes"):
        check_geometry(g, "p", None, 4096)
    with SlotRecords(path, g, writable=True) as rec:
        r = SlotRecord(2, 10, 5, b"h" * 8, b"")
        rec.write(6, r)
        assert rec.read(6) == r
        rec.clear(6)
        assert rec.read(6) is None
