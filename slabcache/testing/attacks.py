"""The second round of attacks, as repeatable exercises with figures.

Each function runs one class of attack many times and returns counts;
``tools/reliability.py`` runs them all (README's reliability table), and
the test suite runs smaller versions of the same ideas
(tests/reliability/test_hardening.py).  Values are derived from their keys
(``expected``), so every byte served is checked.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time

import torch

from ..admin.fsck import check
from ..core import SlabStore
from ..core.items import Item
from ..core.values import describe
from ..errors import ConfigError, UnsupportedValueError
from ..format.keys import make_key
from ..format.layout import StorePaths
from .values import child_env, expected

# ---------------------------------------------------------------- odd outs


def _odd_out(rng: random.Random, n: int) -> tuple[str, object]:
    """An out of ``n`` bytes (or what looks like one) of a random kind."""
    kind = rng.choice(["dense", "stepped", "transposed", "expanded", "bytes", "bytearray",
                       "int32 dense", "memoryview"])
    if kind == "dense":
        return kind, torch.zeros(n, dtype=torch.uint8)
    if kind == "stepped":
        return kind, torch.zeros(2 * n, dtype=torch.uint8)[::2]
    if kind == "transposed":
        return kind, torch.zeros(n // 8, 8, dtype=torch.uint8).t()
    if kind == "expanded":
        return kind, torch.zeros(1, dtype=torch.uint8).expand(n)
    if kind == "bytes":
        return kind, bytes(n)
    if kind == "bytearray":
        return kind, bytearray(n)
    if kind == "memoryview":
        return kind, memoryview(bytearray(n))
    return kind, torch.zeros(n // 4, dtype=torch.int32)


def odd_outs(work: str, trials: int = 2000, seed: int = 5) -> dict:
    """Raw reads into outs of every kind: each is filled with the right
    bytes or refused with UnsupportedValueError; never a hit that leaves
    the out untouched or wrong."""
    out = {"reads": 0, "filled_right": 0, "refused": 0, "wrong": 0, "other_errors": []}
    rng = random.Random(seed)
    p = os.path.join(work, "outs")
    with SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096) as s:
        keys = [f"o{i}" for i in range(32)]
        vals = {k: torch.randint(0, 256, (2048,), dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(i)) for i, k in enumerate(keys)}
        s.put_many(keys, [vals[k] for k in keys])
        for _ in range(trials):
            k = rng.choice(keys)
            kind, o = _odd_out(rng, 2048)
            how = "read_into"
            out["reads"] += 1
            try:
                got = s.read_into(s.lookup([k]), [o])[0]
            except UnsupportedValueError:
                out["refused"] += 1
                continue
            except Exception as exc:  # anything else is a defect
                out["other_errors"].append(f"{kind} {how}: {type(exc).__name__}: {exc}"[:200])
                continue
            filled = bytes(memoryview(o).cast("B")) if not isinstance(o, torch.Tensor) else \
                o.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            if got is not None and filled == vals[k].numpy().tobytes():
                out["filled_right"] += 1
            else:
                out["wrong"] += 1
    shutil.rmtree(p)
    return out


# ---------------------------------------------------------------- PID namespaces


def _unshare_pid(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


_CHURN = """
import json, sys
from slabcache import SlabStore
from slabcache.testing import expected
with SlabStore.open(sys.argv[1]) as s:
    n = 0
    for i in range(int(sys.argv[2])):
        n += s.put(f"ns{i}", expected(f"ns{i}"))
    print(json.dumps({"stored": n}))
"""

_HOLDER = """
import sys, time
from slabcache import SlabStore
s = SlabStore.open(sys.argv[1])
print("holding", flush=True)
time.sleep(60)
"""


def pid_namespaces(work: str, rounds: int = 10) -> dict:
    """A process of the host pins entries and holds a put in flight while
    a process in a PID namespace of its own (its own pids and /proc, as in
    another container) fills the store four times over; then the same pid
    in two namespaces."""
    out = {"rounds": 0, "pins": 0, "pinned_evicted": 0, "reservations": 0, "reservations_reaped": 0,
           "inflight_puts_lost": 0, "wrong": 0, "same_pid_refused_clearly": 0, "same_pid_other": []}
    if not shutil.which("unshare"):
        return {"skipped": "needs util-linux unshare"}
    for r in range(rounds):
        p = os.path.join(work, f"ns{r}")
        with SlabStore.open(p, capacity_bytes=100 * 4096, slot_bytes=4096) as s:
            for i in range(4):
                s.put(f"pin{i}", expected(f"pin{i}"))
                s.pin(f"pin{i}")
            res = s._allocator.reserve(make_key("inflight"))
            child = _unshare_pid(_CHURN, p, "400")
            _o, err = child.communicate(timeout=300)
            if child.returncode != 0:
                return {"failed": child.returncode, "stderr": err[-1000:]}
            out["pins"] += 4
            for i in range(4):
                v = s.get(f"pin{i}")
                if v is None:
                    out["pinned_evicted"] += 1
                elif not torch.equal(v, expected(f"pin{i}")):
                    out["wrong"] += 1
            out["reservations"] += 1
            with s.snapshot() as snap:
                reserved = [x[0] for x in snap.reservations()]
            if res.slot not in reserved:
                out["reservations_reaped"] += 1
            v = expected("inflight")
            item = Item(make_key("inflight"), [v], describe([v.shape], [v.dtype], is_list=False))
            csum = s._writer.write_slot(res.slot, res.generation, item)
            if not res.commit(item, csum).ok:
                out["inflight_puts_lost"] += 1
            got = s.get("inflight")
            if got is not None and not torch.equal(got, v):
                out["wrong"] += 1
        out["rounds"] += 1
        first = _unshare_pid(_HOLDER, p)
        try:
            first.stdout.readline()
            second = _unshare_pid(
                "import sys\nfrom slabcache import SlabStore, ConfigError\ntry:\n"
                "    SlabStore.open(sys.argv[1]).close(); print('opened')\n"
                "except ConfigError as exc:\n    print(exc)\n", p)
            text, err = second.communicate(timeout=120)
        finally:
            first.kill()
            first.communicate()
        if "another PID namespace" in text:
            out["same_pid_refused_clearly"] += 1
        else:
            out["same_pid_other"].append((text + err)[-300:])
        shutil.rmtree(p)
    return out


# ---------------------------------------------------------------- rebuilds


def rebuild_after_eviction(work: str, rounds: int = 10, seed: int = 9) -> dict:
    """Churn stores (evictions ahead of need and at capacity, removes,
    keys stored again after eviction), then lose the index and rebuild it
    from the slot records: it must hold exactly what the index held."""
    out = {"rounds": 0, "entries_before": 0, "restored": 0, "resurrected": 0, "missing": 0,
           "wrong": 0}
    rng = random.Random(seed)
    for r in range(rounds):
        p = os.path.join(work, f"rb{r}")
        slots = rng.choice([64, 256, 512])
        with SlabStore.open(p, capacity_bytes=slots * 4096, slot_bytes=4096) as s:
            for i in range(slots * 4):
                k = f"k{rng.randrange(slots * 2)}"
                op = rng.random()
                if op < 0.8:
                    s.put(k, expected(k))
                elif op < 0.9:
                    s.remove(k)
                else:
                    k2 = f"k{rng.randrange(slots * 2)}"
                    s.put_many([k, k2], [expected(k), expected(k2)])
            before = set(s.keys())
        shutil.rmtree(StorePaths(p).index)
        check(p, rebuild_index=True, progress=False)
        with SlabStore.open(p) as s:
            after = set(s.keys())
            for k in after:
                v = s.get(k)
                if v is not None and not torch.equal(v, expected(k)):
                    out["wrong"] += 1
        out["rounds"] += 1
        out["entries_before"] += len(before)
        out["restored"] += len(after & before)
        out["resurrected"] += len(after - before)
        out["missing"] += len(before - after)
        shutil.rmtree(p)
    return out


def foreign_index(work: str, trials: int = 10) -> dict:
    """Another store's index copied in: fsck must name it and never write
    the slab header; --repair must restore every entry of this slab."""
    out = {"trials": 0, "named": 0, "header_untouched": 0, "entries": 0, "restored": 0, "wrong": 0}
    for t in range(trials):
        a, b = os.path.join(work, f"fa{t}"), os.path.join(work, f"fb{t}")
        for p, tag in ((a, "a"), (b, "b")):
            with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096) as s:
                for i in range(10):
                    s.put(f"{tag}{t}-{i}", expected(f"{tag}{t}-{i}"))
        header = _head(a)
        shutil.rmtree(os.path.join(a, "index"))
        shutil.copytree(os.path.join(b, "index"), os.path.join(a, "index"))
        res = check(a, progress=False)
        out["named"] += res.findings[:1] != [] and res.findings[0].kind == "index belongs to another slab"
        check(a, repair=True, progress=False)
        out["header_untouched"] += _head(a) == header
        with SlabStore.open(a) as s:
            for i in range(10):
                out["entries"] += 1
                v = s.get(f"a{t}-{i}")
                out["restored"] += v is not None and torch.equal(v, expected(f"a{t}-{i}"))
                out["wrong"] += v is not None and not torch.equal(v, expected(f"a{t}-{i}"))
        out["trials"] += 1
        shutil.rmtree(a)
        shutil.rmtree(b)
    return out


def _head(p: str) -> bytes:
    with open(os.path.join(p, "slab"), "rb") as f:
        return f.read(4096)


# ---------------------------------------------------------------- files


_COMMANDS = r"""
import json, sys
from slabcache import SlabStore, ConfigError, cli
out = {}
try:
    SlabStore.open(sys.argv[1]).close()
    out["open"] = "opened"
except ConfigError as exc:
    out["open"] = "ConfigError"
except Exception as exc:
    out["open"] = type(exc).__name__
for cmd in (["stats"], ["ls"], ["fsck"], ["fsck", "--repair"], ["compact"]):
    out[" ".join(cmd)] = cli.main([cmd[0], sys.argv[1], *cmd[1:]])
print(json.dumps(out))
"""


def odd_files(work: str) -> dict:
    """The slab or lock file replaced by a symlink, a FIFO or a directory;
    every entry point is tried: each must refuse at once (ConfigError at
    open, exit 8 from the tool), never hang, never write through a link."""
    out = {"cases": 0, "calls": 0, "refused_clearly": 0, "hung": 0, "written_through_link": 0,
           "other": []}
    for part in ("slab", "lock"):
        for kind in ("symlink", "fifo", "directory"):
            p = os.path.join(work, f"odd-{part}-{kind}")
            SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096).close()
            target = os.path.join(work, f"odd-{part}-{kind}.target")
            with open(target, "wb") as f:
                f.write(b"precious" * 100)
            os.unlink(os.path.join(p, part))
            if kind == "symlink":
                os.symlink(target, os.path.join(p, part))
            elif kind == "fifo":
                os.mkfifo(os.path.join(p, part))
            else:
                os.mkdir(os.path.join(p, part))
            out["cases"] += 1
            try:
                r = subprocess.run([sys.executable, "-c", _COMMANDS, p], capture_output=True, text=True,
                                   env=child_env(), timeout=60)
                got = json.loads(r.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                out["hung"] += 1
                got = {}
            for call, res in got.items():
                out["calls"] += 1
                if res in ("ConfigError", 8) or (call == "fsck" and res == 4):  # 4: reported
                    out["refused_clearly"] += 1
                else:
                    out["other"].append(f"{part} {kind} {call}: {res}")
            with open(target, "rb") as f:
                out["written_through_link"] += f.read() != b"precious" * 100
            shutil.rmtree(p)
            os.unlink(target)
    return out


def modes(work: str) -> dict:
    """Store files under umask 022, private and group-shared, and an index
    rebuilt after it was lost: every file and directory has the store's
    exact mode."""
    out = {"files": 0, "right_mode": 0, "other_modes": []}
    old = os.umask(0o022)
    try:
        for share in (False, True):
            fmode, dmode = (0o660, 0o770) if share else (0o600, 0o700)
            p = os.path.join(work, f"modes-{share}")
            with SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096, share_group=share) as s:
                s.put("a", expected("a"))
            for rebuilt in (False, True):
                if rebuilt:
                    shutil.rmtree(os.path.join(p, "index"))
                    check(p, rebuild_index=True, progress=False)
                for name, want in (("lock", fmode), ("slab", fmode), ("index", dmode),
                                   ("index/data.mdb", fmode), ("index/lock.mdb", fmode)):
                    got = stat.S_IMODE(os.stat(os.path.join(p, name)).st_mode)
                    out["files"] += 1
                    if got == want:
                        out["right_mode"] += 1
                    else:
                        out["other_modes"].append(f"{name} share_group={share} rebuilt={rebuilt}: {got:o}")
            shutil.rmtree(p)
    finally:
        os.umask(old)
    return out


# ---------------------------------------------------------------- batches


def duplicate_keys(work: str, trials: int = 300, seed: int = 4) -> dict:
    """Batches with repeated keys, into stores with every slot pinned or
    not: each occurrence reports what became of the key."""
    out = {"batches": 0, "answers": 0, "untrue": 0}
    rng = random.Random(seed)
    p = os.path.join(work, "dups")
    with SlabStore.open(p, capacity_bytes=8 * 4096, slot_bytes=4096) as s:
        for t in range(trials):
            s.clear()
            full = rng.random() < 0.5
            if full:
                for i in range(8):
                    s.put(f"p{i}", expected(f"p{i}"))
                    s.pin(f"p{i}")
            keys = [f"d{rng.randrange(4)}" for _ in range(rng.randrange(2, 7))]
            vals = [expected(k) for k in keys]
            how = rng.choice(["put_many", "put_many_raw", "put_many_raw_async"])
            descs = [describe([v.shape], [v.dtype], is_list=False) for v in vals]
            if how == "put_many":
                got = s.put_many(keys, vals)
            elif how == "put_many_raw":
                got = s.write(keys, vals, descs)
            else:
                got = s.jobs.write(keys, vals, descs).result()
            for k, ok in zip(keys, got):
                out["answers"] += 1
                out["untrue"] += ok != (k in s)
            out["batches"] += 1
            for i in range(8):
                while s.unpin(f"p{i}"):
                    pass  # pins nest: unpin until none is left
    shutil.rmtree(p)
    return out


# ---------------------------------------------------------------- fsck beside writers


_WRITER = """
import sys, time
from slabcache import SlabStore
from slabcache.testing import expected
with SlabStore.open(sys.argv[1]) as s:
    print("writing", flush=True)
    i = 0
    while True:
        k = f"w{i % 3000}"
        s.put(k, expected(k))
        if i % 7 == 0:
            s.remove(f"w{(i * 13) % 3000}")
        if i % 11 == 0:
            s.put_many([f"b{i % 500}", f"b{(i + 1) % 500}"], [expected("b")] * 2)
        i += 1
"""


def live_fsck(work: str, runs: int = 40) -> dict:
    """Plain fsck (and --deep) on a healthy store two processes keep
    writing (evictions all along): every finding would be false."""
    out = {"runs": 0, "clean": 0, "false_findings": []}
    p = os.path.join(work, "live")
    SlabStore.open(p, capacity_bytes=1000 * 4096, slot_bytes=4096).close()
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, p], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=child_env()) for _ in range(2)]
    try:
        for w in writers:
            w.stdout.readline()
        time.sleep(1.0)
        for i in range(runs):
            res = check(p, deep=bool(i % 2), progress=False)
            out["runs"] += 1
            if res.findings:
                out["false_findings"] += [f.kind for f in res.findings]
            else:
                out["clean"] += 1
    finally:
        for w in writers:
            w.kill()
            w.communicate()
    shutil.rmtree(p)
    return out


# ---------------------------------------------------------------- sizes


def sizes(work: str) -> dict:
    """Sizes out of range, in every place a size is given: each a clear
    error naming the setting, never an OverflowError or a traceback."""
    from ..format.sizes import parse_size

    out = {"cases": 0, "clear_errors": 0, "other": []}
    p = os.path.join(work, "sizes")
    SlabStore.open(p, capacity_bytes=16 * 4096, slot_bytes=4096).close()
    cases = [("open capacity 2**63", lambda: SlabStore.open(os.path.join(work, "x"), capacity_bytes=2 ** 63,
                                                             slot_bytes=4096)),
             ("open slot 2**70", lambda: SlabStore.open(os.path.join(work, "x"), capacity_bytes=8192,
                                                        slot_bytes=2 ** 70)),
             ("open io_threads 10**6", lambda: SlabStore.open(os.path.join(work, "x"), capacity_bytes=8192,
                                                              slot_bytes=4096, io_threads=10 ** 6))]
    for text in ("inf", "1e400", "nan", "-5G", "2000000T"):  # as the integrations read sizes
        cases.append((f"parse_size {text!r}", lambda text=text: _value_error(parse_size, text)))
    for text in ("inf", "1e400", "nan", "2000000T"):
        cases.append((f"slabcache compact --capacity {text}", lambda text=text: _cli(
            "compact", p, "--capacity", text)))
    for name, call in cases:
        out["cases"] += 1
        try:
            call()
            out["other"].append(f"{name}: accepted")
        except (ConfigError, SystemExit):
            out["clear_errors"] += 1
        except Exception as exc:
            out["other"].append(f"{name}: {type(exc).__name__}: {exc}"[:200])
    shutil.rmtree(p)
    return out


def _cli(*argv: str) -> None:
    """Run the tool; a usage error (exit 2) without a traceback is a clear error."""
    r = subprocess.run([sys.executable, "-m", "slabcache", *argv], capture_output=True, text=True,
                       env=child_env())
    if r.returncode == 2 and "Traceback" not in r.stderr:
        raise SystemExit(2)
    raise RuntimeError(f"exit {r.returncode}: {r.stderr[-200:]}")


def _value_error(parse, text: str) -> None:
    """``parse(text)``; its ValueError (what the integrations turn into a
    ConfigError naming their key) counts as a clear error."""
    try:
        parse(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
