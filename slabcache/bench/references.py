"""References measured in the same run: what the disk and memory can do at all."""

from __future__ import annotations

import mmap
import os
import time

import torch

from ..device.memory import aligned_empty
from .contenders import ALIGN


def odirect_ceiling(directory: str, block: int, total: int) -> dict:
    """Sequential O_DIRECT write then read of ``total`` bytes in ``block`` pieces
    (what fio --direct=1 --rw=write/read --bs=block --iodepth=1 measures)."""
    block = max(ALIGN, block // ALIGN * ALIGN)
    total = max(block, total // block * block)
    path = os.path.join(directory, ".ceiling")
    buf = aligned_empty(block)
    buf.random_(0, 256)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        os.posix_fallocate(fd, 0, total)
        arr = buf.numpy()
        t0 = time.perf_counter()
        for off in range(0, total, block):
            os.pwrite(fd, arr, off)
        w = time.perf_counter() - t0
        t0 = time.perf_counter()
        for off in range(0, total, block):
            os.preadv(fd, [arr], off)
        r = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return {"write_gbps": total / w / 1e9, "read_gbps": total / r / 1e9}


def _copy_gbps(dst: torch.Tensor, src: torch.Tensor, rounds: int = 5) -> float:
    """Best of ``rounds`` copies after one warm-up."""
    dst.copy_(src)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return src.numel() / best / 1e9


def memcpy_gbps(nbytes: int = 64 << 20) -> float:
    a = torch.empty(nbytes, dtype=torch.uint8)
    a.fill_(1)
    return _copy_gbps(torch.empty_like(a), a)


def mapped_copy_gbps(directory: str, nbytes: int) -> float:
    """Copy out of an already-mapped, page-cache-warm file (the mmap read ceiling)."""
    path = os.path.join(directory, ".mapped")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20) * max(1, nbytes >> 20))
    try:
        with open(path, "r+b") as f:
            mm = mmap.mmap(f.fileno(), 0)
            src = torch.frombuffer(mm, dtype=torch.uint8)
            gbps = _copy_gbps(torch.empty_like(src), src)
            del src
            mm.close()
    finally:
        os.unlink(path)
    return gbps
