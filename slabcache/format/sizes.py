"""Sizes as people write them: 256K, 4M, 32MiB, 20G, or plain bytes."""

from __future__ import annotations

SIZE_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


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
        raise ValueError(f"cannot read size {text!r}; write e.g. 256K, 4M, 20G or plain bytes") from None
    if val <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(val * mult)


def format_size(n: int) -> str:
    """4194304 -> '4M'."""
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
