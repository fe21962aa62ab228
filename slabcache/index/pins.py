"""The ``pins`` and ``owners`` tables: who holds what, and who is alive.

``pins`` maps (index key, owner) to a pin count; ``owners`` maps each open
writable handle to its open time.  Whether an owner is alive is asked of
``self.alive`` (Liveness.is_alive of the store, index/owner.py): pins,
reservations and handle records of dead owners lapse.
"""

from __future__ import annotations

import struct
import time

from .owner import pid_of

_U32 = struct.Struct("<I")
_OWNER_INFO = struct.Struct("<dB")  # open time, writable


def _pin_prefix(ikey: bytes) -> bytes:
    return struct.pack(">H", len(ikey)) + ikey


class PinOps:
    """Pins, handles and what dead owners leave (a room of IndexTxn)."""

    __slots__ = ()

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

    def _held(self, ikey: bytes) -> bool:
        """True when someone alive pins ``ikey``; pins of dead owners lapse here."""
        pins = self.pins_of(ikey)
        if any(self.alive(who) for who, _ in pins):
            return True
        for who, _ in pins:
            self.delete_pin(ikey, who)
        return False

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
