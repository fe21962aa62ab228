"""slabcache's vLLM tier against vLLM's own file-system tier, through the tier API.

Both tiers are driven exactly as vLLM's TieringOffloadingManager drives a
secondary tier: store jobs and load jobs of ``JOB_BLOCKS`` blocks each
(a request's worth) between the CPU tier's shared buffer (a chunk of it
for every block, as vLLM gives each transfer in flight its own) and the
tier, all submitted at once, then ``get_finished_jobs`` polled until every
job has reported.  No vLLM engine runs; vLLM 0.32 must be installed
(``./tools/bootstrap.sh --with-vllm`` builds .venv-vllm).

Contenders, one directory each on the same filesystem, in one process,
taking turns within each round:

- ``fs``: vLLM's ``FileSystemTierManager`` (one file per block, temp file +
  rename, its 16 + 16 threads).  It opens files with O_DIRECT when the
  filesystem allows it (it does here) and never deletes a block: it has no
  capacity and no eviction.
- ``slabcache-direct`` (``io: direct``, O_DIRECT: matched with ``fs``) and
  ``slabcache-mmap`` (``io: mmap``, buffered, the default);
- ``memory``: blocks kept in a dict (memory_vllm.py), the ceiling: vLLM's
  tier API plus a copy each way, no disk.

Workloads, blocks per second (ratio slabcache / fs):

- store: every block of the working set stored once;
- warm load: every block loaded back, page cache as the store left it,
  the jobs in a shuffled order (the same for every contender of a round;
  report.read_order);
- cold load: the same after writing back and dropping the tier's pages
  (slabcache's through its engine, which also unmaps them); the fraction
  of the blocks' bytes still in the page cache is measured and reported;
- churn: a skewed stream of requests over twice as many blocks as the
  slabcache tier holds: a request whose blocks all hit is loaded, anything
  else stored (slabcache evicts; fs keeps growing, so it hits more: each
  contender's loads and stores are reported);
- lookup: 1,000 keys, each asked until answered (fs answers RETRY first and
  resolves the batch on a background thread at the step's end).

With fio on PATH, each round also times the device itself (DEVICE): O_DIRECT
writes of the block size in order at queue depth 16 into a new file of the
working set's size, then reads of it in order at queue depth 32; each
tier's stores and cold loads are reported as a share of them, round by
round.  On the development machines' virtual disk fs's 16 synchronous load
threads get more than fio's one queue (up to 130% at 1 MiB): there it is a
floor for the device, not a ceiling.

Each round runs the contenders in turn, the order reversed every other
round; figures are medians over rounds.

Run:  .venv-vllm/bin/python benchmarks/vllm_tier.py [--dir DIR] [--json FILE] [--quick]
      python benchmarks/vllm_tier.py --from-json RUN1.json [RUN2.json ...] [--plot FILE.png]
          (several runs' rounds pooled; any venv, matplotlib for the plot)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import time

from report import (
    fio_gbps, load_runs, pooled_heading, pooled_runs, read_order, resident, save_json, span, turns,
)
from slabcache.bench.contenders import drop_file_cache

SIZES = {"64K": 64 << 10, "1M": 1 << 20, "8M": 8 << 20}
# Bytes of blocks per size (at least 32 blocks).  256 MiB makes a cold load
# phase last a few hundred milliseconds; at 64 MiB (40 ms) thread start-up
# and the device's first requests moved the ratios by a third between rounds.
WORKING_SET = 256 << 20
JOB_BLOCKS = 8
CONTENDERS = ("fs", "slabcache-direct", "slabcache-mmap", "memory")
# The device's own rate for cold loads (with fio on PATH; see the module
# docstring for why it is not a ceiling on every disk): O_DIRECT reads of
# the block size, at a queue depth above fs's 16 load threads, from a file
# of the working set's size, taking turns with the tiers.  In order: the
# loads come as jobs in a shuffled order, but random reads at the same
# depth were no faster here (fio, 256 MiB, in order / random: 64 KiB 1.16
# / 1.02 GB/s, 1 MiB 1.22 / 1.23, 8 MiB 1.60 / 1.48), so this is the more
# generous line.
DEVICE = "fio-read"
DEVICE_QD = 32
# The device's own rate for stores: O_DIRECT writes of the block size in
# order, at fs's 16 store threads' depth, into a new file of the working
# set's size (as each tier's store writes blocks the disk has not seen: a
# new slab, new files; benchmarks/disk_reuse.py shows what that costs here).
DEVICE_WRITE_QD = 16


def make_tier(name: str, root: str, block: int, capacity_blocks: int, primary):
    from slabcache.testing.vllm_tier import offloading_spec

    spec = offloading_spec(block=block)
    if name == "fs":
        from vllm.v1.kv_offload.tiering.fs.manager import FileSystemTierManager

        return FileSystemTierManager(spec, primary.view, "fs", root_dir=root)
    if name == "memory":
        from memory_vllm import MemoryTier

        return MemoryTier(spec, primary.view, "memory", capacity_blocks=capacity_blocks)
    from slabcache.integrations.vllm import SlabCacheTier

    return SlabCacheTier(spec, primary.view, "SlabCacheTier", path=root,
                         capacity=capacity_blocks * block, io=name.split("-")[1])


def run_jobs(tier, submit, jobs) -> float:
    """Submit every job, poll until all report; seconds.  Jobs must succeed."""
    from vllm.v1.kv_offload.tiering.base import TransferJob
    import numpy as np

    ids = {}
    t0 = time.perf_counter()
    for n, (keys, chunks) in enumerate(jobs):
        j = TransferJob(job_id=10_000_000 + n, keys=keys, chunk_ids=np.asarray(chunks, dtype=np.int64),
                        is_promotion=False, req_context=None)
        ids[j.job_id] = j
        getattr(tier, submit)(j)
    failed = 0
    while ids:
        for r in tier.get_finished_jobs():
            failed += not r.success
            ids.pop(r.job_id, None)
        if ids:
            time.sleep(0.0002)
    dt = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"{failed} {submit} jobs failed")
    return dt


def batches(ids, chunks):
    """Jobs of JOB_BLOCKS keys, each block in its own CPU-tier chunk."""
    from slabcache.testing.vllm_tier import key

    out = []
    for i in range(0, len(ids), JOB_BLOCKS):
        part = ids[i:i + JOB_BLOCKS]
        out.append(([key(b) for b in part], [chunks[n % len(chunks)] for n in range(i, i + len(part))]))
    return out


def request(req_id: str, keys):
    """A ReqContext with its keys recorded, as vLLM's scheduler does before
    it looks any up."""
    from vllm.v1.kv_offload.base import ReqContext

    ctx = ReqContext(req_id=req_id)
    for i, k in enumerate(keys):
        ctx.set_offload_key_position(k, (i + 1) * 128)
    return ctx


def resolve(tier, keys, ctx) -> dict:
    """Each key's answer, asking again while it is RETRY; a scheduler step
    ends in between (a tier with async lookups resolves them then)."""
    from vllm.v1.kv_offload.base import LookupResult, ScheduleEndContext

    got, pending = {}, list(keys)
    while pending:
        for k in pending:
            answer = tier.lookup(k, ctx)
            if answer is not LookupResult.RETRY:
                got[k] = answer
        pending = [k for k in pending if k not in got]
        if pending:
            tier.on_schedule_end(ScheduleEndContext(new_req_ids=(), preempted_req_ids=()))
            time.sleep(0.0002)
    return got


def lookup_1000(tier) -> float:
    from slabcache.testing.vllm_tier import key

    keys = [key(1_000_000 + i) for i in range(1000)]
    ctx = request("bench", keys)
    t0 = time.perf_counter()
    resolve(tier, keys, ctx)
    dt = time.perf_counter() - t0
    tier.on_request_finished(ctx)
    return dt


def files_of(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def drop_tier_cache(name: str, tier, root: str) -> float | None:
    """Drop the tier's pages from the page cache; the fraction of its bytes
    still cached afterwards (None for the memory ceiling)."""
    if name == "memory":
        return None
    if name == "fs":
        files = files_of(root)
        drop_file_cache(files)
        return resident(files)
    paths, ranges = [], {}
    for store in tier._stores:
        store.engine.drop_cache()
        slab = os.path.join(store.path, "slab")
        g = store.geometry
        with store.snapshot() as snap:
            ranges[slab] = [(g.slot_offset(e.slot), e.length) for e in snap.entries()]
        paths.append(slab)
    return resident(paths, ranges)


def time_device(fio: str, device: str, block: int, n_blocks: int) -> dict:
    """The device's blocks/s for stores and cold loads (DEVICE): O_DIRECT
    writes of ``n_blocks`` blocks into a new file at ``device``, then reads
    of it."""
    common = (f"--filename={device}", f"--bs={block}", f"--size={n_blocks * block}")
    if os.path.exists(device):
        os.unlink(device)  # blocks the disk has not seen, as a tier's store gets
    os.sync()
    wrote = fio_gbps(fio, "--rw=write", f"--iodepth={DEVICE_WRITE_QD}", *common)
    read = fio_gbps(fio, "--readonly", "--rw=read", f"--iodepth={DEVICE_QD}", *common)
    return {"store": wrote * 1e9 / block, "cold_load": read * 1e9 / block}


def one_size(label: str, block: int, base: str, rounds: int, quick: bool,
             contenders: tuple[str, ...] = CONTENDERS) -> dict:
    from slabcache.testing.vllm_tier import Primary

    n_blocks = max(32, WORKING_SET // block // (2 if quick else 1))
    # A CPU-tier chunk for every block: vLLM never has two transfers in
    # flight on one CPU block, and all the jobs here are in flight at once.
    chunks = n_blocks
    primary = Primary(chunks=chunks, block=block)
    primary.fill(range(chunks), seed=1)
    res: dict = {c: {} for c in contenders}
    fio = shutil.which("fio")
    device = os.path.join(base, f"device-{label}")
    try:
        for rnd in range(rounds):
            for name in turns(contenders + ((DEVICE,) if fio else ()), rnd):
                if name == DEVICE:
                    # Written just before it is read, as each tier's blocks
                    # are: the virtual disk's host keeps recent writes
                    # cached, and a ceiling read from an older file was
                    # slower than fs's own loads.
                    dev = res.setdefault(DEVICE, {})
                    for work, rate in time_device(fio, device, block, n_blocks).items():
                        dev.setdefault(work, []).append(rate)
                    continue
                root = os.path.join(base, f"{name}-{label}")
                shutil.rmtree(root, ignore_errors=True)
                os.sync()  # nothing left to write back from the last contender
                tier = make_tier(name, root, block, n_blocks, primary)
                try:
                    ids = list(range(n_blocks))
                    t = run_jobs(tier, "submit_store", batches(ids, list(range(chunks))))
                    res[name].setdefault("store", []).append(n_blocks / t)
                    reads = read_order(batches(ids, list(range(chunks))), rnd)
                    t = run_jobs(tier, "submit_load", reads)
                    res[name].setdefault("warm_load", []).append(n_blocks / t)
                    still = drop_tier_cache(name, tier, root)
                    if still is not None:
                        res[name].setdefault("cold_resident", []).append(still)
                    t = run_jobs(tier, "submit_load", reads)
                    res[name].setdefault("cold_load", []).append(n_blocks / t)
                    res[name].setdefault("lookup_1000_ms", []).append(lookup_1000(tier) * 1e3)
                    rate, loads, stores = churn(tier, n_blocks, chunks, seed=rnd)
                    res[name].setdefault("churn", []).append(rate)
                    res[name].setdefault("churn_loads", []).append(loads)
                    res[name].setdefault("churn_stores", []).append(stores)
                finally:
                    tier.shutdown()
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        primary.close()
        if os.path.exists(device):
            os.unlink(device)
    return {name: {w: statistics.median(v) for w, v in r.items()} | {"runs": r} for name, r in res.items()}


def churn(tier, capacity_blocks: int, chunks: int, seed: int) -> tuple[float, int, int]:
    """Requests of JOB_BLOCKS blocks over twice the capacity, skewed to recent
    ones; all hit -> load, else store.  (blocks moved per second, load jobs,
    store jobs)."""
    from vllm.v1.kv_offload.base import LookupResult

    from slabcache.testing.vllm_tier import key

    rng = random.Random(seed)
    n_req = 2 * capacity_blocks // JOB_BLOCKS
    steps = max(64, n_req)
    moved = loads = 0
    t0 = time.perf_counter()
    for step in range(steps):
        r = min(n_req - 1, int(rng.expovariate(3.0 / n_req)))
        keys = [key(5_000_000 + r * JOB_BLOCKS + b) for b in range(JOB_BLOCKS)]
        ctx = request(f"churn-{step}", keys)  # a request each, as vLLM asks
        answers = resolve(tier, keys, ctx).values()
        op = "submit_load" if all(a is LookupResult.HIT for a in answers) else "submit_store"
        loads += op == "submit_load"
        run_jobs(tier, op, [(keys, [b % chunks for b in range(JOB_BLOCKS)])])
        tier.on_request_finished(ctx)
        moved += JOB_BLOCKS
    return moved / (time.perf_counter() - t0), loads, steps - loads


WORK = ("store", "warm_load", "cold_load", "churn")


def pool(reports: list[dict]) -> dict:
    """The results of several runs as one run of all their rounds."""
    out: dict = {}
    for label in reports[0]["results"]:
        out[label] = {}
        for name in reports[0]["results"][label]:
            runs = pooled_runs([r["results"][label][name]["runs"] for r in reports
                                if name in r["results"].get(label, {})])
            out[label][name] = {w: statistics.median(v) for w, v in runs.items()} | {"runs": runs}
    return out


def device_shares(label: str, r: dict) -> str:
    """Each tier's cold loads, and stores where the run timed the device's
    writes, as a share of the device's rate: round by round against that
    round's fio run, medians."""
    def share(name: str, work: str) -> str:
        ours, dev = r[name]["runs"][work], r[DEVICE]["runs"][work]
        return f"{name} {statistics.median(a / b for a, b in zip(ours, dev)):.0%}"

    tiers = [n for n in r if n not in (DEVICE, "memory")]
    line = (f"{label}: the device (fio, reads in order, queue depth {DEVICE_QD}) {r[DEVICE]['cold_load']:.0f} "
            "blocks/s; cold loads " + ", ".join(share(n, "cold_load") for n in tiers) + " of it")
    if "store" in r[DEVICE]:  # runs before the device's writes were timed have none
        line += (f"; writes (in order into a new file, queue depth {DEVICE_WRITE_QD}) {r[DEVICE]['store']:.0f} "
                 "blocks/s; stores " + ", ".join(share(n, "store") for n in tiers) + " of it")
    return line


def report(results: dict) -> str:
    """Ratios to fs (median over rounds, range over rounds) and each one's
    share of the gap from fs to the in-memory ceiling; then the raw figures."""
    lines = ["| block | pair | " + " | ".join(w.replace("_", " ") for w in WORK)
             + " | lookup 1,000 keys (ms) |", "|---|---|" + "---:|" * (len(WORK) + 1)]
    for label, r in results.items():
        fs, top = r["fs"], r.get("memory")
        for name in ("slabcache-direct", "slabcache-mmap"):
            if name not in r:
                continue
            s = r[name]
            cells = []
            for w in WORK:
                cell = f"**{s[w] / fs[w]:.2f}x**"
                if "runs" in s:
                    cell += f" ({span(a / b for a, b in zip(s['runs'][w], fs['runs'][w]))})"
                if top and top[w] > fs[w]:
                    cell += f", share {(s[w] - fs[w]) / (top[w] - fs[w]):+.0%}"
                cells.append(cell)
            lines.append(f"| {label} | {name.split('-')[1]} vs fs | " + " | ".join(cells)
                         + f" | {s['lookup_1000_ms']:.2f} vs {fs['lookup_1000_ms']:.2f} |")
    lines.append("")
    for label, r in results.items():
        if DEVICE in r:
            lines.append(device_shares(label, r))
    lines.append("")
    for label, r in results.items():
        for name, s in r.items():
            if name == DEVICE:
                continue
            cold = f", cold resident {s['cold_resident']:.1%}" if "cold_resident" in s else ""
            lines.append(f"{label:>4} {name:17s} blocks/s: " + " ".join(f"{w} {s[w]:.0f}" for w in WORK)
                         + f"; churn {s['churn_loads']:.0f} loads, {s['churn_stores']:.0f} stores{cold}")
    return "\n".join(lines)


def plot(results: dict, out: str) -> None:
    """Ratios to vLLM's fs tier, one panel per workload (matplotlib, from the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work = ("store", "warm_load", "cold_load", "churn")
    labels = list(results)
    fig, axes = plt.subplots(1, len(work), figsize=(14, 3.6), sharey=True)
    for ax, w in zip(axes, work):
        for i, name in enumerate(("slabcache-direct", "slabcache-mmap")):
            ys = [results[b][name][w] / results[b]["fs"][w] for b in labels if name in results[b]]
            xs = [j + (i - 0.5) * 0.38 for j in range(len(ys))]
            ax.bar(xs, ys, width=0.36, label=name.split("-")[1] + " vs fs")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(w.replace("_", " "))
    axes[0].set_ylabel("blocks/s, ratio to vLLM's fs tier")
    axes[0].legend(fontsize=8)
    fig.suptitle("slabcache tier vs vLLM's fs tier (O_DIRECT), through vLLM's tier API")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="./slabcache-bench/vllm-tier")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="one round, half the working set")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="fs must be one of them")
    ap.add_argument("--plot", help="write a chart (needs matplotlib) to this PNG")
    ap.add_argument("--from-json", nargs="+", help="only report and plot the results in these JSON "
                    "files (several runs: their rounds pooled)")
    args = ap.parse_args()
    if args.from_json:
        reports = load_runs(args.from_json)
        results = pool(reports)
        print(pooled_heading(reports))
        print(report(results))
        if args.plot:
            plot(results, args.plot)
        return
    os.makedirs(args.dir, exist_ok=True)
    rounds = 1 if args.quick else args.rounds
    results = {}
    for label in args.sizes.split(","):
        results[label] = one_size(label, SIZES[label], args.dir, rounds, args.quick,
                                  tuple(args.contenders.split(",")))
        print(f"{label}: " + json.dumps({c: {w: v for w, v in r.items() if w != "runs"}
                                          for c, r in results[label].items()}), flush=True)
        save_json(args.json, {"rounds": rounds, "job_blocks": JOB_BLOCKS, "results": results})
    print(report(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
