"""The ``meta`` table: what a store was created with, and its counters.

Creation id, the slab header's copy, the eviction policy, the allocation
high-water mark (``next_unused``), the logical clock (``tick``) and the
counters, each under its own name.
"""

from __future__ import annotations

import struct

from .policy import Policy, make_policy

U64 = struct.Struct(">Q")
# Persisted as consecutive u64s: append new counters at the end only.
COUNTERS = ("hits", "misses", "puts", "evictions", "checksum_failures", "rejected_puts",
            "queue_rejections", "io_errors", "bytes_read", "bytes_written")
_COUNTERS = struct.Struct(f"<{len(COUNTERS)}Q")
DEFAULT_POLICY = "lru"


class MetaOps:
    """Named values of the ``meta`` table (a room of IndexTxn)."""

    __slots__ = ()

    def meta_get(self, name: str) -> bytes | None:
        return self.txn.get(name.encode(), db=self.db["meta"])

    def meta_put(self, name: str, value: bytes) -> None:
        self.txn.put(name.encode(), value, db=self.db["meta"])

    def _u64(self, name: str) -> int:
        raw = self.meta_get(name)
        return U64.unpack(raw)[0] if raw else 0

    def init_store(self, creation_id: bytes, header: bytes, policy: Policy | None) -> None:
        """Record what a new store was created with."""
        self.meta_put("creation_id", creation_id)
        # A copy of the slab header lets fsck repair a damaged one.
        self.meta_put("header", header)
        self.set_policy(policy or make_policy(DEFAULT_POLICY))

    def creation_id(self) -> bytes | None:
        raw = self.meta_get("creation_id")
        return None if raw is None else bytes(raw)

    def set_header_copy(self, header: bytes) -> None:
        self.meta_put("header", header)

    def header_copy(self) -> bytes | None:
        raw = self.meta_get("header")
        return None if raw is None else bytes(raw)

    def policy(self) -> Policy:
        """The store's eviction policy, as recorded in the index."""
        return make_policy(bytes(self.meta_get("policy") or DEFAULT_POLICY.encode()).decode())

    def set_policy(self, policy: Policy) -> None:
        self.meta_put("policy", policy.name.encode())

    def tick(self) -> int:
        """The logical clock."""
        if self._tick is None:
            self._tick = self._u64("tick")
        return self._tick

    def set_tick(self, t: int) -> None:
        self._tick = t
        self.meta_put("tick", U64.pack(t))

    def next_tick(self) -> int:
        t = self.tick() + 1
        self.set_tick(t)
        return t

    def counters(self) -> dict[str, int]:
        raw = bytes(self.meta_get("counters") or b"")
        vals = struct.unpack(f"<{len(raw) // 8}Q", raw[:len(raw) // 8 * 8])
        vals = (vals + (0,) * len(COUNTERS))[:len(COUNTERS)]
        return dict(zip(COUNTERS, vals))

    def add_counters(self, delta: dict[str, int]) -> None:
        if not any(delta.values()):
            return
        cur = self.counters()
        for k, v in delta.items():
            cur[k] += v
        self.meta_put("counters", _COUNTERS.pack(*(cur[k] for k in COUNTERS)))

    def next_unused(self) -> int:
        """The allocation high-water mark: slots from here on were never used."""
        if self._unused is None:
            self._unused = self._u64("next_unused")
        return self._unused

    def set_next_unused(self, mark: int) -> None:
        self._unused = mark
        self.meta_put("next_unused", U64.pack(mark))
        self._no_free = False
