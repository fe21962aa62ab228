"""Index damage trials: flip bits in the pages LMDB uses, then read every
key and run each admin command on a copy of the damaged store.

A get may serve the right bytes, miss, or raise CorruptStoreError; any
other exception, and any wrong byte, is a defect.  The commands must exit
with a code from their table and never with a traceback.  Each trial runs
in a child process: LMDB aborts the process on some damaged pages, which
is counted apart (a refusal, never wrong bytes).
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from ..core import SlabStore
from ..format.layout import StorePaths
from .values import child_env, expected

COMMANDS = (("stats",), ("ls",), ("fsck",), ("fsck", "--repair"), ("compact",))

_TRIAL = r"""
import contextlib, io, json, shutil, sys
from slabcache import SlabStore, cli
from slabcache.errors import CorruptStoreError
from slabcache.testing import expected
path, keys, commands = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = {"right": 0, "miss": 0, "wrong": 0, "corrupt": 0, "raw": [], "open": None, "cli": {},
       "after_repair_wrong": 0, "after_repair_fsck": None}

def read_all(p, tally):
    with SlabStore.open(p) as s:
        for k in keys:
            try:
                v = s.get(k)
            except CorruptStoreError:
                tally["corrupt"] += 1
                continue
            except Exception as exc:
                tally["raw"].append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            if v is None:
                tally["miss"] += 1
            elif v.shape == expected(k).shape and bool((v == expected(k)).all()):
                tally["right"] += 1
            else:
                tally["wrong"] += 1

# Copies first: opening a store grows its index file to the map size.
works = []
for n, _cmd in enumerate(commands):
    works.append(f"{path}.cmd{n}")
    shutil.copytree(path, works[-1])
try:
    read_all(path, out)
except CorruptStoreError as exc:
    out["open"] = "CorruptStoreError"
except Exception as exc:
    out["raw"].append(f"open {type(exc).__name__}: {exc}"[:200])
for work, cmd in zip(works, commands):
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = cli.main([cmd[0], work, *cmd[1:]])
        tb = "Traceback" in err.getvalue()
    except BaseException as exc:
        rc, tb = None, True
    out["cli"][" ".join(cmd)] = [rc, tb, err.getvalue().strip().splitlines()[-1:]]
    if cmd == ["fsck", "--repair"] and rc in (0, 1):
        with contextlib.redirect_stdout(io.StringIO()):
            out["after_repair_fsck"] = cli.main(["fsck", work])
        tally = {"right": 0, "miss": 0, "wrong": 0, "corrupt": 0, "raw": []}
        read_all(work, tally)
        out["after_repair_wrong"] = tally["wrong"] + tally["corrupt"] + len(tally["raw"])
    shutil.rmtree(work, ignore_errors=True)
print(json.dumps(out))
"""


@dataclass
class DamageReport:
    trials: int = 0
    aborted: int = 0  # LMDB stopped the process on a damaged page
    right: int = 0
    misses: int = 0
    corrupt_errors: int = 0
    wrong: int = 0
    raw_errors: list = field(default_factory=list)
    cli_exits: dict = field(default_factory=dict)  # command -> {exit code: count}
    cli_tracebacks: int = 0
    repaired_not_clean: int = 0  # fsck --repair said 0/1 but a second fsck disagreed
    wrong_after_repair: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _last_page(data_path: str) -> int:
    import lmdb

    env = lmdb.open(os.path.dirname(data_path), readonly=True, lock=False, max_dbs=16)
    try:
        return env.info()["last_pgno"]
    finally:
        env.close()


def index_damage_trials(workdir: str, trials: int = 12, seed: int = 11, flips: int = 4,
                        keys: int = 60) -> DamageReport:
    rep = DamageReport()
    rng = random.Random(seed)
    names = [f"k{i}" for i in range(keys)]
    base = os.path.join(workdir, "damage-base")
    shutil.rmtree(base, ignore_errors=True)
    # A small index map: each trial copies the store several times.
    with SlabStore.open(base, capacity_bytes=2 * keys * 4096, slot_bytes=4096,
                        index_map_bytes=4 << 20) as s:
        for k in names:
            s.put(k, expected(k))
    data = StorePaths(base).lmdb_data
    last = _last_page(data)
    exits: dict = collections.defaultdict(collections.Counter)
    env = child_env()
    for t in range(trials):
        p = os.path.join(workdir, f"damage-{t}")
        shutil.rmtree(p, ignore_errors=True)
        shutil.copytree(base, p)
        with open(StorePaths(p).lmdb_data, "r+b") as f:
            for _ in range(flips):
                off = rng.randrange(2 * 4096, (last + 1) * 4096)  # past the two meta pages
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
        r = subprocess.run([sys.executable, "-c", _TRIAL, p, json.dumps(names),
                            json.dumps(COMMANDS)], env=env, capture_output=True, text=True,
                           timeout=300)
        rep.trials += 1
        if r.returncode != 0:
            rep.aborted += 1
        else:
            out = json.loads(r.stdout.strip().splitlines()[-1])
            rep.right += out["right"]
            rep.misses += out["miss"]
            rep.corrupt_errors += out["corrupt"]
            rep.wrong += out["wrong"]
            rep.raw_errors += out["raw"]
            for cmd, (rc, tb, _last) in out["cli"].items():
                exits[cmd][rc] += 1
                rep.cli_tracebacks += int(tb)
            if out["after_repair_fsck"] not in (None, 0):
                rep.repaired_not_clean += 1
            rep.wrong_after_repair += out["after_repair_wrong"]
        shutil.rmtree(p, ignore_errors=True)
    rep.cli_exits = {cmd: dict(c) for cmd, c in exits.items()}
    shutil.rmtree(base, ignore_errors=True)
    return rep
