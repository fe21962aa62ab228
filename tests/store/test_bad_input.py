"""Bad input: each case gets a clear error and nothing stored is lost.

These cases are the specification README.md points to ("Errors").
"""

import errno
import os
import struct
import warnings

import pytest
import torch

from slabcache import (
    ConfigError, CorruptStoreError, EntryTooLargeError, InvalidKeyError, LayoutMismatchError,
    SlabStore, StoreClosedError, UnsupportedValueError,
)
from slabcache.format.header import FORMAT_VERSION, SLAB_HEADER

GOOD = torch.arange(16, dtype=torch.int32)


def _negative(n: int) -> torch.Tensor:
    """A contiguous int32 tensor whose negative bit is set (torch makes such
    views lazily, e.g. of a conjugate's imaginary part)."""
    return torch._neg_view(torch.zeros(n, dtype=torch.int32))


def _quantized():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch
        return torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)


@pytest.fixture
def store(tmp_path):
    s = SlabStore.open(tmp_path / "s", capacity_bytes=8 * 4096, slot_bytes=4096)
    s.put("keep", GOOD)
    yield s
    if not s.closed:
        assert torch.equal(s.get("keep"), GOOD), "bad input must not lose stored data"
        s.close()


# (case, call on an open store, expected error, message fragment)
STORE_CASES = [
    ("key is an int", lambda s: s.put(42, GOOD), InvalidKeyError, "key must be str or bytes"),
    ("key is None", lambda s: s.get(None), InvalidKeyError, "key must be str or bytes"),
    ("key is a tuple", lambda s: s.contains(("a", 1)), InvalidKeyError, "to_string"),
    ("key is empty str", lambda s: s.put("", GOOD), InvalidKeyError, "empty string"),
    ("key is 0 bytes", lambda s: s.put(b"", GOOD), InvalidKeyError, "empty bytes"),
    ("value is a list of ints", lambda s: s.put("k", [1, 2]), UnsupportedValueError, "not a torch.Tensor"),
    ("value is a numpy array", lambda s: s.put("k", GOOD.numpy()), UnsupportedValueError, "torch.as_tensor"),
    ("value is None", lambda s: s.put("k", None), UnsupportedValueError, "store a torch.Tensor"),
    ("value is an empty list", lambda s: s.put("k", []), UnsupportedValueError, "at least one tensor"),
    ("value is a sparse tensor", lambda s: s.put("k", GOOD.to_sparse()), UnsupportedValueError, "to_dense"),
    ("value has a quantized dtype", lambda s: s.put("k", _quantized()), UnsupportedValueError,
     "only dense"),
    ("value larger than a slot", lambda s: s.put("k", torch.zeros(4097, dtype=torch.uint8)),
     EntryTooLargeError, "does not fit a slot of 4096"),
    ("get_into with wrong dtype", lambda s: s.get_into("keep", torch.zeros(16)),
     UnsupportedValueError, "stored tensor is int32"),
    ("get_into with wrong shape", lambda s: s.get_into("keep", torch.zeros(4, 4, dtype=torch.int32)),
     UnsupportedValueError, "allocate out"),
    # Lazy views whose bytes are not their values, as outs: refused, never
    # filled with bytes that would read back negated or conjugated.
    ("get_into a negative view", lambda s: s.get_into("keep", _negative(16)),
     UnsupportedValueError, "resolve_neg"),
    ("get_many_into a negative view", lambda s: s.get_many_into(["keep"], [_negative(16)]),
     UnsupportedValueError, "resolve_neg"),
    ("get_into a conjugate view", lambda s: s.put("c", torch.ones(2, dtype=torch.complex64))
     and s.get_into("c", torch.zeros(2, dtype=torch.complex64).conj()), UnsupportedValueError,
     "resolve_conj"),
]


@pytest.mark.parametrize("case,call,error,fragment", STORE_CASES, ids=[c[0] for c in STORE_CASES])
def test_bad_call(store, case, call, error, fragment):
    with pytest.raises(error, match=fragment):
        call(store)


# Values that fail only deep inside a write: each must be refused before a
# slot is reserved, so a full store evicts nothing for them.
DEEP_CASES = [
    ("meta-device tensor", lambda: torch.empty(4, device="meta"), UnsupportedValueError, "meta device"),
    ("conjugate view", lambda: torch.ones(3, dtype=torch.complex64).conj(), UnsupportedValueError,
     "resolve_conj"),
    ("negative view", lambda: torch.ones(3, dtype=torch.complex64).conj().imag, UnsupportedValueError,
     "resolve_neg"),
    ("contiguous negative view", lambda: _negative(16), UnsupportedValueError, "resolve_neg"),
    ("70,000 tensors", lambda: [torch.zeros(1, dtype=torch.uint8)] * 70_000, UnsupportedValueError,
     "at most 65535"),
]


@pytest.mark.parametrize("case,make,error,fragment", DEEP_CASES, ids=[c[0] for c in DEEP_CASES])
@pytest.mark.parametrize("how", ["put", "put_async", "put_many"])
def test_full_store_evicts_nothing_for_a_bad_value(store, case, make, error, fragment, how):
    for i in range(7):
        store.put(f"k{i}", GOOD)
    before = sorted(store.keys())
    with pytest.raises(error, match=fragment):
        if how == "put":
            store.put("bad", make())
        elif how == "put_async":
            store.jobs.put("bad", make()).result()
        else:
            store.put_many(["ok", "bad"], [GOOD, make()])
    assert sorted(store.keys()) == before and store.stats()["evictions"] == 0


def test_a_lazy_view_is_refused_even_after_its_layout_was_stored(store):
    # A layout seen before takes the short path of a put; the view's bits
    # must still be checked there.
    complex_value = torch.ones(2, dtype=torch.complex64)
    for plain, lazy in ((complex_value, complex_value.conj()), (GOOD, _negative(16))):
        assert store.put("plain", plain)
        for put in (lambda: store.put("lazy", lazy), lambda: store.put_many(["lazy"], [lazy])):
            with pytest.raises(UnsupportedValueError, match="resolve"):
                put()
        assert not store.contains("lazy")


def test_overlapping_outs_are_an_error_not_a_deletion(store):
    pair = [torch.arange(8, dtype=torch.int32), torch.arange(8, dtype=torch.int32)]
    store.put("pair", pair)
    buf = torch.zeros(12, dtype=torch.int32)
    with pytest.raises(UnsupportedValueError, match="overlap"):
        store.get_into("pair", [buf[:8], buf[4:]])
    big = torch.zeros(24, dtype=torch.int32)  # keep's out and pair's first out share 8 ints
    with pytest.raises(UnsupportedValueError, match="overlap"):
        store.get_many_into(["keep", "pair"], [big[:16], [big[8:16], big[16:24]]])
    assert store.stats()["checksum_failures"] == 0
    outs = torch.zeros(48, dtype=torch.int32)  # three plain outs of keep's shape, two overlapping
    with pytest.raises(UnsupportedValueError, match="overlap"):
        store.get_many_into(["keep", "keep", "keep"], [outs[32:], outs[:16], outs[8:24]])
    out = [torch.empty(8, dtype=torch.int32), torch.empty(8, dtype=torch.int32)]
    assert store.get_into("pair", out) and torch.equal(out[1], pair[1])


def test_100kb_key_is_accepted(store):
    k = b"k" * 100_000
    assert store.put(k, GOOD) and torch.equal(store.get(k), GOOD)


def test_zero_size_tensor_is_accepted(store):
    assert store.put("z", torch.empty(0, 3))
    got = store.get("z")
    assert got.shape == (0, 3) and got.dtype == torch.float32


def test_closed_store(store):
    store.close()
    with pytest.raises(StoreClosedError, match="closed; open it again"):
        store.get("keep")


# (case, open kwargs, expected error, message fragment)
OPEN_CASES = [
    ("capacity negative", dict(capacity_bytes=-1, slot_bytes=4096), ConfigError, "must be positive"),
    ("capacity zero", dict(capacity_bytes=0, slot_bytes=4096), ConfigError, "must be positive"),
    ("slot zero", dict(capacity_bytes=4096, slot_bytes=0), ConfigError, "must be positive"),
    ("capacity a float", dict(capacity_bytes=1e6, slot_bytes=4096), ConfigError, "must be a whole number"),
    ("capacity a string", dict(capacity_bytes="1G", slot_bytes=4096), ConfigError, "must be a whole number"),
    ("capacity 2**63", dict(capacity_bytes=2 ** 63, slot_bytes=4096), ConfigError, "more than slabcache addresses"),
    ("slot 2**70", dict(capacity_bytes=8192, slot_bytes=2 ** 70), ConfigError, "more than slabcache addresses"),
    ("io_threads 10000", dict(capacity_bytes=8192, slot_bytes=4096, io_threads=10_000), ConfigError,
     "from 1 to 256"),
    ("capacity below one slot", dict(capacity_bytes=100, slot_bytes=4096), ConfigError,
     "smaller than one slot"),
    ("missing sizes on create", dict(), ConfigError, "pass capacity_bytes and slot_bytes"),
    ("unknown policy", dict(capacity_bytes=8192, slot_bytes=4096, policy="random"), ConfigError,
     "use one of fifo, lfu, lru, mru"),
    ("unknown io", dict(capacity_bytes=8192, slot_bytes=4096, io="aio"), ConfigError,
     "use one of mmap, direct"),
    ("unknown durability", dict(capacity_bytes=8192, slot_bytes=4096, durability="paranoid"),
     ConfigError, "use one of fast, strict"),
    ("checksum not a bool", dict(capacity_bytes=8192, slot_bytes=4096, checksum="yes"), ConfigError,
     "True or False"),
]


@pytest.mark.parametrize("case,kw,error,fragment", OPEN_CASES, ids=[c[0] for c in OPEN_CASES])
def test_bad_open(tmp_path, case, kw, error, fragment):
    with pytest.raises(error, match=fragment):
        SlabStore.open(tmp_path / "new", **kw)
    assert not (tmp_path / "new" / "slab").exists()


def test_path_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        SlabStore.open(f, capacity_bytes=8192, slot_bytes=4096)


def test_path_not_a_path(tmp_path):
    with pytest.raises(ConfigError, match="str or os.PathLike"):
        SlabStore.open(123, capacity_bytes=8192, slot_bytes=4096)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_path_read_only(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    with pytest.raises(ConfigError, match="not writable"):
        SlabStore.open(d, capacity_bytes=8192, slot_bytes=4096)


def test_path_read_only_filesystem_dir(tmp_path):
    # Root ignores permission bits, so a read-only bind would be needed for a
    # real EROFS; /proc is read-only for everyone and shows the same error.
    with pytest.raises(ConfigError, match="cannot create store directory|not writable"):
        SlabStore.open("/proc/slabcache-test", capacity_bytes=8192, slot_bytes=4096)


@pytest.fixture
def closed_store(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=8 * 4096, slot_bytes=4096) as s:
        s.put("keep", GOOD)
    return p


def _reopen_keeps_data(p):
    with SlabStore.open(p) as s:
        assert torch.equal(s.get("keep"), GOOD)


def test_reopen_with_other_geometry(closed_store):
    with pytest.raises(LayoutMismatchError, match="slots of 4096 bytes, not 8192"):
        SlabStore.open(closed_store, capacity_bytes=8 * 4096, slot_bytes=8192)
    with pytest.raises(LayoutMismatchError, match="not capacity_bytes"):
        SlabStore.open(closed_store, capacity_bytes=4 * 4096, slot_bytes=4096)
    _reopen_keeps_data(closed_store)


def test_damaged_header(closed_store):
    slab = closed_store / "slab"
    with open(slab, "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff")
    with pytest.raises(CorruptStoreError, match="fails its checksum.*slabcache fsck"):
        SlabStore.open(closed_store)


def test_not_a_slab(closed_store):
    with open(closed_store / "slab", "r+b") as f:
        f.write(b"NOTASLAB")
    with pytest.raises(CorruptStoreError, match="bad magic"):
        SlabStore.open(closed_store)


def test_truncated_slab(closed_store):
    slab = closed_store / "slab"
    os.truncate(slab, os.path.getsize(slab) - 4096)
    with pytest.raises(CorruptStoreError, match="truncated.*fsck"):
        SlabStore.open(closed_store)


def test_newer_format_version(closed_store):
    slab = closed_store / "slab"
    with open(slab, "r+b") as f:
        raw = bytearray(f.read(SLAB_HEADER.size))
        struct.pack_into("<I", raw, 8, FORMAT_VERSION + 1)
        f.seek(0)
        f.write(raw)
    with pytest.raises(CorruptStoreError, match="newer than this slabcache understands"):
        SlabStore.open(closed_store)


def test_index_missing(closed_store):
    os.unlink(closed_store / "index" / "data.mdb")
    with pytest.raises(CorruptStoreError, match="--rebuild-index"):
        SlabStore.open(closed_store)


def test_odirect_refused(tmp_path, monkeypatch):
    # Filesystems that refuse O_DIRECT fail open() with EINVAL; recent
    # kernels' tmpfs accepts it, so the refusal is simulated here.
    real_open = os.open

    def refusing_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(ConfigError, match="refuses O_DIRECT; use io='mmap'"):
        SlabStore.open(tmp_path / "s", capacity_bytes=8192, slot_bytes=4096, io="direct")
    monkeypatch.undo()
    with SlabStore.open(tmp_path / "s", io="mmap") as s:  # the same path works with mmap
        assert s.put("k", GOOD)
