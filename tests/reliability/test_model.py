"""The store against a model: a dict with the same capacity, policy and pin
rules, driven by hypothesis through single and batched puts and reads,
pins, removes, clears and reopens.  Every value read is checked, and the
eviction order is exact (``use_refresh_seconds=0``)."""

import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from slabcache import SlabStore

CAP = 4
# Short keys, and long ones indexed by a hash of the key.
NAMES = [f"m{i}" for i in range(6)] + ["L" * 450 + "a", "L" * 450 + "b"]
KEYS = st.sampled_from(NAMES)


def value(version: int) -> torch.Tensor:
    """A value of its own length and bytes for each version (a key keeps
    the version it was stored with: a put of a stored key rewrites nothing)."""
    g = torch.Generator().manual_seed(version)
    return torch.randint(-1000, 1000, (100 + version % 900,), dtype=torch.int32, generator=g)


class StoreVsModel(RuleBasedStateMachine):
    policy = "lru"
    engine = "mmap"

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.s = self._open()
        self.model: dict[str, list] = {}  # key -> [last use tick, version, inserted, uses]
        self.pins: dict[str, int] = {}
        self.tick = 0
        self.version = 0

    def _open(self) -> SlabStore:
        return SlabStore.open(self.dir, capacity_bytes=CAP * 4096, slot_bytes=4096, policy=self.policy,
                              io=self.engine, use_refresh_seconds=0)

    # -- the model -----------------------------------------------------------

    def _use(self, k):
        self.tick += 1
        m = self.model[k]
        m[0], m[3] = self.tick, m[3] + 1

    def _add(self, k, version):
        self.tick += 1
        self.model[k] = [self.tick, version, self.tick, 0]

    def _rank(self, k):
        tick, _v, inserted, uses = self.model[k]
        return {"lru": tick, "mru": -tick, "fifo": inserted, "lfu": (uses, tick)}[self.policy]

    def _victim(self, keep=()):
        free = [k for k in self.model if not self.pins.get(k) and k not in keep]
        return min(free, key=self._rank) if free else None

    def _pinned(self) -> set:
        return {k for k, n in self.pins.items() if n}

    def _check(self, k, got):
        if k in self.model:
            assert got is not None and torch.equal(got, value(self.model[k][1])), k
        else:
            assert got is None, k

    # -- rules ---------------------------------------------------------------

    @rule(k=KEYS)
    def put(self, k):
        self.version += 1
        got = self.s.put(k, value(self.version))
        if k in self.model:
            assert got
            self._use(k)
            return
        if len(self.model) >= CAP:
            victim = self._victim()
            if victim is None:
                assert got is False  # every slot pinned: nothing lost
                return
            del self.model[victim]
        assert got
        self._add(k, self.version)

    @rule(ks=st.lists(KEYS, min_size=1, max_size=6))
    def put_many(self, ks):
        base = self.version + 1
        self.version += len(ks)
        first = {}
        for i, k in enumerate(ks):
            first.setdefault(k, base + i)  # a repeated key shares its first occurrence's put
        got = self.s.put_many(ks, [value(base + i) for i in range(len(ks))])
        stored = [k for k in first if k in self.model]
        # The batch's stored keys are used first; then each new key, in
        # order, takes a free slot or evicts the victim among the entries
        # the batch does not name, and fails where every one is pinned.
        for k in stored:
            self._use(k)
        want = {k: True for k in stored}
        for k in first:
            if k in want:
                continue
            if len(self.model) >= CAP:
                victim = self._victim(keep=first)
                if victim is None:
                    want[k] = False
                    continue
                del self.model[victim]
            self._add(k, first[k])
            want[k] = True
        assert got == [want[k] for k in ks], (got, want)

    @rule(k=KEYS)
    def get(self, k):
        self._check(k, self.s.get(k))
        if k in self.model:
            self._use(k)

    @rule(ks=st.lists(KEYS, min_size=1, max_size=5))
    def get_many(self, ks):
        for k, got in zip(ks, self.s.get_many(ks)):
            self._check(k, got)
        for k in ks:
            if k in self.model:
                self._use(k)

    @rule(ks=st.lists(KEYS, min_size=1, max_size=5))
    def get_many_into(self, ks):
        descs = [self.s.describe(k) for k in ks]
        assert [d is not None for d in descs] == [k in self.model for k in ks]
        if not all(descs):
            return
        outs = [torch.empty(d.shapes[0], dtype=torch.int32) for d in descs]
        assert self.s.get_many_into(ks, outs) == [True] * len(ks)
        for k, out in zip(ks, outs):
            self._check(k, out)
            self._use(k)

    @rule(ks=st.lists(KEYS, min_size=1, max_size=3))
    def touch(self, ks):
        self.s.touch(ks)
        for k in ks:
            if k in self.model:
                self._use(k)

    @rule(k=KEYS)
    def pin(self, k):
        assert self.s.pin(k) == (k in self.model)
        if k in self.model:
            self.pins[k] = self.pins.get(k, 0) + 1

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data):
        k = data.draw(st.sampled_from(sorted(self._pinned())))
        assert self.s.unpin(k)
        self.pins[k] -= 1

    @rule(ks=st.lists(KEYS, min_size=1, max_size=5), pin=st.booleans())
    def prefix(self, ks, pin):
        n = 0
        while n < len(ks) and ks[n] in self.model:
            n += 1
        assert self.s.prefix(ks, pin=pin) == n
        for k in ks[:n] if pin else ():
            self.pins[k] = self.pins.get(k, 0) + 1

    @rule(ks=st.lists(KEYS, min_size=1, max_size=3, unique=True))
    def remove(self, ks):
        self.s.remove(ks, force=True)
        for k in ks:
            self.model.pop(k, None)
            self.pins.pop(k, None)

    @precondition(lambda self: not any(self.pins.values()))
    @rule()
    def clear(self):
        self.s.clear()
        self.model = {}

    @rule()
    def reopen(self):
        self.s.close()  # its pins lapse with it
        self.s = self._open()
        self.pins = {}

    @invariant()
    def same_keys(self):
        assert sorted(self.s.keys()) == sorted(self.model)
        st_ = self.s.stats()
        assert st_["slots_used"] == len(self.model)
        assert st_["slots_used"] + st_["slots_free"] == st_["slots_total"]

    def teardown(self):
        self.s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _machine(policy: str, engine: str):
    return type(f"StoreVsModel_{policy}_{engine}", (StoreVsModel,), {"policy": policy, "engine": engine})


@pytest.mark.parametrize("policy,engine", [
    ("lru", "mmap"), ("lru", "direct"), ("lfu", "mmap"), ("fifo", "mmap"), ("mru", "direct"),
])
def test_store_against_its_model(policy, engine):
    machine = _machine(policy, engine)
    machine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
    machine.TestCase("runTest").runTest()
