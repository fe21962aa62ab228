"""slabcache inside a real LMCache 0.5.6 engine, against LMCache's own
LocalDiskBackend in the same mode and an in-memory ceiling, in one run.

The engine runs on CPU with a connector stand-in (the "GPU" KV cache is a
CPU tensor), ``local_cpu`` off so every hit comes from the disk tier,
256-token chunks, prompts of 1,024 tokens (4 chunks).  Matched pairs:

- slabcache ``mmap`` (use_odirect unset) vs LocalDiskBackend buffered
  (LMCache's default);
- slabcache ``direct`` (use_odirect: true) vs LocalDiskBackend O_DIRECT;
- ``memory``: chunks kept in a dict (memory_tier.py), the ceiling: LMCache's
  own engine plus a copy each way, no disk.

Workloads, each as prompts per second:

- store:  engine.store of every prompt, until every chunk is on disk;
  ``store() blocks`` is the time the caller spends inside store();
- warm retrieve: engine.retrieve of every prompt, pages cached, three
  passes, the prompts in a shuffled order (the same for every contender
  of a round; report.read_order);
- cold retrieve: the same, one pass, after dropping the files' pages
  (written back first); the fraction of the stored bytes still in the
  page cache is measured and reported (it must be near 0);
- churn: a skewed request stream over twice as many prompts as fit: a full
  hit is retrieved, anything else stored (evicting); timed until every
  store it queued is on disk, as the store workload is, its new prompts
  made before the clock starts.

With fio on PATH, each round also times the device itself (DEVICE): O_DIRECT
requests of one chunk, four in flight, writes in order over a file of the
working set's size, then random reads of it in bursts of four (a prompt's
chunks asked for at once, the next prompt's when all four are in, as a
retrieve reads them).  Each contender's store, cold
retrieve and, for the O_DIRECT pair, warm retrieve (a second read from the
device) are reported as a share of it, retrieves by the time spent inside
the disk tier: where both of a pair sit near 100%, the device, not the
tier, sets the ratio.  Buffered stores land in the page cache and may
pass it.

With --unverified, the plugin also runs with ``slabcache.checksum: false``
(``slabcache-mmap-unverified``, ``slabcache-direct-unverified``), against
the same LMCache contenders: what verifying every read and write costs.

Each round runs the contenders in turn, the order reversed every other
round; figures are medians over rounds.  ``backend_ms`` is the time a warm
retrieve spent inside the disk tier (the rest is LMCache's engine).
Chunk sizes: 256 KiB, 8 MiB and 32 MiB of bf16 KV.  Needs lmcache==0.5.6.

Run:  python benchmarks/lmcache_engine.py [--dir DIR] [--json FILE] [--quick] [--sizes 256K,8M,32M]
                                          [--rounds N] [--unverified]
      python benchmarks/lmcache_engine.py --from-json RUN1.json [RUN2.json ...]  (several runs' rounds pooled)
"""

from __future__ import annotations

import argparse
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

from report import (  # noqa: E402
    fio_gbps, human, load_runs, medians, pooled_heading, read_order, resident, save_json, span,
    turns,
)
from slabcache.bench.contenders import drop_file_cache  # noqa: E402
from slabcache.format.sizes import parse_size  # noqa: E402
from slabcache.integrations.lmcache.cpu_connector import CPUConnector  # noqa: E402

CHUNK = 256
PROMPT = 4 * CHUNK
# (layers, hidden) giving 256 KiB, 8 MiB and 32 MiB per 256-token bf16 chunk
# (32 MiB: Llama-3.1-8B's 32 layers x 8 KV heads x 128).
GEOMETRIES = {256 << 10: (4, 64), 8 << 20: (8, 1024), 32 << 20: (32, 1024)}


class Engine:
    """One LMCache engine with either slabcache or LocalDiskBackend as its disk tier."""

    def __init__(self, contender: str, path: str, chunk_bytes: int, capacity_prompts: int):
        self.contender, self.path = contender, path
        self.layers, self.hidden = GEOMETRIES[chunk_bytes]
        odirect = "direct" in contender
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
                "slabcache.paths": f"file://{path}", "use_odirect": odirect,
                "slabcache.checksum": not contender.endswith(UNVERIFIED)}
        elif contender == "memory":
            cfg.storage_plugins = ["LocalDiskBackend"]
            cfg.extra_config = {"storage_plugin.LocalDiskBackend.module_path": "memory_tier",
                                "storage_plugin.LocalDiskBackend.class_name": "MemoryBackend"}
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

    def drop_cache(self) -> float:
        """Drop the tier's pages from the page cache; the fraction of its
        bytes still cached afterwards (None for the memory ceiling)."""
        if self.contender == "memory":
            return None
        if self.contender.startswith("slabcache"):
            store = self.backend.store
            store.engine.drop_cache()
            g = store.geometry
            with store.snapshot() as snap:
                ranges = [(g.slot_offset(e.slot), e.length) for e in snap.entries()]
            return resident([os.path.join(self.path, "slab")], {os.path.join(self.path, "slab"): ranges})
        files = [os.path.join(self.path, n) for n in os.listdir(self.path)]
        drop_file_cache(files)
        return resident(files)

    def pending_puts(self) -> int:
        """Puts the tier has accepted and not yet written."""
        b = self.backend
        if self.contender.startswith("slabcache"):
            return b.pending_puts()
        if self.contender == "memory":
            return 0
        with b.disk_worker.put_lock:
            return len(b.disk_worker.put_tasks)

    def wait_for_puts(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.pending_puts():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.contender}: queued stores never finished")
            time.sleep(0.0005)

    def close(self) -> None:
        LMCacheEngineBuilder.destroy(self.cfg.lmcache_instance_id)


def run_device(fio: str, directory: str, chunk_bytes: int, prompts: int) -> dict:
    """The device's own rate, in prompts per second, for the stores and
    retrieves the tiers do (see DEVICE)."""
    path = os.path.join(directory, f"{DEVICE}-{chunk_bytes}")
    common = (f"--filename={path}", f"--bs={chunk_bytes}", f"--size={prompts * 4 * chunk_bytes}",
              f"--iodepth={DEVICE_QD}")
    try:
        # Written just before it is read, as each tier's chunks are: the
        # virtual disk's host keeps recent writes cached.
        write = fio_gbps(fio, "--rw=write", *common)
        # Reads in bursts, as a retrieve asks: a prompt's chunks at once,
        # the next prompt's once all are in (here 4 x 256 KiB: 1.27-1.36
        # GB/s so, 1.44-1.51 with four always in flight).
        read = fio_gbps(fio, "--readonly", "--rw=randread", f"--iodepth_batch_submit={DEVICE_QD}",
                        f"--iodepth_batch_complete_min={DEVICE_QD}", *common)
    finally:
        if os.path.exists(path):
            os.remove(path)
    prompt = 4 * chunk_bytes
    return {"store": write * 1e9 / prompt, "read": read * 1e9 / prompt}


def run_one(contender: str, directory: str, chunk_bytes: int, prompts: int, churn_ops: int,
            round_: int = 0) -> dict:
    if contender == DEVICE:
        return run_device(shutil.which("fio"), directory, chunk_bytes, prompts)
    path = os.path.join(directory, f"{contender}-{chunk_bytes}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    # Each contender starts with nothing left to write back from the last:
    # buffered writes run at memory speed only up to the dirty limit.
    os.sync()
    e = Engine(contender, path, chunk_bytes, capacity_prompts=prompts)
    try:
        data = [e.prompt(i) for i in range(prompts)]
        # Touched once before any timing: a fresh buffer's first-touch page
        # faults (tens of ms at 128 MiB, and more when huge pages run out)
        # would otherwise land in whichever retrieve comes first.
        out = torch.zeros_like(data[0][1])
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
        inside = _time_backend_reads(e.backend)
        reads = read_order(data, round_)
        for name in ("warm retrieve", "cold retrieve"):
            if name == "cold retrieve":
                still = e.drop_cache()
                if still is not None:
                    res["cold_resident"] = still
            inside.clear()
            good = 0
            # Warm: several passes, so a pass is long enough to rise above
            # the machine's noise; cold: one, as a second would be warm.
            passes = WARM_PASSES if name == "warm retrieve" else 1
            t0 = time.perf_counter()
            for _ in range(passes):
                for tokens, kv in reads:
                    good += int(e.eng.retrieve(tokens, kv=out).sum()) == PROMPT
            res[name] = passes * prompts / (time.perf_counter() - t0)
            res[name + " hits"] = good / passes
            res[name + " backend_ms"] = 1e3 * sum(inside) / (passes * prompts)
            if name == "warm retrieve":
                # Spot-check the bytes: the last prompt retrieved must be the one stored.
                assert torch.equal(out, reads[-1][1]), f"{contender}: wrong bytes retrieved"
        universe = 2 * prompts
        rng = random.Random(5)
        stream = [min(universe - 1, int(rng.expovariate(1.0 / (universe / 3)))) for _ in range(churn_ops)]
        # The new prompts are made before the clock starts: making one takes
        # 105 ms at 8 MiB chunks and 420 ms at 32 MiB, as long as the whole
        # churn of the faster tiers.
        extra = {j: e.prompt(j) for j in sorted(set(stream)) if j >= prompts}
        hits = 0
        t0 = time.perf_counter()
        for j in stream:
            tokens, kv = data[j] if j < prompts else extra[j]
            if e.eng.lookup(tokens) == PROMPT and int(e.eng.retrieve(tokens, kv=out).sum()) == PROMPT:
                hits += 1
            else:
                e.eng.store(tokens, kv=kv)
        e.wait_for_puts()  # timed like the store workload: until its stores are on disk
        res["churn"] = churn_ops / (time.perf_counter() - t0)
        res["churn hits"] = hits
        return res
    finally:
        e.close()
        shutil.rmtree(path, ignore_errors=True)


def _time_backend_reads(backend) -> list:
    """Times of the backend's batched_get_blocking calls, appended as they run."""
    times: list = []
    real = backend.batched_get_blocking

    def timed(keys):
        t = time.perf_counter()
        try:
            return real(keys)
        finally:
            times.append(time.perf_counter() - t)

    backend.batched_get_blocking = timed
    return times


WARM_PASSES = 3
PAIRS = (("slabcache-mmap", "lmcache-buffered"), ("slabcache-direct", "lmcache-odirect"))
# With --unverified: the plugin again with slabcache.checksum false, against
# the same LMCache contenders: what verifying every read and write costs.
UNVERIFIED = "-unverified"
UNVERIFIED_PAIRS = tuple((ours + UNVERIFIED, theirs) for ours, theirs in PAIRS)
CEILING = "memory"
WORKLOADS = ("store", "warm retrieve", "cold retrieve", "churn")
# The device's own rate (with fio on PATH): O_DIRECT requests of one chunk,
# DEVICE_QD in flight, as a prompt's four chunks are stored and retrieved.
DEVICE = "fio"
DEVICE_QD = 4
# What each contender is compared with on the device: its stores (until on
# disk) with fio's writes; the time its disk tier spends in a cold retrieve
# (and in a warm one for O_DIRECT tiers, which read the device again) with
# fio's reads of a prompt, LMCache's engine around the tier left out.
DEVICE_SHARES = (("store", "store", None), ("cold retrieve", "read", None),
                 ("warm retrieve", "read", "direct"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="slabcache-bench")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="fewer prompts and rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--sizes", default="256K,8M,32M", help="chunk sizes, comma list")
    ap.add_argument("--unverified", action="store_true",
                    help="also run the plugin with slabcache.checksum false (what checksums cost)")
    ap.add_argument("--from-json", nargs="+", help="only report the results in these JSON files "
                    "(several runs: their rounds pooled)")
    args = ap.parse_args(argv)
    if args.from_json:
        reports = load_runs(args.from_json)
        print(pooled_heading(reports))
        print_table(pool(reports))
        return 0
    os.makedirs(args.dir, exist_ok=True)
    rounds = args.rounds or (1 if args.quick else 5)
    report: dict = {"rounds": rounds, "results": []}
    for chunk in [parse_size(x) for x in args.sizes.split(",")]:
        prompts = {256 << 10: 24, 8 << 20: 8, 32 << 20: 4}[chunk] * (1 if args.quick else 2)
        churn_ops = 3 * prompts
        contenders = _contenders(PAIRS + (UNVERIFIED_PAIRS if args.unverified else ())) + [CEILING]
        if shutil.which("fio"):
            contenders.append(DEVICE)
        runs: dict = {c: [] for c in contenders}
        for r in range(rounds):  # taking turns, so drift hits all alike
            for c in turns(contenders, r):
                runs[c].append(run_one(c, args.dir, chunk, prompts, churn_ops, r))
        for c, rs in runs.items():
            report["results"].append({"chunk": chunk, "contender": c, "prompts": prompts,
                                      "median": medians(rs), "runs": rs})
        save_json(args.json, report)
    print_table(report)
    return 0


def pool(reports: list[dict]) -> dict:
    """The results of several runs as one run of all their rounds."""
    rows: dict = {}
    for rep in reports:
        for r in rep["results"]:
            rows.setdefault((r["chunk"], r["contender"]), []).append(r)
    results = []
    for (chunk, contender), rs in rows.items():
        runs = [rnd for r in rs for rnd in r["runs"]]
        results.append({"chunk": chunk, "contender": contender, "prompts": rs[0]["prompts"],
                        "median": medians(runs), "runs": runs})
    return {"rounds": sum(rep["rounds"] for rep in reports), "results": results}


def _contenders(pairs) -> list[str]:
    """Each contender of ``pairs`` once, in order."""
    return list(dict.fromkeys(c for pair in pairs for c in pair))


def print_table(report: dict) -> None:
    by = {(r["chunk"], r["contender"]): r for r in report["results"]}
    chunks = sorted({r["chunk"] for r in report["results"]})
    pairs = [p for p in PAIRS + UNVERIFIED_PAIRS if any((c, p[0]) in by for c in chunks)]
    print("ratio slabcache / LocalDiskBackend in the same mode, medians over rounds (range over rounds);")
    print("share: slabcache's part of the gap from LocalDiskBackend to the in-memory ceiling\n")
    print("| chunk | pair | " + " | ".join(WORKLOADS) + " | store() blocks |")
    print("|---|---|" + "---:|" * (len(WORKLOADS) + 1))
    for chunk in chunks:
        ceiling = by.get((chunk, CEILING))
        for ours, theirs in pairs:
            a, b = by.get((chunk, ours)), by.get((chunk, theirs))
            if not (a and b):
                continue
            cells = []
            for w in WORKLOADS:
                ra = [x[w] / y[w] for x, y in zip(a["runs"], b["runs"])]
                cell = f"**{a['median'][w] / b['median'][w]:.2f}x** ({span(ra)})"
                top = ceiling["median"].get(w) if ceiling else None
                gap = (top - b["median"][w]) if top else 0
                if gap > 0:
                    cell += f", share {(a['median'][w] - b['median'][w]) / gap:+.0%}"
                cells.append(cell)
            cells.append(f"{a['median']['store_blocks_ms']:.1f} vs {b['median']['store_blocks_ms']:.1f} ms")
            print(f"| {human(chunk)} | {ours} vs {theirs} | " + " | ".join(cells) + " |")
    print("\nprompts/s (median) and, for warm retrieve, ms a prompt inside the disk tier:\n")
    for chunk in chunks:
        for c in _contenders(pairs) + [CEILING]:
            r = by.get((chunk, c))
            if r:
                m = r["median"]
                cold = f", cold resident {m['cold_resident']:.1%}" if "cold_resident" in m else ""
                print(f"{human(chunk):>7} {c:18s} " + " ".join(f"{w} {m[w]:.1f}" for w in WORKLOADS) +
                      f", tier {m['warm retrieve backend_ms']:.2f} of "
                      f"{1e3 / m['warm retrieve']:.2f} ms{cold}")
    lines = device_lines(by, chunks, pairs)
    if lines:
        print(f"\nthe device (fio, O_DIRECT, requests of one chunk, {DEVICE_QD} in flight: writes in "
              f"order, random reads in bursts of {DEVICE_QD}), prompts/s, and each tier as a share of it (stores until on "
              "disk; retrieves: the time inside the disk tier):\n")
        print("\n".join(lines))


def device_lines(by: dict, chunks: list[int], pairs) -> list[str]:
    """Per chunk size run with fio: the device's rates (medians over rounds)
    and each tier's share of them, round by round against the fio run of
    the same round: median (range)."""
    lines = []
    for chunk in chunks:
        dev = by.get((chunk, DEVICE))
        if not dev:
            continue
        parts = []
        for w, ref, only in DEVICE_SHARES:
            shares = []
            for c in _contenders(pairs):
                if (chunk, c) not in by or (only and only not in c):
                    continue
                # A store's rate against fio's; a retrieve's time in the tier against fio's.
                per_round = [r[w] / d[ref] if w == "store" else 1e3 / d[ref] / r[w + " backend_ms"]
                             for r, d in zip(by[(chunk, c)]["runs"], dev["runs"])]
                shares.append(f"{c} {statistics.median(per_round):.0%} ({span(per_round, '{:.0%}')})")
            parts.append(("store " if w == "store" else f"{w} (tier) ") + ", ".join(shares))
        d = dev["median"]
        lines.append(f"{human(chunk):>7} writes {d['store']:.1f}, reads {d['read']:.1f}; " + "; ".join(parts))
    return lines

if __name__ == "__main__":
    raise SystemExit(main())
