"""Values a test can check without keeping a copy, and children that import
this checkout."""

from __future__ import annotations

import hashlib
import os

import torch


def child_env(**extra: str) -> dict:
    """Environment for a child Python that must import this checkout's
    slabcache (not some other installed copy); ``extra`` adds variables."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return dict(os.environ, PYTHONPATH=root, **extra)


def expected(key: str, size: int = 3000, exact: bool = False) -> torch.Tensor:
    """The one right value for ``key``: bytes derived from the key itself,
    ``size`` of them when ``exact``."""
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    g = torch.Generator().manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
    n = size if exact else size - (seed % 97)  # lengths vary, most not multiples of 4 KiB
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def verify(store, keys) -> tuple[int, int, int]:
    """(served right, misses, wrong) over ``keys``."""
    right = miss = wrong = 0
    for k in keys:
        v = store.get(k)
        if v is None:
            miss += 1
        elif torch.equal(v, expected(k)):
            right += 1
        else:
            wrong += 1
    return right, miss, wrong
