"""The slot allocator: the one place slots are taken and given back.

A put reserves a slot (a free one, or the policy's victim, whose entry is
deleted in the same transaction), writes, then commits the entry; a failed
write aborts.  Entries leave through :meth:`SlotAllocator.free`.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

from ..device.slabfile import SlotRecords
from ..format.header import Geometry
from ..index import Entry, Index, IndexTxn
from ..index.policy import Policy
from .uses import UseTracker

log = logging.getLogger(__name__)


class PutStatus(enum.Enum):
    """What became of a put."""

    STORED = "stored"  # written and committed
    PRESENT = "present"  # the key was already stored: counted as a use
    REJECTED = "rejected"  # no free slot and every entry pinned
    LOST = "lost"  # the reservation was taken away (a repair ran meanwhile)

    @property
    def ok(self) -> bool:
        """True when the key is stored afterwards (what put() returns)."""
        return self in (PutStatus.STORED, PutStatus.PRESENT)


@dataclass(frozen=True)
class Reservation:
    """A slot taken for one put: write it, then ``commit`` or ``abort``."""

    allocator: "SlotAllocator"
    slot: int
    generation: int

    def commit(self, canon: bytes, ikey: bytes, checksum: int, meta_raw: bytes, length: int,
               durable: bool = False) -> PutStatus:
        return self.allocator._commit(self, canon, ikey, checksum, meta_raw, length, durable)

    def abort(self) -> None:
        self.allocator._abort(self)


class SlotAllocator:
    def __init__(self, index: Index, records: SlotRecords, geometry: Geometry, policy: Policy,
                 owner: bytes, uses: UseTracker, path: str):
        self.index = index
        self.records = records
        self.geometry = geometry
        self.policy = policy
        self.owner = owner
        self.uses = uses
        self.path = path

    def reserve(self, canon: bytes, ikey: bytes) -> Reservation | PutStatus:
        """A Reservation, or PRESENT (counted as a use) or REJECTED."""
        with self.index.write() as t:
            self.uses.flush(t)
            e = t.get_entry(ikey, canon)
            if e is not None:
                t.record_use(e, self.policy, time.time())
                return PutStatus.PRESENT
            got = t.take_free_slot(self.geometry.slot_count)
            if got is None:
                t.reap_dead()
                got = t.take_free_slot(self.geometry.slot_count)
            if got is None:
                victim = t.find_victim(self.policy)
                if victim is None:
                    self.uses.count("rejected_puts")
                    return PutStatus.REJECTED
                got = t.evict(victim, self.policy)
                self.uses.count("evictions")
            slot, gen = got
            # A new generation: readers that looked the old entry up fail
            # their check after copying, even if they copied new bytes.
            gen = (gen + 1) & 0xFFFFFFFF or 1
            t.reserve(slot, gen, self.owner)
            return Reservation(self, slot, gen)

    def _commit(self, r: Reservation, canon, ikey, csum, meta_raw, length, durable) -> PutStatus:
        with self.index.write(durable=durable) as t:
            if t.reservation(r.slot) != (r.generation, self.owner):
                log.warning("slot %d of %s was taken from this put (repair?); dropping it",
                            r.slot, self.path)
                return PutStatus.LOST
            t.unreserve(r.slot)
            old = t.entry_at(ikey)
            if old is not None and old.canon == canon:
                # Another thread or process stored the same key meanwhile.
                t.release_slot(r.slot, r.generation)
                return PutStatus.PRESENT
            if old is not None:  # a different key with the same hash: replace it
                t.free_entry(old, self.policy)
            t.insert(ikey, canon, r.slot, r.generation, length, csum, meta_raw, self.policy,
                     time.time())
        self.uses.count("puts")
        return PutStatus.STORED

    def _abort(self, r: Reservation) -> None:
        with self.index.write() as t:
            if t.reservation(r.slot) == (r.generation, self.owner):
                t.unreserve(r.slot)
                t.release_slot(r.slot, r.generation)

    def free(self, t: IndexTxn, e: Entry) -> None:
        """Remove ``e`` inside write transaction ``t`` and free its slot.

        The slot's record is cleared while the write lock keeps the slot
        from being reused, so an index rebuild does not bring back what was
        removed.
        """
        self.records.clear(e.slot)
        t.free_entry(e, self.policy)

    def free_if_current(self, e: Entry) -> bool:
        """Free ``e`` unless it was replaced or evicted meanwhile."""
        with self.index.write() as t:
            cur = t.entry_at(e.ikey)
            if cur is None or cur.slot != e.slot or cur.generation != e.generation:
                return False
            self.free(t, cur)
            return True
