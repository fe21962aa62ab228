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


@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_a_batch_read_fails_only_the_reads_that_fail(slab, io):
    path, g = slab
    eng = make_engine(io, path, g)
    try:
        values = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in (100, 8192, 4096)]
        digests = [eng.write(slot, [v], hashed=True) for slot, v in zip((0, 5, 7), values)]
        outs = [eng.empty(v.numel()) for v in values]
        two = [eng.empty(50), eng.empty(50)]  # one value read into two parts
        got = eng.read_many_into([0, g.slot_count, 5, 7, 0], [[outs[0]], [eng.empty(8)], [outs[1]],
                                                              [outs[2]], two], hashed=True)
        assert got[0] == digests[0] and got[2] == digests[1] and got[3] == digests[2]
        assert isinstance(got[1], SlabIOError) and "outside" in str(got[1])
        assert got[4] == digests[0] and torch.equal(torch.cat(two), values[0])
        assert all(torch.equal(o, v) for o, v in zip(outs, values))
        assert eng.bytes_read == 100 + 8192 + 4096 + 100
    finally:
        eng.close()


def test_wrapper_sees_every_public_call(slab):
    path, g = slab
    calls = []

    class Counting(EngineWrapper):
        def write(self, slot, parts, hashed=False):
            calls.append(("write", slot))
            return super().write(slot, parts, hashed)

        def read_into(self, slot, parts, hashed=False):
            calls.append(("read_into", slot))
            return super().read_into(slot, parts, hashed)

    eng = Counting(make_engine("mmap", path, g))
    try:
        eng.write(1, [torch.ones(8, dtype=torch.uint8)])
        out = eng.empty(8)
        eng.read_into(1, [out])
        # A batch goes through the wrapper's read_into, one read at a time.
        eng.read_many_into([1, 2], [[eng.empty(8)], [eng.empty(8)]])
        assert calls == [("write", 1), ("read_into", 1), ("read_into", 1), ("read_into", 2)]
        assert out.sum() == 8 and eng.name == "mmap"
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
