"""The slot allocator: the one place slots are taken and given back.

A put asks for a slot and gets a descriptor back:

- :meth:`SlotAllocator.claim_free` (a small put, mmap, fast durability):
  the index's write transaction stays open while the caller writes the
  slot, then :meth:`FreeSlot.commit` inserts the entry in it.  No entry
  names a free slot, so no reader sees the bytes before the commit, and a
  crash or a failed write leaves the slot free.
- :meth:`SlotAllocator.claim_free_many`: the same for a small batch, one
  transaction for every key a free slot is found for (the others reserve).
- :meth:`SlotAllocator.reserve_many`: a :class:`Reservation` per key (a free
  slot, or the policy's victim, evicted in the same transaction); the
  caller writes, then commits them (:meth:`commit_many`, one transaction)
  or aborts them.

The allocator never calls back into its caller.  Entries leave through
:meth:`SlotAllocator.free`; every slot a transaction vacates has its record
cleared before the commit (:meth:`_clear_vacated`).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import NamedTuple, Sequence

from ..device.slabfile import SlotRecords
from ..errors import StorageFullError
from ..format.header import Geometry
from ..format.keys import Key
from ..index import Entry, Index, IndexTxn
from ..index.policy import Policy
from ..index.txn import next_generation
from .items import Item
from .uses import UseTracker

log = logging.getLogger(__name__)

# Stores of this many slots or more keep slots free ahead of need (see
# claim_free): a put at capacity then costs one index write transaction
# instead of two, at the price of one slot in KEEP_AHEAD_PER or fewer.
KEEP_FREE_FROM = 256

# A batch that claims free slots (claim_free_many) in a store that keeps
# slots free keeps up to one slot in this many free ahead of need, as many
# as the batch had keys: the next batch of its size then takes one
# transaction at capacity instead of three.
KEEP_AHEAD_PER = 128

# A single put in such a store that takes the last free slot evicts up to
# this many victims onto the free list (no more than one slot in
# KEEP_AHEAD_PER): each later put takes one of them without the walk of the
# eviction order, the look for pins and the record clear that the first
# paid for (its victims' records, adjacent in a store filled in order, are
# cleared with one request).  Puts into a full store of 512 slots (4 ahead),
# in turn with one victim a put (benchmarks/overhead.py, 4 runs each, order
# alternating, medians): 27.1 -> 23.8 us of overhead at 4 KiB, 28.3 -> 24.8
# at 64 KiB.
PUT_AHEAD = 8

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


class Reservation(NamedTuple):
    """A slot taken for one put: write it, then ``commit`` or ``abort``."""

    allocator: "SlotAllocator"
    slot: int
    generation: int

    def commit(self, item: Item, checksum: int, durable: bool = False) -> PutStatus:
        return self.allocator.commit_many([(self, item, checksum)], durable)[0]

    def abort(self) -> None:
        self.allocator.abandon([self])


class FreeSlot:
    """``with allocator.claim_free(key) as c``: the index's write transaction
    is open inside.  ``c.status`` is PRESENT (the key is stored: a use was
    counted) or None; ``c.slot`` is a free slot with its new
    ``c.generation`` to write, then :meth:`commit`, or None when no slot is
    free (reserve instead, which evicts).  An error inside aborts the
    transaction and clears the slot's record: it stays free and empty."""

    __slots__ = ("_alloc", "_key", "_cm", "_t", "_now", "_evicted", "_length", "slot",
                 "generation", "status")

    def __init__(self, alloc: "SlotAllocator", key: Key):
        self._alloc = alloc
        self._key = key
        self._cm = self._t = None
        self.slot = self.status = None
        self._evicted = 0

    def __enter__(self) -> "FreeSlot":
        a = self._alloc
        if a._seems_full:
            return self
        self._now = now = time.time()
        self._cm = a.index.write()
        t = self._t = self._cm.__enter__()  # the preludes run first: uses, orphans
        try:
            key, n, policy = self._key, a.geometry.slot_count, a.policy
            if t.use_if_stored(key.ikey, key.canon, policy, now):
                self.status = PutStatus.PRESENT
                return self
            got = t.take_free_slot(n)
            if got is None:
                a._seems_full = True  # puts at capacity reserve without asking again
                return self
            if a.keep_free and not t.has_free_slot(n):
                # Chosen before this entry joins the order.
                self._evicted = t.free_next(policy, a.put_ahead)
                a._overflowed = a._overflowed or self._evicted > 0
            self.slot, self.generation = got[0], next_generation(got[1])
        except BaseException as exc:
            self._cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def commit(self, length: int, checksum: int, meta_raw: bytes) -> None:
        """The slot is written: its entry joins the index with this transaction."""
        key = self._key
        self._t.add(key.ikey, key.canon, self.slot, self.generation, length, checksum, meta_raw,
                    self._alloc.policy, self._now)
        self.status = PutStatus.STORED
        self._length = length

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._cm is not None:
            stored = self.status is PutStatus.STORED
            self._alloc._end_claim(self._cm, self._t, (exc_type, exc, tb),
                                   () if self.slot is None else (self.slot,),
                                   int(stored), self._length if stored else 0, self._evicted)
        return False


class FreeSlots:
    """``with allocator.claim_free_many(items, kept) as c``: :class:`FreeSlot` for
    a batch, one write transaction open inside.  ``c.claims[i]`` for each
    item: PRESENT (its key is stored: a use was counted), the position of
    the key's first occurrence (a repeat, sharing its outcome), a free
    slot's (slot, new generation) to write now, or None (no slot was free:
    reserve it after the block).  Write the claimed slots, then
    :meth:`commit` those written and :meth:`give_back` the others; the
    transaction commits when the block ends.  An exception inside aborts it
    and clears the record of every claimed slot: they stay free and empty.

    In a store that keeps slots free (``keep_free``) and has been full (a
    put of this handle evicted, or this batch found too few free slots),
    the transaction also evicts onto the free list a slot for each key left
    to reserve, and until as many slots as the batch had keys (at most one
    in KEEP_AHEAD_PER) are free for the next batch, choosing those victims
    before this batch's entries join the order.  Slots evicted here are
    written only after this transaction commits: readers see their entries
    until then."""

    __slots__ = ("_alloc", "_items", "_cm", "_t", "_now", "_evicted", "_stored", "_nbytes",
                 "claims", "kept")

    def __init__(self, alloc: "SlotAllocator", items: Sequence[Item], kept: set[bytes]):
        self._alloc = alloc
        self._items = items
        self._cm = self._t = None
        self._evicted = self._stored = self._nbytes = 0
        self.claims: list = []
        self.kept = kept  # the batch's entries' index keys: no victims for its new keys

    def __enter__(self) -> "FreeSlots":
        a, items = self._alloc, self._items
        if a._seems_full:
            self.claims = [None] * len(items)
            return self
        self._now = now = time.time()
        adds = sum(len(it.key.canon) + len(it.key.ikey) + len(it.desc.encoded) + ENTRY_OVERHEAD
                   for it in items)
        self._cm = a.index.write(keys=len(items), adds=adds)
        t = self._t = self._cm.__enter__()  # the preludes run first: uses, orphans
        try:
            n, policy, claims, first = a.geometry.slot_count, a.policy, self.claims, {}
            need = []
            for i, it in enumerate(items):
                canon, ikey = it.key
                at = first.setdefault(canon, i)
                if at != i:
                    claims.append(at)
                elif t.use_if_stored(ikey, canon, policy, now):
                    claims.append(PutStatus.PRESENT)
                    self.kept.add(ikey)
                else:
                    claims.append(None)
                    need.append(i)
            got = t.take_free_slots(len(need), n)
            for i, (slot, gen) in zip(need, got):
                claims[i] = (slot, next_generation(gen))
            short = len(need) - len(got)
            if a.keep_free:
                a._overflowed = a._overflowed or short > 0
                if a._overflowed:
                    # Slots for the keys left to reserve, and the next batch's.
                    want = short + min(len(items), max(1, n // KEEP_AHEAD_PER))
                    have = t.free_count(n)
                    if have < want:
                        self._evicted += t.free_next(policy, want - have, self.kept)
            elif short:
                a._seems_full = True  # batches at capacity reserve without asking again
        except BaseException as exc:
            self._cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def commit(self, written: Sequence[tuple[int, int, Item, int]]) -> None:
        """Each (slot, generation, item, payload checksum) written: its entry
        joins the index with this transaction."""
        if written:
            self._t.add_many([(slot, gen, it.key.ikey, it.key.canon, it.desc.length, csum,
                               it.desc.encoded) for slot, gen, it, csum in written],
                             self._alloc.policy, self._now)
            self._stored += len(written)
            self._nbytes += sum(w[2].desc.length for w in written)

    def give_back(self, slots: Sequence[tuple[int, int]]) -> None:
        """Claimed (slot, generation) pairs not written: free again, their
        records cleared before the commit."""
        for slot, gen in slots:
            self._t.release_slot(slot, gen)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._cm is not None:
            self._alloc._end_claim(self._cm, self._t, (exc_type, exc, tb),
                                   [c[0] for c in self.claims if type(c) is tuple],
                                   self._stored, self._nbytes, self._evicted)
        return False


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
        # Only for stores whose puts can take one transaction (claim_free).
        # MRU's next victim is the entry just stored: evicting it ahead of
        # need would evict what the put it serves has just written.
        self.keep_free = inline_puts and geometry.slot_count >= KEEP_FREE_FROM and not policy.from_end
        # How many victims a single put at capacity evicts onto the free
        # list at once (keep_free): the next puts then take a slot without
        # walking the eviction order, in fewer transactions that vacate.
        self.put_ahead = max(1, min(PUT_AHEAD, geometry.slot_count // KEEP_AHEAD_PER))
        # Set when claim_free found no free slot, so puts at capacity do
        # not ask again each time; cleared when a slot is freed.
        self._seems_full = False
        # Set once this handle has evicted to make room (the store is full):
        # from then on batches keep slots free ahead of need (FreeSlots).  A
        # store filled to the last slot, and no further, evicts nothing for
        # them.  Cleared when a slot is freed.
        self._overflowed = False
        self.eviction_log = None  # an EvictionLog, once a host asks for one
        index.add_prelude(self)  # orphans go back in the next write (before_write)

    # -- taking slots --------------------------------------------------------

    def claim_free(self, key: Key) -> FreeSlot:
        """A free slot for ``key`` inside one write transaction (FreeSlot)."""
        return FreeSlot(self, key)

    def claim_free_many(self, items: Sequence[Item], kept: set[bytes]) -> FreeSlots:
        """Free slots for a batch inside one write transaction (FreeSlots)."""
        return FreeSlots(self, items, kept)

    def _end_claim(self, cm, t: IndexTxn, exc_info: tuple, claimed, stored: int, nbytes: int,
                   evicted: int) -> None:
        """End the write transaction of a FreeSlot or FreeSlots: committed,
        with its vacated records cleared first and what it stored and evicted
        counted after; or aborted, with the record of each ``claimed`` slot
        cleared first, so the slot stays free and empty."""
        if exc_info[0] is None:
            self._clear_vacated(t)
        else:
            for slot in claimed:
                try:
                    self.records.clear(slot)
                except OSError:
                    pass  # best effort: the write's own error is the one raised
        cm.__exit__(*exc_info)
        if exc_info[0] is None:
            if stored or evicted:
                self.uses.stored(stored, nbytes, evicted)
            if evicted:
                self.log_evicted(t)

    def reserve(self, key: Key) -> Reservation | PutStatus:
        """A Reservation, or PRESENT (counted as a use) or REJECTED."""
        return self.reserve_many([key])[0]  # type: ignore[return-value]

    def _reap_due(self) -> bool:
        now = time.monotonic()
        if now - self._last_reap < REAP_EVERY_SECONDS:
            return False
        self._last_reap = now
        return True

    def reserve_many(self, keys: Sequence[Key], kept=()) -> list[Reservation | PutStatus | int]:
        """Reserve a slot for each key in one write transaction.  A key
        already stored is PRESENT (counted as a use); REJECTED when no slot
        can be had; a key repeated in ``keys`` gets the position of its
        first occurrence, whose outcome it shares.  No slot is taken from the
        batch's stored keys, nor from ``kept`` (its entries stored before)."""
        out: list[Reservation | PutStatus | int] = []
        first: dict[bytes, int] = {}
        now = time.time()
        n, owner, policy = self.geometry.slot_count, self.owner, self.policy
        evictions = rejected = 0
        with self.index.write(keys=len(keys), adds=len(keys) * RESERVATION_BYTES) as t:
            # Stored keys first, as in FreeSlots: none is then a new key's victim.
            need, keep = [], set(kept)
            for i, (canon, ikey) in enumerate(keys):
                at = first.setdefault(canon, i)
                if at != i:
                    out.append(at)
                elif t.use_if_stored(ikey, canon, policy, now):
                    out.append(PutStatus.PRESENT)
                    keep.add(ikey)
                else:
                    out.append(None)
                    need.append(i)
            for i in need:
                got = t.claim(n, owner, policy, self._reap_due, self.keep_free, keep)
                if got is None:
                    rejected += 1
                    out[i] = PutStatus.REJECTED
                else:
                    evictions += got[2]
                    # A free slot found, or one left free for the next put.
                    self._seems_full = bool(self._seems_full and got[2] and not self.keep_free)
                    out[i] = Reservation(self, got[0], got[1])
            self._clear_vacated(t)
        if evictions:
            self._overflowed = True
            self.uses.count("evictions", evictions)
            self.log_evicted(t)
        if rejected:
            self.uses.count("rejected_puts", rejected)
        return out

    def commit_many(self, done: Sequence[tuple[Reservation, Item, int]],
                    durable: bool = False) -> list[PutStatus]:
        """Commit written reservations, each with its item and payload
        checksum, in one transaction."""
        out = []
        now = time.time()
        owner, policy = self.owner, self.policy
        stored = nbytes = 0
        # Each new entry: its key twice (the full key in the entry, and its
        # index key), its description, the fixed head and an order record.
        adds = sum(len(it.key.canon) + len(it.key.ikey) + len(it.desc.encoded) + ENTRY_OVERHEAD
                   for _r, it, _c in done)
        with self.index.write(durable=durable, keys=len(done), adds=adds) as t:
            settled = t.settle_many([(r.slot, r.generation, it.key.ikey, it.key.canon, it.desc.length,
                                      csum, it.desc.encoded) for r, it, csum in done], owner, policy, now)
            for (r, item, _csum), how in zip(done, settled):
                got, desc = _SETTLED[how], item.desc
                if got is PutStatus.STORED:
                    stored += 1
                    nbytes += desc.length
                elif got is PutStatus.LOST:
                    log.warning("slot %d of %s was taken from this put (repair?); dropping it",
                                r.slot, self.path)
                out.append(got)
            self._clear_vacated(t)
        if stored:
            self.uses.stored(stored, nbytes)
        return out

    def log_evicted(self, t: IndexTxn) -> None:
        """After ``t`` committed: its victims to the eviction log, if any."""
        if t.evicted and self.eviction_log is not None:
            self.eviction_log.add(t.evicted)

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
        """Give back abandoned reservations inside ``t``; returns them.  With
        an eviction log, ``t`` keeps the keys it evicts (log_evicted)."""
        if self.eviction_log is not None:
            t.evicted = []
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
            self.records.clear_many(t.vacated)
            t.vacated = None

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
        self._seems_full = self._overflowed = False

    def free_if_current(self, e, counters: UseTracker | None = None) -> bool:
        """Free the entry ``e`` (an Entry or EntryRef) names, unless it was
        replaced or evicted meanwhile; with ``counters``, their counts are
        written in the same transaction either way."""
        with self.index.write() as t:
            cur = t.entry(e.ikey)
            freed = cur is not None and cur.slot == e.slot and cur.generation == e.generation
            if freed:
                self.free(t, cur)
            if counters is not None:
                counters.flush_counters(t)
            return freed
