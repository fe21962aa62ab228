"""Slab <-> GPU bandwidth against plain pinned host<->device copies, same run.

Run on a CUDA machine:  python benchmarks/gpu_transfer.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

from slabcache import SlabStore


def _gbps(nbytes, secs):
    return nbytes / secs / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="slabcache-bench")
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--count", type=int, default=16)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    size = args.size_mib << 20
    n = args.count
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        dev.copy_(host)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    h2d = _gbps(size * n, time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(n):
        host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    d2h = _gbps(size * n, time.perf_counter() - t)
    print(f"pinned copy_: host->device {h2d:.2f} GB/s, device->host {d2h:.2f} GB/s")
    vals = [torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda") for _ in range(n)]
    outs = [torch.empty_like(v) for v in vals]
    for io in ("mmap", "direct"):
        path = os.path.join(args.dir, f"gpu-{io}")
        shutil.rmtree(path, ignore_errors=True)
        with SlabStore.open(path, capacity_bytes=n * size, slot_bytes=size, io=io) as s:
            t = time.perf_counter()
            assert all(f.result() for f in [s.put_async(f"k{i}", v) for i, v in enumerate(vals)])
            put = _gbps(size * n, time.perf_counter() - t)
            s.engine.drop_cache()
            t = time.perf_counter()
            assert all(s.get_many_into([f"k{i}" for i in range(n)], outs))
            torch.cuda.synchronize()
            get = _gbps(size * n, time.perf_counter() - t)
            assert all(torch.equal(a, b) for a, b in zip(outs, vals))
        shutil.rmtree(path, ignore_errors=True)
        print(f"{io}: GPU->slab {put:.2f} GB/s ({100 * put / d2h:.0f}% of pinned D2H), "
              f"slab->GPU (cold) {get:.2f} GB/s ({100 * get / h2d:.0f}% of pinned H2D)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
