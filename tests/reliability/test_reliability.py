"""Crashes, injected faults, corruption, races: never wrong bytes, nothing leaked."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from slabcache import SlabIOError, SlabStore, StorageFullError
from slabcache.testing import (
    FaultyEngine, child_env, corruption_trials, crash_loop, expected, hammer, inject, verify,
)


def _no_leak(s):
    st_ = s.stats()
    assert st_["slots_used"] + st_["slots_free"] + st_["slots_reserved"] == st_["slots_total"]
    assert st_["slots_reserved"] == 0


# ------------------------------------------------------------------ crash loop


# The last: slots of 512 KiB, whose records fill a block each and are
# written with O_DIRECT beside the payloads.
@pytest.mark.parametrize("durability,io,kills,slot_bytes", [("fast", "mmap", 10, 4096),
                                                            ("strict", "direct", 6, 4096),
                                                            ("fast", "direct", 6, 512 << 10)])
def test_crash_loop(tmp_path, durability, io, kills, slot_bytes):
    rep = crash_loop(str(tmp_path / "s"), kills=kills, durability=durability, io=io, max_run=0.4,
                     slot_bytes=slot_bytes)
    with SlabStore.open(tmp_path / "s") as s:
        g = s.geometry
        assert (g.record_bytes == g.alignment) == (slot_bytes > 4096)
    assert rep.kills == kills
    assert rep.acked_puts > 0 and rep.verified > 0
    assert rep.wrong == 0, rep
    assert rep.lost == 0 and rep.torn == 0 and rep.checksum_failures == 0, rep.notes
    assert rep.fsck_unfixable == 0, rep.notes
    assert rep.leaks == 0 and rep.resurrected == 0


def test_the_crash_writers_batches_still_go_a_run_of_slots_at_a_time(tmp_path, monkeypatch):
    """The crash loop's writer runs behind FaultyEngine.  Without faults, and
    slowed, its batches of slot-sized values are still written a run of
    slots at a time, and slowed they wait after the run's payloads, before
    their records: where a kill must find a batch.  (mmap: the direct
    engine forms runs only from aligned buffers, which these are not.)"""
    from types import SimpleNamespace

    from slabcache.testing import faults
    from slabcache.testing.harness import crash_value

    with SlabStore.open(tmp_path / "s", capacity_bytes=32 * 4096, slot_bytes=4096, io="mmap",
                        engine_wrapper=FaultyEngine) as s:
        inner = s.engine.inner
        events, real = [], inner._write_run_impl

        def run(offset, parts, arrays, n):
            events.append(("run", len(parts)))
            real(offset, parts, arrays, n)

        monkeypatch.setattr(inner, "_write_run_impl", run)
        monkeypatch.setattr(faults, "time", SimpleNamespace(sleep=lambda d: events.append(("wait", d))))
        first = ["w1", "w2", "w3"]
        assert s.put_many(first, [crash_value(k) for k in first]) == [True] * 3
        assert events == [("run", 3)]
        events.clear()
        inject(s, "slow")
        then = ["w4", "w5"]
        assert s.put_many(then, [crash_value(k) for k in then]) == [True] * 2
        assert events == [("run", 2), ("wait", s.engine.delay)]
        inject(s, None)
        for k in first + then:
            assert torch.equal(s.get(k), crash_value(k)), k


# ------------------------------------------------------------------ faults


@pytest.fixture
def store(tmp_path, engine):
    s = SlabStore.open(tmp_path / "s", capacity_bytes=32 * 4096, slot_bytes=4096, io=engine,
                       engine_wrapper=FaultyEngine)
    for i in range(8):
        s.put(f"keep{i}", expected(f"keep{i}"))
    yield s
    s.close()


@pytest.mark.parametrize("mode", ["eio_write", "enospc", "short_write"])
def test_write_faults_fail_cleanly(store, mode):
    fe = inject(store, mode)
    with pytest.raises(SlabIOError, match="writing slot"):
        store.put("victim", expected("victim"))
    assert fe.injected == 1
    assert "victim" not in store and store.get("victim") is None
    _no_leak(store)
    inject(store, None)
    assert store.put("victim", expected("victim"))  # usable again
    assert verify(store, [f"keep{i}" for i in range(8)] + ["victim"]) == (9, 0, 0)


def test_read_fault_is_a_miss(store):
    fe = inject(store, "eio_read")
    assert store.get("keep1") is None
    assert store.stats()["io_errors"] == 1 and fe.injected == 1
    inject(store, None)
    assert torch.equal(store.get("keep1"), expected("keep1"))  # the entry is untouched


def test_intermittent_faults_under_load(store):
    fe = inject(store, "eio_write", every=3)
    ok = failed = 0
    for i in range(60):
        try:
            ok += store.put(f"x{i}", expected(f"x{i}"))
        except SlabIOError:
            failed += 1
    assert failed == fe.injected == 20 and ok == 40
    inject(store, None)
    _no_leak(store)
    right, miss, wrong = verify(store, [f"x{i}" for i in range(60)])
    assert wrong == 0 and right + miss == 60


def test_slow_device_with_threads(store):
    inject(store, "slow")
    counts = hammer(store, threads=4, seconds=1.0, keys=40)
    assert counts["wrong"] == 0 and counts["errors"] == 0 and counts["gets"] > 0


# ------------------------------------------------------------------ corruption


def test_corruption_never_serves_wrong_bytes(tmp_path):
    rep = corruption_trials(str(tmp_path), trials=8, flips=6)
    assert rep.trials == 8 and rep.wrong == 0, rep
    assert rep.raw_errors == [], rep.raw_errors
    # Only damage to LMDB's own pages may kill a reader (LMDB aborts there).
    assert set(rep.crashed_by_target) <= {"lmdb"}, rep
    assert rep.by_target == {"payload": 2, "record": 2, "header": 2, "lmdb": 2}
    assert rep.open_refused >= 2  # both damaged headers were refused at open...
    assert rep.open_refused_naming_fsck >= 2  # ...with a message naming fsck
    assert rep.right > 0


# ------------------------------------------------------------------ concurrency


def test_many_threads_then_full_verification(tmp_path, engine):
    with SlabStore.open(tmp_path / "s", capacity_bytes=64 * 4096, slot_bytes=4096, io=engine) as s:
        counts = hammer(s, threads=8, seconds=2.0, keys=150)
        assert counts["wrong"] == 0 and counts["errors"] == 0 and counts["ops"] > 500
        _no_leak(s)
        right, miss, wrong = verify(s, s.keys())
        assert wrong == 0 and miss == 0 and right == len(s)


_PROC = """
import json, sys
from slabcache import SlabStore
from slabcache.testing import hammer
with SlabStore.open(sys.argv[1]) as s:
    print(json.dumps(hammer(s, threads=2, seconds=2.0, keys=100, seed=int(sys.argv[2]))))
"""


def test_four_processes_on_one_path(tmp_path):
    p = tmp_path / "s"
    SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096).close()
    env = child_env()
    procs = [subprocess.Popen([sys.executable, "-c", _PROC, str(p), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    totals = {"ops": 0, "wrong": 0, "errors": 0}
    for pr in procs:
        out, err = pr.communicate(timeout=120)
        assert pr.returncode == 0, err[-2000:]
        c = json.loads(out)
        for k in totals:
            totals[k] += c[k]
    assert totals["wrong"] == 0 and totals["errors"] == 0 and totals["ops"] > 200
    with SlabStore.open(p) as s:
        _no_leak(s)
        assert verify(s, s.keys())[2] == 0


# ------------------------------------------------------------------ disk full


def test_disk_full_at_creation_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, off, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    p = tmp_path / "s"
    with pytest.raises(StorageFullError, match=rf"cannot preallocate \d+ bytes for the slab at {p}"):
        SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096)
    assert sorted(os.listdir(p)) == ["lock"]  # no slab, no index, no temp file
    monkeypatch.undo()
    with SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096) as s:  # works once there is room
        assert s.put("k", expected("k"))


# ------------------------------------------------------------------ stale readers

_READER = """
import sys, time
from slabcache import SlabStore
s = SlabStore.open(sys.argv[1])
with s.snapshot():  # a read transaction, held until the kill
    print("reading", flush=True)
    time.sleep(120)
"""


def test_a_reader_killed_mid_read_does_not_grow_the_index(tmp_path):
    import signal
    import time

    from slabcache.format.layout import StorePaths
    from slabcache.index import Index

    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096) as s:
        child = subprocess.Popen([sys.executable, "-c", _READER, str(p)], stdout=subprocess.PIPE,
                                 env=child_env(), text=True)
        assert child.stdout.readline().strip() == "reading"
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        idx = Index.acquire(StorePaths(p).index, map_size=1 << 30)  # this process's shared one
        try:
            assert str(child.pid) in idx.env.readers()  # the dead reader's slot is still taken
            time.sleep(1.1)  # writers check for dead readers at most once a second
            v = expected("x")
            for i in range(200):
                assert s.put(f"k{i}", v) and s.remove(f"k{i}")
            assert str(child.pid) not in idx.env.readers()
            before = idx.env.info()["last_pgno"]
            for i in range(2000):
                assert s.put(f"k{i}", v) and s.remove(f"k{i}")
            assert idx.env.info()["last_pgno"] - before < 64  # pages are reused, not leaked
        finally:
            idx.release()


# ------------------------------------------------------------------ full index map


def test_a_full_index_map_leaks_nothing_and_close_still_works(tmp_path):
    from slabcache.admin.fsck import check

    p = tmp_path / "s"
    s = SlabStore.open(p, capacity_bytes=2048 * 4096, slot_bytes=4096, index_map_bytes=1 << 20)
    stored, failures = [], 0
    for i in range(2048):
        key = f"{i}-" + "k" * (1000 + 37 * (i % 50))  # long keys fill the index, not the slab
        try:
            if s.put(key, expected(key[:40])):
                stored.append(key)
        except StorageFullError as exc:
            failures += 1
            assert "index_map_bytes" in str(exc)
            assert s.stats()["slots_reserved"] == 0  # a failed put keeps nothing reserved
            if failures == 20:
                break
    assert failures == 20 and stored
    s.close()  # must not raise although the index is full
    with SlabStore.open(p, index_map_bytes=64 << 20) as s2:  # a larger map: usable again
        assert s2.stats()["slots_reserved"] == 0
        assert all(torch.equal(s2.get(k), expected(k[:40])) for k in stored[-5:])
        assert s2.put("after", expected("after"))
    assert check(p, progress=False).exit_code in (0, 1)


@pytest.mark.parametrize("batch", [False, True])
def test_a_lookup_whose_begin_finds_the_map_grown_follows_it(tmp_path, monkeypatch, batch):
    """A read's lookup whose transaction cannot begin because another
    process grew the map (MDB_MAP_RESIZED) follows the map and reads; a
    damaged index, found at the begin or by the read, is named, not raised
    raw; either way the lookup leaves no transaction counted in flight."""
    import lmdb

    from slabcache import CorruptStoreError

    with SlabStore.open(tmp_path / "s", capacity_bytes=64 * 4096, slot_bytes=4096) as s:
        assert s.put("k", expected("k"))
        idx = s._index
        real = idx.env
        raised, followed = [], []

        class Env:
            """The real environment, whose begins raise ``error`` until
            it is cleared (the map followed, for MapResizedError)."""
            error = lmdb.MapResizedError

            def __getattr__(self, name):
                return getattr(real, name)

            get_error = None  # raised by the transaction's get instead

            def begin(self, **kw):
                if self.error is not None:
                    raised.append(self.error)
                    raise self.error("raised by the test")
                txn = real.begin(**kw)
                if self.get_error is None:
                    return txn
                error = self.get_error

                class Txn:
                    def get(self, *a, **k):
                        raise error("raised by the test")

                    def abort(self):
                        txn.abort()

                return Txn()

        def follow():
            followed.append(True)
            fake.error = None

        fake = Env()
        monkeypatch.setattr(idx, "env", fake)
        monkeypatch.setattr(idx, "_follow_map", follow)
        got = s.get_many(["k"])[0] if batch else s.get("k")
        assert torch.equal(got, expected("k"))
        assert raised == [lmdb.MapResizedError] * 2 and followed == [True]
        assert idx._inflight() == 0
        fake.error = lmdb.CorruptedError
        with pytest.raises(CorruptStoreError, match="fsck"):
            s.lookup(["k"]) if batch else s.contains("k")
        assert idx._inflight() == 0
        fake.error, fake.get_error = None, lmdb.CorruptedError
        with pytest.raises(CorruptStoreError, match="fsck"):
            s.lookup(["k"]) if batch else s.contains("k")
        assert idx._inflight() == 0
        monkeypatch.undo()


def test_an_index_map_grown_by_another_process_is_followed(tmp_path):
    from slabcache.format.layout import StorePaths

    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096, index_map_bytes=1 << 24) as s:
        assert s.put("before", expected("before"))
        grow = (f"import lmdb\nenv = lmdb.open({StorePaths(p).index!r}, map_size=3 << 30, max_dbs=8)\n"
                "db = env.open_db(b'meta')\nwith env.begin(write=True) as t:\n    t.put(b'grown', b'1', db=db)\n")
        subprocess.run([sys.executable, "-c", grow], check=True, env=child_env())
        # This handle's map is smaller than the one now recorded in the file.
        assert torch.equal(s.get("before"), expected("before"))
        assert s.put("after", expected("after")) and torch.equal(s.get("after"), expected("after"))
    with SlabStore.open(p) as s:
        assert len(s) == 2
