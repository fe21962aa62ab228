"""Software overhead per operation: what the store adds on top of the raw
work it must do, measured in the same run.

For put, get, get_into and contains at 4, 16 and 64 KiB (mmap engine,
checksums on, page cache warm), and for batches of 32 keys (put_many,
get_many_into), each figure is the store's time per key minus the time of
the raw syscalls and checksum of the same bytes done by hand on the same
slab ("raw"):

- put:      pwrite of the value + xxh3 of it + pwrite of a slot record
            (put_evict: the same puts into a full store, each evicting;
            put_2txn, put_evict_2txn: both with every put taking two index
            transactions, as before a free slot was written under the lock)
- put_many: per batch, one pwritev of its values (slots that follow one
            another) + xxh3 of each + one pwrite of its slot records: the
            floor the store's runs of adjacent slots aim at
- get:      torch.empty + pread + xxh3
- get_into: pread into the caller's tensor + xxh3
- contains: nothing (the raw cost of a lookup is zero)

Reads run as a store opens by default (and as every host integration
opens it): a read records a use of its entry at most once a second
(``use_refresh_seconds=1``).  get_into / get_many_into run again with every
read recording its use, the order exact (``_exact`` rows).

Store and raw take turns round by round, so drift hits both alike; each
figure is the median over rounds.  Targets: overhead get and get_into
<= 15 us, put <= 25 us, contains <= 2 us; batched <= 8 us per key.  A cProfile summary of
what remains in the single-key get and put follows the table.

Run:  python benchmarks/overhead.py [--dir DIR] [--json FILE] [--rounds N]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import time

import torch
import xxhash

import slabcache
from slabcache import SlabStore
from slabcache.core.allocator import KEEP_FREE_FROM

KiB = 1 << 10
SIZES = (4 * KiB, 16 * KiB, 64 * KiB)
BATCH = 32
# The current targets (set for 64 KiB; held at every size): put <= 25 us,
# get_into <= 15 us, batched <= 8 us a key; contains from the round before.
TARGETS = {"put": 25.0, "put_evict": 25.0, "put_2txn": 25.0, "put_evict_2txn": 25.0, "get": 15.0,
           "get_into": 15.0, "contains": 2.0, "put_many": 8.0, "get_many_into": 8.0,
           "get_into_exact": 15.0, "get_many_into_exact": 8.0}


def _one_transaction_puts(s: SlabStore, full: SlabStore, on: bool) -> None:
    """Switch the one-transaction put path of both stores (private switches,
    for this comparison only)."""
    for store in (s, full):
        store._writer.inline = on
        store._allocator.keep_free = on and store.geometry.slot_count >= KEEP_FREE_FROM


def _per_op(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) / n * 1e6


def measure(directory: str, size: int, n: int, rounds: int) -> dict:
    path = os.path.join(directory, f"overhead-{size}")
    shutil.rmtree(path, ignore_errors=True)
    slots = 2 * n + 2 * BATCH * 4
    value = torch.randint(0, 256, (size,), dtype=torch.uint8)
    arr = value.numpy()
    record = os.urandom(128)
    out = torch.empty(size, dtype=torch.uint8)
    outs = [torch.empty(size, dtype=torch.uint8) for _ in range(BATCH)]
    times: dict[str, list] = {}

    def add(name, store_us, raw_us):
        times.setdefault(name, []).append((store_us, raw_us))

    full_path = path + "-full"
    shutil.rmtree(full_path, ignore_errors=True)
    with SlabStore.open(path, capacity_bytes=slots * size, slot_bytes=size, io="mmap") as s, \
            SlabStore.open(full_path, capacity_bytes=n // 2 * size, slot_bytes=size, io="mmap") as full:
        for i in range(n // 2):
            full.put(f"filler-{i}", value)
        fd = os.open(os.path.join(path, "slab"), os.O_RDWR)
        g = s.geometry
        # Raw work goes to the upper half of the slab, in slots that follow
        # one another (a batch's raw values are written with one pwritev);
        # the store uses the lower half.
        assert n <= slots // 2
        raw_offs = [g.slot_offset(slots // 2 + i) for i in range(n)]
        rec_off = g.records_offset
        keys = [f"model@1@0@{i:x}@bfloat16" for i in range(n)]
        try:
            for r in range(rounds):
                s.clear()

                def put_store():
                    for k in keys:
                        s.put(k, value)

                def put_raw():
                    for off in raw_offs:
                        os.pwrite(fd, arr, off)
                        xxhash.xxh3_64_intdigest(arr)
                        os.pwrite(fd, record, rec_off)

                add("put", _per_op(put_store, n), _per_op(put_raw, n))

                # The same puts into a full store: each one evicts.
                def put_evict_store():
                    for k in keys:
                        full.put(k, value)

                add("put_evict", _per_op(put_evict_store, n), _per_op(put_raw, n))

                # Both again with every put reserving, writing and committing
                # in two index transactions (what a put without a free slot
                # to write under the lock does): the cost of the second one.
                s.clear()
                _one_transaction_puts(s, full, False)
                add("put_2txn", _per_op(put_store, n), _per_op(put_raw, n))
                add("put_evict_2txn", _per_op(put_evict_store, n), _per_op(put_raw, n))
                _one_transaction_puts(s, full, True)

                def get_store():
                    for k in keys:
                        s.get(k)

                def get_raw():
                    for off in raw_offs:
                        buf = torch.empty(size, dtype=torch.uint8)
                        a = buf.numpy()
                        os.preadv(fd, [a], off)
                        xxhash.xxh3_64_intdigest(a)

                add("get", _per_op(get_store, n), _per_op(get_raw, n))

                def get_into_store():
                    for k in keys:
                        s.get_into(k, out)

                oa = out.numpy()

                def get_into_raw():
                    for off in raw_offs:
                        os.preadv(fd, [oa], off)
                        xxhash.xxh3_64_intdigest(oa)

                add("get_into", _per_op(get_into_store, n), _per_op(get_into_raw, n))

                def contains_store():
                    for k in keys:
                        s.contains(k)

                add("contains", _per_op(contains_store, n), 0.0)

                batches = [keys[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]
                m = len(batches) * BATCH
                s.clear()

                def put_many_store():
                    for b in batches:
                        s.put_many(b, [value] * BATCH)

                records = record * BATCH

                def put_many_raw():
                    for j in range(0, m, BATCH):
                        os.pwritev(fd, [arr] * BATCH, raw_offs[j])
                        for _ in range(BATCH):
                            xxhash.xxh3_64_intdigest(arr)
                        os.pwrite(fd, records, rec_off)

                add("put_many", _per_op(put_many_store, m), _per_op(put_many_raw, m))
                oas = [o.numpy() for o in outs]

                def get_many_store():
                    for b in batches:
                        s.get_many_into(b, outs)

                def get_many_raw():
                    for i, off in enumerate(raw_offs):
                        a = oas[i % BATCH]
                        os.preadv(fd, [a], off)
                        xxhash.xxh3_64_intdigest(a)

                add("get_many_into", _per_op(get_many_store, m), _per_op(get_many_raw, n))

                # Both reads again with every read recording its use (the
                # order exact: use_refresh_seconds=0).
                s._uses.refresh = 0.0
                add("get_into_exact", _per_op(get_into_store, n), _per_op(get_into_raw, n))
                add("get_many_into_exact", _per_op(get_many_store, m), _per_op(get_many_raw, n))
                s._uses.refresh = s.options.use_refresh_seconds
        finally:
            os.close(fd)
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(full_path, ignore_errors=True)
    res = {}
    for name, pairs in times.items():
        st = statistics.median(p[0] for p in pairs)
        raw = statistics.median(p[1] for p in pairs)
        res[name] = {"store_us": st, "raw_us": raw, "overhead_us": st - raw,
                     "target_us": TARGETS[name]}
    return res


def profile(directory: str, size: int = 16 * KiB, n: int = 2000, top: int = 10) -> str:
    """cProfile of n single-key puts then n gets: where the overhead goes."""
    path = os.path.join(directory, "overhead-profile")
    shutil.rmtree(path, ignore_errors=True)
    value = torch.randint(0, 256, (size,), dtype=torch.uint8)
    keys = [f"model@1@0@{i:x}@bfloat16" for i in range(n)]
    out = []
    with SlabStore.open(path, capacity_bytes=(n + 8) * size, slot_bytes=size) as s:
        for what, fn in (("put", lambda: [s.put(k, value) for k in keys]),
                         ("get", lambda: [s.get(k) for k in keys])):
            pr = cProfile.Profile()
            pr.enable()
            fn()
            pr.disable()
            text = io.StringIO()
            pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(top)
            # The package's files by their path in the repository, wherever it lies.
            root = os.path.dirname(os.path.dirname(os.path.abspath(slabcache.__file__))) + os.sep
            lines = [ln.replace(root, "") for ln in text.getvalue().splitlines() if ln.strip()]
            start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
            out.append(f"{what} ({n} x {size >> 10} KiB), top {top} by own time:\n" +
                       "\n".join(lines[start:start + top + 1]))
    shutil.rmtree(path, ignore_errors=True)
    return "\n\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="slabcache-bench")
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ops", type=int, default=1024)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--sizes", default="4,16,64", help="value sizes in KiB, comma list")
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    report = {}
    print("| op | size | store us/key | raw us/key | overhead us | target |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in [int(k) * KiB for k in args.sizes.split(",")]:
        report[size] = res = measure(args.dir, size, args.ops, args.rounds)
        for name, r in res.items():
            flag = "" if r["overhead_us"] <= r["target_us"] else " (missed)"
            print(f"| {name} | {size >> 10} KiB | {r['store_us']:.1f} | {r['raw_us']:.1f} | "
                  f"**{r['overhead_us']:.1f}** | <= {r['target_us']:.0f}{flag} |")
    if not args.no_profile:
        report["profile"] = prof = profile(args.dir)
        print("\n" + prof)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
