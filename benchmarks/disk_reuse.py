"""What the disk charges for a first write: O_DIRECT writes into blocks
just allocated, against writes into blocks written before, in one run.

A tier that makes a file for every chunk and unlinks it on eviction
(LMCache's LocalDiskBackend, vLLM's ``fs`` tier) writes newly allocated
blocks for as long as it runs; a slab writes them on its first fill and
rewrites its slots after that (churn).  Where the disk is slower on
blocks it has not seen (a thin-provisioned virtual disk, with a
filesystem mounted ``discard`` handing freed blocks back to it), the
host benchmarks' churn rows carry that difference.  This measures it.

Per chunk size, each round, in turn (the order reversed every other
round), fio writes with O_DIRECT in random order, one chunk a request,
DEPTH in flight:

- fresh:      a new file, preallocated (what a new slab is);
- rewrite:    that file again (a slab's slots after the first fill);
- zero-range: that file again after FALLOC_FL_ZERO_RANGE turned its
              extents back to unwritten, on blocks the disk has seen:
              where this runs at the rewrite's rate and fresh does not,
              the cost is the disk's, not the filesystem's extent
              conversion.

Run:  python benchmarks/disk_reuse.py [--dir DIR] [--sizes 256K,8M,32M] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys

from report import fio_gbps, save_json, span

DEPTH = 4
FILE_BYTES = 1 << 30
KINDS = ("fresh", "rewrite", "zero-range")
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_ZERO_RANGE = 0x10


def zero_range(path: str, length: int) -> None:
    """Turn ``length`` bytes of ``path`` back into unwritten extents
    (fallocate(2) with FALLOC_FL_ZERO_RANGE), keeping their blocks."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate(FALLOC_FL_ZERO_RANGE) on {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def one_round(fio: str, directory: str, chunk: int, round_: int) -> dict:
    """GB/s of each kind for one chunk size; the file is made anew."""
    path = os.path.join(directory, f"reuse-{chunk}")
    if os.path.exists(path):
        os.remove(path)  # its blocks go back to the filesystem (and, mounted discard, the disk)
    args = (f"--filename={path}", "--rw=randwrite", f"--bs={chunk}", f"--size={FILE_BYTES}",
            f"--iodepth={DEPTH}", "--fallocate=native", f"--randseed={round_ + 1}")
    out = {"fresh": fio_gbps(fio, *args)}
    # rewrite and zero-range both follow fresh (they need its blocks);
    # between them the order alternates.
    later = ("rewrite", "zero-range") if round_ % 2 == 0 else ("zero-range", "rewrite")
    for kind in later:
        if kind == "zero-range":
            zero_range(path, FILE_BYTES)
        out[kind] = fio_gbps(fio, *args)
    os.remove(path)
    return out


def summarize(rounds: list[dict]) -> dict:
    """Medians of each kind and, paired round by round, each kind's rate
    over fresh's: median and range."""
    out = {kind: statistics.median(r[kind] for r in rounds) for kind in KINDS}
    for kind in KINDS[1:]:
        ratios = [r[kind] / r["fresh"] for r in rounds]
        out[f"{kind}/fresh"] = statistics.median(ratios)
        out[f"{kind}/fresh range"] = span(ratios)
    return out


def mount_options(directory: str) -> str:
    """The mount options of the filesystem holding ``directory``."""
    best, opts = "", "?"
    target = os.path.realpath(directory)
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, opts = mnt, f"{fields[2]} {fields[3]}"
    return opts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="slabcache-bench")
    ap.add_argument("--sizes", default="256K,8M,32M")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    fio = shutil.which("fio")
    if fio is None:
        print("fio is not on PATH: install it (apt install fio) to measure the disk", file=sys.stderr)
        return 2
    os.makedirs(args.dir, exist_ok=True)
    units = {"K": 1 << 10, "M": 1 << 20}
    sizes = [int(s[:-1]) * units[s[-1].upper()] for s in args.sizes.split(",")]
    print(f"filesystem: {mount_options(args.dir)}")
    print(f"fio randwrite, O_DIRECT, {DEPTH} in flight, {FILE_BYTES >> 30} GiB a file, "
          f"{args.rounds} rounds: GB/s (medians) and each over fresh, paired by round (range)")
    report: dict = {"rounds": args.rounds, "results": {}}
    for chunk in sizes:
        rounds = [one_round(fio, args.dir, chunk, r) for r in range(args.rounds)]
        s = summarize(rounds)
        report["results"][chunk] = {"summary": s, "runs": rounds}
        print(f"  {chunk >> 10:>6} KiB: fresh {s['fresh']:.2f}, rewrite {s['rewrite']:.2f} "
              f"({s['rewrite/fresh']:.2f}x, {s['rewrite/fresh range']}), zero-range {s['zero-range']:.2f} "
              f"({s['zero-range/fresh']:.2f}x, {s['zero-range/fresh range']})")
    save_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
