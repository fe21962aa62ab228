"""Store conformance: every I/O engine must pass all of these (see conftest)."""

import os
import signal
import time

import pytest
import torch

from slabcache import (
    ConfigError, EntryTooLargeError, LayoutMismatchError, SlabStore, StoreClosedError,
    UnsupportedValueError,
)
from slabcache.format.checksum import CHECKSUM_BLOCK, checksum
from slabcache.format.values import DTYPE_NAMES
from slabcache.testing import FaultyEngine, child_env, expected

from tests.helpers import rand_tensor, run_py

DTYPES = [getattr(torch, n) for n in DTYPE_NAMES if hasattr(torch, n)]


def _random(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaN payloads included), dtype and shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ab = a.contiguous().reshape(-1).view(torch.uint8) if a.numel() else torch.empty(0)
    bb = b.contiguous().reshape(-1).view(torch.uint8) if b.numel() else torch.empty(0)
    return torch.equal(ab, bb)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_roundtrip_every_dtype(make_store, dtype):
    s = make_store(slot_bytes=8192)
    v = _random((3, 5, 7), dtype, seed=1)
    assert s.put("k", v)
    got = s.get("k")
    assert same_bytes(got, v)


@pytest.mark.parametrize("shape", [(), (1,), (0,), (4, 0, 3), (2, 3, 4, 5), (1000,)])
def test_roundtrip_shapes(make_store, shape):
    s = make_store(slot_bytes=8192)
    v = _random(shape, torch.float32, seed=2)
    assert s.put("k", v)
    assert same_bytes(s.get("k"), v)


def test_non_contiguous_values(make_store):
    s = make_store(slot_bytes=16384)
    base = _random((32, 48), torch.bfloat16, seed=3)
    for i, v in enumerate([base.t(), base[::2, 1::3], base.unsqueeze(0).expand(3, 32, 48)]):
        assert not v.is_contiguous()
        assert s.put(f"k{i}", v)
        assert same_bytes(s.get(f"k{i}"), v.contiguous())


def test_list_values_come_back_as_lists(make_store):
    s = make_store(slot_bytes=16384)
    v = [_random((2, 4, 8), torch.bfloat16, 4), _random((5,), torch.int64, 5),
         _random((3, 3), torch.float8_e4m3fn, 6)]
    assert s.put(b"multi", v)
    got = s.get(b"multi")
    assert isinstance(got, list) and len(got) == 3
    assert all(same_bytes(a, b) for a, b in zip(got, v))
    # A one-element list stays a list; a bare tensor stays a tensor.
    s.put("one", [v[0]])
    assert isinstance(s.get("one"), list)
    s.put("bare", v[0])
    assert isinstance(s.get("bare"), torch.Tensor)


def test_get_into(make_store):
    s = make_store(slot_bytes=8192)
    v = [_random((4, 16), torch.float16, 7), _random((8,), torch.int32, 8)]
    s.put("k", v)
    out = [torch.zeros(4, 16, dtype=torch.float16), torch.zeros(8, dtype=torch.int32)]
    assert s.get_into("k", out)
    assert all(same_bytes(a, b) for a, b in zip(out, v))
    # Non-contiguous destination still receives the right values.
    dst = torch.zeros(16, 4, dtype=torch.float16).t()
    s.put("t", v[0])
    assert s.get_into("t", dst) and same_bytes(dst.contiguous(), v[0])
    assert not s.get_into("missing", out)
    with pytest.raises(UnsupportedValueError, match="stored tensor is float16"):
        s.get_into("t", torch.zeros(4, 16, dtype=torch.float32))
    with pytest.raises(UnsupportedValueError, match="stored value has 2"):
        s.get_into("k", out[0])


def test_get_into_view_does_not_touch_neighbours(make_store):
    # A 100-byte value read into a view of a larger buffer must leave the
    # bytes after the view alone, even with O_DIRECT's rounded-up reads.
    s = make_store()
    v = rand_tensor(100, 9)
    s.put("k", v)
    big = torch.full((8192,), 7, dtype=torch.uint8)
    off = 4096 - (big.data_ptr() % 4096)
    view = big[off:off + 100]
    assert s.get_into("k", view)
    assert torch.equal(view, v)
    assert bool((big[off + 100:] == 7).all()) and bool((big[:off] == 7).all())


# ------------------------------------------------------------------ geometry


def test_geometry_and_slot_fit(make_store, tmp_path):
    s = make_store(capacity_bytes=10 * 4096 + 100, slot_bytes=4000)
    st = s.stats()
    assert st["slot_bytes"] == 4096  # rounded up to the alignment
    assert st["slots_total"] == (10 * 4096 + 100) // 4096
    assert s.put("exact", rand_tensor(4096, 1))
    assert torch.equal(s.get("exact"), rand_tensor(4096, 1))
    with pytest.raises(EntryTooLargeError, match="does not fit a slot of 4096"):
        s.put("big", rand_tensor(4097, 2))
    assert torch.equal(s.get("exact"), rand_tensor(4096, 1))  # nothing lost
    assert "big" not in s


def test_slab_is_preallocated_with_bounded_overhead(tmp_path, engine):
    cap = 64 << 20
    for slot in (4096, 256 << 10, 32 << 20):
        with SlabStore.open(tmp_path / str(slot), capacity_bytes=cap, slot_bytes=slot, io=engine) as s:
            st = os.stat(tmp_path / str(slot) / "slab")
            assert st.st_size == s.stats()["file_bytes"]
            assert st.st_size - s.stats()["capacity_bytes"] <= cap // 100 + (1 << 20)
            assert st.st_blocks * 512 >= st.st_size  # blocks really reserved


def test_reopen_reads_geometry_and_rejects_mismatch(tmp_path, engine):
    p = tmp_path / "s"
    SlabStore.open(p, capacity_bytes=8 * 8192, slot_bytes=8192, io=engine).close()
    with SlabStore.open(p, io=engine) as s:
        assert s.stats()["slots_total"] == 8 and s.stats()["slot_bytes"] == 8192
    with SlabStore.open(p, capacity_bytes=8 * 8192, slot_bytes=8000, io=engine) as s:
        assert s.stats()["slot_bytes"] == 8192  # same after rounding: accepted
    with pytest.raises(LayoutMismatchError, match="slots of 8192 bytes"):
        SlabStore.open(p, capacity_bytes=8 * 8192, slot_bytes=4096, io=engine)
    with pytest.raises(LayoutMismatchError, match="compact --capacity"):
        SlabStore.open(p, capacity_bytes=16 * 8192, slot_bytes=8192, io=engine)


def test_file_count_does_not_grow(make_store, tmp_path):
    s = make_store(capacity_bytes=64 * 4096)

    def files():
        return sum(len(f) for _, _, f in os.walk(tmp_path / "store"))

    before = files()
    for i in range(200):  # fills, then evicts
        s.put(f"k{i}", rand_tensor(3000, i))
    assert files() == before
    assert len(s) == 64


# ------------------------------------------------------------------ semantics


def test_put_existing_does_not_rewrite(make_store):
    s = make_store()
    s.put("k", rand_tensor(100, 1))
    e1 = s.entry("k")
    assert s.put("k", rand_tensor(100, 2)) is True
    e2 = s.entry("k")
    assert (e2.slot, e2.generation) == (e1.slot, e1.generation)
    assert torch.equal(s.get("k"), rand_tensor(100, 1))
    assert e2.use.hits == e1.use.hits + 1  # counted as a use
    assert s.stats()["puts"] == 1


def test_contains_batched_contains_and_keys(make_store):
    s = make_store()
    for k in ["a", "b", "c", b"a"]:
        s.put(k, rand_tensor(10, 0))
    assert "a" in s and b"a" in s and "zz" not in s
    assert s.prefix(["a", "b", "x", "c"]) == 2
    assert s.prefix(["x", "a"]) == 0
    assert s.prefix([]) == 0
    assert sorted(map(repr, s.keys())) == sorted(map(repr, ["a", "b", "c", b"a"]))
    assert len(s) == 4
    # str and bytes keys are distinct.
    s.remove("a")
    assert "a" not in s and b"a" in s


def test_remove_frees_the_slot(make_store):
    s = make_store(capacity_bytes=2 * 4096)
    s.put("a", rand_tensor(10, 1))
    s.put("b", rand_tensor(10, 2))
    assert s.stats()["slots_free"] == 0
    assert s.remove("a") and not s.remove("a")
    assert s.stats()["slots_free"] == 1
    s.put("c", rand_tensor(10, 3))
    assert s.stats()["evictions"] == 0 and "b" in s


def test_long_keys(make_store):
    s = make_store(capacity_bytes=64 * 4096)
    keys = ["x" * 511, "y" * 1000, b"\xff" * 100_000, "model/with/slashes@8@3@" + "ab" * 300]
    for i, k in enumerate(keys):
        assert s.put(k, rand_tensor(64, i))
    for i, k in enumerate(keys):
        assert k in s
        assert torch.equal(s.get(k), rand_tensor(64, i))
    # Keys sharing a long prefix stay distinct.
    assert "y" * 999 not in s and "y" * 1001 not in s
    assert sorted(map(repr, s.keys())) == sorted(map(repr, keys))


# ------------------------------------------------------------------ policies


def _fill(s, n):
    for i in range(n):
        assert s.put(f"k{i}", rand_tensor(16, i))


@pytest.mark.parametrize("policy,uses,expected_victims", [
    ("lru", ["k0"], ["k1", "k2"]),  # k0 refreshed, so k1 then k2 go
    # Uses waiting for one flush keep their order: k0's second use is its last.
    ("lru", ["k0", "k1", "k2", "k3", "k0"], ["k1", "k2"]),
    ("mru", ["k1"], ["k1", "new0"]),  # most recent goes first: k1 (used), then the newcomer
    ("fifo", ["k0"], ["k0", "k1"]),  # use does not matter
    ("lfu", ["k0", "k0", "k2"], ["k1", "k3"]),  # fewest uses; ties by least recent
])
def test_eviction_order(make_store, policy, uses, expected_victims):
    # Exact order: every read moves its entry (no refresh window).
    s = make_store(capacity_bytes=4 * 4096, policy=policy, use_refresh_seconds=0)
    _fill(s, 4)
    for k in uses:
        assert s.get(k) is not None
    victims = []
    for j in range(2):
        before = set(s.keys())
        s.put(f"new{j}", rand_tensor(16, 100 + j))
        victims += sorted(before - set(s.keys()))
    assert victims == expected_victims
    assert s.stats()["evictions"] == 2


@pytest.mark.parametrize("policy,left", [
    ("lru", ["k1", "k3", "n0", "n1"]),  # k2, least recent once k1 is used, made room for n1
    ("fifo", ["k1", "k3", "n0", "n1"]),  # k1 came first, but the batch names it: k2
    ("lfu", ["k1", "k3", "n0", "n1"]),
    ("mru", ["k0", "k1", "k2", "n1"]),  # k1 most recent once used, but named: n0
])
@pytest.mark.parametrize("slot_bytes,nbytes", [(4096, 1000), (512 << 10, 300 << 10)])
def test_a_batch_keeps_its_stored_keys_when_it_evicts_for_its_new_ones(make_store, policy, left,
                                                                      slot_bytes, nbytes):
    """A put_many at capacity that names a stored key counts it as used
    and evicts for its new keys only entries it does not name: the stored
    key is neither evicted and written again nor lost while reported
    stored.  (Small values: after a batch that found no free slot; values
    over 256 KiB: always reserved.)"""
    s = make_store(capacity_bytes=4 * slot_bytes, slot_bytes=slot_bytes, policy=policy,
                   use_refresh_seconds=0)

    def value(i):
        return torch.full((nbytes // 4,), i, dtype=torch.int32)

    for i in range(4):
        assert s.put(f"k{i}", value(i))
    assert s.put_many(["n0"], [value(10)]) == [True]  # evicts k0 (MRU: k3)
    assert s.put_many(["n1", "k1"], [value(11), value(99)]) == [True, True]
    assert sorted(s.keys()) == left
    assert torch.equal(s.get("k1"), value(1))  # a use: not written again
    assert s.stats()["evictions"] == 2


@pytest.mark.parametrize("slots", [4, 256])  # 256: slots are freed ahead of need
def test_a_batch_that_runs_out_of_free_slots_keeps_its_stored_keys(make_store, slots):
    """FIFO's next victim is the oldest entry even when used; a batch that
    names it and needs one slot more than are free evicts others."""
    s = make_store(capacity_bytes=slots * 4096, policy="fifo")
    for i in range(slots):
        assert s.put(f"k{i}", rand_tensor(16, i))
    oldest = next(i for i in range(slots) if f"k{i}" in s)
    new = [f"n{j}" for j in range(s.stats()["slots_free"] + 1)]
    keys = new + [f"k{oldest}"]
    assert s.put_many(keys, [rand_tensor(16, 500 + j) for j in range(len(keys))]) == [True] * len(keys)
    assert all(k in s for k in keys) and f"k{oldest + 1}" not in s
    assert torch.equal(s.get(f"k{oldest}"), rand_tensor(16, oldest))


@pytest.mark.parametrize("policy,kept", [("mru", "k0"), ("lfu", "k1")])
def test_a_batch_never_evicts_its_own_new_entries(make_store, policy, kept):
    """A batch with more new keys than free slots: those written into free
    slots join the order first, and are then MRU's newest or LFU's least
    used entries; the keys after them evict entries the batch does not name."""
    s = make_store(capacity_bytes=4 * 4096, policy=policy, use_refresh_seconds=0)
    assert s.put("k0", rand_tensor(16, 0)) and s.put("k1", rand_tensor(16, 1))
    assert s.get("k0") is not None and s.get("k1") is not None  # each used once (LFU)
    keys = ["n0", "n1", "n2"]
    assert s.put_many(keys, [rand_tensor(16, 10 + j) for j in range(3)]) == [True] * 3
    assert sorted(s.keys()) == [kept, "n0", "n1", "n2"]  # MRU's newest went; LFU's least recent
    for j, k in enumerate(keys):
        assert torch.equal(s.get(k), rand_tensor(16, 10 + j))


@pytest.mark.parametrize("stored", [4, 6])  # 4: the first group fits the free slots
def test_a_batch_in_several_groups_never_evicts_its_earlier_groups(make_store, stored):
    """Values of 256 KiB go in 1 MiB groups of four; MRU's newest entries
    are an earlier group's, and a later group evicts the older ones."""
    size = 256 << 10
    s = make_store(capacity_bytes=8 * size, slot_bytes=size, policy="mru")
    for i in range(stored):
        assert s.put(f"k{i}", torch.full((size,), i, dtype=torch.uint8))
    keys = [f"n{j}" for j in range(8)]
    assert s.put_many(keys, [torch.full((size,), 10 + j, dtype=torch.uint8) for j in range(8)]) == [True] * 8
    assert sorted(s.keys()) == keys
    for j, k in enumerate(keys):
        assert torch.equal(s.get(k), torch.full((size,), 10 + j, dtype=torch.uint8))


def test_touch_counts_as_use_and_contains_does_not(make_store):
    s = make_store(capacity_bytes=3 * 4096, policy="lru")
    _fill(s, 3)
    s.touch(["k0"])
    assert s.contains("k1")  # not a use: k1 stays least recent
    s.put("n", rand_tensor(1, 9))
    assert "k1" not in s and "k0" in s


def test_use_refresh_window_skips_recent_uses_but_counts_hits(make_store, monkeypatch):
    s = make_store(capacity_bytes=3 * 4096, policy="lru", use_refresh_seconds=60)
    _fill(s, 3)
    assert s.get("k0") is not None  # used within 60 s of its put: order unchanged
    s.put("n0", rand_tensor(1, 9))
    assert "k0" not in s and "k1" in s
    assert s.stats()["hits"] == 1
    # Once the window has passed, a read moves the entry again.
    later = time.time() + 120
    monkeypatch.setattr(time, "time", lambda: later)
    assert s.get("k1") is not None
    s.put("n1", rand_tensor(1, 10))
    assert "k1" in s and "k2" not in s


def test_by_default_a_read_moves_its_entry_at_most_once_a_second(make_store, monkeypatch):
    """The default handle opens with the one-second window every host
    integration uses: a read within a second of the entry's last use moves
    nothing; a later one does; ``touch`` always does."""
    s = make_store(capacity_bytes=3 * 4096, policy="lru")
    assert s.options.use_refresh_seconds == 1.0
    _fill(s, 3)
    assert s.get("k0") is not None  # just written: no move, k0 stays least recent
    s.put("n0", rand_tensor(1, 9))
    assert "k0" not in s and "k1" in s
    s.touch(["k1"])  # an explicit use moves it whatever the window
    s.put("n1", rand_tensor(1, 10))
    assert "k1" in s and "k2" not in s
    later = time.time() + 2
    monkeypatch.setattr(time, "time", lambda: later)
    assert s.get("n0") is not None  # a second on: the read moves n0 past k1 and n1
    s.put("n2", rand_tensor(1, 11))
    assert "n0" in s and "k1" not in s


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), True, "1"])
def test_use_refresh_window_must_be_seconds(make_store, bad):
    with pytest.raises(ConfigError, match="use_refresh_seconds"):
        make_store(use_refresh_seconds=bad)


def test_policy_order_survives_reopen(tmp_path, engine):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=3 * 4096, slot_bytes=4096, policy="lru", io=engine,
                        use_refresh_seconds=0) as s:  # the read moves k0
        _fill(s, 3)
        s.get("k0")
    with SlabStore.open(p, io=engine) as s:
        assert s.policy.name == "lru"
        s.put("n", rand_tensor(1, 9))
        assert "k1" not in s and "k0" in s


def test_policy_change_on_reopen(tmp_path, engine):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=3 * 4096, slot_bytes=4096, policy="lru", io=engine,
                        use_refresh_seconds=0) as s:  # the read moves k0
        _fill(s, 3)
        s.get("k0")
    with SlabStore.open(p, policy="fifo", io=engine) as s:
        s.put("n", rand_tensor(1, 9))
        assert "k0" not in s  # FIFO ignores the use
    with SlabStore.open(p, io=engine) as s:
        assert s.policy.name == "fifo"


# ------------------------------------------------------------------ pins


def test_pinned_entries_are_never_evicted(make_store):
    s = make_store(capacity_bytes=3 * 4096)
    _fill(s, 3)
    assert s.pin("k0") and s.pin("k1") and not s.pin("missing")
    s.put("a", rand_tensor(1, 1))  # evicts k2, the only unpinned one
    assert "k0" in s and "k1" in s and "k2" not in s
    assert s.pin("a")
    assert s.put("b", rand_tensor(1, 2)) is False  # everything pinned
    assert sorted(s.keys()) == ["a", "k0", "k1"]
    assert all(s.get(k) is not None for k in ["a", "k0", "k1"])
    assert s.stats()["rejected_puts"] == 1
    assert s.unpin("k1") and not s.unpin("k1")
    assert s.put("b", rand_tensor(1, 2)) and "k1" not in s


def test_pins_nest_and_block_remove(make_store):
    s = make_store()
    s.put("k", rand_tensor(1, 1))
    s.pin("k")
    s.pin("k")
    assert s.pin_count("k") == 2
    assert not s.remove("k") and "k" in s
    s.unpin("k")
    assert s.pin_count("k") == 1
    assert s.remove("k", force=True) and "k" not in s
    assert s.pin_count("k") == 0


def test_pins_of_a_dead_process_lapse(tmp_path, engine):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=2 * 4096, slot_bytes=4096, io=engine) as s:
        _fill(s, 2)
    run_py(f"""
        import os, signal
        from slabcache import SlabStore
        s = SlabStore.open({str(p)!r}, io={engine!r})
        assert s.pin("k0") and s.pin("k1")
        os.kill(os.getpid(), signal.SIGKILL)
    """, check=False)
    with SlabStore.open(p, io=engine) as s:
        assert s.pin_count("k0") == 0
        assert s.put("n", rand_tensor(1, 1))


def test_pins_of_a_live_process_hold(tmp_path, engine):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=2 * 4096, slot_bytes=4096, io=engine) as s:
        _fill(s, 2)
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", f"""
import sys
from slabcache import SlabStore
s = SlabStore.open({str(p)!r}, io={engine!r})
s.pin("k0"); s.pin("k1")
print("pinned", flush=True)
sys.stdin.readline()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=child_env())
        try:
            assert child.stdout.readline().strip() == "pinned"
            assert s.pin_count("k0") == 1
            assert s.put("n", rand_tensor(1, 1)) is False
        finally:
            child.communicate("\n", timeout=30)
        assert s.put("n", rand_tensor(1, 1)) is True  # pins released on exit


# ------------------------------------------------------------------ integrity


def test_checksum_mismatch_is_a_miss(make_store, tmp_path):
    s = make_store()
    s.put("bad", rand_tensor(3000, 1))
    s.put("good", rand_tensor(3000, 2))
    e = s.entry("bad")
    with open(tmp_path / "store" / "slab", "r+b") as f:
        off = s.geometry.slot_offset(e.slot) + 1234
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))
    s.engine.drop_cache()
    assert s.get("bad") is None
    assert s.stats()["checksum_failures"] == 1
    assert "bad" not in s  # dropped
    # Recorded with the drop, not at a later flush: another process sees it
    # while this handle is still open (a killed process loses no failure).
    seen = run_py("""
        import sys
        from slabcache import SlabStore
        with SlabStore.open(sys.argv[1], readonly=True) as r:
            print(r.stats()["checksum_failures"], r.contains("bad"))
    """, str(tmp_path / "store"))
    assert seen.stdout.split() == ["1", "False"]
    assert torch.equal(s.get("good"), rand_tensor(3000, 2))


class _ChangedWhileRead(FaultyEngine):
    """Once armed, the next read's out changes after the slot's bytes land
    and before they are hashed, as when a caller writes into the buffer it
    passed while the read fills it."""

    armed = 0

    def read_into(self, slot, parts, hashed=False):
        digest = self.inner.read_into(slot, parts, hashed)
        if self.armed:
            self.armed -= 1
            parts[0][0] ^= 0xFF
            digest = checksum([p.numpy() for p in parts]) if hashed else digest
        return digest


@pytest.mark.parametrize("many", [False, True])
def test_an_out_changed_while_read_is_a_miss_and_the_entry_is_kept(make_store, many):
    s = make_store(engine_wrapper=_ChangedWhileRead)
    v = rand_tensor(3000, 1)
    s.put("k", v)
    s.put("other", rand_tensor(3000, 2))
    s.engine.armed = 1
    out = torch.empty(3000, dtype=torch.uint8)
    got = s.get_many_into(["k", "other"], [out, torch.empty_like(out)])[0] if many else s.get_into("k", out)
    assert got is False  # the hashed bytes were not the slot's: never served
    assert "k" in s and s.stats()["checksum_failures"] == 0
    assert s.get_into("k", out) and torch.equal(out, v)
    # Damage in the slot itself still drops the entry: the second read agrees.
    s.engine.armed = 0
    s.put("k", v)
    off = s.geometry.slot_offset(s.entry("k").slot) + 17
    with open(os.path.join(s.path, "slab"), "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))
    s.engine.drop_cache()
    assert s.get_into("k", out) is False
    assert "k" not in s and s.stats()["checksum_failures"] == 1


@pytest.mark.parametrize("n", [CHECKSUM_BLOCK, CHECKSUM_BLOCK + 1, 3 * CHECKSUM_BLOCK - 4097,
                               5 * CHECKSUM_BLOCK])
def test_multi_block_values_round_trip_and_catch_damage_in_any_block(make_store, tmp_path, n):
    # Large reads copy and hash block by block on several threads; every
    # block must count, and the blocks must combine in order.
    s = make_store(capacity_bytes=2 * 5 * CHECKSUM_BLOCK, slot_bytes=5 * CHECKSUM_BLOCK)
    blocks = -(-n // CHECKSUM_BLOCK)
    for b in range(blocks):
        v = rand_tensor(n, b)
        s.put("v", v)
        out = s.engine.empty(n)
        assert s.get_into("v", out) and torch.equal(out, v)
        assert s.get_into("v", out) and torch.equal(out, v)  # page-cache warm
        # Damage the last byte of block b: a miss, never the damaged bytes.
        off = s.geometry.slot_offset(s.entry("v").slot) + min(n, (b + 1) * CHECKSUM_BLOCK) - 1
        with open(tmp_path / "store" / "slab", "r+b") as f:
            f.seek(off)
            byte = f.read(1)
            f.seek(off)
            f.write(bytes([byte[0] ^ 0x01]))
        assert s.get("v") is None, f"damage in block {b} of {blocks} was served"
        assert s.stats()["checksum_failures"] == b + 1


def test_read_racing_an_eviction_is_a_miss(make_store):
    s = make_store(capacity_bytes=1 * 4096, checksum=False, engine_wrapper=FaultyEngine)
    s.put("old", rand_tensor(4096, 1))

    def evict_during_read(slot):
        # Between copying the bytes and validating them.
        s.engine.after_read = None
        assert s.put("new", rand_tensor(4096, 2))  # reuses the one slot

    s.engine.after_read = evict_during_read
    assert s.get("old") is None  # not the new bytes, not a mix
    assert torch.equal(s.get("new"), rand_tensor(4096, 2))


def _read_old(s, how: str):
    if how == "get":
        return s.get("old")
    if how == "get_many":
        return s.get_many(["old"])[0]
    out = torch.zeros(4096, dtype=torch.uint8)
    return out if s.get_into("old", out) else None


def _validations(s, monkeypatch) -> list:
    """Count the reads' second lookups (the index's slot_gen / slot_gens)."""
    calls, index = [], s._index
    for name in ("slot_gen", "slot_gens"):
        real = getattr(index, name)
        monkeypatch.setattr(index, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    return calls


@pytest.mark.parametrize("how", ["get", "get_into", "get_many"])
def test_a_verified_read_of_a_slot_rewritten_meanwhile_is_a_miss(make_store, monkeypatch, how):
    """With checksums, bytes of the slot's next value fail the old entry's
    checksum; the index then shows the slot changed hands: a miss, not
    damage (nothing counted as a checksum failure, the new entry kept)."""
    s = make_store(capacity_bytes=1 * 4096, engine_wrapper=FaultyEngine)
    s.put("old", rand_tensor(4096, 1))

    def rewrite_before_read(slot):
        s.engine.before_read = None
        assert s.put("new", rand_tensor(4096, 2))  # reuses the one slot

    s.engine.before_read = rewrite_before_read
    checks = _validations(s, monkeypatch)
    assert _read_old(s, how) is None
    assert checks, "a read whose checksum failed was not validated in the index"
    assert s.stats()["checksum_failures"] == 0
    assert torch.equal(s.get("new"), rand_tensor(4096, 2))


@pytest.mark.parametrize("how", ["get", "get_into", "get_many"])
def test_bytes_proven_by_their_checksum_need_no_second_lookup(make_store, monkeypatch, how):
    """With checksums, bytes that match the entry's checksum are its value,
    even if the entry is evicted right after they were copied: served,
    without the index read that an unverified read takes to validate."""
    s = make_store(capacity_bytes=1 * 4096, engine_wrapper=FaultyEngine)
    s.put("old", rand_tensor(4096, 1))

    def evict_after_read(slot):
        s.engine.after_read = None
        assert s.put("new", rand_tensor(4096, 2))  # evicts old, rewrites its slot

    s.engine.after_read = evict_after_read
    checks = _validations(s, monkeypatch)
    got = _read_old(s, how)
    assert got is not None and torch.equal(got, rand_tensor(4096, 1))
    assert checks == [] and "old" not in s


def test_reopen_serves_everything(tmp_path, engine):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=32 * 4096, slot_bytes=4096, io=engine) as s:
        for i in range(20):
            s.put(f"k{i}", rand_tensor(1000 + i, i))
        s.pin("k3")
    with SlabStore.open(p, io=engine) as s:
        assert len(s) == 20 and s.pin_count("k3") == 0  # pins die with the handle
        for i in range(20):
            assert torch.equal(s.get(f"k{i}"), rand_tensor(1000 + i, i))


@pytest.mark.parametrize("durability", ["fast", "strict"])
def test_sigkill_then_reopen(tmp_path, engine, durability):
    p = tmp_path / "s"
    proc = run_py(f"""
        import os, signal, sys, torch
        from slabcache import SlabStore
        s = SlabStore.open({str(p)!r}, capacity_bytes=64 * 4096, slot_bytes=4096,
                           io={engine!r}, durability={durability!r})
        for i in range(100):
            g = torch.Generator().manual_seed(i)
            assert s.put(f"k{{i}}", torch.randint(0, 256, (4000,), dtype=torch.uint8, generator=g))
            print(f"k{{i}}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, check=False)
    assert proc.returncode == -signal.SIGKILL
    acked = proc.stdout.split()
    assert len(acked) == 100
    with SlabStore.open(p, io=engine) as s:
        st = s.stats()
        assert st["slots_used"] + st["slots_free"] == st["slots_total"]
        for k in acked[-64:]:  # the newest 64 fit; LRU evicted the rest
            i = int(k[1:])
            assert torch.equal(s.get(k), rand_tensor(4000, i))


_SHARER = """
import json, os, sys, time
from slabcache import SlabStore
from slabcache.testing import expected
who, other, path, io, go = sys.argv[1:6]
out = {"stored": 0, "right": 0, "miss": 0, "wrong": 0}
with SlabStore.open(path, io=io) as s:
    while not os.path.exists(go):  # both start together
        time.sleep(0.001)
    for i in range(600):
        k = f"{who}{i}"
        out["stored"] += s.put(k, expected(k))
        for j in (i, i - 3):  # its own, and the other's, evicted by now or not
            for key in (f"{who}{j}", f"{other}{j}"):
                v = s.get(key) if j >= 0 else None
                if v is None:
                    out["miss"] += 1
                elif bool((v == expected(key)).all()) and v.shape == expected(key).shape:
                    out["right"] += 1
                else:
                    out["wrong"] += 1
print(json.dumps(out))
"""


def test_two_processes_share_a_path(tmp_path, engine):
    """Two processes put ten times what the store holds, evicting each
    other's entries while reading them: never a wrong byte, and the index
    (entries, free list, counters) adds up afterwards."""
    import json
    import subprocess
    import sys

    p = tmp_path / "s"
    SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096, io=engine).close()
    go = tmp_path / "go"
    env = child_env()
    procs = [subprocess.Popen([sys.executable, "-c", _SHARER, w, o, str(p), engine, str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w, o in (("a", "b"), ("b", "a"))]
    time.sleep(1.0)  # both open
    go.touch()
    reps = []
    for pr in procs:
        out, err = pr.communicate(timeout=300)
        assert pr.returncode == 0, err[-2000:]
        reps.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["wrong"] for r in reps] == [0, 0] and all(r["right"] > 0 for r in reps), reps
    assert [r["stored"] for r in reps] == [600, 600]
    with SlabStore.open(p, io=engine) as s:
        st = s.stats()
        assert st["puts"] == 1200 and st["evictions"] == 1200 - len(s)
        assert st["slots_used"] + st["slots_free"] == st["slots_total"] and len(s) == st["slots_used"]
        keys = s.keys()
        assert 48 <= len(keys) <= 64
        for k in keys:
            assert torch.equal(s.get(k), expected(k))


def test_put_by_one_handle_is_visible_to_another(tmp_path, engine):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=8 * 4096, slot_bytes=4096, io=engine) as a, \
            SlabStore.open(p, io=engine) as b:
        a.put("k", rand_tensor(100, 1))
        assert "k" in b and torch.equal(b.get("k"), rand_tensor(100, 1))
        b.remove("k")
        assert "k" not in a


def test_a_use_waiting_for_a_flush_follows_its_key_replaced_by_another_process(
        tmp_path, engine, monkeypatch):
    """A read of a key that another process removed and stored again, while
    a use of its old entry waited in this handle, is a use of the new entry:
    exact LRU evicts the keys read before it, not it."""
    from slabcache.core import uses

    # Uses wait for this handle's next write, however long the other takes.
    monkeypatch.setattr(uses, "USE_FLUSH_SECONDS", 3600.0)
    monkeypatch.setattr(uses, "COUNTER_FLUSH_SECONDS", 3600.0)
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=4 * 4096, slot_bytes=4096, io=engine,
                        use_refresh_seconds=0) as s:
        _fill(s, 4)
        assert s.get("k0") is not None  # a use of k0's entry, waiting for this handle's next write
        run_py(f"""
            import sys
            from slabcache import SlabStore
            from tests.helpers import rand_tensor
            with SlabStore.open(sys.argv[1], io="{engine}") as o:
                assert o.remove("k0") and o.put("k0", rand_tensor(16, 50))
        """, str(p))
        for k in ("k1", "k2", "k3", "k0"):
            assert s.get(k) is not None
        assert torch.equal(s.get("k0"), rand_tensor(16, 50))
        victims = []
        for j in range(2):
            before = set(s.keys())
            s.put(f"new{j}", rand_tensor(16, 100 + j))
            victims += sorted(before - set(s.keys()))
        assert victims == ["k1", "k2"]


# ------------------------------------------------------------------ life


def test_closed_store_raises(make_store):
    s = make_store()
    s.put("k", rand_tensor(1, 1))
    s.close()
    s.close()  # idempotent
    for call in (lambda: s.get("k"), lambda: s.put("j", rand_tensor(1, 1)),
                 lambda: "k" in s, lambda: len(s), lambda: s.stats()):
        with pytest.raises(StoreClosedError, match="open it again"):
            call()


def test_context_manager_and_stats(tmp_path, engine):
    with SlabStore.open(tmp_path / "s", capacity_bytes=4 * 4096, slot_bytes=4096, io=engine) as s:
        s.put("k", rand_tensor(1, 1))
        s.get("k")
        s.get("nope")
        st = s.stats()
    assert s.closed
    for key in ("slots_total", "slots_used", "slot_bytes", "capacity_bytes", "hits", "misses",
                "puts", "evictions", "checksum_failures"):
        assert key in st
    assert (st["hits"], st["misses"], st["puts"], st["slots_used"]) == (1, 1, 1, 1)
    # Counters persist across handles.
    with SlabStore.open(tmp_path / "s", io=engine) as s:
        assert s.stats()["hits"] == 1


def test_readonly_handle(tmp_path, engine):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=4 * 4096, slot_bytes=4096, io=engine) as s:
        s.put("k", rand_tensor(100, 1))
        with SlabStore.open(p, readonly=True, io=engine) as r:
            assert torch.equal(r.get("k"), rand_tensor(100, 1))
            with pytest.raises(ValueError, match="read-only"):
                r.put("j", rand_tensor(1, 1))
