"""Sizes as people write them: 256K, 4M, 32MiB, 20G, or plain bytes."""

from __future__ import annotations

SIZE_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# The largest size slabcache takes (1 EiB): file offsets are signed 64-bit
# numbers, and no disk comes near it.
MAX_BYTES = 1 << 60


def check_bytes(name: str, n) -> int:
    """``n`` as a number of bytes in 1..MAX_BYTES.  Raises ValueError
    naming ``name``."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"{name} must be a whole number of bytes, got {type(n).__name__} {n!r}")
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {n}")
    if n > MAX_BYTES:
        raise ValueError(f"{name} of {n} bytes is more than slabcache addresses (1 EiB); "
                         "give the size of a real disk, e.g. 20G")
    return n


def parse_size(text: str) -> int:
    """'256K', '4M', '32MiB', '1G', '4096' -> bytes.  Raises ValueError."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if not t:
        raise ValueError(f"empty size {text!r}")
    mult = SIZE_SUFFIX.get(t[-1], 1)
    num = t[:-1] if t[-1] in SIZE_SUFFIX else t
    try:
        val = float(num)
    except ValueError:
        val = float("nan")
    if val != val or val in (float("inf"), float("-inf")):  # nan, inf, 1e400
        raise ValueError(f"cannot read size {text!r}; write e.g. 256K, 4M, 20G or plain bytes")
    if val <= 0:
        raise ValueError(f"size {text!r} must be positive")
    if val * mult > MAX_BYTES:
        raise ValueError(f"size {text!r} is more than slabcache addresses (1 EiB); "
                         "give the size of a real disk, e.g. 20G")
    return int(val * mult)


def format_size(n: int) -> str:
    """4194304 -> '4M'."""
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
