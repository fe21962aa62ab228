"""The LMDB index on its own: transactions over a bare environment, no slab."""

import os

import pytest

from slabcache.index import Index
from slabcache.index.policy import LRU, make_policy
from slabcache.index import owner as owners


@pytest.fixture
def index(tmp_path):
    idx = Index.acquire(str(tmp_path / "index"), map_size=1 << 24, create=True)
    with idx.write() as t:
        t.init_store(b"c" * 16, b"header", make_policy("lfu"))
    yield idx
    idx.release()


def _insert(t, key, slot, gen=1, policy=None):
    t.add(key, key, slot, gen, 10, 99, b"", policy or t.policy(), 0.0)
    return t.entry(key)


def test_store_settings_are_recorded(index):
    with index.read() as t:
        assert t.creation_id() == b"c" * 16 and t.header_copy() == b"header"
        assert t.policy().name == "lfu"


def test_slots_come_from_the_free_list_then_the_high_water_mark(index):
    with index.write() as t:
        assert [t.take_free_slot(3) for _ in range(4)] == [(0, 0), (1, 0), (2, 0), None]
        t.release_slot(1, 5)
        assert t.free_count(3) == 1 and t.take_free_slot(3) == (1, 5)


@pytest.fixture
def me(index, tmp_path):
    """A live owner: a handle holding its lock on the store's lock file."""
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    yield index.liveness.claim(fd)
    os.close(fd)


def test_free_entry_is_the_one_way_out(index, me):
    with index.write() as t:
        e = _insert(t, b"sk", slot=4, gen=3)
        t.pin(b"sk", me)
        assert t.pin_count(b"sk") == 1 and t.evict_next(t.policy()) is None  # pinned
        t.free_entry(e, t.policy())
    with index.read() as t:
        assert t.entry(b"sk") is None and t.all_pins() == []
        assert dict(t.free_slots()) == {4: 3} and list(t.order_keys()) == []


def test_victim_follows_the_policy(index):
    lru = LRU()
    with index.write() as t:
        t.set_policy(lru)
        a = _insert(t, b"a", 0, policy=lru)
        _insert(t, b"b", 1, policy=lru)
        t.record_uses({a.ikey: (1, 1.0, a.slot, a.generation)}, lru)  # a is now the most recent
        assert t.evict_next(lru) == (1, 1)  # b's slot and generation, b gone
        assert t.entry(b"b") is None and t.entry(b"a") is not None
        assert [ikey for _k, ikey in t.order_keys()] == [b"a"]


def _filed(t, policy):
    """Each entry's order key as the policy computes it, against the order table."""
    want = sorted((policy.order_key(e.slot, e.use), e.ikey) for e in t.entries())
    return want, list(t.order_keys())


@pytest.mark.parametrize("policy", ["lru", "fifo", "mru", "lfu"])
def test_a_batch_is_filed_in_order_even_when_the_clock_is_behind(index, policy):
    """A batch's entries and uses are appended to the order table when the
    policy files them last; an index whose clock was set back (so some keys
    sort before existing ones) still files every one of them."""
    pol = make_policy(policy)
    row = lambda k, slot: (slot, 1, k, k, 10, 99, b"")  # noqa: E731
    with index.write() as t:
        t.set_policy(pol)
        t.add_many([row(b"a", 0), row(b"b", 1)], pol, 0.0)
        t.set_tick(0)  # the clock behind the order table
        t.add_many([row(b"c", 2), row(b"d", 3)], pol, 0.0)
        want, got = _filed(t, pol)
        assert got == want and len(got) == 4
        a, c = t.entry(b"a"), t.entry(b"c")
        t.set_tick(0)
        t.record_uses({b"a": (2, 1.0, a.slot, a.generation), b"c": (1, 1.0, c.slot, c.generation)}, pol)
        want, got = _filed(t, pol)
        assert got == want and len(got) == 4
        assert t.entry(b"a").use.hits == 2 and t.entry(b"c").use.hits == 1


def test_reap_dead_releases_what_a_dead_process_held(index, me):
    # A handle whose lock is gone, and one recorded by format version 1
    # (pid and start time) for a pid that does not exist.
    dead = owners.OWNER.pack(os.getpid(), owners.TOKEN_BIT | 12345, 7)
    dead_v1 = owners.v1_owner(2 ** 31 - 7, 1)
    with index.write() as t:
        _insert(t, b"k", slot=0)
        _insert(t, b"j", slot=1)
        t.pin(b"k", dead)
        t.pin(b"j", me)
        t.reserve(5, 2, dead)
        t.reserve(6, 2, dead_v1)
        t.reserve(7, 2, me)
        for who in (dead, dead_v1, me):
            t.register_owner(who, writable=True)
        assert t.reap_dead() == {"reservations": 2, "pins": 1, "owners": 2}
        assert t.reservations() == [(7, 2, me)] and {(5, 2), (6, 2)} <= set(t.free_slots())
        assert t.pin_count(b"j") == 1 and [w for w, _t, _wr in t.owners()] == [me]


def test_a_lock_is_proof_of_life_whatever_the_pid(index, tmp_path):
    """Owners are judged by the lock they hold, not by /proc: one whose pid
    names no process here (another PID namespace) is alive while its lock
    is held, and dead once its descriptor is closed."""
    fd = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    own = index.liveness.claim(fd)
    elsewhere = owners.OWNER.pack(2 ** 31 - 7, *owners.OWNER.unpack(own)[1:])
    assert index.alive(own) and index.alive(elsewhere)
    os.close(fd)
    assert not index.alive(own) and not index.alive(elsewhere)


def test_one_environment_per_path_per_process(tmp_path, index):
    again = Index.acquire(index.path, map_size=1 << 24)
    assert again is index
    again.release()
    with index.read() as t:  # still open for the first user
        t.entry_count()
