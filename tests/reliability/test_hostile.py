"""A hostile environment: fork, a full filesystem, a damaged index."""

import json
import shutil
import subprocess
import sys

import pytest

from slabcache import CorruptStoreError, SlabStore
from slabcache.cli import main as cli_main
from slabcache.format.layout import StorePaths
from slabcache.index.entry import _ENTRY
from slabcache.testing import child_env, expected
from slabcache.testing.damage import index_damage_trials
from tests.helpers import run_py

# ------------------------------------------------------------------ fork


def test_forked_children_open_the_store_themselves_while_the_parent_works(tmp_path):
    """Children forked while the parent's workers are busy: the inherited
    handle is refused, a fresh open works, nothing hangs or breaks."""
    out = run_py("""
        import json, sys, torch
        torch.set_num_threads(1)
        from slabcache.testing.forks import fork_trials
        rep = fork_trials(sys.argv[1], sys.argv[2], rounds=3, children=4, timeout=60)
        print(json.dumps(rep.to_dict()))
    """, str(tmp_path / "s"), str(tmp_path / "out"), timeout=300).stdout
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["errors"] == [] and rep["hung"] == 0 and rep["died"] == 0, rep
    assert rep["children"] == 12 and rep["child_ops"] == 12 * 240
    assert rep["inherited_refused"] == 12 * 3 and rep["inherited_used"] == 0
    assert rep["wrong"] == 0 and rep["fsck_exit"] == 0


def test_multiprocessing_fork_pool_workers_open_by_path(tmp_path):
    out = run_py("""
        import json, multiprocessing, sys
        from slabcache import SlabStore
        from slabcache.testing import expected

        def work(i):
            with SlabStore.open(sys.argv[1]) as s:
                k = f"w{i}"
                s.put(k, expected(k))
                v = s.get(k)
                return v is not None and bool((v == expected(k)).all())

        if __name__ == "__main__":
            parent = SlabStore.open(sys.argv[1], capacity_bytes=64 * 4096, slot_bytes=4096)
            parent.put("p", expected("p"))
            with multiprocessing.get_context("fork").Pool(3) as pool:
                oks = pool.map(work, range(12))
            got = [parent.get(f"w{i}") for i in range(12)]
            parent.close()
            print(json.dumps({"oks": oks, "seen": sum(g is not None for g in got)}))
    """, str(tmp_path / "s"), timeout=300).stdout
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep == {"oks": [True] * 12, "seen": 12}


def test_an_inherited_handle_says_to_open_again_and_leaves_the_parent_alone(tmp_path):
    out = run_py("""
        import json, os, sys
        from slabcache import SlabStore, StoreForkedError
        from slabcache.testing import expected
        s = SlabStore.open(sys.argv[1], capacity_bytes=64 * 4096, slot_bytes=4096)
        s.put("a", expected("a"))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            msgs = []
            for call in (lambda: s.get("a"), lambda: s.put("b", expected("b")),
                         lambda: s.jobs.put("c", expected("c")), lambda: len(s)):
                try:
                    call()
                    msgs.append("worked")
                except StoreForkedError as exc:
                    msgs.append(str(exc))
            s.close()  # a no-op in the child
            os.write(w, json.dumps(msgs).encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        msgs = json.loads(os.read(r, 1 << 16))
        v = s.get("a")
        s.put("d", expected("d"))
        print(json.dumps({"msgs": msgs, "status": status, "parent_ok": bool((v == expected("a")).all()),
                          "len": len(s)}))
        s.close()
    """, str(tmp_path / "s")).stdout
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["status"] == 0 and rep["parent_ok"] and rep["len"] == 2
    assert len(rep["msgs"]) == 4
    for m in rep["msgs"]:
        assert "before it forked" in m and "open the store again in this process" in m


# ------------------------------------------------------------------ full filesystem


def _can_mount_tmpfs(tmp_path) -> str | None:
    """Why a private tmpfs cannot be mounted here, or None when it can."""
    if not shutil.which("unshare"):
        return "needs util-linux `unshare` to mount a private, small tmpfs"
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        f"mount -t tmpfs -o size=1m probe {probe}"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"this machine does not allow a private tmpfs mount ({r.stderr.strip()[:80]})"
    return None


def test_a_full_filesystem_is_an_error_never_a_signal_and_loses_nothing(tmp_path):
    why = _can_mount_tmpfs(tmp_path)
    if why:
        pytest.skip(why)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=24m slabfull {mnt} && "
              f"exec {sys.executable} -m slabcache.testing.fullfs {mnt}")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, text=True, env=child_env(), timeout=300)
    assert r.returncode == 0, f"exit {r.returncode} (-7/135 is SIGBUS): {r.stderr[-2000:]}"
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["other_errors"] == [] and rep["wrong"] == 0, rep
    assert rep["refused_full"] > 0 and rep["gets_full"] > 0
    acked = rep["acked_before"] + rep["acked_full"]
    assert rep["readonly_full"] == acked  # everything acknowledged is still there
    assert rep["reopen_full"] == "opened" or "is full" in rep["reopen_full"]
    assert rep["acked_after"] == 100 and rep["fsck_exit"] == 0


# ------------------------------------------------------------------ damaged index


def test_random_damage_to_the_index_is_a_miss_or_a_clear_error(tmp_path):
    rep = index_damage_trials(str(tmp_path), trials=6, flips=6, seed=11)
    assert rep.trials == 6
    assert rep.wrong == 0 and rep.raw_errors == [], rep.raw_errors
    assert rep.right + rep.misses + rep.corrupt_errors > 0
    assert rep.cli_tracebacks == 0
    table = {"stats": {0, 8}, "ls": {0, 8}, "fsck": {0, 4}, "fsck --repair": {0, 1}, "compact": {0, 8}}
    for cmd, codes in rep.cli_exits.items():
        assert set(codes) <= {str(c) for c in table[cmd]} | set(table[cmd]), (cmd, codes)
    assert rep.repaired_not_clean == 0 and rep.wrong_after_repair == 0


def _entry_raw(path, key):
    import lmdb
    env = lmdb.open(str(StorePaths(path).index), max_dbs=16)
    return env, env.open_db(b"entries")


def _rewrite_entry(path, canon: bytes, edit) -> None:
    env, db = _entry_raw(path, canon)
    with env.begin(write=True, db=db) as t:
        raw = bytearray(t.get(canon))
        t.put(canon, bytes(edit(raw)))
    env.close()


def test_a_damaged_length_or_shape_is_corrupt_store_error_not_a_huge_allocation(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        s.put("a", expected("a"))
        s.put("b", expected("b"))

    def huge_length(raw):
        raw[12:20] = (1 << 50).to_bytes(8, "little")  # the length field
        return raw

    def huge_shape(raw):
        raw[_ENTRY.size + 10:_ENTRY.size + 18] = (1 << 40).to_bytes(8, "little")  # first dim
        return raw

    _rewrite_entry(p, b"sa", huge_length)
    _rewrite_entry(p, b"sb", huge_shape)
    with SlabStore.open(p) as s:
        for k in ("a", "b"):
            with pytest.raises(CorruptStoreError, match="slabcache fsck"):
                s.get(k)
            with pytest.raises(CorruptStoreError, match="slabcache fsck"):
                s.get_many([k])
    assert cli_main(["fsck", str(p)]) == 4
    assert cli_main(["fsck", str(p), "--repair"]) == 1
    with SlabStore.open(p) as s:
        assert s.get("a") is None and s.get("b") is None


def test_ls_shows_a_key_whose_bytes_are_not_utf8(tmp_path, capsys):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
        s.put("ok", expected("ok"))
    env, db = _entry_raw(p, b"sok")
    with env.begin(write=True, db=db) as t:
        raw = bytearray(t.get(b"sok"))
        raw[-2:] = b"\xff\xfe"  # the stored key, in place of "ok"
        t.put(b"sok", bytes(raw))
    env.close()
    assert cli_main(["ls", str(p)]) == 0
    assert "\\xff\\xfe" in capsys.readouterr().out
    assert cli_main(["fsck", str(p)]) == 4  # and fsck finds it


def test_a_crashing_cli_command_prints_one_line_and_exits_8(tmp_path, capsys, monkeypatch):
    p = tmp_path / "s"
    SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096).close()
    import slabcache.admin.reports as reports

    def boom(_store):
        raise KeyError("unexpected")

    monkeypatch.setattr(reports, "store_stats", boom)
    assert cli_main(["stats", str(p)]) == 8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "KeyError" in err[0] and "slabcache fsck" in err[0]


def test_a_fork_during_a_long_transaction_refuses_the_child_clearly(tmp_path):
    """A thread of the parent inside a transaction past the fork's wait: the
    child cannot close its copy safely, so it cannot open the store, and
    says so; the parent is unaffected."""
    out = run_py("""
        import json, os, sys, threading, time
        import slabcache.index.env as index_env
        from slabcache import SlabStore, StoreForkedError
        from slabcache.testing import expected
        index_env.FORK_WAIT_SECONDS = 0.2
        s = SlabStore.open(sys.argv[1], capacity_bytes=64 * 4096, slot_bytes=4096)
        s.put("a", expected("a"))
        inside = threading.Event()

        def hold():
            with s.snapshot():
                inside.set()
                time.sleep(1.0)

        t = threading.Thread(target=hold)
        t.start()
        inside.wait()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                SlabStore.open(sys.argv[1])
                msg = "opened"
            except StoreForkedError as exc:
                msg = str(exc)
            os.write(w, msg.encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        msg = os.read(r, 1 << 16).decode()
        t.join()
        v = s.get("a")
        s.put("b", expected("b"))
        print(json.dumps({"msg": msg, "parent_ok": bool((v == expected("a")).all()), "len": len(s)}))
        s.close()
    """, str(tmp_path / "s")).stdout
    rep = json.loads(out.strip().splitlines()[-1])
    assert "forked while a thread of its parent was inside a transaction" in rep["msg"]
    assert rep["parent_ok"] and rep["len"] == 2
