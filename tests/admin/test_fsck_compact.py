"""fsck and compaction: break stores on purpose, one way at a time, then repair."""

import hashlib
import os
import signal
import subprocess
import sys

import pytest
import torch

from slabcache import CorruptStoreError, SlabStore, StoreBusyError
from slabcache.admin.fsck import check
from slabcache.cli import main
from slabcache.admin.compact import compact
from slabcache.format.keys import index_key
from slabcache.format.layout import StorePaths
from slabcache.index import Index
from slabcache.testing import child_env

from tests.helpers import rand_tensor

N = 10


def _value(i):
    return rand_tensor(3000 + i, i)


@pytest.fixture
def store_path(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        for i in range(N):
            s.put(f"k{i}", _value(i))
    return p


def _intact(p, skip=()):
    with SlabStore.open(p) as s:
        for i in range(N):
            if f"k{i}" in skip:
                continue
            got = s.get(f"k{i}")
            assert got is not None and torch.equal(got, _value(i)), f"k{i} damaged"


def _digest(p):
    h = hashlib.sha256()
    for name in ("slab", "index/data.mdb"):
        h.update((p / name).read_bytes())
    return h.hexdigest()


def _codes(p, *flags):
    return check(p, repair="--repair" in flags, deep="--deep" in flags,
                 rebuild_index="--rebuild-index" in flags, progress=False)


def _entry_slot(p, key):
    with SlabStore.open(p) as s:
        return s.entry(key).slot, s.geometry


def test_clean_store_and_check_never_writes(store_path):
    before = _digest(store_path)
    res = _codes(store_path, "--deep")
    assert res.exit_code == 0 and res.findings == [] and res.entries == N
    assert res.bytes_scrubbed == sum(3000 + i for i in range(N))
    assert _digest(store_path) == before


def test_flipped_payload_byte(store_path):
    slot, g = _entry_slot(store_path, "k3")
    with open(store_path / "slab", "r+b") as f:
        f.seek(g.slot_offset(slot) + 100)
        b = f.read(1)
        f.seek(g.slot_offset(slot) + 100)
        f.write(bytes([b[0] ^ 1]))
    assert _codes(store_path).exit_code == 0  # only --deep reads payloads
    res = _codes(store_path, "--deep")
    assert res.exit_code == 4 and [f.kind for f in res.findings] == ["checksum mismatch"]
    assert _codes(store_path, "--deep", "--repair").exit_code == 1
    assert _codes(store_path, "--deep").exit_code == 0
    _intact(store_path, skip={"k3"})
    with SlabStore.open(store_path) as s:
        assert "k3" not in s


def test_damaged_slab_header(store_path):
    with open(store_path / "slab", "r+b") as f:
        f.seek(24)
        f.write(b"\x00\x00\x10\x00")
    with pytest.raises(CorruptStoreError, match="slabcache fsck"):
        SlabStore.open(store_path)
    res = _codes(store_path)
    assert res.exit_code == 4 and res.findings[0].kind == "slab header damaged"
    assert _codes(store_path, "--repair").exit_code == 1
    assert _codes(store_path, "--deep").exit_code == 0
    _intact(store_path)


def test_truncated_slab(store_path):
    slot, g = _entry_slot(store_path, "k9")
    with SlabStore.open(store_path) as s:
        lost = {f"k{i}" for i in range(N) if s.entry(f"k{i}").slot >= slot}
    os.truncate(store_path / "slab", g.slot_offset(slot) + 10)
    with pytest.raises(CorruptStoreError, match="truncated"):
        SlabStore.open(store_path)
    res = _codes(store_path)
    assert res.exit_code == 4 and "slab truncated" in [f.kind for f in res.findings]
    assert _codes(store_path, "--repair").exit_code == 1
    assert _codes(store_path, "--deep").exit_code == 0
    _intact(store_path, skip=lost)
    with SlabStore.open(store_path) as s:
        assert not any(k in s for k in lost)
        st = s.stats()
        assert st["slots_used"] + st["slots_free"] == st["slots_total"]


@pytest.mark.parametrize("how", ["deleted", "garbled"])
def test_lost_index_is_rebuilt(store_path, how):
    with SlabStore.open(store_path) as s:
        s.remove("k5")  # removed entries must not come back
    mdb = store_path / "index" / "data.mdb"
    if how == "deleted":
        os.unlink(mdb)
    else:
        mdb.write_bytes(os.urandom(mdb.stat().st_size))
    with pytest.raises(CorruptStoreError, match="rebuild-index"):
        SlabStore.open(store_path)
    res = _codes(store_path)
    assert res.exit_code == 4 and res.findings[0].kind == "index unreadable"
    res = _codes(store_path, "--rebuild-index")
    assert res.exit_code == 1 and res.entries == N - 1
    assert _codes(store_path, "--deep").exit_code == 0
    _intact(store_path, skip={"k5"})
    with SlabStore.open(store_path) as s:
        assert "k5" not in s and len(s) == N - 1
        assert s.put("new", _value(99))  # the free list works after a rebuild
        st = s.stats()
        assert st["slots_used"] + st["slots_free"] == st["slots_total"]


def _edit_index(p, fn):
    idx = Index.acquire(StorePaths(p).index, map_size=1 << 30)
    try:
        with idx.write() as t:
            fn(t)
    finally:
        idx.release()


def test_two_entries_on_one_slot(store_path):
    from dataclasses import replace

    def clash(t):
        a = t.entry(index_key(b"sk1"))
        b = t.entry(index_key(b"sk2"))
        t.txn.put(b.ikey, replace(b, slot=a.slot).encode(), db=t.db["entries"])

    _edit_index(store_path, clash)
    res = _codes(store_path)
    kinds = [f.kind for f in res.findings]
    assert res.exit_code == 4 and "shared slot" in kinds and "leaked slot" in kinds
    assert _codes(store_path, "--repair").exit_code == 1
    assert _codes(store_path, "--deep").exit_code == 0
    _intact(store_path, skip={"k2"})


def test_leaked_slot(store_path):
    def forget(t):
        t.drop_entry_key(index_key(b"sk4"))
        t.rebuild_order(t.policy())

    _edit_index(store_path, forget)
    res = _codes(store_path)
    assert res.exit_code == 4 and [f.kind for f in res.findings] == ["leaked slot"]
    assert _codes(store_path, "--repair").exit_code == 1
    assert _codes(store_path).exit_code == 0
    _intact(store_path, skip={"k4"})
    with SlabStore.open(store_path) as s:
        st = s.stats()
        assert st["slots_used"] + st["slots_free"] == st["slots_total"]


def test_stale_pin(store_path):
    code = f"""
import os, signal
from slabcache import SlabStore
s = SlabStore.open({str(store_path)!r})
s.pin("k1")
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", code], env=child_env())
    assert r.returncode == -signal.SIGKILL
    res = _codes(store_path)
    kinds = sorted(f.kind for f in res.findings)
    assert res.exit_code == 4 and kinds == ["stale pin"]
    assert _codes(store_path, "--repair").exit_code == 1
    assert _codes(store_path).exit_code == 0
    _intact(store_path)


def test_repair_refuses_while_open(store_path, capsys):
    with SlabStore.open(store_path):
        with pytest.raises(StoreBusyError, match=f"pid\\(s\\) {os.getpid()}"):
            _codes(store_path, "--repair")
        assert _codes(store_path).exit_code == 0  # checking alone is fine
        assert main(["fsck", str(store_path), "--repair"]) == 8
    assert "is open by pid" in capsys.readouterr().err


def test_cli_exit_codes_and_json(store_path, tmp_path, capsys):
    import json

    assert main(["fsck", str(store_path)]) == 0
    assert main(["fsck", str(tmp_path / "missing")]) == 8
    os.unlink(store_path / "index" / "data.mdb")
    capsys.readouterr()
    assert main(["fsck", str(store_path), "--json"]) == 4
    out = json.loads(capsys.readouterr().out)
    assert out["exit_code"] == 4 and out["findings"][0]["kind"] == "index unreadable"
    assert main(["fsck", str(store_path), "--rebuild-index"]) == 1
    assert main(["fsck", str(store_path), "--deep"]) == 0


# ------------------------------------------------------------------ compaction


def _use_order(p):
    with SlabStore.open(p, use_refresh_seconds=0) as s:  # every read moves its entry
        for i in range(N):  # k0 is used last: the most valuable under LRU
            s.get(f"k{N - 1 - i}")


def test_shrink_keeps_the_most_valuable(store_path):
    _use_order(store_path)
    res = compact(store_path, capacity_bytes=6 * 4096, progress=False)
    assert res.kept == 6 and len(res.dropped) == N - 6
    assert all("no room" in d["why"] for d in res.dropped)
    assert _codes(store_path, "--deep").exit_code == 0
    with SlabStore.open(store_path) as s:
        assert s.stats()["slots_total"] == 6
        assert sorted(s.keys()) == sorted(f"k{i}" for i in range(6))
        assert os.path.getsize(store_path / "slab") == s.stats()["file_bytes"]
    _intact(store_path, skip={f"k{i}" for i in range(6, N)})


def test_grow(store_path, caplog):
    res = compact(store_path, capacity_bytes=64 * 4096, progress=False)
    # Only an interrupted compaction is reported as one.
    assert not [r for r in caplog.records if "interrupted" in r.getMessage()]
    assert res.kept == N and res.dropped == []
    with SlabStore.open(store_path) as s:
        assert s.stats()["slots_total"] == 64
        st = os.stat(store_path / "slab")
        assert st.st_blocks * 512 >= st.st_size  # preallocated
    _intact(store_path)
    assert _codes(store_path, "--deep").exit_code == 0


def test_reslot(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=8 * 8192, slot_bytes=8192) as s:
        s.put("small", rand_tensor(1000, 1))
        s.put("big", rand_tensor(6000, 2))
        s.put("list", [rand_tensor(10, 3).view(torch.int16), torch.ones(3, 2)])
    res = main(["compact", str(p), "--slot-bytes", "4K", "--capacity", "64K"])
    assert res == 0
    with SlabStore.open(p) as s:
        assert (s.stats()["slot_bytes"], s.stats()["slots_total"]) == (4096, 16)
        assert torch.equal(s.get("small"), rand_tensor(1000, 1)) and "big" not in s
        got = s.get("list")
        assert torch.equal(got[0], rand_tensor(10, 3).view(torch.int16)) and torch.equal(got[1], torch.ones(3, 2))


@pytest.mark.parametrize("phase,new_state", [("copy", False), ("marker", False), ("swap", True)])
def test_compaction_killed_midway(store_path, phase, new_state):
    # The on_phase seam kills the process where a crash or kill -9 could land.
    code = f"""
import os, signal
from slabcache.admin.compact import compact
def crash(p):
    if p == {phase!r}:
        os.kill(os.getpid(), signal.SIGKILL)
compact({str(store_path)!r}, capacity_bytes=32 * 4096, progress=False, on_phase=crash)
"""
    r = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    with SlabStore.open(store_path) as s:  # open finishes or undoes the switch
        assert s.stats()["slots_total"] == (32 if new_state else 16)
    assert sorted(os.listdir(store_path)) == ["index", "lock", "slab"]
    assert _codes(store_path, "--deep").exit_code == 0
    _intact(store_path)


def test_compact_refuses_while_open(store_path):
    with SlabStore.open(store_path):
        with pytest.raises(StoreBusyError):
            compact(store_path, capacity_bytes=8 * 4096, progress=False)
    _intact(store_path)


def test_header_with_a_valid_checksum_but_wrong_geometry(store_path):
    from slabcache.device.slabfile import read_slab_header, write_header_bytes
    from slabcache.format.header import Geometry, pack_header

    g, cid = read_slab_header(str(store_path / "slab"))
    wrong = Geometry(g.alignment, g.record_bytes, g.slot_bytes * 2, g.slot_count // 2,
                     g.records_offset, g.data_offset)
    write_header_bytes(str(store_path / "slab"), pack_header(wrong, cid))
    res = _codes(store_path)
    assert res.exit_code == 4 and "slab header differs from the index's copy" in [f.kind for f in res.findings]
    assert _codes(store_path, "--repair").exit_code == 1
    assert read_slab_header(str(store_path / "slab"))[0] == g
    assert _codes(store_path, "--deep").exit_code == 0
    _intact(store_path)
