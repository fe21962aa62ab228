"""Which keys a handle evicted to make room, for a host that reports them.

vLLM publishes KV events for blocks a tier stores and removes; a block
slabcache evicts to make room for another is a removal only this handle
saw (the index keeps no history).  The allocator hands each write
transaction's victims to the log once the transaction has committed.
"""

from __future__ import annotations

import collections
import threading

from ..format.keys import decode_key


class EvictionLog:
    """Keys evicted by this handle's puts, oldest first, until taken.

    Bounded: past ``limit`` keys not yet taken the oldest are dropped and
    counted in ``dropped`` (a host that never takes them loses nothing
    else).  Thread-safe.
    """

    def __init__(self, limit: int = 1 << 16):
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._keys: collections.deque[bytes] = collections.deque(maxlen=limit)
        self._lock = threading.Lock()
        self.dropped = 0

    def add(self, canons: list[bytes]) -> None:
        with self._lock:
            over = len(self._keys) + len(canons) - self._keys.maxlen
            if over > 0:
                self.dropped += over
            self._keys.extend(canons)

    def take(self) -> list[str | bytes]:
        """The keys evicted since the last take, oldest first."""
        with self._lock:
            canons = list(self._keys)
            self._keys.clear()
        return [decode_key(c) for c in canons]
