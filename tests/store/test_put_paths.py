"""The two ways a put reaches the index.

With the mmap engine and fast durability, a small put with a free slot
writes its payload inside its one index write transaction (no entry names a
free slot, so nobody can read it before the commit); otherwise it reserves
a slot, writes, and commits.  A small batch does the same for every key it
finds a free slot for, a group of up to INLINE_BATCH_BYTES at a time.  Such
stores of KEEP_FREE_FROM slots or more keep slots free ahead of need (a
single put: up to PUT_AHEAD; a batch: as many as it had keys; up to one in
KEEP_AHEAD_PER either way) so that puts at capacity take the first way too.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from slabcache import SlabIOError, SlabStore
from slabcache.core import uses as uses_module
from slabcache.admin.fsck import check
from slabcache.core.allocator import KEEP_AHEAD_PER, KEEP_FREE_FROM, PUT_AHEAD
from slabcache.testing import FaultyEngine, child_env, expected
from tests.helpers import rand_tensor


def _fill(s, n: int, prefix: str = "k") -> None:
    for i in range(n):
        assert s.put(f"{prefix}{i}", rand_tensor(100, i))


@pytest.mark.parametrize("engine", ["mmap"], indirect=True)
@pytest.mark.parametrize("n", [KEEP_FREE_FROM, 8 * KEEP_AHEAD_PER])
def test_a_large_store_keeps_slots_free_ahead_and_evicts_in_policy_order(make_store, n):
    ahead = min(PUT_AHEAD, n // KEEP_AHEAD_PER)  # 2, then 8
    s = make_store(capacity_bytes=n * 4096, policy="lru", use_refresh_seconds=0)  # exact order
    _fill(s, n)
    # Taking the last free slot evicted the least recent entries ahead of need.
    st = s.stats()
    assert st["slots_used"] == n - ahead and st["slots_free"] == ahead and st["evictions"] == ahead
    assert all(f"k{i}" not in s for i in range(ahead)) and all(f"k{i}" in s for i in range(ahead, n))
    assert s.get(f"k{ahead}") is not None  # now the most recent: the next ones go first
    for j in range(ahead - 1):  # each takes a slot kept free, evicting nothing
        assert s.put(f"new{j}", rand_tensor(100, 900 + j))
    assert s.stats()["evictions"] == ahead and s.stats()["slots_free"] == 1
    assert s.put("last", rand_tensor(100, 999))  # takes the last: the next victims go
    assert s.stats()["evictions"] == 2 * ahead and s.stats()["slots_used"] == n - ahead
    gone = [f"k{i}" for i in range(ahead + 1, 2 * ahead + 1)]
    assert all(k not in s for k in gone) and f"k{ahead}" in s and f"k{2 * ahead + 1}" in s
    assert "last" in s and all(f"new{j}" in s for j in range(ahead - 1))
    assert check(s.path, progress=False).exit_code == 0  # every victim's record cleared


@pytest.mark.parametrize("engine", ["mmap"], indirect=True)
def test_a_batch_at_capacity_leaves_slots_free_for_the_next_single_put(make_store):
    n = KEEP_FREE_FROM
    s = make_store(capacity_bytes=n * 4096, policy="lru")
    _fill(s, n)
    assert s.put_many([f"b{i}" for i in range(40)], [rand_tensor(100, i) for i in range(40)]) == [True] * 40
    assert s.stats()["slots_free"] == n // KEEP_AHEAD_PER  # kept for the next batch
    assert s.put("single", rand_tensor(100, 1))
    st = s.stats()
    assert st["slots_used"] == n - 1 and st["evictions"] == (n + 40 + 1) - (n - 1)  # all kept but those
    assert all(f"b{i}" in s for i in range(40)) and "single" in s


@pytest.mark.parametrize("engine", ["mmap"], indirect=True)  # io is chosen below
@pytest.mark.parametrize("slots,policy,io,durability", [
    (KEEP_FREE_FROM - 1, "lru", "mmap", "fast"), (KEEP_FREE_FROM, "mru", "mmap", "fast"),
    (KEEP_FREE_FROM, "lru", "direct", "fast"), (KEEP_FREE_FROM, "lru", "mmap", "strict")])
def test_other_stores_use_every_slot(make_store, slots, policy, io, durability):
    s = make_store(capacity_bytes=slots * 4096, policy=policy, io=io, durability=durability)
    _fill(s, slots)
    assert s.stats()["slots_used"] == slots and all(f"k{i}" in s for i in range(slots))
    assert s.put("more", rand_tensor(100, 1))
    assert s.stats()["slots_used"] == slots and "more" in s
    if policy == "mru":
        assert f"k{slots - 1}" not in s  # the most recent before "more"


def test_a_put_of_a_stored_key_is_a_use_not_a_write(make_store):
    s = make_store(capacity_bytes=4 * 4096, policy="lru")
    _fill(s, 4)
    written = s.engine.bytes_written
    assert s.put("k0", rand_tensor(100, 123))  # present: not rewritten
    assert s.engine.bytes_written == written and torch.equal(s.get("k0"), rand_tensor(100, 0))
    s.put("n", rand_tensor(100, 9))
    assert "k0" in s and "k1" not in s  # the put counted as a use of k0


@pytest.mark.parametrize("call", ["put", "put_many"])
def test_a_put_killed_inside_its_write_leaves_the_index_usable(tmp_path, engine, call):
    # A small put, and a small batch, hold the index's write lock while they
    # write: a process killed there must not leave the lock held, a slot
    # taken or a key half stored.  A batch commits only after every write:
    # a kill inside one leaves none of its keys stored.
    p = tmp_path / "s"
    doomed = ("s.put('doomed', expected('doomed'))" if call == "put" else
              "s.put_many(['doomed', 'doomed2'], [expected('doomed'), expected('doomed2')])")
    code = textwrap.dedent(f"""
        import sys
        from slabcache import SlabStore
        from slabcache.testing import FaultyEngine, expected
        s = SlabStore.open({str(p)!r}, capacity_bytes=16 * 4096, slot_bytes=4096,
                           io={engine!r}, engine_wrapper=FaultyEngine)
        assert s.put("before", expected("before"))
        s.engine.delay = 60
        s.engine.inject("slow")
        print("writing", flush=True)
        {doomed}
        print("put returned", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    try:
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(1.0)  # into the write, where it sleeps for 60 s
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with SlabStore.open(p, io=engine) as s:
        assert "doomed" not in s and "doomed2" not in s
        assert torch.equal(s.get("before"), expected("before"))
        assert s.put("after", expected("after"))  # the write lock was recovered
        st = s.stats()
        assert st["slots_used"] == 2 and st["slots_used"] + st["slots_free"] == st["slots_total"]
    res = check(p, deep=True)
    assert res.findings == [] and res.entries == 2


def test_a_failed_inline_write_keeps_pending_uses_and_counters(make_store, monkeypatch):
    # Every transaction writes the counters, so the failed put's transaction
    # takes some with it when it is aborted.
    monkeypatch.setattr(uses_module, "COUNTER_FLUSH_SECONDS", 0.0)
    s = make_store(capacity_bytes=8 * 4096, engine_wrapper=FaultyEngine, use_refresh_seconds=0)
    assert s.put("a", rand_tensor(100, 1))
    assert s.get("a") is not None and s.get("missing") is None
    s.engine.inject("eio_write")
    with pytest.raises(SlabIOError):
        s.put("b", rand_tensor(100, 2))
    s.engine.inject(None)
    assert "b" not in s and s.stats()["slots_used"] == 1
    assert s.put("c", rand_tensor(100, 3))  # writes what the failed put gave back
    assert s.entry("a").use.hits == 1
    st = s.stats()
    assert (st["hits"], st["misses"], st["puts"]) == (1, 1, 2)


@pytest.mark.parametrize("io,durability,size,want", [
    ("mmap", "fast", 4096, 1),
    ("mmap", "fast", 300 << 10, 2),  # over 256 KiB: the write does not hold the lock
    ("mmap", "strict", 4096, 2),  # the payload is synced before the commit
    ("direct", "fast", 4096, 2),  # each write waits for the device
])
def test_which_puts_take_one_index_transaction(tmp_path, io, durability, size, want):
    with SlabStore.open(tmp_path / "s", capacity_bytes=4 * (512 << 10), slot_bytes=512 << 10, io=io,
                        durability=durability) as s:
        s.put("warm", rand_tensor(size, 0))  # the first put also registers this handle
        index = s._index
        real, calls = index.write, []

        def counting(*a, **kw):
            calls.append(1)
            return real(*a, **kw)

        index.write = counting
        try:
            assert s.put("k", rand_tensor(size, 1))
        finally:
            index.write = real
        assert len(calls) == want and torch.equal(s.get("k"), rand_tensor(size, 1))


# -- batches ---------------------------------------------------------------

def _no_leak(s):
    st = s.stats()
    assert st["slots_used"] + st["slots_free"] + st["slots_reserved"] == st["slots_total"]
    assert st["slots_reserved"] == 0


@contextlib.contextmanager
def _counting_writes(s):
    """A list that gets one item per index write transaction ``s`` opens
    inside the block."""
    index, calls = s._index, []
    real = index.write

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    index.write = counting
    try:
        yield calls
    finally:
        del index.write  # the class's method again


@pytest.mark.parametrize("io,durability,count,size,want", [
    ("mmap", "fast", 8, 4096, 1),
    ("mmap", "fast", 40, 64 << 10, 3),  # 2.5 MiB: groups of 1 MiB, one transaction each
    ("mmap", "fast", 3, 300 << 10, 2),  # values over 256 KiB: reserved, written, committed
    ("mmap", "strict", 8, 4096, 2),  # the payloads are synced before the commit
    ("direct", "fast", 8, 4096, 2),  # each write waits for the device
])
def test_which_batches_take_one_index_transaction_a_group(tmp_path, io, durability, count, size, want):
    with SlabStore.open(tmp_path / "s", capacity_bytes=64 * (512 << 10), slot_bytes=512 << 10, io=io,
                        durability=durability) as s:
        s.put("warm", rand_tensor(100, 0))  # the first put also registers this handle
        keys = [f"k{i}" for i in range(count)]
        with _counting_writes(s) as calls:
            assert s.put_many(keys, [rand_tensor(size, i) for i in range(count)]) == [True] * count
        assert len(calls) == want
        for i, k in enumerate(keys):
            assert torch.equal(s.get(k), rand_tensor(size, i)), k
        st = s.stats()
        assert st["slots_reserved"] == 0 and st["slots_used"] == count + 1 and st["puts"] == count + 1


@pytest.mark.parametrize("engine", ["mmap"], indirect=True)
def test_batches_at_capacity_keep_the_next_batch_free_and_take_one_transaction(make_store):
    """The first batch at capacity finds one slot free: it claims it, evicts
    ahead of need as many slots as it has keys, and reserves the rest.  Every
    batch of that size after it takes one transaction and leaves as many
    slots free again, evicting in policy order."""
    n, batch = 4 * KEEP_FREE_FROM, 8  # at most one slot in 128 kept free: 8
    ahead = min(PUT_AHEAD, n // KEEP_AHEAD_PER)  # what the fill's last put evicted
    s = make_store(capacity_bytes=n * 4096, policy="lru")
    _fill(s, n)
    for j in range(ahead - 1):  # single puts take those slots but the last
        assert s.put(f"p{j}", rand_tensor(100, 500 + j))
    assert s.stats()["slots_free"] == 1 and s.stats()["evictions"] == ahead
    txns, evictions = [], s.stats()["evictions"]
    for b in range(4):
        keys = [f"b{b}-{i}" for i in range(batch)]
        with _counting_writes(s) as calls:
            assert s.put_many(keys, [rand_tensor(100, b * batch + i) for i in range(batch)]) == [True] * batch
        txns.append(len(calls))
        st = s.stats()
        assert st["slots_free"] == batch and st["slots_used"] == n - batch, (b, st)
        assert all(torch.equal(s.get(k), rand_tensor(100, b * batch + i)) for i, k in enumerate(keys))
    assert txns == [3, 1, 1, 1]
    gone = s.stats()["evictions"] - evictions
    assert gone == 4 * batch + batch - 1  # each batch's keys, and the slots kept free ahead
    first = ahead + gone  # the fill evicted the first ahead; the oldest go first
    assert all(f"k{i}" not in s for i in range(first)) and f"k{first}" in s
    _no_leak(s)


@pytest.mark.parametrize("engine", ["mmap"], indirect=True)
def test_batches_that_fill_a_store_to_its_last_slot_evict_nothing(make_store):
    """A host that sizes the store to its working set (vLLM's benchmark
    stores exactly its capacity) keeps every block: slots are kept free
    ahead of need only once the store has overflowed."""
    n, batch = 4 * KEEP_FREE_FROM, 8
    s = make_store(capacity_bytes=n * 4096, policy="lru")
    keys = [f"k{i}" for i in range(n)]
    for j in range(0, n, batch):
        assert s.put_many(keys[j:j + batch], [rand_tensor(100, i) for i in range(j, j + batch)]) == [True] * batch
    st = s.stats()
    assert st["evictions"] == 0 and st["slots_used"] == n and st["slots_free"] == 0
    assert all(k in s for k in keys)
    txns = []
    for b in range(3):  # overflowing: the first evicts, the next take one transaction
        with _counting_writes(s) as calls:
            s.put_many([f"o{b}-{i}" for i in range(batch)], [rand_tensor(100, i) for i in range(batch)])
        txns.append(len(calls))
    assert txns == [3, 1, 1] and s.stats()["slots_free"] == batch
    s.remove("o2-0")  # room again: nothing is evicted ahead until the store overflows anew
    evictions = s.stats()["evictions"]
    assert s.put_many([f"a{i}" for i in range(batch)], [rand_tensor(100, i) for i in range(batch)]) == [True] * batch
    st = s.stats()
    assert st["slots_free"] == 1 and st["evictions"] == evictions


@pytest.mark.parametrize("engine", ["mmap"], indirect=True)
def test_a_batch_never_writes_a_slot_a_committed_entry_still_names(make_store):
    """A batch writes its payloads while its transaction is open: the slots
    it writes must be free in what readers see (the last commit), never
    slots whose entries the same transaction evicts."""
    n, batch = 2 * KEEP_FREE_FROM, 4
    s = make_store(capacity_bytes=n * 4096, policy="lru")
    _fill(s, n)
    eng, index = s._writer.engine, s._index
    real, clashes, writes = eng.write_many, [], []

    def committed_slots() -> set:
        seen: set = set()

        def look():  # another thread: a reader, seeing the last commit only
            with index.read() as t:
                seen.update(e.slot for e in t.entries())

        th = threading.Thread(target=look)
        th.start()
        th.join()
        return seen

    def spying(slots, parts_list, hashed=False):
        writes.append(len(slots))
        clashes.extend(set(slots) & committed_slots())
        return real(slots, parts_list, hashed)

    eng.write_many = spying
    for b in range(6):
        keys = [f"b{b}-{i}" for i in range(batch)]
        assert s.put_many(keys, [rand_tensor(100, i) for i in range(batch)]) == [True] * batch
    assert len(writes) >= 6 and clashes == []


@pytest.mark.parametrize("engine", ["mmap"], indirect=True)
@pytest.mark.parametrize("error", [OSError(5, "injected"), KeyboardInterrupt()])
def test_a_failed_group_keeps_the_groups_before_it_and_leaves_its_slots_free(make_store, monkeypatch,
                                                                             error):
    """A batch of three 1 MiB groups whose second group's second value fails:
    the first group is committed, the second keeps its first value (an I/O
    error) or nothing (any other exception, which aborts its transaction),
    the third is not tried, and every other slot is free with its record
    cleared."""
    size = 256 << 10
    s = make_store(capacity_bytes=16 * size, slot_bytes=size)
    eng = s._writer.engine
    real, calls = eng._write_one, []

    def fail_sixth(offset, part, array, n):
        calls.append(offset)
        if len(calls) == 6:
            raise error
        real(offset, part, array, n)

    monkeypatch.setattr(eng, "_write_one", fail_sixth)
    keys = [f"k{i}" for i in range(12)]
    # Values one byte short of their slot never form runs: one write each.
    values = [rand_tensor(size - 1, i) for i in range(12)]
    with pytest.raises(SlabIOError if isinstance(error, OSError) else KeyboardInterrupt):
        s.put_many(keys, values)
    monkeypatch.setattr(eng, "_write_one", real)
    kept = keys[:5] if isinstance(error, OSError) else keys[:4]
    assert [k for k in keys if k in s] == kept
    for k in kept:
        assert torch.equal(s.get(k), values[keys.index(k)])
    _no_leak(s)
    assert s.stats()["slots_used"] == len(kept)
    assert check(s.path, deep=True, progress=False).exit_code == 0
    records = s._writer.records
    written = {s.entry(k).slot for k in kept}
    for slot in range(16):
        if slot not in written:
            assert records.read(slot) is None, slot


# -- long keys whose index keys collide ------------------------------------

@pytest.mark.parametrize("path,size", [
    ("put", 4096), ("put_many", 4096), ("one_batch", 4096),  # one index transaction
    ("put", 300 << 10), ("one_batch", 300 << 10),  # over 256 KiB: reserved, then committed
])
def test_a_long_key_whose_index_key_collides_replaces_the_other_entry_whole(tmp_path, monkeypatch,
                                                                           path, size):
    """Keys over MAX_INLINE_KEY bytes are indexed by a hash: should two
    share one, the later put frees the other's entry (its slot, its place
    in the order) on every put path, and reads still tell the keys apart."""
    from slabcache.format import keys as keys_module

    monkeypatch.setattr(keys_module, "index_key", lambda canon: b"#" + bytes(32))  # every long key
    first, second = "a" * 500, "b" * 500
    with SlabStore.open(tmp_path / "s", capacity_bytes=8 * (512 << 10), slot_bytes=512 << 10,
                        io="mmap") as s:
        if path == "one_batch":  # both in one batch: the later one stays
            assert s.put_many([first, second], [rand_tensor(size, 1), rand_tensor(size, 2)]) == [True] * 2
        elif path == "put_many":
            assert s.put(first, rand_tensor(size, 1))
            assert s.put_many([second, "short"], [rand_tensor(size, 2), rand_tensor(size, 3)]) == [True] * 2
        else:
            assert s.put(first, rand_tensor(size, 1)) and s.put(second, rand_tensor(size, 2))
        assert torch.equal(s.get(second), rand_tensor(size, 2))
        assert s.get(first) is None and first not in s
        want = 2 if path == "put_many" else 1  # the second key (and "short")
        st = s.stats()
        assert st["slots_used"] == want and st["slots_free"] == st["slots_total"] - want
        with s._index.read() as t:
            assert len(list(t.order_keys())) == want
    assert check(tmp_path / "s", progress=False).exit_code == 0
