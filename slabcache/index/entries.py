"""The ``entries`` and ``order`` tables: what is stored, and in which order
it goes.

``entries`` maps an index key to its Entry (slot, generation, length,
checksum, use statistics, value description, full key); ``order`` maps the
policy's order key of each entry to its index key.  An entry leaves the
index through one path, :meth:`EntryOps.free_entry`, which also drops its
pins and frees its slot.
"""

from __future__ import annotations

from typing import Iterator

from .entry import Entry, EntryRef, canon_of, encode_entry, ref_of, slot_gen_of, use_of, with_use
from .policy import Policy, UseStats


class EntryOps:
    """Entries and the eviction order (a room of IndexTxn)."""

    __slots__ = ()

    def ref(self, ikey: bytes, canon: bytes) -> EntryRef | None:
        """The entry for ``canon`` as an EntryRef (no full decode), or None."""
        raw = self.txn.get(ikey, db=self.db["entries"])
        return None if raw is None else ref_of(ikey, raw, canon)

    def entry(self, ikey: bytes, canon: bytes | None = None) -> Entry | None:
        """The whole entry at ``ikey`` (for ``canon``, when given), or None."""
        raw = self.txn.get(ikey, db=self.db["entries"])
        if raw is None:
            return None
        e = Entry.decode(ikey, raw)
        return e if canon is None or e.canon == canon else None

    def has(self, ikey: bytes, canon: bytes) -> bool:
        raw = self.txn.get(ikey, db=self.db["entries"])
        if raw is None:
            return False
        return ikey == canon or canon_of(raw) == canon

    def add(self, ikey: bytes, canon: bytes, slot: int, generation: int, length: int,
            checksum: int, meta_raw: bytes, policy: Policy, now: float) -> UseStats:
        """A new entry, last in its use order; returns its use statistics."""
        if ikey != canon:  # a put of a stored key is a use: one found here is another's
            self.holds_or_clears(ikey, canon, policy)
        tick = self.tick() + 1
        use = self.put_entry((slot, generation, ikey, canon, length, checksum, meta_raw), tick,
                             policy, now)
        self.set_tick(tick)
        return use

    def add_many(self, rows, policy: Policy, now: float) -> list[UseStats]:
        """:meth:`add` for each (slot, generation, ikey, canon, length,
        checksum, meta_raw) in order, the clock read and written once, each
        table written with one call (a batch's commit)."""
        tick = self.tick()
        out, entries, order, long_rows = [], [], [], []
        for row in rows:
            tick += 1
            if row[2] != row[3]:  # a long key (its index key a hash): after the rest, one at a time
                long_rows.append((len(out), row, tick))
                out.append(None)
                continue
            use, entry, filed = _new_entry(row, tick, policy, now)
            entries.append(entry)
            order.append(filed)
            out.append(use)
        if entries:
            self._put_rows(entries, "entries")
            self._put_rows(order, "order", policy.files_last)
        for i, row, at in long_rows:  # holds_or_clears must see the rows put before
            self.holds_or_clears(row[2], row[3], policy)
            out[i] = self.put_entry(row, at, policy, now)
        if out:
            self.set_tick(tick)
        return out

    def put_entry(self, row, tick: int, policy: Policy, now: float) -> UseStats:
        """Write the entry of ``row`` (slot, generation, ikey, canon, length,
        checksum, meta_raw) last in its use order at ``tick``; the caller
        advances the clock."""
        use, (ikey, raw), (order_key, _ikey) = _new_entry(row, tick, policy, now)
        self.txn.put(ikey, raw, db=self.db["entries"])
        self.txn.put(order_key, ikey, db=self.db["order"])
        return use

    def holds_or_clears(self, ikey: bytes, canon: bytes, policy: Policy) -> bool:
        """True when ``ikey``'s entry is ``canon``'s.  Otherwise, before
        ``canon``'s new entry goes in, the entry of another key whose hash is
        the same index key (only a long key's can be) is freed."""
        raw = self.txn.get(ikey, db=self.db["entries"])
        if raw is None:
            return False
        if canon_of(raw) == canon:
            return True
        self.free_entry(Entry.decode(ikey, raw), policy)
        return False

    def _put_rows(self, rows: list, table: str, last: bool = False) -> None:
        """Put (key, value) ``rows`` into ``table`` with one call.  ``last``:
        every key sorts after the table's (the policy files new and used
        entries last), so LMDB appends them without searching; a key that
        does not (an index whose clock was set back) is put plainly."""
        with self.txn.cursor(db=self.db[table]) as cur:
            _consumed, added = cur.putmulti(rows, append=last)
            if added != len(rows):  # only with append: put every row the usual way
                cur.putmulti(rows)

    def free_entry(self, e: Entry, policy: Policy) -> None:
        """Remove ``e``: its entry, its place in the eviction order, its pins;
        its slot goes on the free list with the entry's generation."""
        self._unlink_entry(e, policy)
        self.drop_pins(e.ikey)
        self.release_slot(e.slot, e.generation)

    def _unlink_entry(self, e: Entry, policy: Policy) -> None:
        self.txn.delete(e.ikey, db=self.db["entries"])
        self.txn.delete(policy.order_key(e.slot, e.use), db=self.db["order"])

    def record_uses(self, uses, policy: Policy) -> None:
        """Record batched uses: ``uses`` maps index key -> (count, wall time,
        slot, generation).  A use of an entry that was evicted or replaced
        since (another slot or generation) is dropped.  Entries are patched
        in place, the clock advanced once for the batch, and each table read
        or written with one call where LMDB has one."""
        entries, order = self.db["entries"], self.db["order"]
        with self.txn.cursor(db=entries) as cur:
            found = cur.getmulti(list(uses))  # only the keys still stored
        tick = self.tick()
        patched, moved, delete = [], [], self.txn.delete
        for ikey, raw in found:
            count, when, slot, gen = uses[ikey]
            if slot_gen_of(raw) != (slot, gen):
                continue
            old = use_of(raw)
            tick += 1
            new = UseStats(tick, old.hits + count, old.inserted)
            patched.append((ikey, with_use(raw, new, when)))
            old_key, new_key = policy.order_key(slot, old), policy.order_key(slot, new)
            if new_key != old_key:
                delete(old_key, db=order)
                moved.append((new_key, ikey))
        if patched:
            self._put_rows(patched, "entries")
        if moved:
            self._put_rows(moved, "order", policy.files_last)
        self.set_tick(tick)

    def use_if_stored(self, ikey: bytes, canon: bytes, policy: Policy, now: float) -> bool:
        """True when ``canon`` is stored, recording a use of it."""
        raw = self.txn.get(ikey, db=self.db["entries"])
        if raw is not None and (ikey == canon or canon_of(raw) == canon):
            slot, gen = slot_gen_of(raw)
            self.record_uses({ikey: (1, now, slot, gen)}, policy)
            return True
        return False

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


def _new_entry(row, tick: int, policy: Policy, now: float):
    """(use statistics, (index key, encoded entry), (order key, index key))
    of a new entry for ``row`` (slot, generation, ikey, canon, length,
    checksum, meta_raw), last in its use order at ``tick``."""
    slot, generation, ikey, canon, length, checksum, meta_raw = row
    use = UseStats(tick, 0, tick)
    raw = encode_entry(slot, generation, length, checksum, use, now, now, meta_raw, canon)
    return use, (ikey, raw), (policy.order_key(slot, use), ikey)
