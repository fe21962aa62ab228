"""Where a retrieve, a store and a vLLM load job spend their time, against
LMCache's own disk backend and vLLM's fs tier doing the same.

``--lmcache`` (needs lmcache): one engine per contender (slabcache mmap,
LocalDiskBackend buffered), prompts of 4 chunks of 8 MiB and 32 MiB; per
prompt, the time of a warm retrieve, a cold one and a store, split into
the engine's own part and the disk tier's, and the tier's into its steps
(slabcache: lookup and allocation, the engine's reads, the validation;
LocalDiskBackend: its file reads).  ``--vllm`` (in .venv-vllm): load jobs
of 8 blocks of 1 MiB and 8 MiB, slabcache (mmap, direct) and fs, the job's
time and slabcache's steps in it.  Medians over rounds, contenders taking
turns.  The passes over the bytes are counted in the docstring of each
function below and in README's performance section.

Run:  python benchmarks/breakdown.py --lmcache [--json FILE]
      .venv-vllm/bin/python benchmarks/breakdown.py --vllm [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

from report import human, save_json, turns


class Timers:
    """Wraps methods of objects, collecting how long each call took."""

    def __init__(self):
        self.t: dict[str, list] = {}

    def wrap(self, obj, name: str, label: str | None = None) -> None:
        real = getattr(obj, name)
        acc = self.t.setdefault(label or name, [])

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                acc.append(time.perf_counter() - t0)

        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        """Seconds spent in each, since the last take."""
        out = {k: sum(v) for k, v in self.t.items()}
        for v in self.t.values():
            v.clear()
        return out


def lmcache(directory: str, rounds: int) -> dict:
    """Passes over a chunk's bytes.  Retrieve: LocalDiskBackend copies the
    page cache into the engine's buffer (readinto: 1 copy); slabcache does
    the same copy (preadv) and hashes each piece while it is in cache (1
    hash pass, from cache; cold values of 16 MiB or more are hashed after
    their read, from memory, while the disk reads the next); then
    LMCache's engine copies the buffer into
    the KV cache (1 copy, both).  Store: the engine copies the KV cache
    into a buffer (1 copy, both), the tier copies it into the page cache
    (write / pwrite: 1 copy; slabcache hashes each piece as it goes)."""
    import lmcache_engine as le
    import torch

    out: dict = {}
    for chunk in (8 << 20, 32 << 20):
        prompts = 6 if chunk == 8 << 20 else 3
        res: dict = {}
        for r in range(rounds):
            for c in turns(("slabcache-mmap", "lmcache-buffered"), r):
                path = os.path.join(directory, f"bd-{c}")
                shutil.rmtree(path, ignore_errors=True)
                os.makedirs(path)
                os.sync()
                e = le.Engine(c, path, chunk, prompts)
                tm = Timers()
                b = e.backend
                tm.wrap(b, "batched_get_blocking", "tier")
                if c.startswith("slabcache"):
                    s = b.store
                    tm.wrap(s, "lookup", "lookup")
                    tm.wrap(b, "_allocate", "allocate")
                    tm.wrap(s.engine, "read_many_into", "read (copy + hash)")
                    tm.wrap(s._index, "slot_gens", "validate")
                    tm.wrap(s._writer, "put_many", "tier write (copy + hash)")
                else:
                    tm.wrap(b, "read_file", "read (copy)")
                    tm.wrap(b, "write_file", "tier write (copy)")
                try:
                    data = [e.prompt(i) for i in range(prompts)]
                    kv_out = torch.empty_like(data[0][1])
                    t0 = time.perf_counter()
                    for tokens, kv in data:
                        e.eng.store(tokens, kv=kv)
                    store_call = time.perf_counter() - t0
                    for tokens, _kv in data:
                        e.wait_on_disk(tokens)
                    e.wait_for_puts()
                    row = {"store: in store()": store_call, "store: until on disk": time.perf_counter() - t0}
                    row.update({f"store: {k}": v for k, v in tm.take().items() if "write" in k})
                    for phase in ("warm", "cold"):
                        if phase == "cold":
                            e.drop_cache()
                        tm.take()
                        t0 = time.perf_counter()
                        for tokens, _kv in data:
                            e.eng.retrieve(tokens, kv=kv_out)
                        row[f"{phase}: retrieve"] = time.perf_counter() - t0
                        for k, v in tm.take().items():
                            if "write" not in k:
                                row[f"{phase}: {k}"] = v
                        row[f"{phase}: engine (rest)"] = row[f"{phase}: retrieve"] - row[f"{phase}: tier"]
                    for k, v in row.items():
                        res.setdefault(c, {}).setdefault(k, []).append(1e3 * v / prompts)
                finally:
                    e.close()
                    shutil.rmtree(path, ignore_errors=True)
        out[human(chunk)] = {c: {k: statistics.median(v) for k, v in r.items()} for c, r in res.items()}
    return out


def vllm(directory: str, rounds: int) -> dict:
    """Passes over a block's bytes in a load job.  fs (O_DIRECT): the device
    writes the CPU tier's buffer directly (no CPU copy, no hash).
    slabcache direct: the same DMA, then a hash pass over the buffer (from
    memory: DMA'd bytes are not in the CPU's cache).  slabcache mmap: a copy
    from the page cache (preadv), hashed piece by piece while in cache."""
    import vllm_tier as vt
    from slabcache.testing.vllm_tier import Primary

    out: dict = {}
    for label, block in (("1M", 1 << 20), ("8M", 8 << 20)):
        n_blocks = max(32, (64 << 20) // block)
        primary = Primary(chunks=32, block=block)
        primary.fill(range(32), seed=1)
        res: dict = {}
        try:
            for r in range(rounds):
                for c in turns(("fs", "slabcache-direct", "slabcache-mmap"), r):
                    root = os.path.join(directory, f"bd-{c}-{label}")
                    shutil.rmtree(root, ignore_errors=True)
                    os.sync()
                    tier = vt.make_tier(c, root, block, n_blocks, primary)
                    tm = Timers()
                    if c != "fs":
                        s = tier._stores[0]
                        tm.wrap(s, "lookup", "lookup")
                        tm.wrap(s.engine, "read_many_into", "read")
                        tm.wrap(s._index, "slot_gens", "validate")
                    try:
                        ids = list(range(n_blocks))
                        jobs = vt.batches(ids, list(range(32)))
                        vt.run_jobs(tier, "submit_store", jobs)
                        for phase in ("warm", "cold"):
                            if phase == "cold":
                                vt.drop_tier_cache(c, tier, root)
                            tm.take()
                            t = vt.run_jobs(tier, "submit_load", jobs)
                            row = {f"{phase}: all jobs": t}
                            row.update({f"{phase}: {k}": v for k, v in tm.take().items()})
                            for k, v in row.items():
                                res.setdefault(c, {}).setdefault(k, []).append(1e3 * v / len(jobs))
                    finally:
                        tier.shutdown()
                        shutil.rmtree(root, ignore_errors=True)
        finally:
            primary.close()
        out[label] = {c: {k: statistics.median(v) for k, v in r.items()} for c, r in res.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lmcache", action="store_true")
    ap.add_argument("--vllm", action="store_true")
    ap.add_argument("--dir", default="slabcache-bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    report = {}
    if args.lmcache:
        report["lmcache, ms a prompt of 4 chunks"] = lmcache(args.dir, args.rounds)
    if args.vllm:
        report["vllm, ms a load job of 8 blocks"] = vllm(args.dir, args.rounds)
    for title, sizes in report.items():
        print(f"\n{title} (medians over {args.rounds} rounds):")
        for size, by in sizes.items():
            for c, row in by.items():
                print(f"  {size:>6} {c:18s} " + "; ".join(f"{k} {v:.2f}" for k, v in row.items()))
    save_json(args.json, report)


if __name__ == "__main__":
    main()
