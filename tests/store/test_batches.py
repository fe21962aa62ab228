"""Batched operations: one index transaction per batch, same guarantees as
one key at a time (every engine)."""

import os

import pytest
import torch

from slabcache.format.checksum import CHECKSUM_BLOCK
from slabcache import SlabIOError, SlabStore, UnsupportedValueError
from slabcache.core.values import describe
from slabcache.testing import FaultyEngine, inject
from tests.helpers import drop_until_cold, rand_tensor


def _no_leak(s):
    st = s.stats()
    assert st["slots_used"] + st["slots_free"] + st["slots_reserved"] == st["slots_total"]
    assert st["slots_reserved"] == 0


def test_put_many_then_get_many_round_trip(make_store):
    s = make_store(capacity_bytes=64 * 4096)
    keys = [f"k{i}" for i in range(20)]
    vals = [rand_tensor(100 + 37 * i, i) for i in range(20)]
    assert s.put_many(keys, vals) == [True] * 20
    got = s.get_many(keys + ["missing"])
    assert got[-1] is None
    assert all(torch.equal(g, v) for g, v in zip(got, vals))
    assert s.stats()["puts"] == 20
    _no_leak(s)


def test_put_many_counts_present_and_repeated_keys_as_uses(make_store):
    s = make_store(capacity_bytes=16 * 4096)
    assert s.put("a", rand_tensor(10, 1))
    assert s.put_many(["a", "b", "b"], [rand_tensor(10, 9), rand_tensor(10, 2), rand_tensor(10, 3)]) == [True] * 3
    assert torch.equal(s.get("a"), rand_tensor(10, 1))  # not rewritten
    assert torch.equal(s.get("b"), rand_tensor(10, 2))  # the first of the batch wins
    assert s.entry("a").use.hits >= 1 and len(s) == 2


def test_put_many_evicts_like_single_puts_and_rejects_when_all_pinned(make_store):
    s = make_store(capacity_bytes=4 * 4096)
    assert s.put_many([f"k{i}" for i in range(4)], [rand_tensor(10, i) for i in range(4)]) == [True] * 4
    for i in range(4):
        s.pin(f"k{i}")
    assert s.put_many(["x", "y"], [rand_tensor(10, 5)] * 2) == [False, False]
    s.unpin("k0")
    assert s.put_many(["x"], [rand_tensor(10, 5)]) == [True]
    assert "k0" not in s and s.stats()["evictions"] == 1
    _no_leak(s)


def test_put_many_checks_everything_before_reserving(make_store):
    s = make_store(capacity_bytes=4 * 4096)
    s.put_many(["a", "b"], [rand_tensor(10, 1), rand_tensor(10, 2)])
    with pytest.raises(UnsupportedValueError):
        s.put_many(["c", "d"], [rand_tensor(10, 3), "not a tensor"])
    with pytest.raises(ValueError, match="one value per key"):
        s.put_many(["c"], [])
    assert sorted(s.keys()) == ["a", "b"] and "c" not in s
    _no_leak(s)


@pytest.mark.parametrize("big", [False, True])
def test_put_many_write_failure_keeps_what_was_written(tmp_path, engine, big):
    from slabcache import SlabStore

    size = (1 << 20) if big else 1000  # big batches write on several threads
    with SlabStore.open(tmp_path / "s", capacity_bytes=16 * (1 << 20), slot_bytes=1 << 20, io=engine,
                        engine_wrapper=FaultyEngine) as s:
        s.put("keep", rand_tensor(size, 0))
        fe = inject(s, "eio_write", every=3)  # the 3rd and 6th writes fail
        keys = [f"k{i}" for i in range(6)]
        with pytest.raises(SlabIOError, match="writing slot"):
            s.put_many(keys, [rand_tensor(size, i) for i in range(6)])
        failed = fe.injected
        inject(s, None)
        present = [k for k in keys if k in s]
        if big:  # written side by side, all of them: which two failed depends on the threads
            assert failed == 2 and len(present) == 4
        else:  # one after another: it stops at the first failure
            assert failed == 1 and present == ["k0", "k1"]
        for k in present:  # exactly the entries written without error, each intact
            assert torch.equal(s.get(k), rand_tensor(size, keys.index(k)))
        assert torch.equal(s.get("keep"), rand_tensor(size, 0))
        _no_leak(s)


def test_put_many_of_adjacent_slots_written_as_runs_keeps_the_runs_written(tmp_path, engine,
                                                                            monkeypatch):
    """Small whole-slot values of a batch go to adjacent slots and are written
    a run at a time: a run that fails fails its values only, the runs before
    it are committed, the rest are not tried, and every record written
    rebuilds the index."""
    from slabcache.admin.fsck import check
    from slabcache.device import engine as engine_module

    monkeypatch.setattr(engine_module, "COALESCE_BYTES", 2 * 4096)  # runs of two
    path = tmp_path / "s"
    keys = [f"k{i}" for i in range(6)]
    with SlabStore.open(path, capacity_bytes=16 * 4096, slot_bytes=4096, io=engine) as s:
        eng = s._writer.engine
        buf = eng.empty(6 * 4096)
        values = [buf[i * 4096:(i + 1) * 4096] for i in range(6)]
        for i, v in enumerate(values):
            v.copy_(rand_tensor(4096, i))
        runs, real = [], eng._write_run_impl

        def fail_second(offset, parts, arrays, n):
            runs.append(len(parts))
            if len(runs) == 2:
                raise OSError(5, "injected")
            real(offset, parts, arrays, n)

        monkeypatch.setattr(eng, "_write_run_impl", fail_second)
        with pytest.raises(SlabIOError, match="writing slots"):
            s.put_many(keys, values)
        assert runs == [2, 2]
        assert [k for k in keys if k in s] == ["k0", "k1"]
        _no_leak(s)
        monkeypatch.setattr(eng, "_write_run_impl", real)
        assert s.put_many(keys, values) == [True] * 6
        assert runs == [2, 2]  # the spy is gone: these runs went to the disk
        for i, k in enumerate(keys):
            assert torch.equal(s.get(k), rand_tensor(4096, i)), k
    assert check(path, deep=True, progress=False).exit_code == 0
    rebuilt = check(path, rebuild_index=True, progress=False)
    assert [f.kind for f in rebuilt.findings] == ["index rebuilt"], rebuilt.findings
    with SlabStore.open(path) as s:
        assert sorted(s.keys()) == keys
        for i, k in enumerate(keys):
            assert torch.equal(s.get(k), rand_tensor(4096, i)), k


def test_a_large_batch_goes_to_threads_only_when_it_has_no_runs(tmp_path, engine):
    """4 x 512 KiB values that fill adjacent slots are written in the caller,
    one request for each two (1 MiB); values that do not fill their slots go
    to the writer threads, one request each."""
    slot = 512 << 10
    with SlabStore.open(tmp_path / "s", capacity_bytes=16 * slot, slot_bytes=slot, io=engine) as s:
        eng = s._writer.engine
        buf = eng.empty(4 * slot)
        whole = [buf[i * slot:(i + 1) * slot] for i in range(4)]
        for i, v in enumerate(whole):
            v.copy_(rand_tensor(slot, i))
        runs, real = [], eng._write_run_impl
        eng._write_run_impl = lambda off, parts, arrays, n: (runs.append(len(parts)), real(off, parts, arrays, n))
        assert s.put_many([f"w{i}" for i in range(4)], whole) == [True] * 4
        assert runs == [2, 2] and s._writer._pool is None
        short = [rand_tensor(slot - 4096, 10 + i) for i in range(4)]
        assert s.put_many([f"s{i}" for i in range(4)], short) == [True] * 4
        assert runs == [2, 2] and s._writer._pool is not None
        for i in range(4):
            assert torch.equal(s.get(f"w{i}"), rand_tensor(slot, i))
            assert torch.equal(s.get(f"s{i}"), rand_tensor(slot - 4096, 10 + i))


def test_a_failed_read_in_a_batch_is_a_miss_for_that_key_only(make_store):
    s = make_store(capacity_bytes=16 * 4096, engine_wrapper=FaultyEngine)
    keys = [f"k{i}" for i in range(6)]
    vals = [rand_tensor(3000 + i, i) for i in range(6)]
    assert s.put_many(keys, vals) == [True] * 6
    inject(s, "eio_read", every=2)  # the 2nd, 4th and 6th read fail
    outs = [torch.empty(3000 + i, dtype=torch.uint8) for i in range(6)]
    assert s.get_many_into(keys, outs) == [True, False, True, False, True, False]
    assert all(torch.equal(outs[i], vals[i]) for i in (0, 2, 4))
    assert s.stats()["io_errors"] == 3
    inject(s, None)
    assert all(k in s for k in keys)  # a read error drops nothing
    _no_leak(s)


def test_get_many_into_handles_every_kind_of_out(make_store):
    s = make_store(capacity_bytes=16 * 4096)
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    pair = [torch.arange(5, dtype=torch.int16), torch.ones(2, 2)]
    s.put_many(["a", "pair"], [a, pair])
    out_a = torch.empty(4, 3).t()  # not contiguous: read, then copied
    out_pair = [torch.empty(5, dtype=torch.int16), torch.empty(2, 2)]
    assert s.get_many_into(["a", "pair", "gone"], [out_a, out_pair, torch.empty(3)]) == [True, True, False]
    assert torch.equal(out_a, a) and torch.equal(out_pair[0], pair[0]) and torch.equal(out_pair[1], pair[1])
    with pytest.raises(UnsupportedValueError, match="stored tensor"):
        s.get_many_into(["a"], [torch.empty(3, 4, dtype=torch.float64)])


def _damage(s, tmp_path, key, at=100):
    e = s.entry(key)
    with open(tmp_path / "store" / "slab", "r+b") as f:
        f.seek(s.geometry.slot_offset(e.slot) + at)
        b = f.read(1)
        f.seek(s.geometry.slot_offset(e.slot) + at)
        f.write(bytes([b[0] ^ 0x40]))
    s.engine.drop_cache()


# Small values: one engine call; 300 KiB: side by side; 17 MiB, cold: each
# read whole and hashed on a helper (mmap).
@pytest.mark.parametrize("size", [3000, 300 << 10, 17 << 20])
def test_a_damaged_payload_in_a_batch_is_a_miss_for_that_key_only(make_store, tmp_path, size):
    """Both integrations read through lookup + read_into: a value that fails
    its checksum there is a miss, never bytes."""
    slot = max(512 << 10, -(-size // 4096) * 4096)
    s = make_store(capacity_bytes=8 * slot, slot_bytes=slot)
    keys = [f"k{i}" for i in range(4)]
    vals = [rand_tensor(size, i) for i in range(4)]
    assert s.put_many(keys, vals) == [True] * 4
    _damage(s, tmp_path, "k1")  # the slab's pages dropped: the reads below are cold
    outs = [torch.zeros(size, dtype=torch.uint8) for _ in keys]
    got = s.read_into(s.lookup(keys), outs)
    assert [d is not None for d in got] == [True, False, True, True]
    assert all(torch.equal(outs[i], vals[i]) for i in (0, 2, 3))
    assert s.stats()["checksum_failures"] == 1 and "k1" not in s
    _damage(s, tmp_path, "k2")
    outs = [torch.zeros(size, dtype=torch.uint8) for _ in keys]
    assert s.get_many_into(keys, outs) == [True, False, False, True]
    assert all(torch.equal(outs[i], vals[i]) for i in (0, 3))
    assert [v is not None for v in s.get_many(keys)] == [True, False, False, True]


def test_lookup_then_read_is_a_miss_if_the_entry_changed_between(make_store):
    s = make_store(capacity_bytes=2 * 4096)
    s.write(["x"], [rand_tensor(64, 1)], [describe([(4, 4)], [torch.float32], is_list=False)])
    found = s.lookup(["x", "nothing"])
    assert found[1] is None and found[0].desc.shapes == ((4, 4),) and found[0].length == 64
    s.remove("x")
    s.put("y", rand_tensor(64, 2))
    s.put("z", rand_tensor(64, 3))  # x's slot is reused
    out = torch.empty(64, dtype=torch.uint8)
    assert s.read_into(found, [out, None]) == [None, None]
    s.write(["x"], [rand_tensor(64, 4)], [describe([(64,)], [torch.uint8], is_list=False)])
    found = s.lookup(["x"])
    assert s.read_into(found, [out])[0].dtypes == ("uint8",)
    assert torch.equal(out, rand_tensor(64, 4))


def test_prefix_pins_and_unpins_in_one_go(make_store):
    s = make_store()
    s.put_many(["a", "b", "d"], [rand_tensor(10, i) for i in range(3)])
    assert s.contains(["a", "c", "d"]) == [True, False, True]
    assert s.prefix(["a", "b", "c", "d"], pin=True) == 2
    assert [s.pin_count(k) for k in "abd"] == [1, 1, 0]
    assert s.unpin(["a", "b", "d"]) == [True, True, False]
    assert [s.pin_count(k) for k in "abd"] == [0, 0, 0]


def test_put_many_raw_async_weighs_its_keys_against_the_queue(make_store):
    s = make_store(capacity_bytes=16 * 4096, max_pending_puts=4)
    desc = describe([(10,)], [torch.uint8], is_list=False)
    fut = s.jobs.write(["a", "b", "c"], [rand_tensor(10, i) for i in range(3)], [desc] * 3)
    assert fut.result(10) == [True, True, True]
    big = s.jobs.write([f"k{i}" for i in range(6)], [rand_tensor(10, i) for i in range(6)], [desc] * 6)
    assert big.result(10) == [True] * 6  # larger than the whole limit: runs alone
    assert torch.equal(s.get("k5"), rand_tensor(10, 5))


@pytest.mark.parametrize("nowait", [True, False])
@pytest.mark.parametrize("blocks", [3, 4])
def test_large_values_read_side_by_side_warm_and_cold(make_store, tmp_path, nowait, blocks):
    """Batches of large values are read on several threads, each value in
    pieces hashed as they land; cold, the batch is asked for at once
    (readahead), or, from 16 MiB, each value read whole and hashed on a
    helper.  Every byte must come back, in every out."""
    n = blocks * CHECKSUM_BLOCK + 12345
    s = make_store(capacity_bytes=8 * (blocks + 1) * CHECKSUM_BLOCK, slot_bytes=(blocks + 1) * CHECKSUM_BLOCK)
    if not nowait and hasattr(s.engine, "_nowait"):
        s.engine._nowait = False  # a filesystem that cannot say what is cached
    keys = [f"k{i}" for i in range(5)]
    vals = [rand_tensor(n, i) for i in range(5)]
    assert s.put_many(keys, vals) == [True] * 5
    for cold in (False, True):
        if cold:
            s.engine.drop_cache()
        outs = [torch.zeros(n, dtype=torch.uint8) for _ in keys]
        assert s.get_many_into(keys, outs) == [True] * 5
        assert all(torch.equal(o, v) for o, v in zip(outs, vals))
    s.engine.drop_cache()
    out = torch.zeros(n, dtype=torch.uint8)
    assert s.get_into("k3", out) and torch.equal(out, vals[3])  # one value, its blocks spread


def test_large_values_written_piece_by_piece_carry_the_format_checksum(make_store, tmp_path):
    """Large single-buffer writes hash each piece as it is written (alone:
    spread over the cores; in a batch: one value a thread); the checksum
    must be the format's, as fsck --deep recomputes it."""
    from slabcache.admin.fsck import check
    from slabcache.format.checksum import checksum

    sizes = [1 << 20, CHECKSUM_BLOCK, CHECKSUM_BLOCK + 1, 3 * CHECKSUM_BLOCK - 4097]
    s = make_store(capacity_bytes=12 * 3 * CHECKSUM_BLOCK, slot_bytes=3 * CHECKSUM_BLOCK)
    for i, n in enumerate(sizes):
        assert s.put(f"one{i}", rand_tensor(n, i))
    assert s.put_many([f"many{i}" for i in range(len(sizes))],
                      [rand_tensor(n, 10 + i) for i, n in enumerate(sizes)]) == [True] * len(sizes)
    for i, n in enumerate(sizes):
        for key, seed in ((f"one{i}", i), (f"many{i}", 10 + i)):
            v = rand_tensor(n, seed)
            assert s.entry(key).checksum == checksum([v.numpy()])
            assert torch.equal(s.get(key), v)
    res = check(tmp_path / "store", deep=True, progress=False)
    assert res.findings == [] and res.bytes_scrubbed == 2 * sum(sizes)


# A host pool keeps a page's K and V (and each layer) apart: the raw verbs
# take a value as parts, written and read back to back.  Small (one call),
# side by side, and 17 MiB cold (read whole, hashed on a helper).
@pytest.mark.parametrize("size", [3000, 300 << 10, (5 << 20) + 3, 17 << 20])
def test_a_value_given_as_parts_is_the_same_value_as_one_buffer(make_store, size):
    slot = max(512 << 10, -(-size // 4096) * 4096)
    s = make_store(capacity_bytes=6 * slot, slot_bytes=slot)
    desc = describe([(size,)], [torch.uint8], is_list=False)
    vals = [rand_tensor(size, i) for i in range(3)]
    cut = [size // 3, size // 2 + 7]  # parts that do not line up with anything

    def pieces(t):
        return [t[:cut[0]], t[cut[0]:cut[1]], t[cut[1]:]]

    assert s.write(["parts", "whole"], [pieces(vals[0]), vals[1]], [desc, desc]) == [True, True]
    for cold in (True, False):  # the batch read cold, then warm (each value its own way)
        if cold:
            s.engine.drop_cache()
        whole, split_out = torch.zeros(size, dtype=torch.uint8), torch.zeros(size, dtype=torch.uint8)
        got = s.read_into(s.lookup(["parts", "whole"]), [whole, pieces(split_out)])
        assert got[0] is not None and got[1] is not None
        assert torch.equal(whole, vals[0]) and torch.equal(split_out, vals[1])
    for key in ("parts", "whole"):  # one value alone, its checksum blocks spread
        out = torch.zeros(size, dtype=torch.uint8)
        s.engine.drop_cache()
        assert s.read_into(s.lookup([key]), [pieces(out)])[0] is not None
        assert torch.equal(out, vals[0] if key == "parts" else vals[1])
    assert s.write(["alone"], [pieces(vals[2])], [desc]) == [True]  # a lone write, pieces spread
    assert torch.equal(s.get("alone"), vals[2])
    from slabcache.format.checksum import checksum  # what fsck --deep recomputes

    assert [s.entry(k).checksum for k in ("parts", "whole", "alone")] == [
        checksum([v.numpy()]) for v in vals]


def test_parts_of_the_wrong_size_or_overlapping_are_refused_before_anything_is_read(make_store):
    s = make_store()
    desc = describe([(100,)], [torch.uint8], is_list=False)
    v = rand_tensor(100, 1)
    with pytest.raises(ValueError, match="parts hold 99 bytes"):
        s.write(["k"], [[v[:50], v[50:99]]], [desc])
    assert "k" not in s
    s.write(["k"], [[v[:50], v[50:]]], [desc])
    out = torch.zeros(200, dtype=torch.uint8)
    with pytest.raises(ValueError, match="add up to exactly"):
        s.read_into(s.lookup(["k"]), [[out[:50], out[100:200]]])
    with pytest.raises(UnsupportedValueError, match="overlap"):
        s.read_into(s.lookup(["k"]), [[out[:60], out[50:100]]])
    with pytest.raises(ValueError, match="empty list"):
        s.read_into(s.lookup(["k"]), [[]])
    assert torch.equal(out, torch.zeros(200, dtype=torch.uint8))
    s.read_into(s.lookup(["k"]), [[out[100:150], out[:50]]])
    assert torch.equal(out[100:150], v[:50]) and torch.equal(out[:50], v[50:])


def test_evictions_are_logged_for_a_host_that_watches_them(make_store):
    """vLLM reports blocks a tier removed: the keys this handle evicted, in
    order, through put, put_many and write; removes are not evictions."""
    s = make_store(capacity_bytes=4 * 4096)
    s.put_many(["a", "b"], [rand_tensor(10, i) for i in range(2)])
    log = s.watch_evictions()
    assert s.watch_evictions() is log
    s.put_many([b"c", "d"], [rand_tensor(10, i) for i in range(2)])
    assert log.take() == []  # four slots: nothing evicted yet
    s.put("e", rand_tensor(10, 5))
    s.put_many(["f", "g"], [rand_tensor(10, i) for i in range(2)])
    s.write(["h"], [rand_tensor(10, 9)], [describe([(10,)], [torch.uint8], is_list=False)])
    s.remove("h")
    got = log.take()
    assert got == ["a", "b", b"c", "d"] and all(k not in s for k in got)
    assert log.take() == [] and log.dropped == 0


def test_the_eviction_log_keeps_the_newest_when_nobody_takes_it(make_store):
    s = make_store(capacity_bytes=2 * 4096)
    log = s.watch_evictions(limit=2)
    for i in range(5):
        s.put(f"k{i}", rand_tensor(10, i))
    assert log.take() == ["k1", "k2"] and log.dropped == 1


def test_evictions_ahead_of_need_by_one_transaction_puts_are_logged(make_store):
    """Stores of 256 slots or more keep a slot free for one-transaction
    puts, evicting ahead of need: those victims are logged too."""
    s = make_store(capacity_bytes=256 * 4096)
    s.put_many([f"k{i}" for i in range(256)], [rand_tensor(10, i) for i in range(256)])
    log = s.watch_evictions()
    for i in range(3):
        assert s.put(f"new{i}", rand_tensor(10, i))
    gone = [f"k{i}" for i in range(256) if f"k{i}" not in s]
    assert log.take() == gone and len(gone) >= 3  # one more, on mmap: the slot kept free


@pytest.mark.parametrize("cold", [False, True])
def test_values_in_adjacent_slots_are_read_together_and_each_verified(make_store, tmp_path, cold):
    """A request's blocks sit in adjacent slots: a batch reads runs of them
    with one request (up to 1 MiB, direct engine), in any batch order, and
    still checks each value on its own: a damaged one is a miss, its
    neighbours hits."""
    size = 64 << 10
    s = make_store(capacity_bytes=40 * size, slot_bytes=size)
    desc = describe([(size,)], [torch.uint8], is_list=False)
    keys = [f"k{i}" for i in range(36)]
    vals = [rand_tensor(size, i) for i in range(36)]
    assert s.write(keys, vals, [desc] * 36) == [True] * 36
    assert sorted(s.entry(k).slot for k in keys) == list(range(36))  # adjacent, as a job's blocks are
    s.write(["short"], [rand_tensor(100, 99)], [describe([(100,)], [torch.uint8], is_list=False)])
    _damage(s, tmp_path, "k7")
    if not cold:
        s.get_many(keys)  # warm again (k7 now gone)
    if cold:
        s.engine.drop_cache()
    order = [k for k in keys[::-1] if k != "k7"] + ["short", "k7"]  # tail first, as SGLang reads
    found = s.lookup(order)
    outs = [s.engine.empty(size) for _ in order[:-2]] + [torch.empty(100, dtype=torch.uint8), s.engine.empty(size)]
    read_before = s.engine.bytes_read
    groups = []
    real = s.engine._read_group

    def counted(slots, parts_list, group, hashed):
        groups.append(sorted(slots[i] for i in group))
        return real(slots, parts_list, group, hashed)

    s.engine._read_group = counted
    got = s.read_into(found, outs)
    # Runs of at most 16 slots (1 MiB); warm, k7 was already dropped by the
    # first read and splits the first run.  Only engines that gain from it
    # read runs together (direct: requests; mmap reads warm blocks faster
    # one by one).
    want = ([list(range(0, 16)), list(range(16, 32)), list(range(32, 36))] if cold else
            [list(range(0, 7)), list(range(8, 24)), list(range(24, 36))])
    assert sorted(groups) == (want if s.engine.coalesce_below > size else [])
    for k, o, d in zip(order, outs, got):
        if k in ("k7",):
            assert d is None
        elif k == "short":
            assert d is not None and torch.equal(o, rand_tensor(100, 99))
        else:
            assert d is not None and torch.equal(o, vals[int(k[1:])]), k
    # A damaged value is read twice: the second read proves the damage.
    assert s.engine.bytes_read - read_before == 35 * size + 100 + (0 if found[-1] is None else 2 * size)
    assert s.stats()["checksum_failures"] == 1


def test_a_value_shorter_than_its_slot_ends_a_run_read_together(make_store):
    """Only values that fill their slot are read as one run: the bytes after
    a short value are not the next value's."""
    size = 64 << 10
    s = make_store(capacity_bytes=8 * size, slot_bytes=size)
    full, short = describe([(size,)], [torch.uint8], is_list=False), describe([(100,)], [torch.uint8], is_list=False)
    vals = [rand_tensor(size, 1), rand_tensor(100, 2), rand_tensor(size, 3), rand_tensor(size, 4)]
    assert s.write(["a", "short", "b", "c"], vals, [full, short, full, full]) == [True] * 4
    assert [s.entry(k).slot for k in ("a", "short", "b", "c")] == [0, 1, 2, 3]
    outs = [s.engine.empty(v.numel()) for v in vals]  # aligned, as a host's buffers are
    got = s.read_into(s.lookup(["a", "short", "b", "c"]), outs)
    assert all(d is not None for d in got) and all(torch.equal(o, v) for o, v in zip(outs, vals))


@pytest.mark.parametrize("cold", [False, True])
def test_values_of_several_checksum_blocks_read_one_after_another_are_verified(make_store, cold):
    """A batch read value by value in the caller (spread_from above the
    values: what a tuned engine or a 2-core host may choose) still checks
    each value against the format's block-wise checksum."""
    n = CHECKSUM_BLOCK + 4096
    s = make_store(capacity_bytes=3 * 2 * CHECKSUM_BLOCK, slot_bytes=2 * CHECKSUM_BLOCK)
    vals = [rand_tensor(n, i) for i in range(3)]
    assert all(s.put_many(["a", "b", "c"], vals))
    s.engine.spread_from = 1 << 40
    if cold:
        s.engine.drop_cache()
    outs = [s.engine.empty(n) for _ in vals]
    assert s.get_many_into(["a", "b", "c"], outs) == [True] * 3
    assert all(torch.equal(o, v) for o, v in zip(outs, vals))
    assert s.stats()["checksum_failures"] == 0 and s.stats()["misses"] == 0


def test_a_cold_batch_of_small_values_is_asked_for_at_once(tmp_path):
    """Through the page cache (mmap), a batch of small values found out of
    the cache asks the kernel for every value before reading the first, so
    the disk sees the batch's reads together; warm, it asks for nothing.
    Every value still comes back right."""
    size = 64 << 10
    with SlabStore.open(tmp_path / "store", capacity_bytes=40 * size, slot_bytes=size, io="mmap") as s:
        keys = [f"k{i}" for i in range(8)]
        vals = [rand_tensor(size - 7 * i, i) for i in range(8)]
        assert s.put_many(keys, vals) == [True] * 8
        asked = []
        real = s.engine._readahead
        s.engine._readahead = lambda offset, n: (asked.append((offset, n)), real(offset, n))
        for cold in (True, False):
            if cold:
                drop_until_cold(s)
            asked.clear()
            outs = [torch.zeros(size - 7 * i, dtype=torch.uint8) for i in range(8)]
            assert s.get_many_into(keys, outs) == [True] * 8
            assert all(torch.equal(o, v) for o, v in zip(outs, vals))
            want = sorted((s.geometry.slot_offset(s.entry(k).slot), size - 7 * i) for i, k in enumerate(keys))
            assert sorted(asked) == (want if cold else [])


def test_a_value_whose_head_is_cached_is_read_cold_and_each_cold_reader_opens_its_own(tmp_path):
    """Readahead past one value brings the head of the next slot into the
    page cache: a batch is judged cold by a value's last page, not its
    first.  Cold large values are read whole through each reader thread's
    own open of the slab (the kernel keeps readahead state per open file),
    and those opens are closed with the store."""
    from slabcache.device import mmap as mmap_engine

    n = mmap_engine.COLD_WHOLE_FROM + 12345
    s = SlabStore.open(tmp_path / "store", capacity_bytes=6 * (n + (1 << 20)), slot_bytes=n + (1 << 20), io="mmap")
    try:
        keys = [f"k{i}" for i in range(4)]
        vals = [rand_tensor(n, i) for i in range(4)]
        assert s.put_many(keys, vals) == [True] * 4
        s.engine.drop_cache()
        with open(tmp_path / "store" / "slab", "rb") as f:  # the heads cached, as readahead leaves them
            for k in keys:
                f.seek(s.geometry.slot_offset(s.entry(k).slot))
                f.read(1 << 20)
        whole = []
        real = s.engine._read_whole
        s.engine._read_whole = lambda slot, parts, hashed: (whole.append(slot), real(slot, parts, hashed))[1]
        outs = [torch.zeros(n, dtype=torch.uint8) for _ in keys]
        assert s.get_many_into(keys, outs) == [True] * 4
        assert all(torch.equal(o, v) for o, v in zip(outs, vals))
        assert sorted(whole) == sorted(s.entry(k).slot for k in keys)
        readers = list(s.engine._reader_fds)
        assert readers and s.engine.fd not in readers
    finally:
        s.close()
    for fd in readers:
        with pytest.raises(OSError):
            os.fstat(fd)
