"""The core's parts on their own: the slot allocator (its abort paths
included), the reader and the use tracker, assembled by hand over a slab,
an index and a use tracker, without a SlabStore."""

import os

import pytest
import torch

from slabcache.core.allocator import FreeSlot, PutStatus, Reservation, SlotAllocator
from slabcache.core.items import Item
from slabcache.core.reader import Reader
from slabcache.core.uses import MAX_PENDING_USES, UseTracker
from slabcache.core.values import described
from slabcache.device import make_engine
from slabcache.device.slabfile import SlotRecords, create_slab
from slabcache.errors import CorruptStoreError, StorageFullError
from slabcache.format.header import pack_header
from slabcache.format.keys import make_key
from slabcache.format.records import record_meta
from slabcache.format.keys import key_hash
from slabcache.index import Index, IndexTxn
from slabcache.index.policy import LRU


class Parts:
    """A slab, its records, an index, a use tracker and an allocator."""

    def __init__(self, tmp_path, slots: int = 4, inline: bool = True):
        d = tmp_path / "store"
        d.mkdir()
        self.g, cid = create_slab(str(d / "slab"), slots * 4096, 4096)
        self.index = Index.acquire(str(d / "index"), map_size=1 << 24, create=True)
        with self.index.write() as t:
            t.init_store(cid, pack_header(self.g, cid), LRU())
        self.lock_fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        self.owner = self.index.liveness.claim(self.lock_fd)
        self.records = SlotRecords(str(d / "slab"), self.g, writable=True)
        self.engine = make_engine("mmap", str(d / "slab"), self.g)
        self.uses = UseTracker(LRU())
        self.index.add_prelude(self.uses)
        self.alloc = SlotAllocator(self.index, self.records, self.g, LRU(), self.owner, self.uses,
                                   str(d), inline_puts=inline)
        self.reader = Reader(self.engine, self.index, self.alloc, self.uses, True, self.g, str(d))

    def item(self, key: str, seed: int = 0, n: int = 1000) -> Item:
        v = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        return Item(make_key(key), [v], described([v], False))

    def write(self, slot: int, gen: int, item: Item) -> int:
        csum = self.engine.write(slot, item.parts, hashed=True)
        self.records.write_fields(slot, gen, item.desc.length, csum, key_hash(item.key.canon),
                                  record_meta(item.key.canon, item.desc.encoded))
        return csum

    def put(self, item: Item) -> PutStatus:
        r = self.alloc.reserve(item.key)
        if isinstance(r, PutStatus):
            return r
        return r.commit(item, self.write(r.slot, r.generation, item))

    def close(self):
        self.alloc.close()
        self.index.remove_prelude(self.uses)
        self.engine.close()
        self.records.close()
        self.index.release()
        os.close(self.lock_fd)


@pytest.fixture
def parts(tmp_path):
    p = Parts(tmp_path)
    yield p
    p.close()


# ------------------------------------------------------------------ allocator


def test_a_free_slot_is_claimed_written_and_committed_in_one_transaction(parts):
    item = parts.item("a")
    with parts.alloc.claim_free(item.key) as free:
        assert isinstance(free, FreeSlot) and (free.slot, free.generation) == (0, 1)
        free.commit(item.desc.length, parts.write(free.slot, free.generation, item), item.desc.encoded)
    assert free.status is PutStatus.STORED
    with parts.alloc.claim_free(item.key) as again:
        assert again.slot is None
    assert again.status is PutStatus.PRESENT
    assert parts.uses.pending_counters()["puts"] == 1


def test_a_failed_write_inside_a_claim_leaves_the_slot_free_and_empty(parts):
    item = parts.item("a")
    with pytest.raises(OSError):
        with parts.alloc.claim_free(item.key) as free:
            parts.write(free.slot, free.generation, item)
            raise OSError("injected after the write")
    assert parts.records.read(0) is None  # the record went with the abort
    with parts.index.read() as t:
        assert t.entry_count() == 0 and t.free_count(parts.g.slot_count) == 4


def test_reservations_commit_and_a_repeated_key_points_at_its_first(parts):
    a, b = parts.item("a", 1), parts.item("b", 2)
    got = parts.alloc.reserve_many([a.key, b.key, a.key])
    assert [type(x) for x in got] == [Reservation, Reservation, int] and got[2] == 0
    done = [(got[0], a, parts.write(got[0].slot, got[0].generation, a)),
            (got[1], b, parts.write(got[1].slot, got[1].generation, b))]
    assert parts.alloc.commit_many(done) == [PutStatus.STORED, PutStatus.STORED]
    assert parts.alloc.reserve_many([a.key]) == [PutStatus.PRESENT]


def test_a_reservation_taken_away_is_lost_and_a_key_stored_meanwhile_is_present(parts):
    a = parts.item("a")
    r1 = parts.alloc.reserve(a.key)
    r2 = parts.alloc.reserve(a.key)  # two puts of one key race
    with parts.index.write() as t:
        t.unreserve(r2.slot)  # a repair took r2 away
    assert r1.commit(a, parts.write(r1.slot, r1.generation, a)) is PutStatus.STORED
    assert r2.commit(a, 0) is PutStatus.LOST
    r3 = parts.alloc.reserve_many([parts.item("x").key])[0]
    parts.write(r3.slot, r3.generation, a)  # its record names a
    with parts.index.write() as t:  # someone stored x meanwhile
        t.add(make_key("x").ikey, make_key("x").canon, 3, 1, 10, 0, b"", LRU(), 0.0)
    x = Item(make_key("x"), a.parts, a.desc)
    assert r3.commit(x, 0) is PutStatus.PRESENT
    assert parts.records.read(r3.slot) is None  # freed, and its record with it


def test_abandoned_reservations_go_back_now_or_with_the_next_write(parts, monkeypatch):
    r = parts.alloc.reserve(parts.item("a").key)
    parts.alloc.abandon([r])
    with parts.index.read() as t:
        assert t.reservations() == [] and t.is_free(r.slot)
    r = parts.alloc.reserve(parts.item("b").key)

    def full(*a, **kw):
        raise StorageFullError("injected: no room")

    monkeypatch.setattr(parts.index, "flush", full)
    parts.alloc.abandon([r])  # cannot give it back now: owed
    assert parts.alloc.pending_keys() == 1
    monkeypatch.undo()
    with pytest.raises(RuntimeError):  # a write that aborts takes nothing away for good
        with parts.index.write():
            raise RuntimeError("injected")
    assert parts.alloc.pending_keys() == 1
    with parts.index.write():  # the next write that commits gives it back
        pass  # its preludes are the work
    with parts.index.read() as t:
        assert t.reservations() == [] and parts.alloc.pending_keys() == 0


def test_rejected_when_every_slot_is_pinned(parts):
    for i in range(4):
        assert parts.put(parts.item(f"k{i}", i)) is PutStatus.STORED
    with parts.index.write() as t:
        for i in range(4):
            t.pin(make_key(f"k{i}").ikey, parts.owner)
    assert parts.alloc.reserve(parts.item("new").key) is PutStatus.REJECTED
    assert parts.uses.pending_counters()["rejected_puts"] == 1


# ------------------------------------------------------------------ reader


def test_the_reader_finds_reads_and_proves(parts):
    a = parts.item("a", 3)
    parts.put(a)
    assert parts.reader.find(make_key("nope")) is None
    ref, plan = parts.reader.find(a.key)
    assert ref.length == 1000 and plan.desc == a.desc
    out = torch.empty(1000, dtype=torch.uint8)
    assert parts.reader.read(ref, [out]) and torch.equal(out, a.parts[0])
    f = parts.reader.lookup([a.key])[0]
    assert f.length == 1000 and f.desc == a.desc
    assert parts.reader.lookup([a.key, make_key("nope")])[1] is None
    assert parts.uses.pending_counters()["misses"] == 2


def test_a_read_of_an_entry_replaced_meanwhile_is_a_miss(parts):
    a = parts.item("a", 3)
    parts.put(a)
    f = parts.reader.lookup([a.key])[0]
    with parts.index.write() as t:  # evicted and the slot reused, between lookup and read
        parts.alloc.free(t, t.entry(a.key.ikey))
    parts.put(parts.item("b", 4))
    out = torch.empty(1000, dtype=torch.uint8)
    assert parts.reader.read_many([f.ref], [[out]]) == [False]


def test_a_damaged_payload_is_a_miss_and_its_entry_is_dropped(parts):
    a = parts.item("a", 3)
    parts.put(a)
    f = parts.reader.lookup([a.key])[0]
    bad = a.parts[0].clone()
    bad[10] ^= 1
    parts.engine.write(f.ref.slot, [bad])
    out = torch.empty(1000, dtype=torch.uint8)
    assert not parts.reader.read(f.ref, [out])
    assert parts.reader.find(a.key) is None
    with parts.index.read() as t:
        assert t.counters()["checksum_failures"] == 1  # written with the drop


def test_an_entry_the_slab_cannot_hold_is_refused_before_any_read(parts):
    a = parts.item("a", 3)
    parts.put(a)
    with parts.index.write() as t:
        e = t.entry(a.key.ikey)
        t.drop_entry_key(a.key.ikey)
        t.add(a.key.ikey, a.key.canon, 99, e.generation, 1000, 0, a.desc.encoded, LRU(), 0.0)
    with pytest.raises(CorruptStoreError, match="slabcache fsck"):
        parts.reader.find(a.key)


# ------------------------------------------------------------------ use tracker


def test_uses_within_the_refresh_window_move_nothing_but_count(parts):
    u = UseTracker(LRU(), refresh_seconds=60)
    a = parts.item("a")
    parts.put(a)
    ref = parts.reader.find(a.key)[0]
    u.hit_many([ref._replace(used=1e12)])  # used "just now": not recorded
    assert u.pending_keys() == 0 and u.pending_counters()["hits"] == 1
    u.hit_many([ref._replace(used=0.0)])
    assert u.pending_keys() == 1 and u.pending_counters()["bytes_read"] == 2000


def test_flushed_uses_are_written_and_given_back_on_abort(parts):
    a = parts.item("a")
    parts.put(a)
    ref = parts.reader.find(a.key)[0]
    u = parts.uses
    with parts.index.write():
        pass  # the put's counters out of the way
    u.hit(ref)
    with pytest.raises(RuntimeError):
        with parts.index.write() as t:  # the tracker runs first in it, then the abort
            assert isinstance(t, IndexTxn) and u.pending_keys() == 0
            raise RuntimeError("injected")
    assert u.pending_keys() == 1  # given back
    with parts.index.write():
        pass  # its preludes are the work
    with parts.index.read() as t:
        assert t.entry(a.key.ikey).use.hits == 1


def test_a_tracker_that_records_no_uses_keeps_counters_only():
    u = UseTracker(LRU(), record_uses=False)
    from slabcache.index.entry import EntryRef

    refs = [EntryRef(b"k%d" % i, b"k%d" % i, i, 1, 10, 0, b"") for i in range(5)]
    assert not u.hit_many(refs)
    assert u.pending_keys() == 0 and u.pending_counters()["hits"] == 5


def test_uses_given_back_past_the_cap_are_forgotten():
    u = UseTracker(LRU())
    u.give_back(({b"k%d" % i: (1, 0.0, i, 1) for i in range(10)}, None))
    assert u.pending_keys() == 10
    u.give_back(({b"x%d" % i: (1, 0.0, i, 1) for i in range(MAX_PENDING_USES)}, None))
    assert u.pending_keys() == 10  # the index keeps refusing them: not hoarded


def test_pending_uses_keep_their_order_and_uses_given_back_go_before_them():
    """A flush records uses in the order they wait in: the eviction order."""
    u = UseTracker(LRU())
    from slabcache.index.entry import EntryRef

    ref = {k: EntryRef(k, k, i, 1, 10, 0, b"") for i, k in enumerate([b"a", b"b", b"c"])}
    u.hit_many([ref[b"a"], ref[b"b"], ref[b"a"]])  # a's second use is the later one
    assert list(u._uses) == [b"b", b"a"] and u._uses[b"a"][0] == 2
    u.give_back(({b"c": (1, 0.0, 2, 1), b"a": (3, 0.0, 0, 1)}, None))  # taken before those
    assert list(u._uses) == [b"c", b"b", b"a"] and u._uses[b"a"][0] == 5


def test_a_use_of_a_replaced_entry_is_not_counted_with_its_successors():
    """Another process replaced an entry while a use of it waited: a read of
    the new entry starts its own use (a flush drops the old entry's, as it
    names a slot and generation no longer stored), and a use taken back of
    the old entry adds nothing to the new one's."""
    from slabcache.index.entry import EntryRef

    u = UseTracker(LRU())
    old, new = EntryRef(b"a", b"a", 0, 1, 10, 0, b""), EntryRef(b"a", b"a", 3, 2, 10, 0, b"")
    u.hit_many([old, old])
    u.hit_many([new])
    assert u._uses[b"a"][0] == 1 and u._uses[b"a"][2:] == [3, 2]
    u.give_back(({b"a": (4, 0.0, 0, 1)}, None))
    assert u._uses[b"a"][0] == 1 and u._uses[b"a"][2:] == [3, 2]
    u.give_back(({b"a": (4, 0.0, 3, 2)}, None))  # the same entry's: counted
    assert u._uses[b"a"][0] == 5


def test_a_handle_that_only_misses_still_writes_its_counters(parts, monkeypatch):
    import slabcache.core.uses as uses_module

    monkeypatch.setattr(uses_module, "COUNTER_FLUSH_SECONDS", 0.0)
    for i in range(3):
        assert parts.reader.find(make_key(f"nope{i}")) is None
    with parts.index.read() as t:
        assert t.counters()["misses"] == 3  # written, not only pending
