"""The device layer on its own: a slab file and its engines, no index."""

import os

import pytest
import torch

from slabcache import LayoutMismatchError, SlabIOError
from slabcache.device import EngineWrapper, make_engine
from slabcache.device.slabfile import SlotRecords, check_geometry, create_slab, read_slab_header
from slabcache.format.checksum import checksum
from slabcache.format.records import EMPTY_RECORD, SlotRecord


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


def _whole_slots(eng, g, count, seed=0):
    """``count`` slot-sized values in one aligned buffer (as a host's blocks are)."""
    buf = eng.empty(count * g.slot_bytes)
    buf.copy_(torch.randint(0, 256, (buf.numel(),), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(seed)))
    return [buf[i * g.slot_bytes:(i + 1) * g.slot_bytes] for i in range(count)]


def _spy_runs(eng, monkeypatch, fail_on=None):
    """Record each run write as (first slot, values); the ``fail_on``-th fails."""
    runs, real = [], eng._write_run_impl

    def spy(offset, parts, arrays, n):
        runs.append(((offset - eng.geometry.data_offset) // eng.geometry.slot_bytes, len(parts)))
        if len(runs) == fail_on:
            raise OSError(5, "injected")
        real(offset, parts, arrays, n)

    monkeypatch.setattr(eng, "_write_run_impl", spy)
    return runs


@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_write_many_writes_adjacent_whole_slots_with_one_request(slab, io, monkeypatch):
    from slabcache.device import engine as engine_module

    path, g = slab
    eng = make_engine(io, path, g)
    try:
        runs = _spy_runs(eng, monkeypatch)
        whole = _whole_slots(eng, g, 5)
        short = eng.empty(100)
        short.copy_(torch.arange(100, dtype=torch.uint8))
        # 2, 3 adjacent and whole; 4 holds a short value; 0 follows nothing; 6, 7 adjacent.
        slots = [2, 3, 4, 0, 6, 7]
        values = [whole[0], whole[1], short, whole[2], whole[3], whole[4]]
        done, err = eng.write_many(slots, [[v] for v in values], hashed=True)
        assert err is None and runs == [(2, 2), (6, 2)]
        assert done == [checksum([v.numpy()]) for v in values]
        assert eng.bytes_written == 5 * g.slot_bytes + 100
        for slot, v in zip(slots, values):
            out = eng.empty(v.numel())
            assert eng.read_into(slot, [out], hashed=True) == checksum([v.numpy()])
            assert torch.equal(out, v), slot
        # A run stops at COALESCE_BYTES.
        runs.clear()
        monkeypatch.setattr(engine_module, "COALESCE_BYTES", 2 * g.slot_bytes)
        done, err = eng.write_many([1, 2, 3], [[v] for v in whole[:3]], hashed=False)
        assert err is None and done == [None] * 3 and runs == [(1, 2)]
    finally:
        eng.close()


@pytest.mark.parametrize("hashed", [True, False])
def test_a_large_value_goes_into_the_page_cache_in_pieces(tmp_path, monkeypatch, hashed):
    """mmap: a value of FUSE_FROM bytes or more is written in pieces of at
    most FUSED_STEP, hashed or not (one pwritev of a whole large value now
    and then took twenty times as long), and reads back whole."""
    from slabcache.device import mmap as mmap_module

    path = str(tmp_path / "slab")
    g, _cid = create_slab(path, 2 * (6 << 20), 6 << 20)
    eng = make_engine("mmap", path, g)
    sizes = []
    real = os.pwritev

    def spy(fd, buffers, offset, *flags):
        sizes.append(sum(memoryview(b).nbytes for b in buffers))
        return real(fd, buffers, offset, *flags)

    try:
        data = torch.randint(0, 256, (5 << 20,), dtype=torch.uint8)
        parts = [data[:3 << 20], data[3 << 20:]]  # a piece straddles the two
        monkeypatch.setattr(os, "pwritev", spy)
        digest = eng.write(1, parts, hashed=hashed)
        monkeypatch.setattr(os, "pwritev", real)
        assert sum(sizes) == 5 << 20 and max(sizes) <= mmap_module.FUSED_STEP
        assert digest == (checksum([data.numpy()]) if hashed else None)
        out = eng.empty(5 << 20)
        assert eng.read_into(1, [out], hashed=True) == checksum([data.numpy()])
        assert torch.equal(out, data) and eng.bytes_written == 5 << 20
    finally:
        eng.close()


@pytest.mark.parametrize("split", [False, True], ids=["one-buffer", "two-parts"])
def test_a_large_read_whose_head_is_cached_in_part_reads_the_rest(tmp_path, monkeypatch, split):
    """mmap: a large value's first piece is read without waiting for the
    disk (RWF_NOWAIT), which returns what the page cache holds, often part
    of the piece; the rest of the value, from that byte on, is read after.
    The page cache here holds 100,000 bytes of it (not a page or piece
    boundary), into one buffer and into two parts."""
    path = str(tmp_path / "slab")
    g, _cid = create_slab(path, 2 * (6 << 20), 6 << 20)
    eng = make_engine("mmap", path, g)
    try:
        data = torch.randint(0, 256, (5 << 20,), dtype=torch.uint8)
        digest = eng.write(1, [data], hashed=True)
        held = 100_000

        def cached_in_part(dst, offset):
            first = dst[0][:held]
            return os.preadv(eng.fd, [first], offset)

        monkeypatch.setattr(eng, "_cached", cached_in_part)
        out = torch.zeros(5 << 20, dtype=torch.uint8)
        outs = [out[:3 << 20], out[3 << 20:]] if split else [out]
        assert eng.read_into(1, outs, hashed=True) == digest
        assert torch.equal(out, data)
    finally:
        eng.close()


@pytest.mark.parametrize("io", ["mmap", "direct"])
def test_write_many_stops_at_a_run_that_fails(slab, io, monkeypatch):
    path, g = slab
    eng = make_engine(io, path, g)
    try:
        runs = _spy_runs(eng, monkeypatch, fail_on=2)
        whole = _whole_slots(eng, g, 5, seed=1)
        done, err = eng.write_many([0, 1, 3, 4, 6], [[v] for v in whole], hashed=True)
        assert runs == [(0, 2), (3, 2)]  # slot 6 is never tried
        assert done == [checksum([v.numpy()]) for v in whole[:2]]
        assert isinstance(err, SlabIOError) and "slots 3-4" in str(err)
        assert eng.bytes_written == 2 * g.slot_bytes
        out = eng.empty(g.slot_bytes)
        eng.read_into(6, [out])
        assert not out.any()  # a new slab's slot, untouched
    finally:
        eng.close()


def test_slot_records_of_adjacent_slots_are_written_with_one_request(slab, monkeypatch):
    from slabcache.device import slabfile

    path, g = slab
    calls = []
    real = os.pwritev
    monkeypatch.setattr(slabfile.os, "pwritev", lambda fd, bufs, off: (calls.append(off), real(fd, bufs, off))[1])
    with SlotRecords(path, g, writable=True) as recs:
        keep = SlotRecord(9, 10, 11, b"k" * 8, b"meta-of-4")
        recs.write(4, keep)
        rows = [(slot, slot + 1, 100 * slot, 7 * slot, bytes([slot]) * 8, b"m" * slot)
                for slot in (1, 2, 3, 5)]
        recs.write_many(rows)
        assert calls == [g.record_offset(1), g.record_offset(5)]
        for slot, gen, length, csum, khash, meta in rows:
            assert recs.read(slot) == SlotRecord(gen, length, csum, khash, meta)
        assert recs.read(4) == keep  # padding ends at each record's end


@pytest.mark.parametrize("direct", [False, True])
def test_records_of_adjacent_slots_are_cleared_with_one_request(tmp_path, monkeypatch, direct):
    """Victims evicted ahead of need lie side by side when the store was
    filled in order: their records are zeroed whole, a run with one
    request (with O_DIRECT where records fill whole blocks), and no record
    beside a run is touched."""
    path = str(tmp_path / "slab")
    g, _cid = create_slab(path, 8 * (256 << 10), 256 << 10)  # records of one block each
    rows = [(slot, slot + 1, 10 * slot, 7 * slot, bytes([slot]) * 8, b"m" * (slot + 1))
            for slot in range(7)]
    with SlotRecords(path, g, writable=True, direct=direct) as recs:
        assert recs.direct == direct
        recs.write_many(rows)
        seen = _record_writes(monkeypatch, g)
        recs.clear_many([5, 3, 1, 2, 3])
        monkeypatch.undo()
        alone = g.record_bytes if direct else len(EMPTY_RECORD)  # O_DIRECT pads to the block
        assert [(off, n) for _flags, off, n in seen] == [(g.record_offset(1), 3 * g.record_bytes),
                                                         (g.record_offset(5), alone)]
        for slot, gen, length, csum, khash, meta in rows:
            want = None if slot in (1, 2, 3, 5) else SlotRecord(gen, length, csum, khash, meta)
            assert recs.read(slot) == want, slot
    with open(path, "rb") as f:  # each cleared run is zeros to its last byte
        f.seek(g.record_offset(1))
        assert f.read(3 * g.record_bytes) == bytes(3 * g.record_bytes)


@pytest.mark.parametrize("short", ["short write", "more pieces than IOV_MAX"])
def test_a_run_of_slot_records_is_written_whole(tmp_path, monkeypatch, short):
    """A run's request that the kernel takes only part of is finished, and a
    run of more records than one request may carry goes in several."""
    from slabcache.device import slabfile

    count = 300 if short == "more pieces than IOV_MAX" else 8  # two pieces a record
    path = str(tmp_path / "slab")
    g, _cid = create_slab(path, count * 4096, 4096)
    real, calls = os.pwritev, []

    def half_first(fd, bufs, off):
        if len(bufs) > 1024:
            raise OSError(22, "Invalid argument")  # what IOV_MAX does
        calls.append(len(bufs))
        if len(calls) == 1 and short == "short write":
            return real(fd, [bytes(b"".join(bufs)[:g.record_bytes * 3 + 100])], off)
        return real(fd, bufs, off)

    monkeypatch.setattr(slabfile.os, "pwritev", half_first)
    rows = [(slot, slot + 1, 10 * slot, 7 * slot, bytes([slot % 256]) * 8, b"m" * (slot % 50))
            for slot in range(count)]
    with SlotRecords(path, g, writable=True) as recs:
        recs.write_many(rows)
        assert len(calls) >= 2 and max(calls) <= 1024
        for slot, gen, length, csum, khash, meta in rows:
            assert recs.read(slot) == SlotRecord(gen, length, csum, khash, meta), slot


@pytest.mark.parametrize("how", ["read_into", "read_many_into"])
def test_a_short_read_of_a_small_value_is_finished(slab, monkeypatch, how):
    """A read the kernel answers only in part (a signal, a short preadv) is
    read on from where it stopped, into the same buffer."""
    path, g = slab
    eng = make_engine("mmap", path, g)
    try:
        data = [torch.randint(0, 256, (5000,), dtype=torch.uint8) for _ in range(2)]
        digests = [eng.write(slot, [d], hashed=True) for slot, d in ((2, data[0]), (5, data[1]))]
        real, shorted = os.preadv, []

        def short_first(fd, bufs, off, *flags):
            if not flags and len(shorted) < 2 and len(bufs) == 1 and len(memoryview(bufs[0])) > 1000:
                shorted.append(off)
                return real(fd, [memoryview(bufs[0])[:777]], off)
            return real(fd, bufs, off, *flags)

        monkeypatch.setattr(os, "preadv", short_first)
        outs = [torch.zeros(5000, dtype=torch.uint8) for _ in range(2)]
        if how == "read_into":
            got = [eng.read_into(slot, [o], hashed=True) for slot, o in ((2, outs[0]), (5, outs[1]))]
        else:
            got = eng.read_many_into([2, 5], [[outs[0]], [outs[1]]], hashed=True)
        monkeypatch.undo()
        assert len(shorted) == 2
        assert got == digests
        assert all(torch.equal(o, d) for o, d in zip(outs, data))
    finally:
        eng.close()


def test_page_cached_says_what_the_page_cache_holds_and_reads_nothing(tmp_path):
    import mmap

    from slabcache.device.syscalls import PAGE, mapping_address, page_cached

    path = tmp_path / "f"
    path.write_bytes(os.urandom(16 * PAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        mm = mmap.mmap(fd, 16 * PAGE)
        base = mapping_address(mm)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert page_cached(base + 5 * PAGE + 17) is False
        assert page_cached(base + 5 * PAGE + 17) is False  # asking read nothing in
        os.pread(fd, 1, 5 * PAGE)
        assert page_cached(base + 5 * PAGE) is True
        assert page_cached(base + 6 * PAGE - 1) is True  # any byte of the page
        mm.close()
    finally:
        os.close(fd)


def _record_writes(monkeypatch, g):
    """Spy on writes into the slot records' region: (fd flags, offset, bytes) each."""
    import fcntl

    seen = []
    lo, hi = g.records_offset, g.data_offset

    def spy(real, sizes):
        def write(fd, data, offset, *rest):
            if lo <= offset < hi:
                seen.append((fcntl.fcntl(fd, fcntl.F_GETFL), offset, sizes(data)))
            return real(fd, data, offset, *rest)
        return write

    monkeypatch.setattr(os, "pwrite", spy(os.pwrite, len))
    monkeypatch.setattr(os, "pwritev", spy(os.pwritev, lambda bufs: sum(memoryview(b).nbytes for b in bufs)))
    return seen


# (engine, slot size, slots, records written with O_DIRECT): a small store's
# records fill a block each (so put_many's run of 256 KiB values, and its
# records, go as one request); a thousand 8 KiB slots get 1 KiB records.
@pytest.mark.parametrize("io, slot_bytes, slots, direct", [("direct", 256 << 10, 8, True),
                                                           ("mmap", 256 << 10, 8, False),
                                                           ("direct", 8192, 1000, False)])
def test_a_direct_store_writes_whole_block_records_with_o_direct(tmp_path, monkeypatch, io, slot_bytes,
                                                                 slots, direct):
    """With ``direct``, a record that fills its blocks is written with
    O_DIRECT (a buffered one would wait on the inode lock for every payload
    in flight); records that share blocks, and the ``mmap`` engine's, stay
    buffered.  Either way every key comes back from the records alone."""
    from slabcache import SlabStore
    from slabcache.admin.fsck import check

    path = tmp_path / "s"
    # k1-k4 fill their slots, so put_many writes them, and their records, as one run.
    values = {f"k{i}": torch.randint(0, 256, (slot_bytes if 1 <= i <= 4 else slot_bytes // 2 + i,),
                                     dtype=torch.uint8) for i in range(6)}
    with SlabStore.open(path, capacity_bytes=slots * slot_bytes, slot_bytes=slot_bytes, io=io) as s:
        g = s.geometry
        assert (g.record_bytes == g.alignment) == (slots == 8)
        seen = _record_writes(monkeypatch, g)
        s.put("k0", values["k0"])
        s.put_many([f"k{i}" for i in range(1, 6)], [values[f"k{i}"] for i in range(1, 6)])
        s.remove("k5")
        monkeypatch.undo()
    assert seen, "no record was written"
    for flags, offset, n in seen:
        assert bool(flags & os.O_DIRECT) == direct, (offset, n)
        if direct:
            assert offset % g.alignment == 0 and n % g.record_bytes == 0
    # The records hold every key: the index rebuilt from them alone serves each value.
    assert check(path, deep=True, progress=False).exit_code == 0
    os.unlink(path / "index" / "data.mdb")
    assert check(path, rebuild_index=True, progress=False).exit_code == 1
    with SlabStore.open(path) as s:
        assert "k5" not in s
        for k in ("k0", "k1", "k2", "k3", "k4"):
            assert torch.equal(s.get(k), values[k]), k


def test_a_byte_buffer_views_its_tensor_and_keeps_it_alive():
    import gc
    import weakref

    from slabcache.device.memory import byte_buffer

    t = torch.arange(4096, dtype=torch.int32).view(torch.uint8)[100:9000]
    want, alive = bytes(t.numpy()), weakref.ref(t)
    buf = byte_buffer(t)
    del t
    gc.collect()
    assert alive() is not None  # its memory cannot be freed under the view
    assert bytes(buf) == want and len(memoryview(buf)) == 8900
    memoryview(buf).cast("B")[:3] = b"abc"  # writable: reads land in it
    assert bytes(buf[:3]) == b"abc"
    del buf
    gc.collect()
    assert alive() is None
    assert len(memoryview(byte_buffer(torch.empty(0, dtype=torch.uint8)))) == 0


def test_a_byte_buffer_of_memory_off_the_cpu_is_refused_not_viewed():
    """A tensor whose memory the CPU cannot address (here on the meta
    device, as one on a GPU) gets numpy's error, never a view at its
    address, even when a view of its length was made before."""
    from slabcache.device.memory import byte_buffer

    byte_buffer(torch.zeros(4, dtype=torch.uint8))  # a view type of this length exists
    with pytest.raises(TypeError, match="meta"):
        byte_buffer(torch.empty(4, dtype=torch.uint8, device="meta"))
    with pytest.raises(TypeError, match="meta"):
        byte_buffer(torch.empty(7, dtype=torch.uint8, device="meta"))  # a length not seen
