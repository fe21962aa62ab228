"""Slab <-> GPU bandwidth against plain pinned host<->device copies, same run.

slab -> GPU is measured two ways on the mmap engine: the store's path
(pinned staging buffers, one CUDA stream per worker, ``get_many_into``) and
cudaHostRegister'ing each value's window of the slab mapping and copying
straight from it, each page-cache cold and warm.

Run on a CUDA machine:  python benchmarks/gpu_transfer.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import time

import torch

from slabcache import SlabStore
from slabcache.format.checksum import checksum
from slabcache.format.header import round_up


def _gbps(nbytes, secs):
    return nbytes / secs / 1e9


def registered_windows(store: SlabStore, keys: list[str], outs: list[torch.Tensor]) -> None:
    """slab -> GPU the other way: page-lock each value's window of the slab
    mapping with cudaHostRegister and copy straight from it, no staging copy.

    The checksum is verified on the host before the copy, as the store must
    to keep its guarantee; registering pins (and so faults in) the pages.
    """
    cudart = torch.cuda.cudart()
    view, g = store.engine.view, store.geometry
    for k, out in zip(keys, outs):
        e = store.entry(k)
        off = g.slot_offset(e.slot)
        window = view[off:off + e.length]
        if checksum([window.numpy()]) != e.checksum:
            raise RuntimeError(f"checksum mismatch for {k!r}")
        start = off & ~(mmap.PAGESIZE - 1)
        length = round_up(off + e.length, mmap.PAGESIZE) - start
        ptr = view.data_ptr() + start
        err = int(cudart.cudaHostRegister(ptr, length, 0))
        if err != 0:
            raise RuntimeError(f"cudaHostRegister of {length} bytes of the slab mapping failed (error {err})")
        try:
            out.copy_(window, non_blocking=True)
            torch.cuda.current_stream().synchronize()
        finally:
            cudart.cudaHostUnregister(ptr)


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
    keys = [f"k{i}" for i in range(n)]
    for io in ("mmap", "direct"):
        path = os.path.join(args.dir, f"gpu-{io}")
        shutil.rmtree(path, ignore_errors=True)
        with SlabStore.open(path, capacity_bytes=n * size, slot_bytes=size, io=io) as s:
            t = time.perf_counter()
            assert all(f.result() for f in [s.jobs.put(k, v) for k, v in zip(keys, vals)])
            put = _gbps(size * n, time.perf_counter() - t)

            def staged():
                assert all(s.get_many_into(keys, outs))

            ways = {"staged": staged}
            if io == "mmap":
                ways["registered"] = lambda: registered_windows(s, keys, outs)
            rates = {}
            for way, read in ways.items():
                for state in ("cold", "warm"):
                    if state == "cold":
                        s.engine.drop_cache()
                    for o in outs:
                        o.zero_()
                    t = time.perf_counter()
                    read()
                    torch.cuda.synchronize()
                    rates[f"{way} {state}"] = _gbps(size * n, time.perf_counter() - t)
                    assert all(torch.equal(a, b) for a, b in zip(outs, vals))
        shutil.rmtree(path, ignore_errors=True)
        print(f"{io}: GPU->slab {put:.2f} GB/s ({100 * put / d2h:.0f}% of pinned D2H)")
        for name, r in rates.items():
            print(f"{io}: slab->GPU {name}: {r:.2f} GB/s ({100 * r / h2d:.0f}% of pinned H2D)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
