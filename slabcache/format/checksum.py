"""Payload checksums: xxh3-64, block-wise for large values.

Changing anything here changes what is on disk: bump FORMAT_VERSION.
"""

from __future__ import annotations

from typing import Sequence

import xxhash

# Payloads longer than one block are checksummed as the xxh3-64 of their
# blocks' xxh3-64 digests, so blocks can be hashed in parallel and while
# later blocks are still being read.  Changing this changes the format.
CHECKSUM_BLOCK = 4 << 20


def block_digest(buf) -> bytes:
    """Digest of one checksum block (xxh3 releases the GIL on large buffers)."""
    return xxhash.xxh3_64_digest(buf)


def block_hasher():
    """A streaming hasher whose ``digest()`` equals ``block_digest`` of the
    bytes fed to it (for hashing a block piece by piece as it is copied)."""
    return xxhash.xxh3_64()


def combine_digests(digests: Sequence[bytes], total: int) -> int:
    if total <= CHECKSUM_BLOCK:
        return int.from_bytes(digests[0], "big") if digests else xxhash.xxh3_64_intdigest(b"")
    return xxhash.xxh3_64_intdigest(b"".join(digests))


def checksum(parts: Sequence) -> int:
    """Payload checksum over the concatenation of ``parts`` (buffer objects)."""
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(len(v) for v in views)
    if total <= CHECKSUM_BLOCK:
        h = xxhash.xxh3_64()
        for v in views:
            h.update(v)
        return h.intdigest()
    digests, h, filled = [], xxhash.xxh3_64(), 0
    for v in views:
        while len(v):
            take = min(len(v), CHECKSUM_BLOCK - filled)
            h.update(v[:take])
            v = v[take:]
            filled += take
            if filled == CHECKSUM_BLOCK:
                digests.append(h.digest())
                h, filled = xxhash.xxh3_64(), 0
    if filled:
        digests.append(h.digest())
    return combine_digests(digests, total)
