"""What a long fill of the page cache runs at: the kernel's writeback rate,
for a slab and for a file per chunk alike.

A buffered write returns once its bytes are in the page cache; past the
kernel's dirty limits, every writer is held back to the rate at which the
disk takes the dirty pages.  This measures that rate beside O_DIRECT, so the
store rows of the host benchmarks (short bursts, all in the page cache for
the ``mmap`` tiers) can be read against a long fill.

Per round, contenders in turn (order reversed every other round), each
filling GIB gibibytes with 32 MiB values in batches of 4 (a prompt's chunks)
into a new directory:

- ``slab-mmap``:    a slabcache store, ``io="mmap"`` (buffered, the default);
- ``files``:        a new file per value, written whole, one after another
                    (LMCache's ``LocalDiskBackend`` with its default, buffered
                    writes, which it runs on 4 threads);
- ``slab-direct``:  a slabcache store, ``io="direct"`` (O_DIRECT).

Reported, GB/s (medians over rounds): the first BURST bytes (below the
dirty limits: the page cache's rate), the last half of the fill (held to
the disk's rate, for the buffered contenders), and the whole fill until
``os.sync`` returns (every byte on disk).

Run:  python benchmarks/writeback.py [--dir DIR] [--gib N] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

from report import save_json, turns
from slabcache import SlabStore
from slabcache.device.memory import aligned_empty

MiB = 1 << 20
VALUE = 32 * MiB
BATCH = 4
BURST = 512 * MiB
CONTENDERS = ("slab-mmap", "files", "slab-direct")


def fill(root: str, contender: str, values: list[torch.Tensor], total: int) -> list[float]:
    """Seconds each batch took, then the seconds os.sync took after the last."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    os.sync()
    batches = total // (VALUE * BATCH)
    times = []

    def timed(write_batch) -> None:
        """Each batch's seconds, then the final os.sync's."""
        for b in range(batches):
            t = time.perf_counter()
            write_batch(b)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        os.sync()
        times.append(time.perf_counter() - t)

    if contender == "files":
        def files(b: int) -> None:
            for i, v in enumerate(values):
                with open(os.path.join(root, f"{b}-{i}.chunk"), "wb") as f:
                    f.write(v.numpy())

        timed(files)
        return times
    with SlabStore.open(os.path.join(root, "store"), capacity_bytes=total + VALUE, slot_bytes=VALUE,
                        io=contender.split("-")[1]) as s:
        def puts(b: int) -> None:
            if not all(s.put_many([f"{b}-{i}" for i in range(BATCH)], values)):
                raise RuntimeError(f"{contender}: a put was refused")

        timed(puts)  # synced with the store open, as a host's store stays open
    return times


def rates(times: list[float], total: int) -> dict:
    """GB/s of the burst, of the last half, and of the whole fill with its sync."""
    batch = VALUE * BATCH
    *writes, sync = times
    first = BURST // batch
    half = len(writes) // 2
    return {"burst": first * batch / sum(writes[:first]) / 1e9,
            "last half": (len(writes) - half) * batch / sum(writes[half:]) / 1e9,
            "until on disk": total / (sum(writes) + sync) / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="slabcache-bench")
    ap.add_argument("--gib", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    total = args.gib << 30
    if total < 2 * BURST:
        ap.error(f"--gib must be at least {2 * BURST >> 30}")
    values = [aligned_empty(VALUE) for _ in range(BATCH)]
    for v in values:
        v.random_(0, 256)
    runs: dict = {c: [] for c in CONTENDERS}
    root = os.path.join(args.dir, "writeback")
    try:
        for r in range(args.rounds):
            for c in turns(CONTENDERS, r):
                runs[c].append(rates(fill(root, c, values, total), total))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {c: {m: statistics.median(x[m] for x in rs) for m in rs[0]} for c, rs in runs.items()}
    print(f"fills of {args.gib} GiB, 32 MiB values in batches of 4, {args.rounds} rounds in turn: "
          "GB/s (medians)")
    for c, s in summary.items():
        print(f"  {c:12s} " + "  ".join(f"{m} {v:.2f}" for m, v in s.items()))
    save_json(args.json, {"gib": args.gib, "rounds": args.rounds, "summary": summary, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
