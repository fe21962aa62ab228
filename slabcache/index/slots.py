"""The ``free`` and ``reserved`` tables: which slots are free, which are
being written, and how a put gets a slot (a free one, or the policy's
victim, evicted here).

``free`` maps a slot to the generation of its last use; slots at or above
the high-water mark ``next_unused`` were never used and are free without
being listed, so creating a store of a million slots costs nothing here.
``reserved`` maps a slot being written to its new generation and the
owner writing it.  Every slot this transaction takes an entry or a
reservation from is listed in ``vacated``, for whoever owns the slab to
clear its record before the commit.
"""

from __future__ import annotations

import struct
from typing import Iterator

from ..errors import CorruptStoreError
from .entry import canon_of, slot_gen_of
from .meta import U64
from .policy import Policy

_U32 = struct.Struct("<I")


def next_generation(gen: int) -> int:
    """The generation a slot's next entry gets: readers that looked the old
    entry up fail their check after copying, even if they copied new bytes."""
    return (gen + 1) & 0xFFFFFFFF or 1


class SlotOps:
    """Free slots, reservations and eviction (a room of IndexTxn)."""

    __slots__ = ()

    def _vacate(self, slot: int) -> None:
        if self.vacated is None:
            self.vacated = [slot]
        else:
            self.vacated.append(slot)

    def take_free_slot(self, slot_count: int) -> tuple[int, int] | None:
        """Pop a free slot: (slot, last generation), or None when none is free."""
        got = self.take_free_slots(1, slot_count)
        return got[0] if got else None

    def take_free_slots(self, count: int, slot_count: int) -> list[tuple[int, int]]:
        """Pop up to ``count`` free slots, (slot, last generation) each: listed
        ones first, in slot order, then never-used ones (one cursor and one
        update of the mark for a batch)."""
        out: list[tuple[int, int]] = []
        if self._no_free or count <= 0:
            return out
        if self._free_listed is not False:
            with self.txn.cursor(db=self.db["free"]) as cur:
                ok = cur.first()
                while ok and len(out) < count:
                    out.append((U64.unpack(cur.key())[0], _U32.unpack(cur.value())[0]))
                    cur.delete()  # leaves the cursor on the next record, or on none
                    ok = bool(cur.key())
            # Whether a listed slot is left, known until this transaction
            # changes the list again: has_free_slot need not look.
            self._free_listed = ok
        if len(out) < count:
            nxt = self.next_unused()
            end = min(slot_count, nxt + count - len(out))
            if end > nxt:
                self.set_next_unused(end)
                out.extend((slot, 0) for slot in range(nxt, end))
            if len(out) < count:
                self._no_free = True  # until a slot is released in this transaction
        return out

    def release_slot(self, slot: int, generation: int) -> None:
        self.txn.put(U64.pack(slot), _U32.pack(generation), db=self.db["free"])
        self._vacate(slot)
        self._no_free = False
        self._free_listed = True

    def is_free(self, slot: int) -> bool:
        """Whether ``slot`` is on the free list."""
        return self.txn.get(U64.pack(slot), db=self.db["free"]) is not None

    def free_slots(self) -> Iterator[tuple[int, int]]:
        with self.txn.cursor(db=self.db["free"]) as cur:
            for k, v in cur:
                yield U64.unpack(k)[0], _U32.unpack(v)[0]

    def free_count(self, slot_count: int) -> int:
        listed = self.txn.stat(self.db["free"])["entries"]
        return listed + max(0, slot_count - self.next_unused())

    def has_free_slot(self, slot_count: int) -> bool:
        if self._free_listed is None:
            with self.txn.cursor(db=self.db["free"]) as cur:
                self._free_listed = cur.first()
        return self._free_listed or self.next_unused() < slot_count

    def reserve(self, slot: int, generation: int, who: bytes) -> None:
        self.txn.put(U64.pack(slot), _U32.pack(generation) + who, db=self.db["reserved"])

    def reservation(self, slot: int) -> tuple[int, bytes] | None:
        raw = self.txn.get(U64.pack(slot), db=self.db["reserved"])
        if raw is None:
            return None
        return _U32.unpack_from(raw)[0], bytes(raw[4:])

    def unreserve(self, slot: int) -> None:
        self.txn.delete(U64.pack(slot), db=self.db["reserved"])

    def reservations(self) -> list[tuple[int, int, bytes]]:
        with self.txn.cursor(db=self.db["reserved"]) as cur:
            return [(U64.unpack(k)[0], _U32.unpack_from(v)[0], bytes(v[4:])) for k, v in cur]

    def claim(self, slot_count: int, owner: bytes, policy: Policy, reap_due,
              keep_free: bool = False, keep=()) -> tuple[int, int, int] | None:
        """Reserve a slot for a key not stored (the caller has asked
        use_if_stored): (slot, new generation, how many entries were evicted
        for it), None when no slot can be had.  A free slot comes first, then
        slots of dead processes' reservations (when ``reap_due()`` says so),
        then the policy's victim, evicted here (with ``keep_free``, the next
        victim too, onto the free list); never the entry of an index key in
        ``keep`` (the caller's batch's entries)."""
        got = self.take_free_slot(slot_count)
        if got is None and reap_due():
            self.reap_dead()
            got = self.take_free_slot(slot_count)
        evicted = 0
        if got is None:
            got = self.evict_next(policy, keep)
            if got is None:
                return None
            evicted = 1 + (keep_free and self.free_next(policy, 1, keep))
        slot, gen = got
        gen = next_generation(gen)
        self.txn.put(U64.pack(slot), _U32.pack(gen) + owner, db=self.db["reserved"])
        return slot, gen, evicted

    def settle(self, slot: int, generation: int, owner: bytes, ikey: bytes, canon: bytes,
               length: int, checksum: int, meta_raw: bytes, policy: Policy, now: float) -> str:
        """Turn the reservation (slot, generation) of ``owner`` into the entry
        for ``canon``.  Returns "stored", "present" (someone stored the key
        meanwhile; the slot is freed) or "lost" (the reservation is gone)."""
        return self.settle_many([(slot, generation, ikey, canon, length, checksum, meta_raw)],
                                owner, policy, now)[0]

    def settle_many(self, rows, owner: bytes, policy: Policy, now: float) -> list[str]:
        """:meth:`settle` for each (slot, generation, ikey, canon, length,
        checksum, meta_raw) in order, in one loop (a batch's commit): the
        clock is read once and written once."""
        txn, reserved = self.txn, self.db["reserved"]
        tick = start = self.tick()
        out = []
        for row in rows:
            slot, generation, ikey, canon = row[:4]
            skey = U64.pack(slot)
            raw = txn.get(skey, db=reserved)
            if raw is None or _U32.unpack_from(raw)[0] != generation or raw[4:] != owner:
                out.append("lost")
                continue
            txn.delete(skey, db=reserved)
            if self.holds_or_clears(ikey, canon, policy):  # stored meanwhile, by another put
                self.release_slot(slot, generation)
                out.append("present")
                continue
            tick += 1  # the new entry is last in its use order
            self.put_entry(row, tick, policy, now)
            out.append("stored")
        if tick != start:
            self.set_tick(tick)
        return out

    def evict_next(self, policy: Policy, keep=()) -> tuple[int, int] | None:
        """Evict the first entry in eviction order that nobody alive has
        pinned and hand its (slot, generation) to the caller, who reuses the
        slot; None when every entry is pinned."""
        got = self.evict(policy, 1, keep)
        return got[0] if got else None

    def evict(self, policy: Policy, count: int, keep=()) -> list[tuple[int, int]]:
        """Evict up to ``count`` entries, the first in eviction order that
        nobody alive has pinned and whose index keys are not in ``keep``, and
        hand their (slot, generation) to the caller; fewer when the rest are
        pinned or kept.  Each entry is removed
        through its order key as found, without decoding more than its head
        (every put at capacity runs this), with one walk for them all.  A
        policy that evicts from the end (MRU) evicts one at a time."""
        entries, txn, out = self.db["entries"], self.txn, []
        if self._pins_exist is None:
            with txn.cursor(db=self.db["pins"]) as cur:
                self._pins_exist = cur.first()
        backward = policy.from_end
        if backward:
            count = min(count, 1)
        with txn.cursor(db=self.db["order"]) as cur:
            ok = cur.last() if backward else cur.first()
            while ok and len(out) < count:
                ikey = bytes(cur.value())
                raw = txn.get(ikey, db=entries)
                if raw is None or (self._pins_exist and self._held(ikey)) or (keep and ikey in keep):
                    ok = cur.prev() if backward else cur.next()
                    continue
                got = slot_gen_of(raw)
                if got is None:
                    raise CorruptStoreError(
                        "an index entry is truncated; run `slabcache fsck --repair`")
                ok = cur.delete() and bool(cur.key())  # on the next in order, or on none
                txn.delete(ikey, db=entries)
                self._vacate(got[0])
                if self.evicted is not None:  # a handle reports what it evicts
                    self.evicted.append(canon_of(raw))
                out.append(got)
        return out

    def free_next(self, policy: Policy, count: int = 1, keep=()) -> int:
        """Evict up to ``count`` of the policy's next victims (see evict)
        onto the free list; how many (0 when every entry is pinned)."""
        got = self.evict(policy, count, keep)
        for slot, gen in got:
            self.release_slot(slot, gen)
        return len(got)
