#!/usr/bin/env python3
"""One run of every reliability exercise, with the figures README quotes.

    python tools/reliability.py [--kills 50] [--corruptions 80] [--rounds 10] [--outs 2000]
                                [--only NAME,...] [--json FILE]

Exits non-zero when any exercise served a wrong byte.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slabcache import SlabIOError, SlabStore  # noqa: E402
from slabcache.testing import (  # noqa: E402
    FaultyEngine, child_env, corruption_trials, crash_loop, expected, hammer, inject, verify,
)
from slabcache.testing import attacks  # noqa: E402
from slabcache.testing.damage import index_damage_trials  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def faults(work: str) -> dict:
    out = {"injected": 0, "puts_failed_cleanly": 0, "reads_missed": 0, "wrong": 0, "leaks": 0}
    for io in ("mmap", "direct"):
        for mode in ("eio_write", "enospc", "short_write", "eio_read", "slow"):
            p = os.path.join(work, f"fault-{io}-{mode}")
            with SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096, io=io,
                                engine_wrapper=FaultyEngine) as s:
                fe = inject(s, mode, every=2)
                for i in range(40):
                    k = f"f{i}"
                    try:
                        s.put(k, expected(k))
                    except SlabIOError:
                        out["puts_failed_cleanly"] += 1
                for i in range(40):
                    v = s.get(f"f{i}")
                    if v is not None and not bool((v == expected(f"f{i}")).all()):
                        out["wrong"] += 1
                out["reads_missed"] += s.stats()["io_errors"]
                out["injected"] += fe.injected
                inject(s, None)
                st = s.stats()
                out["leaks"] += st["slots_used"] + st["slots_free"] != st["slots_total"]
                out["wrong"] += verify(s, s.keys())[2]
            shutil.rmtree(p)
    return out


def concurrency(work: str) -> dict:
    out = {"threads": 16, "processes": 4, "ops": 0, "wrong": 0, "errors": 0}
    p = os.path.join(work, "conc")
    with SlabStore.open(p, capacity_bytes=128 * 4096, slot_bytes=4096) as s:
        c = hammer(s, threads=16, seconds=5.0, keys=300)
        out["ops"] += c["ops"]
        out["wrong"] += c["wrong"] + verify(s, s.keys())[2]
        out["errors"] += c["errors"]
    code = ("import json,sys\nfrom slabcache import SlabStore\nfrom slabcache.testing import hammer\n"
            "with SlabStore.open(sys.argv[1]) as s:\n"
            "    print(json.dumps(hammer(s, threads=4, seconds=5.0, keys=300, seed=int(sys.argv[2]))))\n")
    env = child_env()
    procs = [subprocess.Popen([sys.executable, "-c", code, p, str(i)], stdout=subprocess.PIPE,
                              text=True, env=env) for i in range(4)]
    for pr in procs:
        c = json.loads(pr.communicate()[0])
        out["ops"] += c["ops"]
        out["wrong"] += c["wrong"]
        out["errors"] += c["errors"]
    with SlabStore.open(p) as s:
        out["wrong"] += verify(s, s.keys())[2]
    shutil.rmtree(p)
    return out


def bad_inputs() -> int:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--co", "tests/store/test_bad_input.py"],
                       capture_output=True, text=True, cwd=ROOT)
    return sum(1 for line in r.stdout.splitlines() if "::" in line)


def forks(work: str, rounds: int) -> dict:
    """fork_trials in a process of its own (it forks its caller)."""
    code = ("import json,sys,torch\ntorch.set_num_threads(1)\n"
            "from slabcache.testing.forks import fork_trials\n"
            "print(json.dumps(fork_trials(sys.argv[1], sys.argv[2], rounds=int(sys.argv[3]), "
            "children=4).to_dict()))\n")
    r = subprocess.run([sys.executable, "-c", code, os.path.join(work, "fork"),
                        os.path.join(work, "fork-out"), str(rounds)],
                       capture_output=True, text=True, env=child_env(), timeout=1800)
    if r.returncode != 0:
        return {"failed": r.returncode, "stderr": r.stderr[-2000:]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["errors"] = len(out["errors"])
    return out


def full_filesystem(work: str) -> dict:
    """slabcache.testing.fullfs on a private 24 MiB tmpfs (needs `unshare`)."""
    mnt = os.path.join(work, "fullfs")
    os.makedirs(mnt)
    script = (f"mount -t tmpfs -o size=24m slabfull {mnt} && "
              f"exec {sys.executable} -m slabcache.testing.fullfs {mnt}")
    try:
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                           capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=600)
    except FileNotFoundError:
        return {"skipped": "needs util-linux unshare"}
    if r.returncode != 0:
        return {"exit": r.returncode, "stderr": r.stderr[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def full_filesystem_reads(work: str) -> dict:
    """fullfs's batched reads and key lists of 4,000 keys on a full tmpfs."""
    mnt = os.path.join(work, "fullfs-reads")
    os.makedirs(mnt)
    script = (f"mount -t tmpfs -o size=24m slabfull {mnt} && "
              f"exec {sys.executable} -m slabcache.testing.fullfs {mnt} reads")
    try:
        r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                           capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=600)
    except FileNotFoundError:
        return {"skipped": "needs util-linux unshare"}
    if r.returncode != 0:
        return {"exit": r.returncode, "stderr": r.stderr[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--corruptions", type=int, default=80)
    ap.add_argument("--forks", type=int, default=10, help="fork rounds (4 children each)")
    ap.add_argument("--damage", type=int, default=40, help="index damage trials")
    ap.add_argument("--rounds", type=int, default=10,
                    help="rounds of the namespace, rebuild and foreign-index attacks (fsck runs: 4x)")
    ap.add_argument("--outs", type=int, default=2000, help="odd-out reads (duplicate-key batches: a quarter)")
    ap.add_argument("--only", help="comma list of exercises to run (default: all)")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="slabcache-rel-", dir=os.environ.get("TMPDIR"))
    t0 = time.time()
    exercises = {
        "crash_fast_mmap": lambda: crash_loop(os.path.join(work, "c1"), kills=args.kills).to_dict(),
        "crash_strict_direct": lambda: crash_loop(os.path.join(work, "c2"), kills=args.kills // 2,
                                                  durability="strict", io="direct").to_dict(),
        # Slots of 512 KiB: each slot record fills a block, written with O_DIRECT.
        "crash_fast_direct_512k": lambda: crash_loop(os.path.join(work, "c3"), kills=args.kills // 2,
                                                     io="direct", slot_bytes=512 << 10).to_dict(),
        "faults": lambda: faults(work),
        "corruption": lambda: corruption_trials(work, trials=args.corruptions).to_dict(),
        "concurrency": lambda: concurrency(work),
        "bad_inputs": bad_inputs,
        "forks": lambda: forks(work, args.forks),
        "full_filesystem": lambda: full_filesystem(work),
        "index_damage": lambda: index_damage_trials(work, trials=args.damage, flips=12).to_dict(),
        # The second round (slabcache.testing.attacks).
        "odd_outs": lambda: attacks.odd_outs(work, trials=args.outs),
        "pid_namespaces": lambda: attacks.pid_namespaces(work, rounds=args.rounds),
        "rebuild_after_eviction": lambda: attacks.rebuild_after_eviction(work, rounds=args.rounds),
        "foreign_index": lambda: attacks.foreign_index(work, trials=args.rounds),
        "odd_files": lambda: attacks.odd_files(work),
        "duplicate_keys": lambda: attacks.duplicate_keys(work, trials=args.outs // 4),
        "full_filesystem_reads": lambda: full_filesystem_reads(work),
        "modes": lambda: attacks.modes(work),
        "live_fsck": lambda: attacks.live_fsck(work, runs=4 * args.rounds),
        "sizes": lambda: attacks.sizes(work),
    }
    chosen = args.only.split(",") if args.only else list(exercises)
    unknown = set(chosen) - set(exercises)
    if unknown:
        ap.error(f"unknown exercise(s) {sorted(unknown)}; choose from {sorted(exercises)}")
    report = {}
    for name in chosen:
        t1 = time.time()
        report[name] = exercises[name]()
        print(f"{name}: {time.time() - t1:.0f} s", file=sys.stderr, flush=True)
        if args.json:  # as it goes: a later exercise's failure loses nothing
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    report["seconds"] = time.time() - t0
    shutil.rmtree(work, ignore_errors=True)
    wrong = sum(r.get("wrong", 0) + r.get("wrong_after_repair", 0)
                for r in report.values() if isinstance(r, dict) and "wrong" in r)
    report["wrong_bytes_served"] = wrong
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0 if wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
