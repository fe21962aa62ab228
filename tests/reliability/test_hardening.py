"""The second round of hardening: odd read targets, processes in other PID
namespaces, rebuilds after eviction, foreign indexes, files that are not
what they seem, duplicate keys in a batch, failed transactions, a map grown
elsewhere, modes, a live fsck, read-only handles, sizes and counters."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest
import torch

from slabcache import ConfigError, SlabStore, UnsupportedValueError
from slabcache.admin.fsck import check
from slabcache.cli import main as cli_main
from slabcache.core.allocator import PUT_AHEAD
from slabcache.core.values import describe
from slabcache.core.items import Item
from slabcache.format.keys import make_key
from slabcache.format.layout import StorePaths
from slabcache.index import IndexTxn
from slabcache.testing import child_env, expected
from tests.helpers import copy_tree_sparse, rand_tensor, run_py


def _fsck(p, *flags):
    return check(p, repair="--repair" in flags, deep="--deep" in flags,
                 rebuild_index="--rebuild-index" in flags, progress=False)


# ------------------------------------------------------------------ odd outs


@pytest.fixture
def store(tmp_path):
    s = SlabStore.open(tmp_path / "s", capacity_bytes=16 * 4096, slot_bytes=4096)
    s.put("k", rand_tensor(1000, 1))
    yield s
    s.close()


@pytest.mark.parametrize("make_out", [
    lambda: torch.zeros(2000, dtype=torch.uint8)[::2],  # a slice with a step
    lambda: torch.zeros(40, 25, dtype=torch.uint8).t(),  # transposed
], ids=["stepped", "transposed"])
def test_a_raw_read_never_fills_a_hidden_copy(store, make_out):
    """Each raw read path refuses an out its bytes cannot land in, instead
    of filling a copy and reporting a hit."""
    for found in (store.lookup(["k"]), store.lookup(["k", "k"])[:1]):
        out = make_out()
        with pytest.raises(UnsupportedValueError, match="not contiguous"):
            store.read_into(found, [out])
        assert not out.any()  # untouched
    assert torch.equal(store.get("k"), rand_tensor(1000, 1))  # nothing lost


def test_bytes_are_never_written_into(store):
    frozen = bytes(1000)
    with pytest.raises(UnsupportedValueError, match="read-only"):
        store.read_into(store.lookup(["k"]), [frozen])
    assert frozen == bytes(1000)
    room = bytearray(1000)  # a writable buffer works
    assert store.read_into(store.lookup(["k"]), [room])[0] is not None
    assert bytes(room) == rand_tensor(1000, 1).numpy().tobytes()


def test_an_expanded_out_is_refused_with_a_clear_error(store):
    assert store.put("m", rand_tensor(1000, 2).view(10, 100))
    for key, out in (("k", torch.zeros(1, dtype=torch.uint8).expand(1000)),
                     ("m", torch.zeros(1, 100, dtype=torch.uint8).expand(10, 100))):
        with pytest.raises(UnsupportedValueError, match="share memory"):
            store.get_into(key, out)
        with pytest.raises(UnsupportedValueError, match="share memory"):
            store.get_many_into([key], [out])
    # Non-contiguous outs whose elements are distinct still work.
    big = torch.zeros(2000, dtype=torch.uint8)
    assert store.get_into("k", big[::2]) and torch.equal(big[::2], rand_tensor(1000, 1))
    t = torch.zeros(100, 10, dtype=torch.uint8).t()
    assert store.get_into("m", t) and torch.equal(t, rand_tensor(1000, 2).view(10, 100))


# ------------------------------------------------------------------ PID namespaces


def _private_pid_namespace() -> str | None:
    """Why a process cannot be started in a PID namespace of its own with
    its own /proc here (as in another container), or None when it can."""
    if not shutil.which("unshare"):
        return "needs util-linux `unshare` to start a process in another PID namespace"
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
                        "sh", "-c", "echo $$"], capture_output=True, text=True)
    if r.returncode != 0 or r.stdout.strip() != "1":
        return f"this machine does not allow a private PID namespace ({r.stderr.strip()[:80]})"
    return None


def _in_namespace(code: str, *args: str, timeout: float = 120) -> subprocess.Popen:
    return subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


_CHURN = """
import json, sys, os
from slabcache import SlabStore
from slabcache.testing import expected
with SlabStore.open(sys.argv[1]) as s:
    stored = 0
    for i in range(400):  # four times the store: every unpinned entry is evicted
        stored += s.put(f"ns{i}", expected(f"ns{i}"))
    print(json.dumps({"pid": os.getpid(), "stored": stored}))
"""


def test_a_process_in_another_pid_namespace_respects_pins_and_reservations(tmp_path):
    """The holder's pid means nothing (or another process) in the other
    namespace's /proc; its locks still prove it alive."""
    why = _private_pid_namespace()
    if why:
        pytest.skip(why)
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=100 * 4096, slot_bytes=4096) as s:
        for i in range(4):
            assert s.put(f"pinned{i}", expected(f"pinned{i}")) and s.pin(f"pinned{i}")
        # A put in flight: reserved, not yet written or committed.
        r = s._allocator.reserve(make_key("inflight"))
        child = _in_namespace(_CHURN, str(p))
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-2000:]
        rep = json.loads(out.strip().splitlines()[-1])
        assert rep["pid"] != os.getpid() and rep["stored"] > 0
        for i in range(4):  # pins held: not one evicted
            assert torch.equal(s.get(f"pinned{i}"), expected(f"pinned{i}"))
        # The reservation was not reaped: this put completes and reads back.
        v = expected("inflight")
        item = Item(make_key("inflight"), [v], describe([v.shape], [v.dtype], is_list=False))
        assert r.commit(item, s._writer.write_slot(r.slot, r.generation, item)).ok
        assert torch.equal(s.get("inflight"), v)
        assert s.stats()["slots_reserved"] == 0


_HOLD = """
import sys, time
from slabcache import SlabStore
from slabcache.testing import expected
s = SlabStore.open(sys.argv[1])
assert s.put("held", expected("held")) and s.pin("held")
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_pins_of_a_namespaced_process_hold_while_it_lives_and_lapse_when_it_dies(tmp_path):
    why = _private_pid_namespace()
    if why:
        pytest.skip(why)
    p = tmp_path / "s"
    SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096).close()
    holder = _in_namespace(_HOLD, str(p), "60")
    assert holder.stdout.readline().strip() == "holding"
    try:
        with SlabStore.open(p) as s:
            for i in range(200):
                s.put(f"x{i}", expected(f"x{i}"))
            assert s.pin_count("held") == 1 and torch.equal(s.get("held"), expected("held"))
    finally:
        holder.kill()
        holder.communicate()
    with SlabStore.open(p) as s:  # its process is gone: the pin lapses
        assert s.pin_count("held") == 0
        for i in range(200):
            s.put(f"y{i}", expected(f"y{i}"))
        assert "held" not in s


def test_the_same_pid_in_two_namespaces_is_refused_with_what_to_change(tmp_path):
    why = _private_pid_namespace()
    if why:
        pytest.skip(why)
    p = tmp_path / "s"
    SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096).close()
    first = _in_namespace(_HOLD, str(p), "60")  # pid 1 in its namespace
    assert first.stdout.readline().strip() == "holding"
    try:
        second = _in_namespace("""
import sys
from slabcache import SlabStore, ConfigError
try:
    SlabStore.open(sys.argv[1]).close()
    print("opened")
except ConfigError as exc:
    print(exc)
""", str(p))
        out, err = second.communicate(timeout=120)
    finally:
        first.kill()
        first.communicate()
    assert second.returncode == 0, err[-2000:]
    assert "another PID namespace" in out and "--pid=host" in out and "own store path" in out


# ------------------------------------------------------------------ rebuild after eviction


def test_a_rebuilt_index_never_brings_back_what_was_evicted_or_replaced(tmp_path):
    """Stores of 256+ slots keep slots free by evicting ahead of need (runs
    of adjacent victims at once); puts at capacity evict too.  Every evicted slot's record is cleared, so a
    rebuild restores exactly what the index held."""
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=256 * 4096, slot_bytes=4096) as s:
        assert s.put("x", rand_tensor(1000, 1))  # the old value
        for i in range(600):  # evicts x and hundreds more, both ways
            s.put(f"k{i}", expected(f"k{i}"))
        assert "x" not in s
        assert s.put("x", rand_tensor(1000, 2))  # stored again, elsewhere
        before = {k: s.get(k) for k in s.keys()}
    assert _fsck(p, "--deep").exit_code == 0
    shutil.rmtree(StorePaths(p).index)
    res = _fsck(p, "--rebuild-index")
    assert res.exit_code == 1, res.findings
    assert [f.kind for f in res.findings] == ["index unreadable", "index rebuilt"]
    with SlabStore.open(p) as s:
        assert sorted(s.keys()) == sorted(before)
        for k, v in before.items():
            assert torch.equal(s.get(k), v), k
        assert torch.equal(s.get("x"), rand_tensor(1000, 2))


def test_a_key_in_two_slots_is_restored_in_neither(tmp_path):
    """Two records of one key cannot be ordered (generations count per
    slot): a rebuild keeps none of them rather than possibly the older."""
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        s.put("a", rand_tensor(1000, 1))
        s.put("keep", rand_tensor(1000, 3))
        slot = s.entry("a").slot
        g = s.geometry
    with open(p / "slab", "r+b") as f:  # a second copy of a's record and payload
        f.seek(g.record_offset(slot))
        rec = f.read(g.record_bytes)
        f.seek(g.slot_offset(slot))
        payload = f.read(g.slot_bytes)
        f.seek(g.record_offset(9))
        f.write(rec)
        f.seek(g.slot_offset(9))
        f.write(payload)
    res = _fsck(p, "--rebuild-index")
    assert "ambiguous entry" in [f.kind for f in res.findings]
    with SlabStore.open(p) as s:
        assert "a" not in s and torch.equal(s.get("keep"), rand_tensor(1000, 3))
    assert _fsck(p, "--rebuild-index").findings[-1].detail.startswith("restored 1 ")


def test_a_rebuild_keeps_one_of_two_long_keys_whose_index_keys_collide_and_clears_the_other(
        tmp_path, monkeypatch):
    """Keys over MAX_INLINE_KEY bytes are indexed by a hash.  Should two
    stored keys share one, a rebuild can index only one: it keeps the later
    slot's and clears the other's record, so that the next
    rebuild neither finds it again nor leaves its slot both free and named."""
    import slabcache.admin.rebuild as rebuild_module
    import slabcache.format.keys as keys_module

    p = tmp_path / "s"
    first, second = "a" * 500, "b" * 500
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        s.put(first, rand_tensor(1000, 1))
        s.put("gone", rand_tensor(1000, 4))  # removed: a free slot between them
        s.put("keep", rand_tensor(1000, 3))
        s.put(second, rand_tensor(1000, 2))
        s.remove(["gone"])
        slots = {k: s.entry(k).slot for k in (first, second)}
    assert slots[first] < slots[second]
    collide = lambda canon: b"#" + bytes(32) if len(canon) > keys_module.MAX_INLINE_KEY else canon  # noqa: E731
    monkeypatch.setattr(keys_module, "index_key", collide)
    monkeypatch.setattr(rebuild_module, "index_key", collide)
    res = _fsck(p, "--rebuild-index")
    dropped = [f for f in res.findings if f.kind == "colliding entry"]
    assert [(f.slot, f.fixed) for f in dropped] == [(slots[first], True)]
    assert res.findings[-1].detail.startswith("restored 2 ")
    with SlabStore.open(p) as s:
        assert first not in s
        assert torch.equal(s.get(second), rand_tensor(1000, 2))
        assert torch.equal(s.get("keep"), rand_tensor(1000, 3))
        assert s._writer.records.read(slots[first]) is None
        assert s.stats()["slots_used"] == 2
    assert check(p, deep=True, progress=False).exit_code == 0
    again = _fsck(p, "--rebuild-index")
    assert "colliding entry" not in [f.kind for f in again.findings]
    assert again.findings[-1].detail.startswith("restored 2 ")


# ------------------------------------------------------------------ foreign index


def _two_stores(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for p, tag in ((a, "a"), (b, "b")):
        with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
            for i in range(10):
                s.put(f"{tag}{i}", expected(f"{tag}{i}"))
    return a, b


def test_a_foreign_index_is_named_and_rebuilt_never_written_over_the_slab(tmp_path):
    a, b = _two_stores(tmp_path)
    header = (a / "slab").read_bytes()[:4096]
    shutil.rmtree(a / "index")
    copy_tree_sparse(b / "index", a / "index")
    res = _fsck(a)
    assert res.exit_code == 4 and res.findings[0].kind == "index belongs to another slab"
    assert "--rebuild-index" in res.findings[0].detail
    assert (a / "slab").read_bytes()[:4096] == header  # nothing written
    res = _fsck(a, "--repair")
    assert res.exit_code == 1, res.findings
    assert (a / "slab").read_bytes()[:4096] == header
    with SlabStore.open(a) as s:
        assert sorted(s.keys()) == sorted(f"a{i}" for i in range(10))
        assert all(torch.equal(s.get(f"a{i}"), expected(f"a{i}")) for i in range(10))
    assert _fsck(a, "--deep").exit_code == 0


def test_a_damaged_header_is_not_restored_from_a_foreign_index(tmp_path):
    a, b = _two_stores(tmp_path)
    shutil.rmtree(a / "index")
    copy_tree_sparse(b / "index", a / "index")
    with open(a / "slab", "r+b") as f:
        f.seek(24)
        f.write(b"\x00\x00\x10\x00")
    damaged = (a / "slab").read_bytes()
    res = _fsck(a, "--repair")
    assert res.exit_code == 4
    assert res.findings[0].kind == "slab header damaged" and "does not fit" in res.findings[0].detail
    assert (a / "slab").read_bytes() == damaged


# ------------------------------------------------------------------ links, FIFOs, directories


def test_repair_never_writes_through_a_symlinked_slab(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        s.put("a", expected("a"))
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 100)
    os.replace(p / "slab", tmp_path / "slab.moved")
    os.symlink(victim, p / "slab")
    for argv in (["fsck", str(p), "--repair"], ["fsck", str(p)], ["stats", str(p)]):
        assert cli_main(argv) == 8
    with pytest.raises(ConfigError, match="symbolic link"):
        SlabStore.open(p)
    assert victim.read_bytes() == b"precious" * 100


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_slab_that_is_a_fifo_or_a_directory_is_refused_at_once(tmp_path, kind):
    p = tmp_path / "s"
    SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096).close()
    os.unlink(p / "slab")
    if kind == "fifo":
        os.mkfifo(p / "slab")
    else:
        os.mkdir(p / "slab")
    out = run_py("""
        import sys
        from slabcache import SlabStore, ConfigError, cli
        try:
            SlabStore.open(sys.argv[1])
        except ConfigError as exc:
            print("open:", exc)
        for cmd in ("stats", "ls", "fsck"):
            print(cmd, cli.main([cmd, sys.argv[1]]))
    """, str(p), timeout=60).stdout  # a FIFO used to block forever here
    name = "a FIFO" if kind == "fifo" else "a directory"
    assert f"is {name}, not a regular file" in out
    assert "stats 8" in out and "ls 8" in out and "fsck 8" in out


# ------------------------------------------------------------------ duplicate keys in a batch


def test_a_repeated_key_in_a_batch_shares_its_first_outcome(tmp_path):
    with SlabStore.open(tmp_path / "s", capacity_bytes=4 * 4096, slot_bytes=4096) as s:
        for i in range(4):
            assert s.put(f"p{i}", expected(f"p{i}")) and s.pin(f"p{i}")
        v = expected("new")
        desc = describe([v.shape], [v.dtype], is_list=False)
        assert s.put_many(["new", "new"], [v, v]) == [False, False]
        assert s.write(["new", "new"], [v, v], [desc, desc]) == [False, False]
        assert s.jobs.write(["new", "new"], [v, v], [desc, desc]).result() == [False, False]
        assert "new" not in s
        s.unpin("p0")
        assert s.put_many(["new", "other", "new"], [v, v, v]) == [True, False, True]
        assert torch.equal(s.get("new"), v) and len(s) == 4


# ------------------------------------------------------------------ failed transactions


def test_a_failed_reserve_gives_back_the_orphans_and_uses_it_took(tmp_path, monkeypatch):
    with SlabStore.open(tmp_path / "s", capacity_bytes=16 * 4096, slot_bytes=4096,
                        use_refresh_seconds=0) as s:  # every read owes a use
        s.put("a", expected("a"))
        # An orphan (a reservation whose give-back failed) and a pending use.
        r = s._allocator.reserve(make_key("orphan"))
        s._allocator._orphans.append(r)
        uses_before = s.entry("a").use.hits
        s.get("a")
        assert s._uses.pending_keys() == 1
        boom = RuntimeError("injected failure inside the transaction")
        take = IndexTxn.take_free_slots  # every way a put gets a free slot goes through it

        def fail(*a, **kw):
            raise boom

        monkeypatch.setattr(IndexTxn, "take_free_slots", fail)
        with pytest.raises(RuntimeError, match="injected"):
            s.put_many(["b", "c"], [expected("b"), expected("c")])
        monkeypatch.setattr(IndexTxn, "take_free_slots", take)
        assert s.stats()["slots_reserved"] == 1  # the aborted transaction released nothing...
        assert s._uses.pending_keys() == 1 and s._allocator.pending_keys() == 1  # ...and owes it still
        assert s.put("b", expected("b"))  # the next write does it
        assert s.stats()["slots_reserved"] == 0
        assert s.entry("a").use.hits == uses_before + 1


# ------------------------------------------------------------------ a map grown elsewhere


def test_a_map_another_process_grew_and_filled_is_followed(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=4096 * 4096, slot_bytes=4096, index_map_bytes=1 << 20) as s:
        assert s.put("before", expected("before"))
        # Another process, with a larger map, writes past the end of ours.
        run_py("""
            import sys
            from slabcache import SlabStore
            from slabcache.testing import expected
            with SlabStore.open(sys.argv[1], index_map_bytes=64 << 20) as o:
                for i in range(1500):
                    assert o.put(f"{i}-" + "k" * 300, expected("x"))
        """, str(p), timeout=300)
        assert torch.equal(s.get("before"), expected("before"))
        assert s.put("after", expected("after")) and torch.equal(s.get("after"), expected("after"))
        assert len(s) == 1502


# ------------------------------------------------------------------ modes


def test_a_group_shared_lock_file_is_group_writable_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        SlabStore.open(tmp_path / "s", capacity_bytes=16 * 4096, slot_bytes=4096, share_group=True).close()
    finally:
        os.umask(old)
    for name in ("lock", "slab", "index/data.mdb", "index/lock.mdb"):
        assert stat.S_IMODE(os.stat(tmp_path / "s" / name).st_mode) == 0o660, name


@pytest.mark.parametrize("share_group", [False, True])
def test_a_rebuilt_index_takes_the_slabs_modes(tmp_path, share_group):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096, share_group=share_group) as s:
        s.put("a", expected("a"))
    shutil.rmtree(p / "index")
    assert _fsck(p, "--rebuild-index").exit_code == 1
    file_mode, dir_mode = (0o660, 0o770) if share_group else (0o600, 0o700)
    assert stat.S_IMODE(os.stat(p / "index").st_mode) == dir_mode
    for name in os.listdir(p / "index"):
        assert stat.S_IMODE(os.stat(p / "index" / name).st_mode) == file_mode


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the store's files another owner")
def test_an_index_rebuilt_by_root_belongs_to_the_stores_owner(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        s.put("a", expected("a"))
    shutil.rmtree(p / "index")
    os.chown(p / "slab", 12345, 12345)
    assert _fsck(p, "--rebuild-index").exit_code == 1
    for part in ("index", "index/data.mdb", "index/lock.mdb"):
        assert os.stat(p / part).st_uid == 12345, part


# ------------------------------------------------------------------ fsck beside a writer


_WRITER = """
import sys, time
from slabcache import SlabStore
from slabcache.testing import expected
with SlabStore.open(sys.argv[1]) as s:
    print("writing", flush=True)
    end = time.monotonic() + float(sys.argv[2])
    i = 0
    while time.monotonic() < end:  # three times the store: evictions all along
        k = f"w{i % 3000}"
        s.put(k, expected(k))
        if i % 7 == 0:
            s.remove(f"w{(i * 13) % 3000}")
        i += 1
"""


def test_plain_fsck_on_a_store_in_use_finds_nothing(tmp_path):
    p = tmp_path / "s"
    SlabStore.open(p, capacity_bytes=1000 * 4096, slot_bytes=4096).close()
    w = subprocess.Popen([sys.executable, "-c", _WRITER, str(p), "30"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=child_env())
    assert w.stdout.readline().strip() == "writing"
    try:
        time.sleep(1.0)
        runs = [_fsck(p, *(("--deep",) if i % 2 else ())) for i in range(8)]
    finally:
        w.kill()
        w.communicate()
    assert [r.findings for r in runs] == [[]] * 8
    assert all(r.entries > 0 for r in runs)


# ------------------------------------------------------------------ read-only handles


def test_a_read_only_handle_keeps_no_uses(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=600 * 4096, slot_bytes=4096) as s:
        s.put_many([f"k{i}" for i in range(500)], [expected(f"k{i}", 100) for i in range(500)])
    with SlabStore.open(p, readonly=True) as r:
        assert all(v is not None for v in r.get_many([f"k{i}" for i in range(500)]))
        for i in range(500):
            assert r.get(f"k{i}") is not None
        assert r._uses.pending_keys() == 0
        assert r.stats()["hits"] == 1000


# ------------------------------------------------------------------ sizes


def test_infinite_and_huge_sizes_are_clear_errors(tmp_path, capsys):
    p = tmp_path / "s"
    SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096).close()
    for size in ("inf", "1e400", "nan", "2000000T"):
        with pytest.raises(SystemExit) as exc:
            cli_main(["compact", str(p), "--capacity", size])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("cannot read size" in err or "1 EiB" in err), err
    from slabcache.admin.compact import compact
    with pytest.raises(ConfigError, match="1 EiB"):
        compact(p, capacity_bytes=2 ** 63)
    from slabcache.integrations.vllm.settings import tier_config
    for cap in ("inf", "1e400", 2 ** 63):
        with pytest.raises(ConfigError, match="capacity"):
            tier_config({"path": str(p), "capacity": cap}, block_size_bytes=4096)
    with pytest.raises(ConfigError, match="io_threads"):
        tier_config({"path": str(p), "capacity": "1G", "io_threads": 100_000}, block_size_bytes=4096)


# ------------------------------------------------------------------ counters


def test_byte_counters_are_kept_with_the_others(tmp_path, capsys):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        for i in range(3):
            s.put(f"k{i}", rand_tensor(1000 + i, i))
        s.get("k0")
        s.get_many(["k1", "k2", "missing"])
    assert cli_main(["stats", str(p), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["bytes_written"] == 3003 and st["bytes_read"] == 3003
    with SlabStore.open(p) as s:  # and they add up across handles
        s.get("k0")
        assert s.stats()["bytes_read"] == 4003


# ------------------------------------------------------------------ a full filesystem


def test_batched_reads_and_key_lists_on_a_full_filesystem_are_never_a_signal(tmp_path):
    from tests.reliability.test_hostile import _can_mount_tmpfs

    why = _can_mount_tmpfs(tmp_path)
    if why:
        pytest.skip(why)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=24m slabfull {mnt} && "
              f"exec {sys.executable} -m slabcache.testing.fullfs {mnt} reads")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, text=True, env=child_env(), timeout=300)
    assert r.returncode == 0, f"exit {r.returncode} (-7/135 is SIGBUS): {r.stderr[-2000:]}"
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["other_errors"] == [] and rep["wrong"] == 0, rep
    # The put at capacity keeps slots free ahead of need: up to PUT_AHEAD go.
    assert rep["stored"] == 3999 and rep["right_after"] >= 3999 - PUT_AHEAD
    assert rep["ops"]["get_many"] == "ok" and rep["ops"]["get_many again"] == "ok"
    assert set(rep["ops"].values()) <= {"ok", "full"} and rep["fsck_exit"] == 0


def test_a_one_transaction_put_that_fails_after_its_write_leaves_no_record(tmp_path, monkeypatch):
    """The slot of a failed put stays free, and a free slot keeps no record
    (a rebuilt index would bring the never-stored value back)."""
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        assert s.put("a", expected("a"))

        def fail(*a, **kw):
            raise RuntimeError("injected failure after the payload and record were written")

        monkeypatch.setattr(IndexTxn, "add", fail)
        with pytest.raises(RuntimeError, match="injected"):
            s.put("b", expected("b"))
        monkeypatch.undo()
        assert "b" not in s
    assert _fsck(p).findings == []
    shutil.rmtree(StorePaths(p).index)
    _fsck(p, "--rebuild-index")
    with SlabStore.open(p) as s:
        assert s.keys() == ["a"]


# ------------------------------------------------------------------ format version 1


def _as_version_1(p):
    """Turn the store at ``p`` into what version 1 wrote (same layout)."""
    import zlib

    from slabcache.format.header import SLAB_HEADER

    raw = bytearray((p / "slab").read_bytes()[:SLAB_HEADER.size])
    fields = list(SLAB_HEADER.unpack(bytes(raw)))
    fields[1], fields[2] = 1, 0
    fields[2] = zlib.crc32(SLAB_HEADER.pack(*fields))
    v1 = SLAB_HEADER.pack(*fields)
    with open(p / "slab", "r+b") as f:
        f.write(v1)
    _put_meta(p, b"header", v1)
    return v1


def _put_meta(p, name, value, db=b"meta"):
    import lmdb

    env = lmdb.open(str(StorePaths(p).index), max_dbs=16)
    with env.begin(write=True, db=env.open_db(db)) as t:
        t.put(name, value)
    env.close()


def test_a_version_1_store_is_upgraded_only_while_no_version_1_process_has_it(tmp_path):
    from slabcache.format.header import header_version
    from slabcache.index import owner as owners

    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        s.put("a", expected("a"))
    _as_version_1(p)
    # A live handle of version 1 (this process, as version 1 recorded it).
    live_v1 = owners.v1_owner(os.getpid(), owners._start_time(os.getpid()))
    _put_meta(p, live_v1, b"\0" * 9, db=b"owners")
    with SlabStore.open(p, readonly=True) as r:  # readers write nothing: fine
        assert torch.equal(r.get("a"), expected("a"))
    with pytest.raises(ConfigError, match="open by an older slabcache"):
        SlabStore.open(p)
    assert header_version((p / "slab").read_bytes()) == 1
    # Once it is gone (a dead process's record), the open upgrades.
    import lmdb

    env = lmdb.open(str(StorePaths(p).index), max_dbs=16)
    with env.begin(write=True, db=env.open_db(b"owners")) as t:
        t.delete(live_v1)
        t.put(owners.v1_owner(2 ** 31 - 7, 1), b"\0" * 9)
    env.close()
    with SlabStore.open(p) as s:
        assert torch.equal(s.get("a"), expected("a"))
    assert header_version((p / "slab").read_bytes()) == 2
    assert _fsck(p, "--deep").findings == []


# ------------------------------------------------------------------ repairs that keep what they can


def _slot_of(p, key):
    with SlabStore.open(p, readonly=True) as s:
        return s.entry(key).slot, s.geometry


def test_a_cleared_record_is_rewritten_from_the_entry_the_payload_proves(tmp_path):
    """An eviction's transaction clears the record before it commits; if it
    aborts, the entry stays with no record.  The repair keeps the entry and
    rewrites its record, so a later rebuild still finds it."""
    from slabcache.format.records import EMPTY_RECORD

    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        for k in ("a", "b"):
            s.put(k, expected(k))
    slot, g = _slot_of(p, "a")
    with open(p / "slab", "r+b") as f:
        f.seek(g.record_offset(slot))
        f.write(EMPTY_RECORD)
    res = _fsck(p)
    assert res.exit_code == 4 and [f.kind for f in res.findings] == ["record out of date"]
    assert _fsck(p, "--repair").exit_code == 1
    assert _fsck(p, "--deep").findings == []
    shutil.rmtree(StorePaths(p).index)
    _fsck(p, "--rebuild-index")
    with SlabStore.open(p) as s:
        assert sorted(s.keys()) == ["a", "b"] and torch.equal(s.get("a"), expected("a"))


def test_an_entry_that_does_not_match_its_payload_is_restored_from_the_record(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        for k in ("a", "b"):
            s.put(k, expected(k))
    import lmdb

    env = lmdb.open(str(StorePaths(p).index), max_dbs=16)
    with env.begin(write=True, db=env.open_db(b"entries")) as t:
        raw = bytearray(t.get(b"sa"))
        raw[20:28] = (12345).to_bytes(8, "little")  # the entry's checksum
        t.put(b"sa", bytes(raw))
    env.close()
    with SlabStore.open(p) as s:
        assert s.get("a") is None  # a checksum failure: a miss, and the entry is dropped
        assert torch.equal(s.get("b"), expected("b"))
    # The slot went free and its record was cleared with it: nothing to restore.
    assert _fsck(p, "--deep").findings == []


def test_a_repair_restores_an_entry_from_its_record_instead_of_dropping_it(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        for k in ("a", "b"):
            s.put(k, expected(k))
    import lmdb

    env = lmdb.open(str(StorePaths(p).index), max_dbs=16)
    with env.begin(write=True, db=env.open_db(b"entries")) as t:
        raw = bytearray(t.get(b"sa"))
        raw[8:12] = (77).to_bytes(4, "little")  # the entry's generation
        raw[20:28] = (12345).to_bytes(8, "little")  # and its checksum
        t.put(b"sa", bytes(raw))
    env.close()
    res = _fsck(p)
    assert res.exit_code == 4 and [f.kind for f in res.findings] == ["entry does not match its payload"]
    assert "restored from the record" in res.findings[0].detail
    assert _fsck(p, "--repair").exit_code == 1
    assert _fsck(p, "--deep").findings == []
    with SlabStore.open(p) as s:
        assert torch.equal(s.get("a"), expected("a")) and torch.equal(s.get("b"), expected("b"))


# ------------------------------------------------------------------ index room


def test_room_made_for_a_large_batch_is_sized_by_what_it_writes(tmp_path):
    """A batch asks for room before it writes (the index is mapped writable:
    a write into a hole of a full filesystem is a SIGBUS), and the file
    never shrinks: so the room must be what the batch can write, not a
    multiple of it."""
    p = tmp_path / "s"
    v = torch.zeros(100, dtype=torch.uint8)
    with SlabStore.open(p, capacity_bytes=12000 * 4096, slot_bytes=4096) as s:
        s.put_many([f"k{i}" for i in range(10000)], [v] * 10000)
        s.touch([f"k{i}" for i in range(10000)])
        used = (s._index.env.info()["last_pgno"] + 1) * 4096
    allocated = os.stat(StorePaths(p).lmdb_data).st_blocks * 512
    assert allocated < 3 * used + (2 << 20), (allocated, used)
