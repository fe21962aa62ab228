"""A ``direct`` store's slot records written with O_DIRECT against buffered,
in turn in one process.

A buffered record write takes the slab's inode lock exclusively; ext4
holds that lock shared through every O_DIRECT request in flight, so each
buffered record waits for every payload in flight and holds new ones back.
A store whose records fill a block each writes them with O_DIRECT instead
(device/slabfile.py, SlotRecords).  The ``buffered`` contender opens the
same store with that switched off (a private switch, for this comparison
only).

Per round, each contender on a new store of 8 MiB slots (order reversed
every other round):

- puts:   BATCHES batches of 4 values queued on ``store.jobs`` at once,
          until all are written: into new slots, then again into the same
          slots (after ``clear``);
- mixed:  one thread reading 4 values with ``get_many_into`` in a loop
          while another puts batches of 4, for SECONDS: each one's GB/s.

Run:  python benchmarks/direct_records.py [--dir DIR] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time

import torch

from report import save_json, span, turns
from slabcache import SlabStore
import slabcache.device.slabfile as slabfile

VALUE = 8 << 20
BATCHES = 16
SECONDS = 4.0
CONTENDERS = ("o_direct", "buffered")


def open_store(path: str, contender: str, slots: int) -> SlabStore:
    """A new direct store; ``buffered`` switches its O_DIRECT records off."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    real = slabfile.SlotRecords.__init__

    def buffered(self, p, g, writable, direct=False):
        real(self, p, g, writable, direct=False)

    if contender == "buffered":
        slabfile.SlotRecords.__init__ = buffered
    try:
        s = SlabStore.open(path, capacity_bytes=slots * VALUE, slot_bytes=VALUE, io="direct",
                           queue_full="wait")
    finally:
        slabfile.SlotRecords.__init__ = real
    if s._records.direct != (contender == "o_direct"):
        s.close()
        raise RuntimeError(f"{contender}: the store's records are not what this run compares")
    return s


def puts(path: str, contender: str, values: list[torch.Tensor], round_: int) -> dict:
    s = open_store(path, contender, 4 * BATCHES + 4)
    out = {}
    try:
        for phase in ("new slots", "rewrite"):
            if phase == "rewrite":
                s.clear()
            t = time.perf_counter()
            futs = [s.jobs.put_many([f"{round_}-{b}-{i}" for i in range(4)], values) for b in range(BATCHES)]
            if not all(all(f.result()) for f in futs):
                raise RuntimeError(f"{contender}: a put was refused")
            out[phase] = 4 * BATCHES * VALUE / (time.perf_counter() - t) / 1e9
    finally:
        s.close()
    return out


def mixed(path: str, contender: str, values: list[torch.Tensor]) -> dict:
    s = open_store(path, contender, 64)
    outs = [torch.empty(VALUE, dtype=torch.uint8) for _ in values]
    keys = [f"r{i}" for i in range(16)]
    try:
        for i in range(0, 16, 4):
            s.put_many(keys[i:i + 4], values)
        stop = time.monotonic() + SECONDS
        moved = {"reads": 0, "puts": 0}
        failed: list = []

        def reader():
            j = 0
            while time.monotonic() < stop:
                got = s.get_many_into(keys[(j % 4) * 4:(j % 4) * 4 + 4], outs)
                if any(g is None for g in got):
                    failed.append("a read missed")
                    return
                moved["reads"] += 4 * VALUE
                j += 1

        def writer():
            j = 0
            while time.monotonic() < stop:
                s.put_many([f"w{j}-{i}" for i in range(4)], values)
                moved["puts"] += 4 * VALUE
                j += 1

        threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failed:
            raise RuntimeError(f"{contender}: {failed[0]}")
        spent = time.monotonic() - t0
        return {"reads beside puts": moved["reads"] / spent / 1e9, "puts beside reads": moved["puts"] / spent / 1e9}
    finally:
        s.close()


def summarize(rounds: dict) -> dict:
    """Per measure: each contender's median GB/s and o_direct / buffered
    paired round by round (median, range, rounds faster)."""
    out = {}
    for m in rounds["o_direct"][0]:
        a = [r[m] for r in rounds["o_direct"]]
        b = [r[m] for r in rounds["buffered"]]
        ratios = [x / y for x, y in zip(a, b)]
        out[m] = {"o_direct": statistics.median(a), "buffered": statistics.median(b),
                  "ratio": statistics.median(ratios), "range": span(ratios),
                  "faster": sum(r > 1 for r in ratios)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="slabcache-bench")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "direct-records")
    values = [torch.randint(0, 256, (VALUE,), dtype=torch.uint8) for _ in range(4)]
    rounds: dict = {c: [] for c in CONTENDERS}
    try:
        for r in range(args.rounds):
            for c in turns(CONTENDERS, r):
                rounds[c].append(puts(path, c, values, r) | mixed(path, c, values))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    summary = summarize(rounds)
    print(f"direct store, {VALUE >> 20} MiB values, {args.rounds} rounds in turn: GB/s (medians); "
          "records O_DIRECT / buffered, paired by round")
    for m, v in summary.items():
        print(f"  {m:18s} O_DIRECT {v['o_direct']:.2f}  buffered {v['buffered']:.2f}  "
              f"{v['ratio']:.2f}x ({v['range']}), faster in {v['faster']} of {args.rounds}")
    save_json(args.json, {"rounds": args.rounds, "summary": summary, "runs": rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
