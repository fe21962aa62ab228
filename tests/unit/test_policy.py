"""Policies order slot numbers from use statistics alone: no disk, no index."""

import pytest

from slabcache import ConfigError
from slabcache.index.policy import POLICIES, UseStats, make_policy, slot_of


class Model:
    """Entries -> use stats, evicting by sorting the policy's order keys."""

    def __init__(self, name):
        self.p = make_policy(name)
        self.clock = 0
        self.uses = {}

    def insert(self, slot):
        self.clock += 1
        self.uses[slot] = UseStats(self.clock, 0, self.clock)

    def use(self, slot):
        self.clock += 1
        u = self.uses[slot]
        self.uses[slot] = UseStats(self.clock, u.hits + 1, u.inserted)

    def victim(self, pinned=()):
        keys = sorted((self.p.order_key(s, u) for s, u in self.uses.items()),
                      reverse=self.p.from_end)
        for k in keys:
            if slot_of(k) not in pinned:
                return slot_of(k)
        return None


@pytest.mark.parametrize("name,uses,victim", [
    ("lru", [0, 2], 1), ("mru", [0, 2], 2), ("fifo", [0, 1, 2], 0),
    ("lfu", [0, 0, 1, 2, 2], 3), ("lfu", [0, 1, 2, 3], 0),  # tie on hits: least recent
])
def test_victims(name, uses, victim):
    m = Model(name)
    for s in range(4):
        m.insert(s)
    for s in uses:
        m.use(s)
    assert m.victim() == victim


def test_pinned_slots_are_skipped():
    m = Model("lru")
    for s in range(3):
        m.insert(s)
    assert m.victim(pinned={0, 1}) == 2
    assert m.victim(pinned={0, 1, 2}) is None


def test_large_slot_numbers_and_clock_sort_numerically():
    m = Model("lru")
    m.uses = {7: UseStats(2**40, 0, 1), 2**33: UseStats(255, 0, 2)}
    assert m.victim() == 2**33


def test_names_are_lmcache_names_case_insensitive():
    assert sorted(POLICIES) == ["fifo", "lfu", "lru", "mru"]
    assert make_policy("LRU").name == "lru"
    with pytest.raises(ConfigError, match="use one of"):
        make_policy("arc")
