"""IndexTxn: typed operations over one LMDB transaction of a store's index,
composed of one room per table group:

``meta``      (meta.py)     creation id, header copy, policy, allocation
                            high-water mark, clock, counters
``entries``, ``order``      (entries.py) what is stored and its eviction order
``free``, ``reserved``      (slots.py) free slots, reservations, eviction
``pins``, ``owners``        (pins.py) who holds what, and who is alive
and repair.py, what fsck needs beyond them.  The rooms share the state set
here; a method call costs what it cost when they were one class.
"""

from __future__ import annotations

from typing import Callable

import lmdb

from .entries import EntryOps
from .meta import COUNTERS, MetaOps
from .pins import PinOps
from .repair import RepairOps
from .slots import SlotOps, next_generation

TABLES = ("meta", "entries", "order", "free", "reserved", "pins", "owners")

__all__ = ["COUNTERS", "TABLES", "IndexTxn", "next_generation"]


class IndexTxn(MetaOps, EntryOps, SlotOps, PinOps, RepairOps):
    """Typed operations over one LMDB transaction."""

    __slots__ = ("txn", "db", "alive", "vacated", "evicted", "_pins_exist", "_no_free",
                 "_free_listed", "_tick", "_unused")

    def __init__(self, txn: lmdb.Transaction, dbs: dict, alive: Callable[[bytes], bool]):
        self.txn = txn
        self.db = dbs
        # Whether an owner (of a pin, reservation or handle) is alive:
        # Liveness.is_alive of the store (index/owner.py).
        self.alive = alive
        # Slots whose entry or reservation this transaction dropped: whoever
        # owns the slab clears their records before it commits (an index
        # rebuild must not bring back what left the index).  None until one
        # is (most transactions vacate nothing).
        self.vacated: list[int] | None = None
        # Canonical keys of the entries evicted to make room, for a handle
        # that reports them (SlabStore.watch_evictions: its allocator's
        # prelude sets a list); None where nobody asked, and the keys are
        # not even read out of their entries.
        self.evicted: list[bytes] | None = None
        # What a batch of puts in one write transaction need not ask again:
        # None until known, then whether any pin exists; whether the free
        # list and the unused slots ran out; whether the free list holds a
        # slot.
        self._pins_exist: bool | None = None
        self._no_free = False
        self._free_listed: bool | None = None  # None until known
        # The clock and the allocation high-water mark as this transaction
        # last read or wrote them (None until then): a batch of puts moves
        # both once a key and need not read them back each time.
        self._tick: int | None = None
        self._unused: int | None = None
