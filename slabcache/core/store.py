"""SlabStore: a key -> tensor(s) store in one preallocated slab file plus an
LMDB index.

The verbs are batch-first: each takes a list of keys and costs one index
transaction (or two, for writes), and a single key is the one-element case.

- bytes: :meth:`~SlabStore.lookup` (what is stored, without payloads),
  :meth:`~SlabStore.read_into` (those values' bytes into the caller's
  buffers), :meth:`~SlabStore.write` (bytes with their descriptions);
- keys: :meth:`~SlabStore.contains`, :meth:`~SlabStore.prefix`,
  :meth:`~SlabStore.pin`, :meth:`~SlabStore.unpin`, :meth:`~SlabStore.touch`,
  :meth:`~SlabStore.remove`, :meth:`~SlabStore.clear`;
- tensors (typed.py): put, put_many, get, get_into, get_many, get_many_into;
- queued work as futures: ``store.jobs`` (jobs.py);
- looking: stats, snapshot, keys, describe, entry, pin_count.

Crash protocol (writer.py): a slot is taken (its old entry deleted, a new
generation), the payload and the slot's record written, then the entry
committed.  Reads are validated after copying (reader.py).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

from ..format.keys import decode_key, make_key
from ..format.values import ValueDesc
from ..index import Entry, IndexTxn
from .evictions import EvictionLog
from .handle import Handle
from .items import Item, new_item
from .reader import Found
from .typed import TensorVerbs, raw_parts
from .values import check_disjoint, out_bytes

_ONE = (str, bytes, bytearray, memoryview)  # a single key, not a list of them


def _out_parts(out, where: str) -> list:
    """The byte parts an out gives: one for a tensor or buffer, one per
    element of a list or tuple of them."""
    if isinstance(out, (list, tuple)):
        if not out:
            raise ValueError(f"{where} is an empty list; give at least one part")
        return [out_bytes(o, f"{where}[{j}]") for j, o in enumerate(out)]
    return [out_bytes(out, where)]


class SlabStore(Handle, TensorVerbs):
    """A key -> tensor(s) store in one preallocated slab file plus an LMDB index.

    Open with :meth:`SlabStore.open`.  Thread-safe; several processes may
    open the same path at once.
    """

    # -- bytes -------------------------------------------------------------

    def lookup(self, keys: Sequence[str | bytes]) -> list[Found | None]:
        """What is stored under each key (None for misses, counted), in one
        read transaction, without reading payloads: each Found carries the
        value's description (``.desc``) and byte length (``.length``), so a
        caller can allocate before :meth:`read_into`.  Raises
        CorruptStoreError for a damaged entry."""
        ks = [make_key(k) for k in keys]
        with self._guard:
            return self._reader.lookup(ks)

    def read_into(self, found: Sequence[Found | None], outs: Sequence) -> list[ValueDesc | None]:
        """Read what :meth:`lookup` found into ``outs``: each a contiguous
        CPU tensor (any dtype) or a writable buffer of at least
        ``found[i].length`` bytes, or a list of such parts that the bytes
        fill back to back and whose sizes add up to exactly the length (a
        page spread over a host pool's K and V buffers); ignored where
        found[i] is None.  Returns each value's description, or None where
        it was not found or is no longer the entry that was looked up
        (evicted or replaced since: validated after reading, as every read
        is).  Raises UnsupportedValueError for an out the bytes cannot land
        in, ValueError for one of the wrong size."""
        jobs, parts = [], []
        bufs = [None if f is None else _out_parts(o, f"outs[{i}]")
                for i, (f, o) in enumerate(zip(found, outs, strict=True))]
        check_disjoint([b for p in bufs if p is not None for b in p])
        for i, (f, buf) in enumerate(zip(found, bufs)):
            if f is None:
                continue
            room = buf[0].numel() if len(buf) == 1 else sum(b.numel() for b in buf)
            if len(buf) > 1 and room != f.length:
                raise ValueError(f"the parts of outs[{i}] hold {room} bytes, the value {f.length}; "
                                 "give parts that add up to exactly the value's length")
            if room < f.length:
                raise ValueError(f"outs[{i}] holds {room} bytes, the value {f.length}; pass a larger out")
            jobs.append(i)
            parts.append(buf if room == f.length else [buf[0][:f.length]])
        oks = self._read_found([found[i] for i in jobs], parts)
        res: list = [None] * len(found)
        for i, ok in zip(jobs, oks):
            if ok:
                res[i] = found[i].desc
        return res

    def _read_found(self, found: list[Found], parts: list[list]) -> list[bool]:
        if not found:
            return []
        with self._guard:
            return self._reader.read_many([f.ref for f in found], parts)

    def write(self, keys: Sequence[str | bytes], datas: Sequence,
              descs: Sequence[ValueDesc]) -> list[bool]:
        """Store bytes that already hold values: ``datas[i]`` (a CPU tensor or
        buffer of exactly ``descs[i].length`` bytes, or a list of them whose
        sizes add up to that, written back to back) under ``keys[i]``, each
        described by ``descs[i]`` (``slabcache.core.values.describe``, or
        another store's ``Found.desc``).  One transaction reserves every
        slot, one commits every entry; returns what :meth:`put` returns per
        key and raises as :meth:`put_many` does."""
        self._writable()
        return self._put_items(self._raw_items(keys, datas, descs))

    def _raw_items(self, keys, datas, descs) -> list[Item]:
        items = []
        for key, data, desc in zip(keys, datas, descs, strict=True):
            k = make_key(key)
            self._check_size(desc)
            items.append(new_item(k, raw_parts(data, desc), desc))
        return items

    def _put_items(self, items: list[Item]) -> list[bool]:
        with self._guard:
            return self._writer.put_many(items)

    # -- keys --------------------------------------------------------------

    def contains(self, keys: str | bytes | Iterable[str | bytes]):
        """Whether a key is stored (a bool), or each of a list of keys (a
        list, one read transaction).  Does not count as a use."""
        if isinstance(keys, _ONE):
            canon, ikey = make_key(keys)
            with self._guard:
                return self._index.has(ikey, canon)
        ks = [make_key(k) for k in keys]
        with self._guard, self._index.read() as t:
            return [t.has(ikey, canon) for canon, ikey in ks]

    def __contains__(self, key) -> bool:
        return self.contains(key)

    def prefix(self, keys: Iterable[str | bytes], pin: bool = False) -> int:
        """How many leading keys are stored, stopping at the first that is
        not, in one transaction; with ``pin``, those are pinned too
        (LMCache's prefix lookup)."""
        ks = [make_key(k) for k in keys]
        n = 0
        if not pin:
            with self._guard, self._index.read() as t:
                for canon, ikey in ks:
                    if not t.has(ikey, canon):
                        break
                    n += 1
            return n
        self._writable()
        with self._guard, self._index.write(keys=len(ks)) as t:
            for canon, ikey in ks:
                if not t.has(ikey, canon):
                    break
                t.pin(ikey, self._owner)
                n += 1
        return n

    def pin(self, keys: str | bytes | Iterable[str | bytes]):
        """Protect a key (or each of a list) from eviction until unpinned or
        this handle closes.  Pins nest.  False where a key is not stored."""
        one = isinstance(keys, _ONE)
        ks = [make_key(keys)] if one else [make_key(k) for k in keys]
        self._writable()
        out = []
        with self._guard, self._index.write(keys=len(ks)) as t:
            for canon, ikey in ks:
                ok = t.has(ikey, canon)
                if ok:
                    t.pin(ikey, self._owner)
                out.append(ok)
        return out[0] if one else out

    def unpin(self, keys: str | bytes | Iterable[str | bytes]):
        """Release one pin this handle took on a key (or each of a list).
        False where it held none."""
        one = isinstance(keys, _ONE)
        ks = [make_key(keys)] if one else [make_key(k) for k in keys]
        self._writable()
        with self._guard, self._index.write(keys=len(ks)) as t:
            out = [t.unpin(ikey, self._owner) for _canon, ikey in ks]
        return out[0] if one else out

    def touch(self, keys: str | bytes | Iterable[str | bytes]) -> None:
        """Count a use of each stored key (missing keys are ignored)."""
        ks = [make_key(keys)] if isinstance(keys, _ONE) else [make_key(k) for k in keys]
        self._writable()
        now = time.time()
        with self._guard, self._index.write(keys=len(ks)) as t:
            uses: dict[bytes, tuple] = {}
            for canon, ikey in ks:
                e = t.ref(ikey, canon)
                if e is not None:  # a repeated key counts twice and ends up latest, as in order
                    count = uses.pop(ikey, (0,))[0] + 1
                    uses[ikey] = (count, now, e.slot, e.generation)
            t.record_uses(uses, self.policy)

    def remove(self, keys: str | bytes | Iterable[str | bytes], force: bool = False):
        """Delete a key (or each of a list); its slot is free at once.  False
        where absent, or pinned unless ``force``."""
        one = isinstance(keys, _ONE)
        ks = [make_key(keys)] if one else [make_key(k) for k in keys]
        alloc = self._writable().allocator
        out = []
        with self._guard, self._index.write(keys=len(ks)) as t:
            for canon, ikey in ks:
                e = t.entry(ikey, canon)
                ok = e is not None and (force or t.pin_count(ikey) == 0)
                if ok:
                    alloc.free(t, e)
                out.append(ok)
        return out[0] if one else out

    def watch_evictions(self, limit: int = 1 << 16) -> EvictionLog:
        """From now on, keep the keys this handle's puts evict to make room
        (``log.take()`` returns and forgets them), for a host that reports
        removals.  Evictions by other processes sharing the store are not
        seen.  The same log on every call."""
        alloc = self._writable().allocator
        with self._lock:
            if alloc.eviction_log is None:
                alloc.eviction_log = EvictionLog(limit)
            return alloc.eviction_log

    def clear(self) -> int:
        """Remove every entry, pinned or not.  Returns how many were removed."""
        alloc = self._writable().allocator
        with self._guard, self._index.write(keys=len(self)) as t:
            entries = list(t.entries())
            for e in entries:
                alloc.free(t, e)
            return len(entries)

    # -- looking -----------------------------------------------------------

    def keys(self) -> list[str | bytes]:
        with self._guard, self._index.read() as t:
            return [decode_key(e.canon) for e in t.entries()]

    def __len__(self) -> int:
        with self._guard, self._index.read() as t:
            return t.entry_count()

    def __iter__(self):
        return iter(self.keys())

    def describe(self, key: str | bytes) -> ValueDesc | None:
        """Dtypes, shapes and sizes of a stored value, without reading it."""
        f = self.lookup([key])[0]
        return None if f is None else f.desc

    def entry(self, key: str | bytes) -> Entry | None:
        """The index entry for ``key`` (slot, generation, use stats); a peek."""
        canon, ikey = make_key(key)
        with self._guard, self._index.read() as t:
            return t.entry(ikey, canon)

    def pin_count(self, key: str | bytes) -> int:
        """Pins held on ``key`` by live handles."""
        canon, ikey = make_key(key)
        with self._guard, self._index.read() as t:
            return t.pin_count(ikey) if t.has(ikey, canon) else 0

    @contextmanager
    def snapshot(self) -> Iterator["Snapshot"]:
        """A consistent read-only view of the index (for reports): nothing is
        recorded as a use."""
        with self._guard, self._index.read() as t:
            yield Snapshot(t)

    def stats(self) -> dict:
        """Geometry, occupancy and counters (totals over every process)."""
        g = self.geometry
        with self._guard, self._index.read() as t:
            counters = t.counters()
            used = t.entry_count()
            free = t.free_count(g.slot_count)
            reserved = len(t.reservations())
            pinned = len({ikey for ikey, who, _ in t.all_pins() if t.alive(who)})
        for k, v in self._uses.pending_counters().items():
            counters[k] += v
        return {
            "path": self.path,
            "slots_total": g.slot_count,
            "slots_used": used,
            "slots_free": free,
            "slots_reserved": reserved,
            "slot_bytes": g.slot_bytes,
            "capacity_bytes": g.capacity_bytes,
            "file_bytes": g.file_bytes,
            "alignment": g.alignment,
            "pinned": pinned,
            "policy": self.policy.name,
            "io": self.engine.name,
            "durability": self.durability,
            "checksum": self.checksum,
            "io_threads": self.options.io_threads,
            "queued": self.jobs.queued(),
            **counters,
        }


class Snapshot:
    """What :meth:`SlabStore.snapshot` yields: entries and who holds them."""

    def __init__(self, t: IndexTxn):
        self._t = t

    def entries(self) -> Iterator[Entry]:
        return self._t.entries()

    def pinned(self) -> set[bytes]:
        """Index keys pinned by live handles."""
        return {ikey for ikey, who, _n in self._t.all_pins() if self._t.alive(who)}

    def open_pids(self) -> list[int]:
        return self._t.live_pids()

    def reservations(self) -> list[tuple[int, int, bytes]]:
        """(slot, generation, owner) of every put in flight."""
        return self._t.reservations()
