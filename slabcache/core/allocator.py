"""The slot allocator: the one place slots are taken and given back.

A put reserves a slot (a free one, or the policy's victim, whose entry is
deleted in the same transaction), writes, then commits the entry; a failed
write aborts.  Batches reserve and commit all their slots in one
transaction each.  A small single put into a free slot takes one
transaction instead: it writes while holding the index's write lock
(:meth:`SlotAllocator.put_inline`).  Entries leave through
:meth:`SlotAllocator.free`.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from ..device.slabfile import SlotRecords
from ..errors import StorageFullError
from ..format.header import Geometry
from ..index import Entry, Index, IndexTxn
from ..index.txn import next_generation
from ..index.policy import Policy
from .uses import UseTracker

log = logging.getLogger(__name__)

# Stores of this many slots or more keep one slot free ahead of need (see
# SlotAllocator.put_inline): a put at capacity then costs one index write
# transaction instead of two, at the price of one slot in this many or fewer.
KEEP_FREE_FROM = 256

# Index bytes a new entry takes besides its keys and description (the
# fixed head, an order record, LMDB's node headers), and a reservation.
ENTRY_OVERHEAD = 160
RESERVATION_BYTES = 64

# With no free slot, dead processes' reservations are reclaimed at most
# this often (they are also reclaimed at every open and by fsck --repair);
# reaping on every put at capacity would scan three tables per put.
REAP_EVERY_SECONDS = 1.0


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


_SETTLED = {"stored": PutStatus.STORED, "present": PutStatus.PRESENT, "lost": PutStatus.LOST}


@dataclass(frozen=True)
class Reservation:
    """A slot taken for one put: write it, then ``commit`` or ``abort``."""

    allocator: "SlotAllocator"
    slot: int
    generation: int

    def commit(self, canon: bytes, ikey: bytes, checksum: int, meta_raw: bytes, length: int,
               durable: bool = False) -> PutStatus:
        return self.allocator.commit_many([(self, canon, ikey, checksum, meta_raw, length)], durable)[0]

    def abort(self) -> None:
        self.allocator.abandon([self])


class SlotAllocator:
    def __init__(self, index: Index, records: SlotRecords, geometry: Geometry, policy: Policy,
                 owner: bytes, uses: UseTracker, path: str, inline_puts: bool = False):
        self.index = index
        self.records = records
        self.geometry = geometry
        self.policy = policy
        self.owner = owner
        self.uses = uses
        self.path = path
        self._last_reap = 0.0
        self._orphans: list[Reservation] = []  # see abandon()
        self._orphans_lock = threading.Lock()
        if not index.readonly:
            index.add_prelude(self)  # orphans go back in the next write (before_write)
        # Only for stores whose puts can take one transaction (put_inline).
        # MRU's next victim is the entry just stored: evicting it ahead of
        # need would evict what the put it serves has just written.
        self.keep_free = inline_puts and geometry.slot_count >= KEEP_FREE_FROM and not policy.from_end
        # Set when put_inline found no free slot, so puts at capacity do not
        # ask again each time; cleared when a reservation finds one free.
        self._seems_full = False

    def reserve(self, canon: bytes, ikey: bytes) -> Reservation | PutStatus:
        """A Reservation, or PRESENT (counted as a use) or REJECTED."""
        return self.reserve_many([(canon, ikey)])[0]  # type: ignore[return-value]

    def _reap_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_reap < REAP_EVERY_SECONDS:
            return False
        self._last_reap = now
        return True

    def reserve_many(self, keys: Sequence[tuple[bytes, bytes]]) -> list[Reservation | PutStatus | int]:
        """Reserve a slot for each (canonical key, index key) in one write
        transaction.  A key already stored is PRESENT (counted as a use);
        REJECTED when no slot can be had; a key repeated in ``keys`` gets
        the position of its first occurrence, whose outcome it shares."""
        out: list[Reservation | PutStatus | int] = []
        first: dict[bytes, int] = {}
        now = time.time()
        n, owner, policy = self.geometry.slot_count, self.owner, self.policy
        evictions = rejected = 0
        with self.index.write(keys=len(keys), adds=len(keys) * RESERVATION_BYTES) as t:
            for i, (canon, ikey) in enumerate(keys):
                at = first.setdefault(canon, i)
                if at != i:
                    out.append(at)
                    continue
                got = t.claim(ikey, canon, n, owner, policy, now, self._reap_due, self.keep_free)
                if got is True:
                    out.append(PutStatus.PRESENT)
                elif got is None:
                    rejected += 1
                    out.append(PutStatus.REJECTED)
                else:
                    evictions += got[2]
                    # A free slot found, or one left free for the next put.
                    self._seems_full = bool(self._seems_full and got[2] and not self.keep_free)
                    out.append(Reservation(self, got[0], got[1]))
            self._clear_vacated(t)
        if evictions:
            self.uses.count("evictions", evictions)
        if rejected:
            self.uses.count("rejected_puts", rejected)
        return out

    def put_inline(self, canon: bytes, ikey: bytes, length: int, meta_raw: bytes,
                   write: Callable[[int, int], int]) -> PutStatus | None:
        """Store a small value in one write transaction, when a slot is free:
        ``write(slot, generation) -> checksum`` writes the payload and record
        while this transaction holds the index's write lock.  No entry names
        a free slot, so no reader can see the bytes before the commit, and a
        crash or a failed write leaves the slot free.  PRESENT (a use
        counted) when the key is stored; None when no slot is free (the
        caller then reserves, which evicts).  With ``keep_free``, taking the
        last free slot evicts the next victim onto the free list, so the
        next put finds one."""
        if self._seems_full:
            return None
        now = time.time()
        n, policy = self.geometry.slot_count, self.policy
        evicted = False
        # The preludes run first (uses, so the victim below is chosen on an
        # order that includes them); a failed write aborts the transaction,
        # and what they took goes back to them.
        with self.index.write() as t:
            if t.use_if_stored(ikey, canon, policy, now):
                status = PutStatus.PRESENT
            else:
                got = t.take_free_slot(n)
                if got is None:
                    self._seems_full = True
                    return None
                if self.keep_free and not t.has_free_slot(n):
                    # Chosen before this entry joins the order.
                    evicted = t.free_next(policy)
                slot, gen = got[0], next_generation(got[1])
                try:
                    t.add(ikey, canon, slot, gen, length, write(slot, gen), meta_raw, policy, now)
                except BaseException:
                    # The slot stays free: it must not keep what was written
                    # (best effort: the write's own error is the one to raise).
                    try:
                        self.records.clear(slot)
                    except OSError:
                        pass
                    raise
                status = PutStatus.STORED
                self._clear_vacated(t)
        if status is PutStatus.STORED:
            self.uses.stored(1, length)
        if evicted:
            self.uses.count("evictions")
        return status

    def commit_many(self, items, durable: bool = False) -> list[PutStatus]:
        """Commit written reservations in one transaction; ``items`` are
        (reservation, canon, ikey, checksum, meta_raw, length)."""
        out = []
        now = time.time()
        owner, policy = self.owner, self.policy
        stored = nbytes = 0
        # Each new entry: its key twice (the full key in the entry, and its
        # index key), its description, the fixed head and an order record.
        adds = sum(len(canon) + len(ikey) + len(meta_raw) + ENTRY_OVERHEAD
                   for _r, canon, ikey, _c, meta_raw, _n in items)
        with self.index.write(durable=durable, keys=len(items), adds=adds) as t:
            for r, canon, ikey, csum, meta_raw, length in items:
                got = _SETTLED[t.settle(r.slot, r.generation, owner, ikey, canon, length, csum,
                                        meta_raw, policy, now)]
                if got is PutStatus.STORED:
                    stored += 1
                    nbytes += length
                elif got is PutStatus.LOST:
                    log.warning("slot %d of %s was taken from this put (repair?); dropping it",
                                r.slot, self.path)
                out.append(got)
            self._clear_vacated(t)
        if stored:
            self.uses.stored(stored, nbytes)
        return out

    def abandon(self, reservations: Sequence[Reservation]) -> None:
        """Give back reservations whose put failed (or was never written).
        If even that fails (a full index map), they are kept here and given
        back by the next write transaction that succeeds (before_write), so
        none stays reserved for the life of the process."""
        if not reservations:
            return
        with self._orphans_lock:
            self._orphans.extend(reservations)
        try:
            self.index.flush()
        except StorageFullError:
            pass  # still owed: the next write that gets room gives them back

    # -- the prelude of every write transaction (Index.add_prelude) --------

    optional = False  # a slot reserved by nobody must not wait

    def pending_keys(self) -> int:
        return len(self._orphans)

    def before_write(self, t: IndexTxn) -> list[Reservation] | None:
        """Give back abandoned reservations inside ``t``; returns them."""
        if not self._orphans:
            return None
        with self._orphans_lock:
            orphans, self._orphans = self._orphans, []
        for r in orphans:
            if t.reservation(r.slot) == (r.generation, self.owner):  # not taken by a repair
                t.unreserve(r.slot)
                t.release_slot(r.slot, r.generation)
        self._clear_vacated(t)
        return orphans

    def undo_write(self, orphans: list[Reservation]) -> None:
        with self._orphans_lock:
            self._orphans.extend(orphans)

    def close(self) -> None:
        """Stop running in this index's write transactions."""
        self.index.remove_prelude(self)

    # -- slots leaving the index --------------------------------------------

    def _clear_vacated(self, t: IndexTxn) -> None:
        """Clear the records of the slots ``t`` dropped an entry or a
        reservation from, before it commits: a record outlives its entry
        only until then, so an index rebuilt from the records never brings
        back what was evicted, removed or never committed.  (Should the
        transaction abort, an entry may keep a cleared record: fsck then
        rewrites it from the entry once the payload is verified.)"""
        if t.vacated:
            for slot in set(t.vacated):
                self.records.clear(slot)
            t.vacated.clear()

    def reap_dead(self) -> dict[str, int]:
        """Release what dead handles left (reservations, pins, handle records)."""
        with self.index.write() as t:
            reaped = t.reap_dead()
            self._clear_vacated(t)
        return reaped

    def free(self, t: IndexTxn, e: Entry) -> None:
        """Remove ``e`` inside write transaction ``t`` and free its slot
        (its record cleared while the write lock keeps the slot from being
        reused)."""
        t.free_entry(e, self.policy)
        self._clear_vacated(t)
        self._seems_full = False

    def free_if_current(self, e, then: Callable | None = None) -> bool:
        """Free the entry ``e`` (an Entry or EntryRef) names, unless it was
        replaced or evicted meanwhile; ``then(txn)`` runs in the same write
        transaction either way."""
        with self.index.write() as t:
            cur = t.entry(e.ikey)
            freed = cur is not None and cur.slot == e.slot and cur.generation == e.generation
            if freed:
                self.free(t, cur)
            if then is not None:
                then(t)
            return freed
