"""slabcache inside a real LMCache 0.5.6 engine, against LMCache's own
LocalDiskBackend in the same mode, in one run.

The engine runs on CPU with a connector stand-in (the "GPU" KV cache is a
CPU tensor), ``local_cpu`` off so every hit comes from disk, 256-token
chunks, prompts of 1,024 tokens (4 chunks).  Matched pairs:

- slabcache ``mmap`` (use_odirect unset) vs LocalDiskBackend buffered
  (LMCache's default);
- slabcache ``direct`` (use_odirect: true) vs LocalDiskBackend O_DIRECT.

Workloads, each as prompts per second (ratio slabcache / LMCache):

- store:  engine.store of every prompt, until all chunks are on disk;
  ``store() blocks`` is the time the caller spends inside store();
- warm retrieve: engine.retrieve of every prompt, pages cached;
- cold retrieve: the same after dropping the files' pages (written back first);
- churn: a skewed request stream over twice as many prompts as fit: a full
  hit is retrieved, anything else stored (evicting).

Chunk sizes: 256 KiB and 8 MiB of bf16 KV.  Needs lmcache==0.5.6
(tools/bootstrap.sh --with-lmcache).

Run:  python benchmarks/lmcache_engine.py [--dir DIR] [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time
import uuid

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")

import torch  # noqa: E402
from lmcache.v1.cache_engine import LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402

from slabcache.bench.contenders import drop_file_cache  # noqa: E402
from slabcache.integrations.lmcache.cpu_connector import CPUConnector  # noqa: E402

CHUNK = 256
PROMPT = 4 * CHUNK
# (layers, hidden) giving 256 KiB and 8 MiB per 256-token bf16 chunk
GEOMETRIES = {256 << 10: (4, 64), 8 << 20: (8, 1024)}


class Engine:
    """One LMCache engine with either slabcache or LocalDiskBackend as its disk tier."""

    def __init__(self, contender: str, path: str, chunk_bytes: int, capacity_prompts: int):
        self.contender, self.path = contender, path
        self.layers, self.hidden = GEOMETRIES[chunk_bytes]
        odirect = contender.endswith("direct")
        # One prompt of headroom: the GB figure rounds down to whole slots.
        disk_gb = (capacity_prompts + 1) * 4 * chunk_bytes / 1024 ** 3
        cfg = LMCacheEngineConfig.from_defaults(
            # The CPU allocator holds every chunk in flight to the disk tier:
            # room for all of them, so no store is dropped for lack of memory.
            chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=disk_gb + 0.05,
            max_local_disk_size=disk_gb, lmcache_instance_id=f"bench-{uuid.uuid4().hex[:8]}",
            save_unfull_chunk=True)
        if contender.startswith("slabcache"):
            cfg.storage_plugins = ["LocalDiskBackend"]
            cfg.extra_config = {
                "storage_plugin.LocalDiskBackend.module_path": "slabcache.integrations.lmcache",
                "storage_plugin.LocalDiskBackend.class_name": "SlabCacheBackend",
                "slabcache.paths": f"file://{path}", "use_odirect": odirect}
        else:
            cfg.local_disk = path
            cfg.extra_config = {"use_odirect": odirect}
        self.cfg = cfg
        md = LMCacheMetadata(model_name="bench/model", world_size=1, local_world_size=1, worker_id=0,
                             local_worker_id=0, kv_dtype=torch.bfloat16,
                             kv_shape=(self.layers, 2, CHUNK, 1, self.hidden))
        self.eng = LMCacheEngineBuilder.get_or_create(
            cfg.lmcache_instance_id, cfg, md, CPUConnector(self.layers, self.hidden),
            broadcast_fn=lambda t, s: None, broadcast_object_fn=lambda o, s: o)
        self.eng.post_init()
        self.backend = self.eng.storage_manager.storage_backends["LocalDiskBackend"]

    def prompt(self, i: int):
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(0, 30000, (PROMPT,), generator=g)
        kv = torch.randn(2, self.layers, PROMPT, self.hidden, generator=g).to(torch.bfloat16)
        return tokens, kv

    def wait_on_disk(self, tokens, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.eng.lookup(tokens) < len(tokens):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.contender}: a stored prompt never reached the disk tier")
            time.sleep(0.0005)

    def drop_cache(self) -> None:
        if self.contender.startswith("slabcache"):
            self.backend.store.engine.drop_cache()
        else:
            drop_file_cache(os.path.join(self.path, n) for n in os.listdir(self.path))

    def close(self) -> None:
        LMCacheEngineBuilder.destroy(self.cfg.lmcache_instance_id)


def run_one(contender: str, directory: str, chunk_bytes: int, prompts: int, churn_ops: int) -> dict:
    path = os.path.join(directory, f"{contender}-{chunk_bytes}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    e = Engine(contender, path, chunk_bytes, capacity_prompts=prompts)
    try:
        data = [e.prompt(i) for i in range(prompts)]
        out = torch.empty_like(data[0][1])
        res = {}
        blocked = 0.0
        t0 = time.perf_counter()
        for tokens, kv in data:
            s = time.perf_counter()
            e.eng.store(tokens, kv=kv)
            blocked += time.perf_counter() - s
        for tokens, _kv in data:
            e.wait_on_disk(tokens)
        res["store"] = prompts / (time.perf_counter() - t0)
        res["store_blocks_ms"] = 1e3 * blocked / prompts
        for name in ("warm retrieve", "cold retrieve"):
            if name == "cold retrieve":
                e.drop_cache()
            good = 0
            t0 = time.perf_counter()
            for tokens, kv in data:
                good += int(e.eng.retrieve(tokens, kv=out).sum()) == PROMPT
            res[name] = prompts / (time.perf_counter() - t0)
            res[name + " hits"] = good
            if name == "warm retrieve":
                # Spot-check the bytes: the last prompt retrieved must be the one stored.
                assert torch.equal(out, data[-1][1]), f"{contender}: wrong bytes retrieved"
        rng = random.Random(5)
        universe = 2 * prompts
        extra = {}
        hits = 0
        t0 = time.perf_counter()
        for _ in range(churn_ops):
            j = min(universe - 1, int(rng.expovariate(1.0 / (universe / 3))))
            if j not in extra and j >= prompts:
                extra[j] = e.prompt(j)
            tokens, kv = data[j] if j < prompts else extra[j]
            if e.eng.lookup(tokens) == PROMPT and int(e.eng.retrieve(tokens, kv=out).sum()) == PROMPT:
                hits += 1
            else:
                e.eng.store(tokens, kv=kv)
        res["churn"] = churn_ops / (time.perf_counter() - t0)
        res["churn hits"] = hits
        return res
    finally:
        e.close()
        shutil.rmtree(path, ignore_errors=True)


PAIRS = (("slabcache-mmap", "lmcache-buffered"), ("slabcache-direct", "lmcache-odirect"))
WORKLOADS = ("store", "warm retrieve", "cold retrieve", "churn")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="slabcache-bench")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="fewer prompts and rounds")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    rounds = args.rounds or (1 if args.quick else 3)
    report: dict = {}
    for chunk in GEOMETRIES:
        prompts = (24 if chunk < 1 << 20 else 6) * (1 if args.quick else 2)
        churn_ops = 3 * prompts
        for ours, theirs in PAIRS:
            runs = {ours: [], theirs: []}
            for _ in range(rounds):  # contenders take turns, so drift hits both
                for c in (ours, theirs):
                    runs[c].append(run_one(c, args.dir, chunk, prompts, churn_ops))
            med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}
            report[f"{chunk}:{ours}"] = {"chunk": chunk, "ours": ours, "theirs": theirs, "prompts": prompts,
                                         "rounds": rounds, **{c: med[c] for c in med}}
    print("| chunk | pair | " + " | ".join(WORKLOADS) + " | store() blocks the caller |")
    print("|---|---|" + "---:|" * (len(WORKLOADS) + 1))
    for r in report.values():
        a, b = r[r["ours"]], r[r["theirs"]]
        cells = [f"**{a[w] / b[w]:.2f}x** ({a[w]:.1f} vs {b[w]:.1f}/s)" for w in WORKLOADS]
        cells.append(f"{a['store_blocks_ms']:.1f} vs {b['store_blocks_ms']:.1f} ms")
        size = f"{r['chunk'] >> 20} MiB" if r["chunk"] >= 1 << 20 else f"{r['chunk'] >> 10} KiB"
        print(f"| {size} | {r['ours']} vs {r['theirs']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
