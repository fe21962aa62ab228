"""slabcache against SGLang's own ``file`` HiCache backend, both driven by
SGLang's HiCacheController.

No SGLang engine runs (none does on a CPU-only machine); what runs is the
controller and host pool SGLang's scheduler uses (slabcache.testing.
sglang_hicache.Node), backing requests' pages up with ``write_storage`` and
prefetching them back (hit query, transfer, acks).  sglang 0.5.23 must be
installed (``./tools/bootstrap.sh --with-sglang`` builds .venv-sglang).

Contenders, one directory each on the same filesystem, in one process,
taking turns within each round (the order reversed every other round):

- ``file``: SGLang's ``HiCacheFile`` as it comes (one file per page, temp
  file + rename, buffered; the copying path: each page copied out of and
  into the host pool);
- ``slabcache``: ``SlabCacheStorage`` with ``interface_v1`` (zero-copy
  between slab and host pool) and its defaults (``io: mmap``, buffered:
  matched with ``file``);
- ``memory``: pages in a dict (memory_sglang.py), the ceiling: the
  controller plus a copy each way, no disk.

Workloads, pages per second (ratio slabcache / file):

- store: every request's pages backed up once;
- warm prefetch: every request prefetched back, page cache as the store
  left it, the requests in a shuffled order (the same for every contender
  of a round; report.read_order);
- cold prefetch: the same after writing back and dropping the pages from
  the page cache (slabcache's through its engine, which also unmaps them);
  the fraction still cached is measured and reported;
- churn: a skewed stream of requests over twice as many pages as each
  contender may keep (``file`` gets the same budget through its own LRU
  evictor, ``max_size``): a request whose pages all exist is prefetched,
  anything else backed up; each contender's mix is reported.

Run:  .venv-sglang/bin/python benchmarks/sglang_backend.py [--dir DIR] [--json FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time

import torch

from report import read_order, resident, save_json, span, turns
from slabcache.bench.contenders import drop_file_cache

# Page sizes from tokens a page: 4 layers x 8 KV heads x 128 x K,V x fp16 = 16 KiB a token.
GEOMETRY = {"layers": 4, "heads": 8, "head_dim": 128}
TOKEN_BYTES = 4 * 8 * 128 * 2 * 2
SIZES = {"64K": 4, "1M": 64, "8M": 512}  # tokens a page
WORKING_SET = 128 << 20  # bytes of pages per size
REQUEST = 16 << 20  # bytes of pages a request
CONTENDERS = ("file", "slabcache", "memory")
WORK = ("store", "warm", "cold", "churn")


def make_node(name: str, root: str, page_tokens: int, host_tokens: int, capacity: int | None):
    from slabcache.testing.sglang_hicache import SLABCACHE, Node

    pool = dict(GEOMETRY, page_size=page_tokens, tokens=host_tokens, layout="page_first")
    if name == "file":
        extra = {"file_storage_path": root}
        if capacity:
            extra["max_size"] = capacity
        return Node(extra, backend="file", **pool)
    if name == "memory":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        extra = {"backend_name": "memory", "module_path": "memory_sglang", "class_name": "MemoryStorage",
                 "interface_v1": 1, "capacity": capacity or 2 * WORKING_SET}
        return Node(extra, **pool)
    return Node({**SLABCACHE, "interface_v1": 1, "path": root, "capacity": capacity or 2 * WORKING_SET},
                **pool)


def drop(name: str, node, root: str) -> float | None:
    """Drop the contender's pages from the page cache; the fraction of their
    bytes still cached afterwards (None for the ceiling)."""
    if name == "memory":
        return None
    if name == "file":
        files = [os.path.join(root, f) for f in os.listdir(root)]
        drop_file_cache(files)
        return resident(files)
    store = node.backend.store
    store.engine.drop_cache()
    slab, g = os.path.join(store.path, "slab"), store.geometry
    with store.snapshot() as snap:
        ranges = {slab: [(g.slot_offset(e.slot), e.length) for e in snap.entries()]}
    return resident([slab], ranges)


def requests(n: int, pages: int, page_tokens: int, base: int) -> list[list[int]]:
    return [list(range(base + r * pages * page_tokens, base + (r + 1) * pages * page_tokens)) for r in range(n)]


def store_all(node, idx: torch.Tensor, reqs: list[list[int]]) -> float:
    """Back every request up (queued at once, as the scheduler does); seconds."""
    ctl, per = node.controller, len(reqs[0])
    t0 = time.perf_counter()
    for r, toks in enumerate(reqs):
        ctl.write_storage(idx[r * per:(r + 1) * per], toks, hash_value=node.hashes(toks))
    done = sum(ctl.ack_backup_queue.get(timeout=600).completed_tokens for _ in reqs)
    dt = time.perf_counter() - t0
    if done != per * len(reqs):
        raise RuntimeError(f"stored {done} of {per * len(reqs)} tokens")
    return dt


def prefetch_all(node, reqs: list[list[int]], want: list[torch.Tensor] | None = None) -> float:
    """Prefetch every request back; seconds.  Every page must come back
    (and, given ``want``, equal what was stored)."""
    t0, got_pages = time.perf_counter(), []
    for r, toks in enumerate(reqs):
        hit, done, idx = node.prefetch(toks, rid=f"p{r}")
        if done != len(toks):
            raise RuntimeError(f"request {r}: prefetched {done} of {len(toks)} tokens (hit {hit})")
        if want is not None:
            got_pages.append(idx)
        else:
            node.free(idx)
    dt = time.perf_counter() - t0
    if want is not None:
        got = [p for idx in got_pages for p in node.pages(idx)]
        if not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want)):  # bits: NaNs too
            raise RuntimeError("prefetched pages differ from the stored ones")
        for idx in got_pages:
            node.free(idx)
    return dt


def churn(node, pages: int, page_tokens: int, capacity_pages: int, seed: int) -> tuple[float, int, int]:
    """Requests over twice the capacity, skewed to recent ones: all pages
    exist -> prefetch, else back up.  (pages moved per second, prefetches,
    backups)."""
    rng = random.Random(seed)
    n_req = max(2, 2 * capacity_pages // pages)
    steps = max(32, 2 * n_req)
    reqs = requests(n_req, pages, page_tokens, 50_000_000)
    idx = node.host.alloc(pages * page_tokens)
    ctl = node.controller
    loads = 0
    t0 = time.perf_counter()
    for step in range(steps):
        toks = reqs[min(n_req - 1, int(rng.expovariate(3.0 / n_req)))]
        keys = node.hashes(toks)
        if node.backend.batch_exists(keys) == len(keys):
            hit, done, got = node.prefetch(toks, rid=f"c{step}")
            node.free(got)
            loads += 1
        else:
            ctl.write_storage(idx, toks, hash_value=keys)
            ctl.ack_backup_queue.get(timeout=600)
    dt = time.perf_counter() - t0
    node.free(idx)
    return steps * pages / dt, loads, steps - loads


def one_size(label: str, base: str, rounds: int, quick: bool, contenders: tuple[str, ...]) -> dict:
    page_tokens = SIZES[label]
    page_bytes = page_tokens * TOKEN_BYTES
    ws = WORKING_SET // (2 if quick else 1)
    pages = max(1, REQUEST // page_bytes)
    n_req = max(2, ws // (pages * page_bytes))
    host_tokens = 2 * n_req * pages * page_tokens + 4 * page_tokens
    res: dict = {c: {} for c in contenders}
    for rnd in range(rounds):
        for name in turns(contenders, rnd):
            root = os.path.join(base, f"{name}-{label}")
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
            os.sync()
            node = make_node(name, root, page_tokens, host_tokens, None)
            try:
                reqs = requests(n_req, pages, page_tokens, 1_000_000 * (rnd + 1))
                idx = node.host.alloc(n_req * pages * page_tokens)
                node.host.kv_buffer.view(-1).view(torch.int16).random_(generator=torch.Generator().manual_seed(rnd))
                want = node.pages(idx)
                total = n_req * pages
                res[name].setdefault("store", []).append(total / store_all(node, idx, reqs))
                node.free(idx)
                order = read_order(range(n_req), rnd)
                reads = [reqs[r] for r in order]
                want = [want[r * pages + p] for r in order for p in range(pages)]
                res[name].setdefault("warm", []).append(total / prefetch_all(node, reads, want))
                still = drop(name, node, root)
                if still is not None:
                    res[name].setdefault("cold_resident", []).append(still)
                res[name].setdefault("cold", []).append(total / prefetch_all(node, reads))
            finally:
                node.close()
                shutil.rmtree(root, ignore_errors=True)
            # Churn on a fresh directory with a budget of half the working set.
            os.makedirs(root)
            budget = max(pages, total // 2) * page_bytes
            node = make_node(name, root, page_tokens, host_tokens, budget)
            try:
                rate, loads, stores = churn(node, pages, page_tokens, budget // page_bytes, seed=rnd)
                res[name].setdefault("churn", []).append(rate)
                res[name].setdefault("churn_prefetches", []).append(loads)
                res[name].setdefault("churn_backups", []).append(stores)
            finally:
                node.close()
                shutil.rmtree(root, ignore_errors=True)
    return {name: {w: statistics.median(v) for w, v in r.items()} | {"runs": r} for name, r in res.items()}


def report(results: dict) -> str:
    """Ratios to file (median over rounds, range over rounds) and slabcache's
    share of the gap from file to the in-memory ceiling; then raw figures."""
    lines = ["| page | " + " | ".join(w + (" prefetch" if w in ("warm", "cold") else "") for w in WORK) + " |",
             "|---|" + "---:|" * len(WORK)]
    for label, r in results.items():
        f, s, top = r["file"], r["slabcache"], r.get("memory")
        cells = []
        for w in WORK:
            cell = f"**{s[w] / f[w]:.2f}x** ({span(a / b for a, b in zip(s['runs'][w], f['runs'][w]))})"
            if top and top[w] > f[w]:
                cell += f", share {(s[w] - f[w]) / (top[w] - f[w]):+.0%}"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for label, r in results.items():
        for name, s in r.items():
            cold = f", cold resident {s['cold_resident']:.1%}" if "cold_resident" in s else ""
            lines.append(f"{label:>4} {name:9s} pages/s: " + " ".join(f"{w} {s[w]:.0f}" for w in WORK)
                         + f"; churn {s['churn_prefetches']:.0f} prefetches, {s['churn_backups']:.0f} backups"
                         + cold)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="./slabcache-bench/sglang")
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="one round, half the working set")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="file and slabcache must be among them")
    ap.add_argument("--from-json", help="only report the results in this JSON")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            print(report(json.load(f)["results"]))
        return
    os.makedirs(args.dir, exist_ok=True)
    rounds = 1 if args.quick else args.rounds
    results = {}
    for label in args.sizes.split(","):
        results[label] = one_size(label, args.dir, rounds, args.quick, tuple(args.contenders.split(",")))
        print(f"{label}: " + json.dumps({c: {w: v for w, v in r.items() if w != "runs"}
                                          for c, r in results[label].items()}), flush=True)
    text = report(results)
    print(text)
    save_json(args.json, {"working_set_bytes": WORKING_SET, "request_bytes": REQUEST, "rounds": rounds,
                          "geometry": GEOMETRY, "results": results})


if __name__ == "__main__":
    main()
