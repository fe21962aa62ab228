"""The LMDB index: the single source of truth for what lives where.

Tables (LMDB named databases):

``entries``   index key -> Entry (slot, generation, length, checksum, use
              statistics, value description, full key)
``order``     policy order key -> index key (the eviction order)
``free``      slot -> generation of the slot's last use (released slots)
``reserved``  slot -> generation + owner (slots being written by a put)
``pins``      len + index key + owner -> pin count
``owners``    owner -> open time (processes that have the store open)
``meta``      creation id, policy, allocation high-water mark, clock, counters

Slots at or above the high-water mark ``next_unused`` were never used and
are free without being listed, so creating a store of a million slots costs
nothing here.  Every multi-step change happens in one write transaction, so
another process (or a crash) sees either all of it or none of it.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import lmdb

from . import owner as owners
from .errors import ConfigError, CorruptStoreError, StorageFullError
from .format import EntryMeta
from .policy import Policy, UseStats

log = logging.getLogger(__name__)

_U64 = struct.Struct(">Q")
_U32 = struct.Struct("<I")
# slot, generation, length, checksum, tick, hits, inserted, created, used, meta len
_ENTRY = struct.Struct("<QIQQQQQddI")
_SLOT_GEN = struct.Struct("<QI")  # the head of _ENTRY
# Persisted as consecutive u64s: append new counters at the end only.
COUNTERS = ("hits", "misses", "puts", "evictions", "checksum_failures", "rejected_puts",
            "queue_rejections", "io_errors")
_COUNTERS = struct.Struct(f"<{len(COUNTERS)}Q")

_DBS = ("meta", "entries", "order", "free", "reserved", "pins", "owners")


@dataclass(frozen=True)
class Entry:
    ikey: bytes
    canon: bytes
    slot: int
    generation: int
    length: int
    checksum: int
    use: UseStats
    created: float
    used: float
    meta_raw: bytes  # EntryMeta.encode(); decoded on first use of .meta

    @functools.cached_property
    def meta(self) -> EntryMeta:
        return EntryMeta.decode(self.meta_raw)

    def encode(self) -> bytes:
        meta = self.meta_raw
        head = _ENTRY.pack(self.slot, self.generation, self.length, self.checksum,
                           self.use.tick, self.use.hits, self.use.inserted,
                           self.created, self.used, len(meta))
        return head + meta + self.canon

    @classmethod
    def decode(cls, ikey: bytes, raw: bytes) -> "Entry":
        try:
            slot, gen, length, csum, tick, hits, ins, created, used, mlen = _ENTRY.unpack_from(raw)
        except struct.error as exc:
            raise CorruptStoreError(
                "an index entry is truncated; run `slabcache fsck --repair`"
            ) from exc
        meta_raw = raw[_ENTRY.size:_ENTRY.size + mlen]
        canon = bytes(raw[_ENTRY.size + mlen:])
        return cls(ikey, canon, slot, gen, length, csum, UseStats(tick, hits, ins),
                   created, used, bytes(meta_raw))


def canon_of(raw: bytes) -> bytes:
    """The full key stored in an encoded entry, without decoding the rest."""
    mlen = _U32.unpack_from(raw, _ENTRY.size - 4)[0]
    return bytes(raw[_ENTRY.size + mlen:])


def _pin_prefix(ikey: bytes) -> bytes:
    return struct.pack(">H", len(ikey)) + ikey


class IndexTxn:
    """Typed operations over one LMDB transaction."""

    def __init__(self, index: "Index", txn: lmdb.Transaction):
        self.index = index
        self.txn = txn
        self.db = index.dbs

    # -- meta ------------------------------------------------------------

    def meta_get(self, name: str) -> bytes | None:
        return self.txn.get(name.encode(), db=self.db["meta"])

    def meta_put(self, name: str, value: bytes) -> None:
        self.txn.put(name.encode(), value, db=self.db["meta"])

    def _u64(self, name: str) -> int:
        raw = self.meta_get(name)
        return _U64.unpack(raw)[0] if raw else 0

    def next_tick(self) -> int:
        t = self._u64("tick") + 1
        self.meta_put("tick", _U64.pack(t))
        return t

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

    def has(self, ikey: bytes, canon: bytes) -> bool:
        raw = self.txn.get(ikey, db=self.db["entries"])
        if raw is None:
            return False
        return ikey == canon or canon_of(raw) == canon

    def slot_gen(self, ikey: bytes) -> tuple[int, int] | None:
        """(slot, generation) of the entry at ``ikey``, without decoding the rest."""
        raw = self.txn.get(ikey, db=self.db["entries"])
        return None if raw is None else _SLOT_GEN.unpack_from(raw)

    def entry_at(self, ikey: bytes) -> Entry | None:
        raw = self.txn.get(ikey, db=self.db["entries"])
        return None if raw is None else Entry.decode(ikey, raw)

    def put_entry(self, e: Entry, policy: Policy) -> None:
        self.txn.put(e.ikey, e.encode(), db=self.db["entries"])
        self.txn.put(policy.order_key(e.slot, e.use), e.ikey, db=self.db["order"])

    def delete_entry(self, e: Entry, policy: Policy) -> None:
        self.txn.delete(e.ikey, db=self.db["entries"])
        self.txn.delete(policy.order_key(e.slot, e.use), db=self.db["order"])

    def record_use(self, e: Entry, policy: Policy, now: float, count: int = 1) -> Entry:
        tick = self.next_tick()
        self.txn.delete(policy.order_key(e.slot, e.use), db=self.db["order"])
        new = Entry(e.ikey, e.canon, e.slot, e.generation, e.length, e.checksum,
                    UseStats(tick, e.use.hits + count, e.use.inserted), e.created, now, e.meta_raw)
        self.put_entry(new, policy)
        return new

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
        return None

    def release_slot(self, slot: int, generation: int) -> None:
        self.txn.put(_U64.pack(slot), _U32.pack(generation), db=self.db["free"])

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
        return sum(n for who, n in self.pins_of(ikey) if owners.is_alive(who))

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

    # -- owners ----------------------------------------------------------

    def register_owner(self, who: bytes, writable: bool) -> None:
        self.txn.put(who, struct.pack("<dB", time.time(), writable), db=self.db["owners"])

    def unregister_owner(self, who: bytes) -> None:
        self.txn.delete(who, db=self.db["owners"])

    def owners(self) -> list[tuple[bytes, float, bool]]:
        with self.txn.cursor(db=self.db["owners"]) as cur:
            out = []
            for k, v in cur:
                t, w = struct.unpack("<dB", v)
                out.append((bytes(k), t, bool(w)))
            return out

    # -- eviction --------------------------------------------------------

    def find_victim(self, policy: Policy) -> Entry | None:
        """First entry in eviction order that nobody alive has pinned."""
        for _okey, ikey in self.order_keys(reverse=policy.from_end):
            e = self.entry_at(ikey)
            if e is None:
                continue
            pins = self.pins_of(ikey)
            if any(owners.is_alive(who) for who, _ in pins):
                continue
            for who, _ in pins:  # only dead owners left: their pins lapse
                self.delete_pin(ikey, who)
            return e
        return None

    def reap_dead(self) -> dict[str, int]:
        """Release what dead processes left: reservations, pins, open handles."""
        found = {"reservations": 0, "pins": 0, "owners": 0}
        for slot, gen, who in self.reservations():
            if not owners.is_alive(who):
                self.unreserve(slot)
                self.release_slot(slot, gen)
                found["reservations"] += 1
        for ikey, who, _n in self.all_pins():
            if not owners.is_alive(who):
                self.delete_pin(ikey, who)
                found["pins"] += 1
        for who, _t, _w in self.owners():
            if not owners.is_alive(who):
                self.unregister_owner(who)
                found["owners"] += 1
        return found

    def rekey_order(self, old: Policy, new: Policy) -> None:
        self.txn.drop(self.db["order"], delete=False)
        for e in self.entries():
            self.txn.put(new.order_key(e.slot, e.use), e.ikey, db=self.db["order"])


class Index:
    """One LMDB environment holding a store's index.

    LMDB allows one environment per file per process, while a process may
    open the same store several times (LMCache can build its backends
    twice): ``Index.acquire`` shares one environment per path, reference
    counted, and ``release`` closes it with the last user.
    """

    _registry: dict[str, "Index"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def acquire(cls, path: str, *, map_size: int, readonly: bool = False,
                create: bool = False) -> "Index":
        key = os.path.realpath(path)
        with cls._registry_lock:
            idx = cls._registry.get(key)
            if idx is not None:
                if idx.readonly and not readonly:
                    raise ConfigError(
                        f"the index at {path} is open read-only in this process; close "
                        "that handle before opening the store for writing"
                    )
                idx._refs += 1
                return idx
            idx = cls(path, map_size=map_size, readonly=readonly, create=create)
            cls._registry[key] = idx
            return idx

    def release(self) -> None:
        with Index._registry_lock:
            self._refs -= 1
            if self._refs > 0:
                return
            Index._registry.pop(os.path.realpath(self.path), None)
            self.env.close()
            self.env = None

    def __init__(self, path: str, *, map_size: int, readonly: bool = False,
                 create: bool = False):
        self.path = path
        self.readonly = readonly
        self._refs = 1
        try:
            # No sync at commit: strict handles call sync() after their
            # commits, so fast and strict handles can share one environment.
            self.env = lmdb.open(
                path, map_size=map_size, max_dbs=len(_DBS) + 1, subdir=True,
                sync=False, metasync=False, readahead=False, max_readers=1024,
                writemap=not readonly, map_async=True,
                readonly=readonly, create=create, lock=True, meminit=False,
            )
        except lmdb.Error as exc:
            raise CorruptStoreError(
                f"cannot open the index at {path}: {exc}; run `slabcache fsck "
                f"{os.path.dirname(path)} --rebuild-index` to rebuild it from the slab"
            ) from exc
        self.dbs = {}
        try:
            for name in _DBS:
                # py-lmdb opens handles of a read-only environment in its own
                # read transaction; passing one of ours leaves them unusable.
                self.dbs[name] = self.env.open_db(name.encode(), create=not readonly)
        except lmdb.Error as exc:
            self.env.close()
            raise CorruptStoreError(
                f"the index at {path} is incomplete ({exc}); run `slabcache fsck "
                f"{os.path.dirname(path)} --rebuild-index`"
            ) from exc
        # One writer per process at a time: LMDB serialises writers across
        # processes itself; this keeps threads of one process queueing here.
        self._wlock = threading.Lock()

    @contextmanager
    def read(self) -> Iterator[IndexTxn]:
        with self.env.begin(write=False) as txn:
            yield IndexTxn(self, txn)

    @contextmanager
    def write(self, durable: bool = False) -> Iterator[IndexTxn]:
        """A write transaction; ``durable`` syncs it to disk before returning."""
        with self._wlock:
            txn = self.env.begin(write=True)
            try:
                yield IndexTxn(self, txn)
                txn.commit()
            except lmdb.MapFullError as exc:
                txn.abort()
                raise StorageFullError(
                    f"the index at {self.path} reached its map size "
                    f"({self.env.info()['map_size']} bytes); very long keys use "
                    "index space: shorten them or reopen with a larger index_map_bytes"
                ) from exc
            except BaseException:
                txn.abort()
                raise
        if durable:
            self.env.sync(True)
