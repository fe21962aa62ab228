"""Each room of IndexTxn on a bare environment: meta, entries, slots,
pins and repair (no slab, no store)."""

import os

import pytest

from slabcache.index import Index
from slabcache.index import owner as owners
from slabcache.index.policy import LFU, LRU, MRU
from slabcache.index.txn import next_generation


@pytest.fixture
def index(tmp_path):
    idx = Index.acquire(str(tmp_path / "index"), map_size=1 << 24, create=True)
    with idx.write() as t:
        t.init_store(b"c" * 16, b"header", LRU())
    yield idx
    idx.release()


@pytest.fixture
def me(index, tmp_path):
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    yield index.liveness.claim(fd)
    os.close(fd)


def _add(t, key: bytes, slot: int, gen: int = 1, policy=None, length: int = 10):
    t.add(key, key, slot, gen, length, 99, b"", policy or LRU(), 0.0)


# ------------------------------------------------------------------ meta


def test_meta_counters_add_up_and_survive_unknown_lengths(index):
    with index.write() as t:
        assert t.counters()["hits"] == 0
        t.add_counters({"hits": 3, "bytes_read": 300})
        t.add_counters({"hits": 2})
        t.add_counters({"misses": 0})  # nothing to write
    with index.read() as t:
        c = t.counters()
        assert (c["hits"], c["bytes_read"], c["misses"]) == (5, 300, 0)


def test_meta_clock_mark_policy_and_header(index):
    with index.write() as t:
        assert [t.next_tick() for _ in range(3)] == [1, 2, 3]
        t.set_next_unused(7)
        t.set_policy(LFU())
        t.set_header_copy(b"new header")
    with index.read() as t:
        assert t.next_unused() == 7 and t.policy().name == "lfu"
        assert t.header_copy() == b"new header" and t.creation_id() == b"c" * 16


# ------------------------------------------------------------------ entries


def test_entries_are_found_by_key_and_full_key(index):
    with index.write() as t:
        _add(t, b"sk", 3, gen=5)
        e = t.entry(b"sk")
        assert (e.slot, e.generation, e.length, e.checksum) == (3, 5, 10, 99)
        assert t.entry(b"sk", b"sk") == e and t.entry(b"sk", b"other") is None
        assert t.ref(b"sk", b"sk").slot == 3 and t.ref(b"sk", b"other") is None
        assert t.has(b"sk", b"sk") and not t.has(b"nope", b"nope")
        assert t.entry_count() == 1 and [x.ikey for x in t.entries()] == [b"sk"]


def test_uses_move_entries_in_the_order_and_stale_uses_are_dropped(index):
    lru = LRU()
    with index.write() as t:
        _add(t, b"a", 0, policy=lru)
        _add(t, b"b", 1, policy=lru)
        a = t.entry(b"a")
        t.record_uses({b"a": (2, 5.0, 0, a.generation), b"b": (1, 5.0, 1, 99)}, lru)  # b: stale
        assert [k for _o, k in t.order_keys()] == [b"b", b"a"]
        assert t.entry(b"a").use.hits == 2 and t.entry(b"b").use.hits == 0
        assert t.use_if_stored(b"b", b"b", lru, 6.0) and not t.use_if_stored(b"x", b"x", lru, 6.0)
        assert [k for _o, k in t.order_keys()] == [b"a", b"b"]


def test_free_entry_is_the_one_way_out(index, me):
    with index.write() as t:
        _add(t, b"k", 4, gen=3)
        t.pin(b"k", me)
        t.free_entry(t.entry(b"k"), LRU())
        assert t.entry(b"k") is None and t.all_pins() == [] and list(t.order_keys()) == []
        assert dict(t.free_slots()) == {4: 3} and t.vacated == [4]


# ------------------------------------------------------------------ slots


def test_free_slots_come_from_the_list_then_the_mark(index):
    with index.write() as t:
        assert [t.take_free_slot(3) for _ in range(4)] == [(0, 0), (1, 0), (2, 0), None]
        t.release_slot(1, 5)
        assert t.is_free(1) and t.free_count(3) == 1 and t.has_free_slot(3)
        assert t.take_free_slot(3) == (1, 5) and not t.has_free_slot(3)
        t.release_slot(2, 7)
        t.forget_free(2)  # a repair took it off the list: none is left
        assert not t.has_free_slot(3) and t.take_free_slot(3) is None
    with index.write() as t:  # what a transaction knows of the list ends with it
        t.release_slot(0, 1)
        t.release_slot(2, 1)
    with index.write() as t:
        assert t.take_free_slot(3) == (0, 1) and t.has_free_slot(3)
        assert t.take_free_slot(3) == (2, 1) and not t.has_free_slot(3)


def test_a_batch_takes_free_slots_from_the_list_then_the_mark_in_one_go(index):
    with index.write() as t:
        t.set_next_unused(12)
        for slot, gen in ((9, 4), (5, 2), (7, 3)):
            t.release_slot(slot, gen)
        assert t.take_free_slots(2, 14) == [(5, 2), (7, 3)]  # listed first, in slot order
        assert t.take_free_slots(5, 14) == [(9, 4), (12, 0), (13, 0)]  # all that is left
        assert t.next_unused() == 14 and t.free_count(14) == 0
        assert t.take_free_slots(1, 14) == [] and t.take_free_slot(14) is None
        t.release_slot(5, 6)  # free again: found in the same transaction
        assert t.take_free_slots(3, 14) == [(5, 6)]
    with index.read() as t:
        assert t.next_unused() == 14 and t.free_count(14) == 0


def test_claim_takes_a_free_slot_then_evicts(index, me):
    lru = LRU()
    never = lambda: False  # noqa: E731 - no reaping in this test
    with index.write() as t:
        got = t.claim(1, me, lru, never)
        assert got == (0, 1, 0) and t.reservation(0) == (1, me)
        t.settle(0, 1, me, b"a", b"a", 10, 7, b"", lru, 0.0)
        assert t.claim(1, me, lru, never, keep={b"a"}) is None  # kept: no victim
        assert t.entry(b"a") is not None
        assert t.claim(1, me, lru, never) == (0, next_generation(1), 1)
        assert t.entry(b"a") is None and t.vacated == [0]


def test_claim_returns_none_when_every_entry_is_pinned(index, me):
    with index.write() as t:
        _add(t, b"a", 0)
        t.set_next_unused(1)
        t.pin(b"a", me)
        assert t.claim(1, me, LRU(), lambda: False) is None


def test_settle_stores_finds_present_or_lost(index, me):
    lru = LRU()
    with index.write() as t:
        t.reserve(0, 1, me)
        assert t.settle(0, 2, me, b"k", b"k", 10, 1, b"", lru, 0.0) == "lost"  # another generation
        assert t.settle(0, 1, me, b"k", b"k", 10, 1, b"", lru, 0.0) == "stored"
        t.reserve(1, 1, me)
        assert t.settle(1, 1, me, b"k", b"k", 10, 1, b"", lru, 0.0) == "present"
        assert t.is_free(1) and 1 in t.vacated and t.reservations() == []


def test_a_batch_settled_in_one_loop_keeps_the_clock_and_the_free_list_true(index, me):
    """settle_many and take_free_slot keep the clock, the allocation mark
    and the free list in the transaction between calls: what they write
    must be what the next transaction reads."""
    lru = LRU()
    with index.write() as t:
        t.set_tick(10)
        got = [t.take_free_slot(8) for _ in range(3)]
        assert got == [(0, 0), (1, 0), (2, 0)]
        for slot, _gen in got:
            t.reserve(slot, 1, me)
        rows = [(slot, 1, k, k, 10, 5, b"") for (slot, _g), k in zip(got, (b"a", b"b", b"c"))]
        assert t.settle_many(rows, me, lru, 0.0) == ["stored"] * 3
        assert [t.entry(k).use.tick for k in (b"a", b"b", b"c")] == [11, 12, 13]
        assert t.tick() == 13
        t.release_slot(6, 4)  # the free list holds a slot again: it comes first
        assert t.take_free_slot(8) == (6, 4) and t.take_free_slot(8) == (3, 0)
    with index.write() as t:
        assert t.tick() == 13 and t.next_unused() == 4
        t.reserve(4, 1, me)
        assert t.settle_many([(4, 1, b"d", b"d", 10, 5, b"")], me, lru, 0.0) == ["stored"]
        assert t.entry(b"d").use.tick == 14
        assert [v for _k, v in t.order_keys()] == [b"a", b"b", b"c", b"d"]
    with index.read() as t:
        assert t.tick() == 14


def test_eviction_follows_the_policy_and_spares_pins(index, me):
    mru = MRU()
    with index.write() as t:
        for i, k in enumerate((b"a", b"b", b"c")):
            _add(t, k, i, policy=mru)
        t.pin(b"c", me)
        assert t.evict_next(mru) == (1, 1)  # the most recent unpinned: b
        assert t.free_next(LRU()) and t.is_free(0)  # lru's victim, a, onto the free list


# ------------------------------------------------------------------ pins


def test_pins_nest_and_belong_to_their_owner(index, me):
    other = owners.OWNER.pack(os.getpid(), owners.TOKEN_BIT | 777, 1)  # holds no lock: dead
    with index.write() as t:
        _add(t, b"k", 0)
        assert t.pin(b"k", me) == 1 and t.pin(b"k", me) == 2
        t.pin(b"k", other)
        assert t.pin_count(b"k") == 2  # the dead owner's pin does not count
        assert t.unpin(b"k", me) and t.pin_count(b"k") == 1
        assert not t.unpin(b"k", b"\0" * 16)
        t.register_owner(me, writable=True)
        assert t.live_pids() == [os.getpid()]
        t.release_owner(me)
        assert [w for _k, w, _n in t.all_pins()] == [other] and t.owners() == []


# ------------------------------------------------------------------ repair


def test_repair_operations(index):
    lru = LRU()
    with index.write() as t:
        _add(t, b"a", 0, policy=lru)
        _add(t, b"b", 1, policy=lru)
        t.release_slot(5, 0)
        t.drop_entry_key(b"a")
        t.forget_free(5)
        assert [k for k, _v in t.raw_entries()] == [b"b"] and not t.is_free(5)
        t.rebuild_order(lru, [t.entry(b"b")])
        assert [k for _o, k in t.order_keys()] == [b"b"]
