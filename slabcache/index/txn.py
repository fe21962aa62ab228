"""Typed operations over one LMDB transaction of a store's index.

Tables (LMDB named databases):

``entries``   index key -> Entry (slot, generation, length, checksum, use
              statistics, value description, full key)
``order``     policy order key -> index key (the eviction order)
``free``      slot -> generation of the slot's last use (released slots)
``reserved``  slot -> generation + owner (slots being written by a put)
``pins``      len + index key + owner -> pin count
``owners``    owner -> open time (processes that have the store open)
``meta``      creation id, header copy, policy, allocation high-water mark,
              clock, counters

Slots at or above the high-water mark ``next_unused`` were never used and
are free without being listed, so creating a store of a million slots costs
nothing here.  An entry leaves the index through one path,
:meth:`IndexTxn.free_entry`, which also drops its pins and frees its slot.
"""

from __future__ import annotations

import struct
import time
from typing import Callable, Iterator

import lmdb

from ..errors import CorruptStoreError
from .owner import pid_of
from .entry import Entry, EntryRef, canon_of, encode_entry, ref_of, slot_gen_of, use_of, with_use
from .policy import Policy, UseStats, make_policy

_U64 = struct.Struct(">Q")
_U32 = struct.Struct("<I")
_OWNER_INFO = struct.Struct("<dB")  # open time, writable
# Persisted as consecutive u64s: append new counters at the end only.
COUNTERS = ("hits", "misses", "puts", "evictions", "checksum_failures", "rejected_puts",
            "queue_rejections", "io_errors", "bytes_read", "bytes_written")
_COUNTERS = struct.Struct(f"<{len(COUNTERS)}Q")

TABLES = ("meta", "entries", "order", "free", "reserved", "pins", "owners")
DEFAULT_POLICY = "lru"


def next_generation(gen: int) -> int:
    """The generation a slot's next entry gets: readers that looked the old
    entry up fail their check after copying, even if they copied new bytes."""
    return (gen + 1) & 0xFFFFFFFF or 1


def _pin_prefix(ikey: bytes) -> bytes:
    return struct.pack(">H", len(ikey)) + ikey


class IndexTxn:
    """Typed operations over one LMDB transaction."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict, alive: Callable[[bytes], bool]):
        self.txn = txn
        self.db = dbs
        # Whether an owner (of a pin, reservation or handle) is alive:
        # Liveness.is_alive of the store (index/owner.py).
        self.alive = alive
        # Within one write transaction, what a batch of puts need not ask
        # again: None until known, then whether any pin exists / whether the
        # free list and the unused slots ran out.
        self._pins_exist: bool | None = None
        self._no_free = False
        # Slots whose entry or reservation this transaction dropped: whoever
        # owns the slab clears their records before it commits (an index
        # rebuild must not bring back what left the index).
        self.vacated: list[int] = []

    # -- meta ------------------------------------------------------------

    def meta_get(self, name: str) -> bytes | None:
        return self.txn.get(name.encode(), db=self.db["meta"])

    def meta_put(self, name: str, value: bytes) -> None:
        self.txn.put(name.encode(), value, db=self.db["meta"])

    def _u64(self, name: str) -> int:
        raw = self.meta_get(name)
        return _U64.unpack(raw)[0] if raw else 0

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

    def next_tick(self) -> int:
        t = self._u64("tick") + 1
        self.meta_put("tick", _U64.pack(t))
        return t

    def set_tick(self, tick: int) -> None:
        self.meta_put("tick", _U64.pack(tick))

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

    # -- entries ---------------------------------------------------------

    def get_entry(self, ikey: bytes, canon: bytes) -> Entry | None:
        raw = self.txn.get(ikey, db=self.db["entries"])
        if raw is None:
            return None
        e = Entry.decode(ikey, raw)
        return e if e.canon == canon else None

    def ref(self, ikey: bytes, canon: bytes) -> EntryRef | None:
        """The entry for ``canon`` as an EntryRef (no full decode), or None."""
        raw = self.txn.get(ikey, db=self.db["entries"])
        return None if raw is None else ref_of(ikey, raw, canon)

    def has(self, ikey: bytes, canon: bytes) -> bool:
        raw = self.txn.get(ikey, db=self.db["entries"])
        if raw is None:
            return False
        return ikey == canon or canon_of(raw) == canon

    def raw_entry(self, ikey: bytes):
        """The encoded entry at ``ikey`` (a buffer valid in this transaction), or None."""
        return self.txn.get(ikey, db=self.db["entries"])

    def entry_at(self, ikey: bytes) -> Entry | None:
        raw = self.txn.get(ikey, db=self.db["entries"])
        return None if raw is None else Entry.decode(ikey, raw)

    def put_entry(self, e: Entry, policy: Policy) -> None:
        self.txn.put(e.ikey, e.encode(), db=self.db["entries"])
        self.txn.put(policy.order_key(e.slot, e.use), e.ikey, db=self.db["order"])

    def insert(self, ikey: bytes, canon: bytes, slot: int, generation: int, length: int,
               checksum: int, meta_raw: bytes, policy: Policy, now: float) -> Entry:
        """A new entry, first in its use order."""
        use = self.add(ikey, canon, slot, generation, length, checksum, meta_raw, policy, now)
        return Entry(ikey, canon, slot, generation, length, checksum, use, now, now, meta_raw)

    def add(self, ikey: bytes, canon: bytes, slot: int, generation: int, length: int,
            checksum: int, meta_raw: bytes, policy: Policy, now: float) -> UseStats:
        """:meth:`insert` without building the Entry (every put runs this)."""
        tick = self.next_tick()
        use = UseStats(tick, 0, tick)
        self.txn.put(ikey, encode_entry(slot, generation, length, checksum, use, now, now,
                                        meta_raw, canon), db=self.db["entries"])
        self.txn.put(policy.order_key(slot, use), ikey, db=self.db["order"])
        return use

    def _unlink_entry(self, e: Entry, policy: Policy) -> None:
        self.txn.delete(e.ikey, db=self.db["entries"])
        self.txn.delete(policy.order_key(e.slot, e.use), db=self.db["order"])

    def free_entry(self, e: Entry, policy: Policy) -> None:
        """Remove ``e``: its entry, its place in the eviction order, its pins;
        its slot goes on the free list with the entry's generation."""
        self._unlink_entry(e, policy)
        self.drop_pins(e.ikey)
        self.release_slot(e.slot, e.generation)

    def record_use(self, e: Entry | EntryRef, policy: Policy, now: float, count: int = 1) -> None:
        """Record ``count`` uses of ``e`` at wall time ``now``."""
        self.record_uses({e.ikey: (count, now, e.slot, e.generation)}, policy)

    def record_uses(self, uses, policy: Policy) -> None:
        """Record batched uses: ``uses`` maps index key -> (count, wall time,
        slot, generation).  A use of an entry that was evicted or replaced
        since (another slot or generation) is dropped.  Entries are patched
        in place and the clock advanced once for the batch."""
        entries, order = self.db["entries"], self.db["order"]
        tick = self._u64("tick")
        for ikey, (count, when, slot, gen) in uses.items():
            raw = self.txn.get(ikey, db=entries)
            if raw is None or slot_gen_of(raw) != (slot, gen):
                continue
            old = use_of(raw)
            tick += 1
            new = UseStats(tick, old.hits + count, old.inserted)
            old_key, new_key = policy.order_key(slot, old), policy.order_key(slot, new)
            self.txn.put(ikey, with_use(raw, new, when), db=entries)
            if new_key != old_key:
                self.txn.delete(old_key, db=order)
                self.txn.put(new_key, ikey, db=order)
        self.meta_put("tick", _U64.pack(tick))

    def entries(self) -> Iterator[Entry]:
        with self.txn.cursor(db=self.db["entries"]) as cur:
            for k, v in cur:
                yield Entry.decode(bytes(k), v)

    def entry_count(self) -> int:
        return self.txn.stat(self.db["entries"])["entries"]

    def order_keys(self, reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        with self.txn.cursor(db=self.db["order"]) as cur:
            ok = cur.last() if reverse else cur.first()
            while ok:
                yield bytes(cur.key()), bytes(cur.value())
                ok = cur.prev() if reverse else cur.next()

    # -- slots -----------------------------------------------------------

    def take_free_slot(self, slot_count: int) -> tuple[int, int] | None:
        """Pop a free slot: (slot, last generation), or None when none is free."""
        if self._no_free:
            return None
        with self.txn.cursor(db=self.db["free"]) as cur:
            if cur.first():
                slot = _U64.unpack(cur.key())[0]
                gen = _U32.unpack(cur.value())[0]
                cur.delete()
                return slot, gen
        nxt = self._u64("next_unused")
        if nxt < slot_count:
            self.meta_put("next_unused", _U64.pack(nxt + 1))
            return nxt, 0
        self._no_free = True  # until a slot is released in this transaction
        return None

    def release_slot(self, slot: int, generation: int) -> None:
        self.txn.put(_U64.pack(slot), _U32.pack(generation), db=self.db["free"])
        self.vacated.append(slot)
        self._no_free = False

    def is_free(self, slot: int) -> bool:
        """Whether ``slot`` is on the free list."""
        return self.txn.get(_U64.pack(slot), db=self.db["free"]) is not None

    def free_slots(self) -> Iterator[tuple[int, int]]:
        with self.txn.cursor(db=self.db["free"]) as cur:
            for k, v in cur:
                yield _U64.unpack(k)[0], _U32.unpack(v)[0]

    def free_count(self, slot_count: int) -> int:
        listed = self.txn.stat(self.db["free"])["entries"]
        return listed + max(0, slot_count - self._u64("next_unused"))

    def next_unused(self) -> int:
        return self._u64("next_unused")

    def reserve(self, slot: int, generation: int, who: bytes) -> None:
        self.txn.put(_U64.pack(slot), _U32.pack(generation) + who, db=self.db["reserved"])

    def reservation(self, slot: int) -> tuple[int, bytes] | None:
        raw = self.txn.get(_U64.pack(slot), db=self.db["reserved"])
        if raw is None:
            return None
        return _U32.unpack_from(raw)[0], bytes(raw[4:])

    def unreserve(self, slot: int) -> None:
        self.txn.delete(_U64.pack(slot), db=self.db["reserved"])

    def reservations(self) -> list[tuple[int, int, bytes]]:
        with self.txn.cursor(db=self.db["reserved"]) as cur:
            return [(_U64.unpack(k)[0], _U32.unpack_from(v)[0], bytes(v[4:])) for k, v in cur]

    # -- pins ------------------------------------------------------------

    def pin(self, ikey: bytes, who: bytes) -> int:
        k = _pin_prefix(ikey) + who
        raw = self.txn.get(k, db=self.db["pins"])
        n = (_U32.unpack(raw)[0] if raw else 0) + 1
        self.txn.put(k, _U32.pack(n), db=self.db["pins"])
        self._pins_exist = True
        return n

    def unpin(self, ikey: bytes, who: bytes) -> bool:
        k = _pin_prefix(ikey) + who
        raw = self.txn.get(k, db=self.db["pins"])
        if raw is None:
            return False
        n = _U32.unpack(raw)[0] - 1
        if n > 0:
            self.txn.put(k, _U32.pack(n), db=self.db["pins"])
        else:
            self.txn.delete(k, db=self.db["pins"])
        return True

    def pins_of(self, ikey: bytes) -> list[tuple[bytes, int]]:
        prefix = _pin_prefix(ikey)
        out = []
        with self.txn.cursor(db=self.db["pins"]) as cur:
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    out.append((bytes(k[len(prefix):]), _U32.unpack(v)[0]))
        return out

    def pin_count(self, ikey: bytes) -> int:
        return sum(n for who, n in self.pins_of(ikey) if self.alive(who))

    def drop_pins(self, ikey: bytes) -> None:
        prefix = _pin_prefix(ikey)
        for who, _ in self.pins_of(ikey):
            self.txn.delete(prefix + who, db=self.db["pins"])

    def all_pins(self) -> list[tuple[bytes, bytes, int]]:
        """(index key, owner, count) for every pin record."""
        out = []
        with self.txn.cursor(db=self.db["pins"]) as cur:
            for k, v in cur:
                n = struct.unpack_from(">H", k)[0]
                out.append((bytes(k[2:2 + n]), bytes(k[2 + n:]), _U32.unpack(v)[0]))
        return out

    def delete_pin(self, ikey: bytes, who: bytes) -> None:
        self.txn.delete(_pin_prefix(ikey) + who, db=self.db["pins"])

    def release_owner(self, who: bytes) -> None:
        """Drop every pin ``who`` holds and its open-handle record."""
        for ikey, holder, _n in self.all_pins():
            if holder == who:
                self.delete_pin(ikey, holder)
        self.unregister_owner(who)

    # -- owners ----------------------------------------------------------

    def register_owner(self, who: bytes, writable: bool) -> None:
        self.txn.put(who, _OWNER_INFO.pack(time.time(), writable), db=self.db["owners"])

    def unregister_owner(self, who: bytes) -> None:
        self.txn.delete(who, db=self.db["owners"])

    def owners(self) -> list[tuple[bytes, float, bool]]:
        with self.txn.cursor(db=self.db["owners"]) as cur:
            out = []
            for k, v in cur:
                t, w = _OWNER_INFO.unpack(v)
                out.append((bytes(k), t, bool(w)))
            return out

    def live_pids(self) -> list[int]:
        """Pids of live processes that have the store open."""
        return sorted({pid_of(w) for w, _t, _wr in self.owners() if self.alive(w)})

    # -- eviction --------------------------------------------------------

    def evict_next(self, policy: Policy) -> tuple[int, int] | None:
        """Evict the first entry in eviction order that nobody alive has
        pinned and hand its (slot, generation) to the caller, who reuses the
        slot; None when every entry is pinned.  The entry is removed through
        its order key as found, without decoding more than its head (every
        put at capacity runs this)."""
        entries = self.db["entries"]
        if self._pins_exist is None:
            with self.txn.cursor(db=self.db["pins"]) as cur:
                self._pins_exist = cur.first()
        backward = policy.from_end
        with self.txn.cursor(db=self.db["order"]) as cur:
            ok = cur.last() if backward else cur.first()
            while ok:
                ikey = bytes(cur.value())
                raw = self.txn.get(ikey, db=entries)
                if raw is not None and not (self._pins_exist and self._held(ikey)):
                    got = slot_gen_of(raw)
                    if got is None:
                        raise CorruptStoreError(
                            "an index entry is truncated; run `slabcache fsck --repair`")
                    cur.delete()
                    self.txn.delete(ikey, db=entries)
                    self.vacated.append(got[0])
                    return got
                ok = cur.prev() if backward else cur.next()
        return None

    def _held(self, ikey: bytes) -> bool:
        """True when someone alive pins ``ikey``; pins of dead owners lapse here."""
        pins = self.pins_of(ikey)
        if any(self.alive(who) for who, _ in pins):
            return True
        for who, _ in pins:
            self.delete_pin(ikey, who)
        return False

    def reap_dead(self) -> dict[str, int]:
        """Release what dead processes left: reservations, pins, open handles."""
        found = {"reservations": 0, "pins": 0, "owners": 0}
        for slot, gen, who in self.reservations():
            if not self.alive(who):
                self.unreserve(slot)
                self.release_slot(slot, gen)
                found["reservations"] += 1
        for ikey, who, _n in self.all_pins():
            if not self.alive(who):
                self.delete_pin(ikey, who)
                found["pins"] += 1
        for who, _t, _w in self.owners():
            if not self.alive(who):
                self.unregister_owner(who)
                found["owners"] += 1
        return found

    def rebuild_order(self, policy: Policy, entries=None) -> None:
        """Rewrite the eviction order from ``entries`` (default: all) under ``policy``."""
        entries = list(self.entries()) if entries is None else list(entries)
        self.txn.drop(self.db["order"], delete=False)
        for e in entries:
            self.txn.put(policy.order_key(e.slot, e.use), e.ikey, db=self.db["order"])

    # -- the put path, each step in one call -------------------------------

    def claim(self, ikey: bytes, canon: bytes, slot_count: int, owner: bytes, policy: Policy,
              now: float, reap_due, keep_free: bool = False) -> tuple[int, int, int] | bool | None:
        """Reserve a slot for ``canon``: (slot, new generation, how many
        entries were evicted for it), True when the key is already stored (its
        use recorded), None when no slot can be had.  A free slot comes
        first, then slots of dead processes' reservations (when
        ``reap_due()`` says so), then the policy's victim, evicted here
        (with ``keep_free``, the next victim too, onto the free list)."""
        if self.use_if_stored(ikey, canon, policy, now):
            return True
        got = self.take_free_slot(slot_count)
        if got is None and reap_due():
            self.reap_dead()
            got = self.take_free_slot(slot_count)
        evicted = 0
        if got is None:
            got = self.evict_next(policy)
            if got is None:
                return None
            evicted = 1 + (keep_free and self.free_next(policy))
        slot, gen = got
        gen = next_generation(gen)
        self.txn.put(_U64.pack(slot), _U32.pack(gen) + owner, db=self.db["reserved"])
        return slot, gen, evicted

    def use_if_stored(self, ikey: bytes, canon: bytes, policy: Policy, now: float) -> bool:
        """True when ``canon`` is stored, recording a use of it."""
        raw = self.txn.get(ikey, db=self.db["entries"])
        if raw is not None and (ikey == canon or canon_of(raw) == canon):
            slot, gen = slot_gen_of(raw)
            self.record_uses({ikey: (1, now, slot, gen)}, policy)
            return True
        return False

    def has_free_slot(self, slot_count: int) -> bool:
        with self.txn.cursor(db=self.db["free"]) as cur:
            if cur.first():
                return True
        return self._u64("next_unused") < slot_count

    def free_next(self, policy: Policy) -> bool:
        """Evict the policy's next victim onto the free list; False when
        every entry is pinned."""
        got = self.evict_next(policy)
        if got is None:
            return False
        self.release_slot(*got)
        return True

    def settle(self, slot: int, generation: int, owner: bytes, ikey: bytes, canon: bytes,
               length: int, checksum: int, meta_raw: bytes, policy: Policy, now: float) -> str:
        """Turn the reservation (slot, generation) of ``owner`` into the entry
        for ``canon``.  Returns "stored", "present" (someone stored the key
        meanwhile; the slot is freed) or "lost" (the reservation is gone)."""
        reserved = self.db["reserved"]
        skey = _U64.pack(slot)
        raw = self.txn.get(skey, db=reserved)
        if raw is None or _U32.unpack_from(raw)[0] != generation or raw[4:] != owner:
            return "lost"
        self.txn.delete(skey, db=reserved)
        old = self.txn.get(ikey, db=self.db["entries"])
        if old is not None:
            if canon_of(old) == canon:
                self.release_slot(slot, generation)
                return "present"
            self.free_entry(Entry.decode(ikey, old), policy)  # a long key's hash collided
        self.add(ikey, canon, slot, generation, length, checksum, meta_raw, policy, now)
        return "stored"

    # -- repair (fsck) ---------------------------------------------------

    def raw_entries(self) -> list[tuple[bytes, bytes]]:
        """Every entry as stored, decodable or not."""
        with self.txn.cursor(db=self.db["entries"]) as cur:
            return [(bytes(k), bytes(v)) for k, v in cur]

    def drop_entry_key(self, ikey: bytes) -> None:
        """Remove whatever is stored at ``ikey`` and its pins, without
        decoding it (entries too damaged to free normally)."""
        entries = self.db["entries"]
        if not self.txn.delete(ikey, db=entries):
            # A damaged page can hold a key out of order, where a search
            # cannot find it: delete it where a walk finds it.
            with self.txn.cursor(db=entries) as cur:
                for k in cur.iternext(values=False):
                    if k == ikey:
                        cur.delete()
                        break
        self.drop_pins(ikey)

    def forget_free(self, slot: int) -> None:
        """Take ``slot`` off the free list (it is in use, or out of range)."""
        self.txn.delete(_U64.pack(slot), db=self.db["free"])

    def set_next_unused(self, mark: int) -> None:
        self.meta_put("next_unused", _U64.pack(mark))
        self._no_free = False
