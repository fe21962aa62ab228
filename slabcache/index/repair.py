"""What fsck needs beyond the put and get paths: entries as stored,
damaged or not, and the free list and eviction order set outright."""

from __future__ import annotations

from .meta import U64
from .policy import Policy


class RepairOps:
    """Repair operations (a room of IndexTxn, used by admin/fsck.py)."""

    __slots__ = ()

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
        self.txn.delete(U64.pack(slot), db=self.db["free"])
        self._free_listed = None  # the list may be empty now

    def rebuild_order(self, policy: Policy, entries=None) -> None:
        """Rewrite the eviction order from ``entries`` (default: all) under ``policy``."""
        entries = list(self.entries()) if entries is None else list(entries)
        self.txn.drop(self.db["order"], delete=False)
        for e in entries:
            self.txn.put(policy.order_key(e.slot, e.use), e.ikey, db=self.db["order"])
