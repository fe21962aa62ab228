"""Benchmarks: slabcache against a file-per-chunk store, in one run.

Contenders share one directory's filesystem and see the same key and size
sequences.  Every figure is also given as a ratio against a reference from
the same run (file-per-chunk, an O_DIRECT sequential pass, memcpy), because
absolute numbers on shared machines move by tens of percent.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from ..admin.progress import Progress
from ..core import SlabStore
from ..device.memory import aligned_empty
from .contenders import (
    BASELINE_OF, BUFFERED, ODIRECT, FilePerChunk, LMCacheDisk, SlabContender, direct_supported,
    lmcache_available,
)
from .references import mapped_copy_gbps, memcpy_gbps, odirect_ceiling

log = logging.getLogger(__name__)


@dataclass
class Result:
    contender: str
    size: int
    workload: str
    ops: int
    seconds: float
    cpu_seconds: float
    bytes: int
    p50_us: float
    p99_us: float
    hits: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(gbps=self.gbps, ops_per_s=self.ops_per_s)
        return d


class _Timer:
    def __init__(self):
        self.lat = []
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()

    def lap(self, start: float) -> None:
        self.lat.append(time.perf_counter() - start)

    def result(self, contender, size, workload, nbytes, hits=None, **extra) -> Result:
        secs = time.perf_counter() - self.t0
        cpu = time.process_time() - self.c0
        lat = sorted(self.lat) or [0.0]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return Result(contender, size, workload, len(self.lat), secs, cpu, nbytes,
                      statistics.median(lat) * 1e6, p99 * 1e6, hits, extra)


def _value(size: int, seed: int) -> torch.Tensor:
    # bf16 KV-like payload in an aligned buffer (like LMCache's MemoryObjs);
    # random bytes so nothing compresses or dedups.
    g = torch.Generator().manual_seed(seed)
    buf = aligned_empty(size)
    buf.copy_(torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g))
    return buf.view(torch.bfloat16)


def run_size(make, size: int, capacity_slots: int, churn_ops: int, pool: list[torch.Tensor]) -> list[Result]:
    """All workloads for one contender at one chunk size."""
    c = make()
    out = []
    name = c.name
    # Reads land in a reused, 4 KiB-aligned buffer, as with LMCache's CPU
    # allocator; a fresh allocation per read would measure page faults.
    buf = aligned_empty(size).view(torch.bfloat16)
    keys = [f"model/llama@1@0@{i:08x}@bfloat16" for i in range(capacity_slots)]

    t = _Timer()
    for i, k in enumerate(keys):
        s = time.perf_counter()
        c.put(k, pool[i % len(pool)])
        t.lap(s)
    out.append(t.result(name, size, "fill", size * len(keys)))

    order = keys[:]
    random.Random(1).shuffle(order)
    c.drop_cache()
    for workload in ("cold get", "warm get"):  # the second pass finds the pages cached
        t = _Timer()
        hits = 0
        for k in order:
            s = time.perf_counter()
            hits += bool(c.get(k, buf))
            t.lap(s)
        out.append(t.result(name, size, workload, size * hits, hits=hits))

    # Churn at capacity: a serving node's steady state.  Requests draw from
    # twice as many chunks as fit (skewed towards recent ones); a hit is a
    # get, a miss is a put that evicts.
    rng = random.Random(2)
    universe = 2 * capacity_slots
    t = _Timer()
    moved = 0
    hits = 0
    for _ in range(churn_ops):
        j = min(universe - 1, int(rng.expovariate(1.0 / (universe / 3))))
        k = f"model/llama@1@0@{j:08x}@bfloat16"
        s = time.perf_counter()
        if c.get(k, buf):
            hits += 1
        else:
            c.put(k, pool[j % len(pool)])
        t.lap(s)
        moved += size
    out.append(t.result(name, size, "churn", moved, hits=hits))

    look = [f"model/llama@1@0@{j:08x}@bfloat16" for j in range(capacity_slots)]
    present = [k for k in look if c.batched_contains([k]) == 1]
    batch = (present * (1000 // max(1, len(present)) + 1))[:1000] if present else look[:1000]
    t = _Timer()
    for _ in range(20):
        s = time.perf_counter()
        c.batched_contains(batch)
        t.lap(s)
    out.append(t.result(name, size, "lookup 1000", 0))

    t = _Timer()
    s = time.perf_counter()
    c2 = c.reopen()
    first = present[0] if present else keys[0]
    hit = bool(c2.get(first, buf))
    t.lap(s)
    out.append(t.result(name, size, "restart to first hit", size if hit else 0, hits=int(hit),
                        entries=len(present)))
    c2.close()
    return out


def restart_many(directory: str, entries: int) -> Result:
    """Reopen a store holding ``entries`` small entries and serve one get."""
    path = os.path.join(directory, f"restart-{entries}")
    slot = 4096
    v = torch.zeros(16, dtype=torch.uint8)
    with SlabStore.open(path, capacity_bytes=entries * slot, slot_bytes=slot) as s:
        for i in range(entries):
            s.put(f"k{i}", v)
    t = _Timer()
    st = time.perf_counter()
    with SlabStore.open(path) as s:
        hit = s.get(f"k{entries // 2}") is not None
    t.lap(st)
    shutil.rmtree(path, ignore_errors=True)
    return t.result("slabcache-mmap", slot, f"restart, {entries} entries", 0, hits=int(hit))


# ---------------------------------------------------------------- suite


def run_suite(directory: str, sizes: list[int], quick: bool, restart_entries: list[int],
              progress: bool = True) -> dict:
    os.makedirs(directory, exist_ok=True)
    can_direct = direct_supported(directory)
    # Each slabcache engine next to its matched baseline (BASELINE_OF).
    contenders = [("slabcache-mmap", "mmap"), (BUFFERED, "fpc")]
    if can_direct:
        contenders += [("slabcache-direct", "direct"), (ODIRECT, "fpc-odirect")]
    results: list[Result] = []
    refs = {"memcpy_gbps": memcpy_gbps()}
    notes = []
    if not can_direct:
        notes.append(f"{directory} refuses O_DIRECT: the direct engine was skipped")
    if lmcache_available():
        contenders.append(("lmcache-LocalDiskBackend-buffered", "lmcache"))
        if can_direct:
            contenders.append(("lmcache-LocalDiskBackend-odirect", "lmcache-odirect"))
    else:
        notes.append("lmcache is not installed: LMCache's own LocalDiskBackend was not measured "
                     "(tools/bootstrap.sh --with-lmcache installs it)")

    steps = len(sizes) * (len(contenders) + 1) + len(restart_entries)
    bar = Progress(steps, enabled=progress)
    for size in sizes:
        budget = (64 << 20) if quick else (512 << 20)
        slots = max(16, min(512 if quick else 2048, budget // size))
        churn_ops = slots * (2 if quick else 4)
        pool = [_value(size, seed) for seed in range(4)]
        if can_direct:
            refs[f"odirect_{size}"] = odirect_ceiling(directory, size, max(size * 8, 64 << 20))
        refs[f"mapped_copy_{size}"] = mapped_copy_gbps(directory, max(size, 1 << 20))
        bar.step(f"references {size >> 10} KiB")
        for name, io in contenders:
            sub = os.path.join(directory, f"{name}-{size}")
            shutil.rmtree(sub, ignore_errors=True)

            def make(sub=sub, io=io):
                if io in ("fpc", "fpc-odirect"):
                    return FilePerChunk(sub, capacity_bytes=slots * size, odirect=io == "fpc-odirect")
                if io in ("lmcache", "lmcache-odirect"):
                    return LMCacheDisk(sub, capacity_bytes=slots * size, size=size,
                                       odirect=io == "lmcache-odirect")
                return SlabContender(sub, capacity_bytes=slots * size, slot_bytes=size, io=io)

            results += run_size(make, size, slots, churn_ops, pool)
            shutil.rmtree(sub, ignore_errors=True)
            bar.step(f"{name} {size >> 10} KiB")
    for n in restart_entries:
        results.append(restart_many(directory, n))
        bar.step(f"restart {n}")
    return {"results": [r.to_dict() for r in results], "references": refs, "notes": notes,
            "machine": machine_description(directory), "quick": quick}


def machine_description(directory: str) -> dict:
    fs, best = "unknown (no /proc/mounts)", ""
    if os.path.exists("/proc/mounts"):
        with open("/proc/mounts") as f:
            for line in f:
                _dev, mnt, typ = line.split()[:3]
                if os.path.abspath(directory).startswith(mnt) and len(mnt) >= len(best):
                    best, fs = mnt, typ
    return {"cpus": os.cpu_count(), "filesystem": fs, "torch": torch.__version__,
            "python": sys.version.split()[0], "platform": sys.platform}


# ---------------------------------------------------------------- reporting


def _fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def markdown(report: dict) -> str:
    rows = [Result(**{k: v for k, v in r.items() if k not in ("gbps", "ops_per_s")})
            for r in report["results"]]
    base = {(r.contender, r.size, r.workload): r for r in rows if r.contender in (BUFFERED, ODIRECT)}
    refs = report["references"]
    lines = [
        "Ratios compare each contender with its matched baseline in the same run: "
        f"slabcache-mmap and LMCache buffered with {BUFFERED} (LMCache's default), "
        f"slabcache-direct and LMCache with use_odirect with {ODIRECT}.",
        "",
        "| size | workload | contender | GB/s | ops/s | p50 us | p99 us | CPU s | % ceiling | vs matched baseline |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ceiling = ""
        od = refs.get(f"odirect_{r.size}")
        if od and r.workload in ("fill", "cold get") and r.bytes:
            ref = od["write_gbps"] if r.workload == "fill" else od["read_gbps"]
            ceiling = f"{100 * r.gbps / ref:.0f}%"
        elif r.workload == "warm get" and f"mapped_copy_{r.size}" in refs and r.bytes:
            ceiling = f"{100 * r.gbps / refs[f'mapped_copy_{r.size}']:.0f}%"
        b = base.get((BASELINE_OF.get(r.contender), r.size, r.workload))
        ratio = ""
        if b is not None:
            if r.workload.startswith("lookup"):
                ratio = f"{b.p50_us / r.p50_us:.2f}x" if r.p50_us else ""
            elif r.workload.startswith("restart"):
                ratio = "baseline: 0 hits" if not b.hits else f"{b.p50_us / r.p50_us:.2f}x"
            elif b.ops_per_s:
                ratio = f"{r.ops_per_s / b.ops_per_s:.2f}x"
        hits = "" if r.hits is None else f" ({r.hits} hits)" if r.workload.startswith("restart") else ""
        lines.append(
            f"| {_fmt_size(r.size)} | {r.workload}{hits} | {r.contender} | {r.gbps:.2f} | "
            f"{r.ops_per_s:,.0f} | {r.p50_us:,.0f} | {r.p99_us:,.0f} | {r.cpu_seconds:.2f} | "
            f"{ceiling} | {ratio} |"
        )
    lines.append("")
    lines.append(f"memcpy: {refs['memcpy_gbps']:.1f} GB/s. " + " ".join(
        f"O_DIRECT {_fmt_size(int(k.split('_')[1]))}: write {v['write_gbps']:.2f} GB/s, read {v['read_gbps']:.2f} GB/s."
        for k, v in refs.items() if k.startswith("odirect_")))
    for n in report["notes"]:
        lines.append(f"Note: {n}.")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'slabcache[plot]'") from exc
    rows = report["results"]
    workloads = ["fill", "cold get", "warm get", "churn"]
    contenders = sorted({r["contender"] for r in rows})
    sizes = sorted({r["size"] for r in rows if r["workload"] == "churn"})
    fig, axes = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 3.6))
    for ax, w in zip(axes, workloads):
        for c in contenders:
            ys = [next((r["gbps"] for r in rows if r["contender"] == c and r["size"] == s
                        and r["workload"] == w), 0) for s in sizes]
            ax.plot([s >> 10 for s in sizes], ys, marker="o", label=c)
        ax.set_xscale("log", base=2)
        ax.set_title(w)
        ax.set_xlabel("chunk KiB")
        ax.set_ylabel("GB/s")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
