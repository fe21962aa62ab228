"""Fault injection around the public engine interface.

Open a store with ``engine_wrapper=FaultyEngine``; then ``store.engine`` is
the FaultyEngine, and ``inject(mode, every)`` switches faults on and off.
"""

from __future__ import annotations

import errno
import threading
import time
from typing import Callable

from ..device import EngineWrapper
from ..errors import SlabIOError

MODES = (None, "eio_write", "eio_read", "short_write", "enospc", "slow")


class FaultyEngine(EngineWrapper):
    """Wraps a real engine and injects faults into its I/O.

    ``mode``: one of MODES.  ``every``: fault one call in this many (1 =
    every call).  ``after_read``, when set, is called with the slot number
    after each read and before the store validates it, ``before_read``
    before the read starts (to force a race with eviction or a rewrite of
    the slot deterministically).
    """

    def __init__(self, inner, mode: str | None = None, every: int = 1, delay: float = 0.002):
        super().__init__(inner)
        self.delay = delay
        self.after_read: Callable[[int], None] | None = None
        self.before_read: Callable[[int], None] | None = None
        self._lock = threading.Lock()
        self.inject(mode, every)

    def inject(self, mode: str | None, every: int = 1) -> "FaultyEngine":
        """Fault one call in ``every`` from now on (None: no faults); resets the counts."""
        if mode not in MODES:
            raise ValueError(f"unknown fault mode {mode!r}; use one of {MODES}")
        with self._lock:
            self.mode, self.every = mode, every
            self.calls = 0
            self.injected = 0
        return self

    def _due(self, kind: str) -> bool:
        if self.mode != kind:
            return False
        with self._lock:
            self.calls += 1
            due = self.calls % self.every == 0
            if due:
                self.injected += 1
        return due

    def _fail(self, what: str, slot: int, err: int, why: str):
        exc = OSError(err, why)
        return SlabIOError(f"{what} slot {slot} of {self.path} failed: {exc}")

    def write(self, slot, parts, hashed=False):
        if self.mode == "slow":
            time.sleep(self.delay)
        if self._due("eio_write"):
            raise self._fail("writing", slot, errno.EIO, "injected I/O error on write")
        if self._due("enospc"):
            raise self._fail("writing", slot, errno.ENOSPC, "injected: no space left on device")
        if self._due("short_write"):
            # Half the bytes land, then the device gives up.
            half = sum(p.numel() for p in parts) // 2
            pos, head = 0, []
            for p in parts:
                take = max(0, min(p.numel(), half - pos))
                if take:
                    head.append(p[:take])
                pos += p.numel()
            if head:
                self.inner.write(slot, head)
            raise self._fail("writing", slot, errno.EIO, "injected short write")
        return self.inner.write(slot, parts, hashed)

    def write_many(self, slots, parts_list, hashed=False):
        if self.mode not in (None, "slow"):
            return super().write_many(slots, parts_list, hashed)  # faults land value by value
        # The inner engine's runs of slots; slowed, the wait comes after
        # them, so a kill lands between a batch's payloads and its records.
        got = self.inner.write_many(slots, parts_list, hashed)
        if self.mode == "slow":
            time.sleep(self.delay)
        return got

    def read_into(self, slot, parts, hashed=False):
        if self.mode == "slow":
            time.sleep(self.delay)
        if self._due("eio_read"):
            raise self._fail("reading", slot, errno.EIO, "injected I/O error on read")
        if self.before_read is not None:
            self.before_read(slot)
        digest = self.inner.read_into(slot, parts, hashed)
        if self.after_read is not None:
            self.after_read(slot)
        return digest


def inject(store, mode: str | None, every: int = 1) -> FaultyEngine:
    """Switch the faults of ``store``'s FaultyEngine (returns it)."""
    fe = store.engine
    if not isinstance(fe, FaultyEngine):
        raise TypeError("the store has no FaultyEngine; open it with engine_wrapper=FaultyEngine")
    return fe.inject(mode, every)
