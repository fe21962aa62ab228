"""Value descriptions: dtypes, shapes and sizes of a stored value.

Dtype codes are on disk: append only, never reorder.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from ..errors import CorruptStoreError

# Stable codes for dtypes: append only, never reorder (they are on disk).
DTYPE_NAMES = (
    "float32", "float64", "float16", "bfloat16",
    "int8", "int16", "int32", "int64", "uint8", "bool",
    "complex64", "complex128", "complex32",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    "uint16", "uint32", "uint64", "float8_e8m0fnu",
)
DTYPE_CODES = {n: i for i, n in enumerate(DTYPE_NAMES)}
# Bytes per element, in DTYPE_NAMES order (checked against torch by the tests).
DTYPE_SIZES = (4, 8, 2, 2, 1, 2, 4, 8, 1, 1, 8, 16, 4, 1, 1, 1, 1, 2, 4, 8, 1)

_META_HEAD = struct.Struct("<BBHI")  # version, is_list, tensor count, extra length
_TENSOR_HEAD = struct.Struct("<BB")  # dtype code, ndim


@dataclass(frozen=True)
class ValueDesc:
    """What a stored value looks like: enough to rebuild the tensors."""

    is_list: bool
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    nbytes: tuple[int, ...]
    extra: bytes = b""  # opaque, caller-defined (e.g. LMCache's format tag)

    @functools.cached_property
    def length(self) -> int:
        return sum(self.nbytes)

    @functools.cached_property
    def encoded(self) -> bytes:
        """``encode()``, computed once per description (the put path reuses
        descriptions)."""
        return self.encode()

    def encode(self) -> bytes:
        out = [_META_HEAD.pack(1, self.is_list, len(self.dtypes), len(self.extra))]
        for dt, shape in zip(self.dtypes, self.shapes):
            out.append(_TENSOR_HEAD.pack(DTYPE_CODES[dt], len(shape)))
            out.append(struct.pack(f"<{len(shape)}Q", *shape))
        out.append(struct.pack(f"<{len(self.nbytes)}Q", *self.nbytes))
        out.append(self.extra)
        return b"".join(out)

    @classmethod
    def decode(cls, raw: bytes) -> ValueDesc:
        try:
            ver, is_list, n, elen = _META_HEAD.unpack_from(raw)
            pos = _META_HEAD.size
            dtypes, shapes = [], []
            for _ in range(n):
                code, ndim = _TENSOR_HEAD.unpack_from(raw, pos)
                pos += _TENSOR_HEAD.size
                shapes.append(struct.unpack_from(f"<{ndim}Q", raw, pos))
                pos += 8 * ndim
                dtypes.append(DTYPE_NAMES[code])
            nbytes = struct.unpack_from(f"<{n}Q", raw, pos)
            pos += 8 * n
            extra = bytes(raw[pos:pos + elen])
            if ver != 1 or is_list > 1 or (n != 1 and not is_list) or pos + elen != len(raw):
                raise ValueError("bad meta")
            # Sizes must follow from shapes: a damaged shape or size must
            # never make a reader allocate or copy what the slot cannot hold.
            for dt, shape, nb in zip(dtypes, shapes, nbytes):
                count = 1
                for d in shape:
                    count *= d
                if count * DTYPE_SIZES[DTYPE_CODES[dt]] != nb:
                    raise ValueError("sizes disagree with shapes")
        except (struct.error, IndexError, ValueError) as exc:
            raise CorruptStoreError(
                "an index entry's value description is unreadable; run `slabcache fsck --repair`"
            ) from exc
        return cls(bool(is_list), tuple(dtypes), tuple(shapes), tuple(nbytes), extra)
