"""Reliability harness: crash loops, corruption trials, thread hammering.

Used by the test suite (small runs, in CI) and by ``tools/crash_loop.py`` and
``tools/reliability.py`` (the figures in README).  Every value written here
is derived from its key, so any byte served can be checked without keeping
a copy: ``expected(key)`` is the only right answer.
"""

from __future__ import annotations

import json
import shutil
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from ..admin.fsck import check
from ..format.layout import StorePaths
from ..core import SlabStore
from .values import child_env, expected


# ---------------------------------------------------------------- crash loop


_WRITER = r"""
import os, random, sys
from slabcache import SlabStore
from slabcache.testing import FaultyEngine
from slabcache.testing.harness import crash_value
path, log_path, seed, durability, io, slow = sys.argv[1:7]
rng = random.Random(int(seed))
log = open(log_path, "a", buffering=1)
s = SlabStore.open(path, io=io, durability=durability, engine_wrapper=FaultyEngine)
if slow == "1":
    # Every write waits, so kills fall inside puts in flight (a batch's run
    # of slots waits after its payloads, before their records).
    s.engine.delay = 0.005
    s.engine.inject("slow")
print("ready", flush=True)
while True:
    op = rng.random()
    if op < 0.45:
        k = f"k{rng.randrange(400)}"
        log.write(f"try {k}\n")  # a kill before the next line leaves k uncertain
        if s.put(k, crash_value(k)):
            log.write(f"put {k}\n")
    elif op < 0.7:  # a batch: one transaction reserves, one commits
        # "w" keys fill their slots: free slots that follow one another
        # are written as one run.
        ks = sorted({f"w{rng.randrange(96)}" for _ in range(4)} if op < 0.55 else
                    {f"k{rng.randrange(400)}" for _ in range(3)})
        for k in ks:
            log.write(f"try {k}\n")
        for k, ok in zip(ks, s.put_many(ks, [crash_value(k) for k in ks])):
            log.write(f"{'put' if ok else 'failed'} {k}\n")
    elif op < 0.85:
        k = f"{'w' if op < 0.74 else 'k'}{rng.randrange(96 if op < 0.74 else 400)}"
        log.write(f"try {k}\n")
        log.write(f"{'rm' if s.remove(k, force=True) else 'absent'} {k}\n")
    elif op < 0.95:
        s.pin(f"k{rng.randrange(400)}")
    else:
        s.get(f"k{rng.randrange(400)}")
"""


class _Report:
    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CrashReport(_Report):
    kills: int = 0
    acked_puts: int = 0
    acked_removes: int = 0
    verified: int = 0
    served_right: int = 0
    misses: int = 0
    wrong: int = 0
    lost: int = 0  # acknowledged, never removed, and missing: the store holds every key
    torn: int = 0  # an entry whose payload is not what it names (a kill must never cause one)
    checksum_failures: int = 0
    fsck_unfixable: int = 0
    fsck_repairs: int = 0
    leaks: int = 0
    resurrected: int = 0
    notes: list = field(default_factory=list)


def crash_value(key: str) -> torch.Tensor:
    """The crash loop's value for ``key``: "w" keys fill a 4 KiB slot (their
    batches are written a run of slots at a time), the rest are smaller."""
    return expected(key, 4096, exact=True) if key.startswith("w") else expected(key)


# fsck's findings that mean a committed entry names bytes that were never
# (fully) written: a SIGKILL, unlike a power loss, can never cause one.
TORN = ("checksum mismatch", "entry does not match its payload")


def crash_loop(path: str, kills: int = 50, durability: str = "fast", io: str = "mmap",
               seed: int = 1, capacity_slots: int = 512, max_run: float = 0.6,
               progress=None, slot_bytes: int = 4096) -> CrashReport:
    """Kill a writer with SIGKILL ``kills`` times; verify the store after each kill.

    The writer's 496 keys fit the store, so nothing is evicted: every key
    whose last acknowledged operation is a put must read back (the page
    cache outlives a killed process, so this holds in every durability
    mode).  Every other run slows each write down, so kills land inside
    puts in flight.  After each kill ``fsck --repair --deep`` runs: what it
    repairs is counted, and a payload that does not match its committed
    entry is ``torn``.  ``slot_bytes`` of 512 KiB or more gives the slot
    records a block each (``direct`` writes them with O_DIRECT).
    """
    rep = CrashReport()
    rng = random.Random(seed)
    SlabStore.open(path, capacity_bytes=capacity_slots * slot_bytes, slot_bytes=slot_bytes, io=io).close()
    log_path = os.path.join(os.path.dirname(os.path.abspath(path)), "crash-loop.log")
    open(log_path, "w").close()
    env = child_env()
    state: dict[str, str] = {}  # last acknowledged operation per key
    uncertain: set[str] = set()  # keys whose last operation was never acknowledged
    for i in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, path, log_path, str(seed * 1000 + i),
                                 durability, io, str(i % 2)], stdout=subprocess.PIPE, env=env)
        proc.stdout.readline()  # ready: the store is open
        time.sleep(rng.uniform(0.01, max_run))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        rep.kills += 1
        with open(log_path) as f:
            lines = f.read().splitlines()
        open(log_path, "w").close()
        tried: set[str] = set()
        for line in lines:
            if not line.endswith(tuple("0123456789")):
                continue  # the kill cut this line short: not acknowledged
            op, k = line.split()
            if op == "try":
                tried.add(k)
                continue
            tried.discard(k)
            uncertain.discard(k)
            if op in ("put", "rm"):
                state[k] = op
            rep.acked_puts += op == "put"
            rep.acked_removes += op == "rm"
        # Killed between trying and acknowledging: until a later
        # acknowledged operation, either outcome is right.
        uncertain |= tried
        res = check(path, repair=True, deep=True, progress=False)
        rep.fsck_repairs += sum(1 for f in res.findings if f.fixed)
        torn = [f for f in res.findings if f.kind in TORN]
        rep.torn += len(torn)
        if torn:
            rep.notes.append(f"kill {i}: {[(f.kind, f.key) for f in torn]}")
        if res.exit_code not in (0, 1):
            rep.fsck_unfixable += 1
            rep.notes.append(f"kill {i}: fsck left {[f.kind for f in res.findings if not f.fixed]}")
        with SlabStore.open(path, io=io) as s:
            st = s.stats()
            if st["slots_used"] + st["slots_free"] + st["slots_reserved"] != st["slots_total"]:
                rep.leaks += 1
            rep.checksum_failures = st["checksum_failures"]
            present = set(s.keys())
            for k, op in state.items():
                rep.verified += 1
                v = s.get(k)
                if v is None:
                    rep.misses += 1
                    if op == "put" and k not in uncertain:
                        rep.lost += 1
                        rep.notes.append(f"kill {i}: {k} acknowledged, then missing")
                elif torch.equal(v, crash_value(k)):
                    rep.served_right += 1
                else:
                    rep.wrong += 1
                if op == "rm" and k in present and k not in uncertain:
                    rep.resurrected += 1
        if progress:
            progress(i + 1, kills)
    os.unlink(log_path)
    return rep


# ---------------------------------------------------------------- corruption


_READER = r"""
import json, sys
from slabcache import CorruptStoreError, SlabStore
from slabcache.testing import expected
path, keys = sys.argv[1], json.loads(sys.argv[2])
out = {"right": 0, "miss": 0, "wrong": 0, "corrupt": 0, "raw": [], "open_error": None}
try:
    s = SlabStore.open(path)
except Exception as exc:
    out["open_error"] = f"{type(exc).__name__}: {exc}"
else:
    for k in keys:
        try:
            v = s.get(k)
        except CorruptStoreError:  # a clear error naming fsck: a refusal, not a miss
            out["corrupt"] += 1
            continue
        except Exception as exc:  # anything else is a defect
            out["raw"].append(f"{type(exc).__name__}: {exc}"[:200])
            continue
        if v is None:
            out["miss"] += 1
        elif bool((v == expected(k)).all()) and v.shape == expected(k).shape:
            out["right"] += 1
        else:
            out["wrong"] += 1
    s.close()
print(json.dumps(out))
"""


@dataclass
class CorruptionReport(_Report):
    trials: int = 0
    by_target: dict = field(default_factory=dict)
    open_refused: int = 0
    open_refused_naming_fsck: int = 0
    crashed: int = 0  # the reader died: LMDB aborts on some damaged pages of its own file
    crashed_by_target: dict = field(default_factory=dict)
    reads: int = 0
    right: int = 0
    misses: int = 0
    corrupt_errors: int = 0  # CorruptStoreError naming fsck
    raw_errors: list = field(default_factory=list)  # any other exception: a defect
    wrong: int = 0


def corruption_trials(workdir: str, trials: int = 40, seed: int = 7, flips: int = 8) -> CorruptionReport:
    """Flip random bits in payloads, slot records, the slab header and the
    LMDB files of fresh stores; read every key back in a child process."""
    rep = CorruptionReport()
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(24)]
    base = os.path.join(workdir, "corrupt-base")
    shutil.rmtree(base, ignore_errors=True)
    with SlabStore.open(base, capacity_bytes=32 * 4096, slot_bytes=4096) as s:
        for k in keys:
            s.put(k, expected(k))
        g = s.geometry
    targets = ["payload", "record", "header", "lmdb"]
    env = child_env()
    for t in range(trials):
        target = targets[t % len(targets)]
        p = os.path.join(workdir, f"corrupt-{t}")
        shutil.rmtree(p, ignore_errors=True)
        shutil.copytree(base, p)
        if target == "lmdb":
            fpath = StorePaths(p).lmdb_data
            lo, hi = 0, os.path.getsize(fpath)
        else:
            fpath = StorePaths(p).slab
            lo, hi = {"payload": (g.data_offset, g.file_bytes),
                      "record": (g.records_offset, g.records_offset + g.slot_count * g.record_bytes),
                      "header": (0, 136)}[target]
        with open(fpath, "r+b") as f:
            for _ in range(flips):
                off = rng.randrange(lo, hi)
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
        r = subprocess.run([sys.executable, "-c", _READER, p, json.dumps(keys)], env=env,
                           capture_output=True, text=True, timeout=120)
        rep.trials += 1
        rep.by_target[target] = rep.by_target.get(target, 0) + 1
        if r.returncode != 0:
            rep.crashed += 1
            rep.crashed_by_target[target] = rep.crashed_by_target.get(target, 0) + 1
        else:
            out = json.loads(r.stdout.strip().splitlines()[-1])
            if out["open_error"]:
                rep.open_refused += 1
                rep.open_refused_naming_fsck += "slabcache fsck" in out["open_error"]
            rep.reads += out["right"] + out["miss"] + out["wrong"] + out["corrupt"] + len(out["raw"])
            rep.right += out["right"]
            rep.misses += out["miss"]
            rep.corrupt_errors += out["corrupt"]
            rep.raw_errors += out["raw"]
            rep.wrong += out["wrong"]
        shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    return rep


# ---------------------------------------------------------------- concurrency


def hammer(store, threads: int = 8, seconds: float = 2.0, keys: int = 200, seed: int = 3) -> dict:
    """Many threads doing mixed operations; every get checked as it happens."""
    stop = time.monotonic() + seconds
    counts = {"ops": 0, "gets": 0, "right": 0, "miss": 0, "wrong": 0, "errors": 0}
    lock = threading.Lock()

    def work(n):
        rng = random.Random(seed * 100 + n)
        local = dict.fromkeys(counts, 0)
        while time.monotonic() < stop:
            k = f"h{rng.randrange(keys)}"
            op = rng.random()
            try:
                if op < 0.4:
                    store.put(k, expected(k))
                elif op < 0.8:
                    v = store.get(k)
                    local["gets"] += 1
                    if v is None:
                        local["miss"] += 1
                    elif torch.equal(v, expected(k)):
                        local["right"] += 1
                    else:
                        local["wrong"] += 1
                elif op < 0.88:
                    store.remove(k, force=True)
                elif op < 0.94:
                    if store.pin(k):
                        store.unpin(k)
                else:
                    store.prefix([k, f"h{rng.randrange(keys)}"])
            except Exception:
                local["errors"] += 1
            local["ops"] += 1
        with lock:
            for c, v in local.items():
                counts[c] += v

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return counts


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="slabcache-rel-")
