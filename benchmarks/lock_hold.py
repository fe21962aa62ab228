"""How long a put holds the index's write lock, which every writer on the
node shares, while the page cache is under write-back pressure.

A put of up to 256 KiB into a free slot (``mmap`` engine, ``fast``
durability) writes its payload inside its one index write transaction;
larger puts, and puts with the inline path switched off, take two
transactions and write between them.  While one process holds the write
lock, every other process's puts, removes and pins wait.  This measures,
per put size and path, the time each put's transactions hold the lock
(their sum per put, and the longest single hold), with and without a
second process dirtying the page cache as fast as it can (the kernel then
throttles writers: a pwrite into the page cache can wait for write-back).

Batches of values of up to 256 KiB are written in groups of
INLINE_BATCH_BYTES, each inside the one transaction that claims its free
slots: the same is measured for put_many of 32 x 64 KiB with groups of 1
MiB (the default) and 2 MiB, per transaction (the lock is held once a
group), with the time a key costs beside it.

Run:  python benchmarks/lock_hold.py [--dir DIR] [--puts N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time

import torch

from slabcache import SlabStore
from slabcache.core import writer
from slabcache.core.allocator import KEEP_FREE_FROM

KiB = 1 << 10
SIZES = (16 * KiB, 64 * KiB, 256 * KiB)
BATCH, BATCH_VALUE = 32, 64 * KiB
GROUPS = (1 << 20, 2 << 20)  # bytes a transaction of put_many writes


def _dirty(path: str, stop) -> None:
    """Write buffered data as fast as possible (page-cache pressure)."""
    chunk = os.urandom(8 << 20)
    while not stop.is_set():
        with open(path, "wb") as f:
            for _ in range(256):  # 2 GiB, then start over
                if stop.is_set():
                    break
                f.write(chunk)
        os.unlink(path)


class _Timed:
    """Wraps a store's Index.write, recording how long each transaction is open."""

    def __init__(self, store: SlabStore):
        self.holds: list[float] = []
        index = store._index
        real = index.write
        holds = self.holds

        class Timed:
            def __init__(self, *a, **kw):
                self._cm = real(*a, **kw)

            def __enter__(self):
                t = self._cm.__enter__()
                self._t0 = time.perf_counter()
                return t

            def __exit__(self, *exc):
                try:
                    return self._cm.__exit__(*exc)
                finally:
                    holds.append(time.perf_counter() - self._t0)

        index.write = Timed


def _holds(seconds: list[float], longest: float) -> dict:
    """Quantiles and mean of ``seconds`` (holds), and the ``longest``
    single hold, in microseconds."""
    seconds = sorted(seconds)
    q = lambda p: seconds[min(len(seconds) - 1, int(p * len(seconds)))] * 1e6  # noqa: E731
    return {"hold_us_p50": q(0.5), "hold_us_p99": q(0.99), "hold_us_p999": q(0.999),
            "hold_us_max": longest * 1e6, "hold_us_mean": statistics.mean(seconds) * 1e6}


def measure(root: str, size: int, inline: bool, puts: int) -> dict:
    path = os.path.join(root, f"s{size}-{int(inline)}")
    shutil.rmtree(path, ignore_errors=True)
    with SlabStore.open(path, capacity_bytes=(puts + 8) * size, slot_bytes=size) as s:
        s._writer.inline = inline
        s._allocator.keep_free = inline and s.geometry.slot_count >= KEEP_FREE_FROM
        v = torch.randint(0, 256, (size,), dtype=torch.uint8)
        s.put("warm", v)
        timed = _Timed(s)
        per_put, longest = [], []
        for i in range(puts):
            timed.holds.clear()
            v[:8] = i % 251
            s.put(f"k{i}", v)
            per_put.append(sum(timed.holds))
            longest.append(max(timed.holds))
    shutil.rmtree(path, ignore_errors=True)
    return {"size": size, "path": "one transaction" if inline else "two transactions",
            **_holds(per_put, max(longest))}


def measure_batches(root: str, group: int, batches: int) -> dict:
    """put_many of BATCH values of BATCH_VALUE, in groups of ``group`` bytes
    a transaction: each transaction's hold, and the time a key takes."""
    path = os.path.join(root, f"b{group}")
    shutil.rmtree(path, ignore_errors=True)
    default = writer.INLINE_BATCH_BYTES
    writer.INLINE_BATCH_BYTES = group
    try:
        with SlabStore.open(path, capacity_bytes=(batches * BATCH + 8) * BATCH_VALUE,
                            slot_bytes=BATCH_VALUE) as s:
            v = torch.randint(0, 256, (BATCH_VALUE,), dtype=torch.uint8)
            vals = [v] * BATCH
            s.put("warm", v)
            timed = _Timed(s)
            t0 = time.perf_counter()
            for b in range(batches):
                s.put_many([f"b{b}-{i}" for i in range(BATCH)], vals)
            per_key = (time.perf_counter() - t0) / (batches * BATCH)
            holds = list(timed.holds)
    finally:
        writer.INLINE_BATCH_BYTES = default
        shutil.rmtree(path, ignore_errors=True)
    return {"size": BATCH_VALUE, "path": f"put_many, {group >> 20} MiB groups",
            **_holds(holds, max(holds)), "transactions_a_batch": len(holds) / batches,
            "us_a_key": per_key * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="a directory on the disk to measure (default: a temporary one)")
    ap.add_argument("--puts", type=int, default=2000)
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="slabcache-lock-")
    rows = []
    for pressure in (False, True):
        stop = multiprocessing.Event()
        dirtier = None
        if pressure:
            dirtier = multiprocessing.Process(target=_dirty, args=(os.path.join(root, "dirty"), stop))
            dirtier.start()
            time.sleep(3)  # until write-back is under way
        try:
            for size in SIZES:
                for inline in (True, False):  # taking turns
                    row = measure(root, size, inline, args.puts)
                    row["page_cache_pressure"] = pressure
                    rows.append(row)
            for r in range(2):  # taking turns, each first once
                for group in (GROUPS if r == 0 else GROUPS[::-1]):
                    row = measure_batches(root, group, max(1, args.puts // BATCH))
                    row["page_cache_pressure"] = pressure
                    rows.append(row)
        finally:
            stop.set()
            if dirtier is not None:
                dirtier.join()
    print(f"{'pressure':>8} {'size':>6} {'path':>27} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} "
          f"{'max us':>9} {'us a key':>9}")
    for r in rows:
        per_key = f"{r['us_a_key']:>9.1f}" if "us_a_key" in r else ""
        print(f"{str(r['page_cache_pressure']):>8} {r['size'] // KiB:>5}K {r['path']:>27} "
              f"{r['hold_us_p50']:>8.0f} {r['hold_us_p99']:>8.0f} {r['hold_us_p999']:>9.0f} "
              f"{r['hold_us_max']:>9.0f} {per_key}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
