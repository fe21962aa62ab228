"""What the benchmark scripts share: sizes as people read them, turns that
alternate, medians and ranges over rounds, JSON out, and a check that a
"cold" read really finds nothing in the page cache.

The scripts run as ``python benchmarks/NAME.py``, so this module is
imported as ``report``.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import statistics
import subprocess
from typing import Iterable, Sequence

from slabcache.device.syscalls import cached_pages

KiB, MiB = 1 << 10, 1 << 20


def human(n: int) -> str:
    """4194304 -> '4 MiB', 262144 -> '256 KiB'."""
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= KiB and n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


def turns(contenders: Sequence[str], round_: int) -> list[str]:
    """The order contenders run in ``round_``: reversed every other round,
    so neither always goes first (into a cold cache, a fresh disk...)."""
    order = list(contenders)
    return order if round_ % 2 == 0 else order[::-1]


def read_order(items: Sequence, round_: int) -> list:
    """``items`` (the prompts, jobs or requests written) in the order a
    round reads them back: shuffled, seeded by the round, so every
    contender of a round reads the same order.  Read in the order written,
    a buffered tier's readahead runs on into the next request, which it
    does not for a server whose requests arrive in any order."""
    order = list(items)
    random.Random(7919 + round_).shuffle(order)
    return order


def medians(runs: list[dict]) -> dict:
    """Per key, the median over ``runs`` of each numeric value."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def pooled_runs(runs_by_file: list[dict]) -> dict:
    """Several runs' ``runs`` (workload -> one value a round) as one: each
    workload's rounds, run after run.  Rounds stay paired across
    contenders, as every run ran its contenders in the same rounds."""
    out: dict = {}
    for runs in runs_by_file:
        for w, vals in runs.items():
            out.setdefault(w, []).extend(vals)
    return out


def load_runs(paths: Sequence[str]) -> list[dict]:
    """The JSON reports of several runs of one benchmark."""
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    return reports


def pooled_heading(reports: list[dict]) -> str:
    """The line above a table of several runs pooled."""
    return (f"{sum(r['rounds'] for r in reports)} rounds in {len(reports)} run(s): "
            "medians over every round (range over rounds)\n")


def span(values: Iterable[float], fmt: str = "{:.2f}") -> str:
    """'lo-hi' of ``values`` ('v' when they agree to the format)."""
    vals = sorted(values)
    lo, hi = fmt.format(vals[0]), fmt.format(vals[-1])
    return lo if lo == hi else f"{lo}-{hi}"


def save_json(path: str | None, obj) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1, default=str)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def resident(paths: Iterable[str], ranges: dict[str, list[tuple[int, int]]] | None = None) -> float:
    """The fraction of the files' pages (or of the given (offset, length)
    ranges of them) in the page cache: what a "cold" read must find near 0."""
    total = cached = 0
    page = mmap.PAGESIZE
    for path in paths:
        size = os.path.getsize(path)
        if not size:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            try:
                for off, length in (ranges or {}).get(path, [(0, size)]):
                    start = off // page * page
                    n = (off + length - start + page - 1) // page
                    vec = cached_pages(addr + start, off + length - start)
                    if vec is not None:
                        total += n
                        cached += sum(b & 1 for b in vec)
            finally:
                _libc.munmap(addr, size)
        finally:
            os.close(fd)
    return cached / total if total else 0.0


def fio_gbps(fio: str, *args: str) -> float:
    """Bandwidth in GB/s of one fio job with O_DIRECT and libaio (fio's own
    clock, so its start-up is not counted)."""
    out = subprocess.run([fio, "--name=ref", "--output-format=json", "--direct=1", "--ioengine=libaio",
                          "--norandommap", *args], check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return max(job["read"]["bw_bytes"], job["write"]["bw_bytes"]) / 1e9
