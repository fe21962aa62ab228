"""Finding entries, reading their bytes, and proving the bytes are theirs.

Readers look an entry up and copy its bytes.  Bytes whose checksum equals
the entry's are the entry's value, whatever happened to the slot meanwhile
(a 64-bit hash of other bytes matches by chance one time in 2**64, the
odds every read of a damaged slot already runs).  Any other read (a
mismatch, a store or entry without checksums) is then checked in the index:
the entry must still name the same slot and generation.  A slot is
rewritten only after its entry is gone and with a new generation, so a
read that passes that check saw no rewrite, and a read that fails it is a
miss.  A checksum mismatch on a slot that was not rewritten is a miss too
(counted, and the entry is dropped once a second read of the slot into the
store's own buffer confirms it); wrong bytes are never served.  Every miss
is counted here (:meth:`Reader.find`, :meth:`Reader.lookup`,
:meth:`Reader._judge`).
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple, Sequence

import torch

from ..device import Engine
from ..errors import CorruptStoreError, StorageFullError
from ..format.header import Geometry
from ..format.keys import Key, display_key
from ..format.values import ValueDesc
from ..index import Entry, Index
from ..index.entry import EntryRef
from .allocator import SlotAllocator
from .uses import UseTracker
from .values import Plan, plan_for

log = logging.getLogger(__name__)

_IO_FAILED = object()  # what _copy returns when the engine failed


class Found(NamedTuple):
    """What is stored under one key: its entry (``ref``) and how to rebuild
    its value (``plan``).  ``desc`` and ``length`` say what a caller must
    allocate before SlabStore.read_into."""

    ref: EntryRef
    plan: Plan

    @property
    def desc(self) -> ValueDesc:
        return self.plan.desc

    @property
    def length(self) -> int:
        return self.ref.length


_new_found = tuple.__new__


class Reader:
    def __init__(self, engine: Engine, index: Index, allocator: SlotAllocator | None,
                 uses: UseTracker, checksum: bool, geometry: Geometry, path: str):
        self.engine = engine
        self.index = index
        self.allocator = allocator  # None for a read-only handle
        self.uses = uses
        self.checksum = checksum
        self.geometry = geometry
        self.path = path
        self._last_full_warning = -1e9

    # -- finding -----------------------------------------------------------

    def find(self, key: Key) -> tuple[EntryRef, Plan] | None:
        """What is stored under ``key`` (one read transaction): its entry and
        plan (a Found's fields, without building one: single reads run this);
        None is a miss, counted.  Raises CorruptStoreError for a damaged entry."""
        ref = self.index.ref(key[1], key[0])
        if ref is None:
            self._flush_if(self.uses.count("misses"))
            return None
        return ref, self.plan(ref)

    def lookup(self, keys: Sequence[Key]) -> list[Found | None]:
        """:meth:`find` for each key, in one read transaction."""
        out: list[Found | None] = []
        misses = 0
        for ref in self.index.refs(keys):
            if ref is None:
                misses += 1
                out.append(None)
            else:
                out.append(_new_found(Found, (ref, self.plan(ref))))
        if misses:
            self._flush_if(self.uses.count("misses", misses))
        return out

    def plan(self, e: EntryRef) -> Plan:
        """The entry's Plan, once what the index says is bounded by the
        slab: a damaged entry must never make a read allocate or copy more
        than its slot.  Raises CorruptStoreError."""
        plan = plan_for(e.meta_raw)
        g = self.geometry
        if plan.length != e.length or e.length > g.slot_bytes or e.slot >= g.slot_count:
            raise CorruptStoreError(
                f"the index entry of {display_key(e.canon)!r} in {self.path} is damaged (slot "
                f"{e.slot} of {g.slot_count}, {e.length} bytes, slots of {g.slot_bytes}); run "
                f"`slabcache fsck {self.path} --repair`")
        return plan

    # -- reading -----------------------------------------------------------

    def read(self, e: Entry | EntryRef, parts: list[torch.Tensor]) -> bool:
        """Fill ``parts`` with ``e``'s bytes; False (a miss) unless they are
        verified to be the entry's."""
        digest = self._copy(e, parts)
        if self.checksum and digest == e.checksum != 0:  # proven: no second lookup
            ok, due = True, self.uses.hit(e)
        else:
            now_at = None if digest is _IO_FAILED else self.index.slot_gen(e.ikey)
            ok, due = self._judge(e, digest, now_at)
        self._flush_if(due)
        return ok

    def read_many(self, refs: Sequence[EntryRef], parts_list: Sequence[list[torch.Tensor]]) -> list[bool]:
        """:meth:`read` for many entries, with one validation transaction for
        those their checksums do not prove (the engine reads large values
        side by side, Engine.read_many_into)."""
        if not refs:
            return []
        digests = self.engine.read_many_into([e.slot for e in refs], parts_list, self.checksum)
        for i, d in enumerate(digests):
            if isinstance(d, OSError):
                log.error("%s; serving a miss", d)
                digests[i] = _IO_FAILED
        oks, served, doubt, check = [], [], [], self.checksum
        for i, (e, d) in enumerate(zip(refs, digests)):
            if check and d == e.checksum != 0:  # proven by its checksum
                served.append(e)
                oks.append(True)
            else:
                doubt.append(i)
                oks.append(False)
        if doubt:  # one validation transaction for the rest
            for i, cur in zip(doubt, self.index.slot_gens([refs[i].ikey for i in doubt])):
                e, d = refs[i], digests[i]
                # The common verdict inline (bytes copied unchecked, entry
                # still there); _judge sorts out every other case.
                if d is not _IO_FAILED and cur == (e.slot, e.generation) and (not check or e.checksum == 0):
                    served.append(e)
                    oks[i] = True
                else:
                    oks[i] = self._judge(e, d, cur)[0]
        self._flush_if(self.uses.hit_many(served))
        return oks

    def _copy(self, e, parts):
        """The bytes' checksum (None unchecked), or _IO_FAILED."""
        try:
            return self.engine.read_into(e.slot, parts, hashed=self.checksum)
        except OSError as exc:  # SlabIOError, or an OSError from a wrapper
            log.error("%s; serving a miss", exc)
            return _IO_FAILED

    def _judge(self, e, digest, now_at) -> tuple[bool, bool]:
        """(served, uses due for a flush) for bytes copied from ``e``'s slot,
        given where the index says ``e`` is now."""
        if digest is _IO_FAILED:
            self.uses.count("misses")
            self.uses.count("io_errors")
            return False, False
        if now_at != (e.slot, e.generation):
            self.uses.count("misses")  # evicted or replaced while we read
            return False, False
        # A checksum of 0 marks an entry written with checksum=False.
        if self.checksum and e.checksum != 0 and digest != e.checksum:
            if self._slot_matches(e):
                # The slot holds the entry's bytes: what was hashed changed
                # while it was read (a caller writing into the out it passed,
                # say).  Those bytes are not served, and the entry is kept.
                log.warning("the bytes read from slot %d of %s (key %r) changed while they were "
                            "read, but the slot's bytes are intact; serving a miss (do not write "
                            "into a buffer while a read fills it)", e.slot, self.path, display_key(e.canon))
                self.uses.count("misses")
                return False, False
            self._drop_corrupt(e)
            return False, False
        return True, self.uses.hit(e)

    def _flush_if(self, due: bool) -> None:
        if due and self.allocator is not None:
            try:
                self.index.flush()  # the use tracker runs first in every write
            except StorageFullError as exc:
                # The read itself succeeded; only its use statistics wait.
                now = time.monotonic()
                if now - self._last_full_warning > 60:
                    self._last_full_warning = now
                    log.warning("%s; reads go on without recording their uses", exc)

    def _slot_matches(self, e: Entry | EntryRef) -> bool:
        """Whether ``e``'s slot, read again into a buffer of the store's own,
        still holds bytes with ``e``'s checksum: a mismatch is proven before
        an entry is dropped."""
        try:
            digest = self.engine.read_into(e.slot, [self.engine.empty(e.length)], hashed=True)
        except OSError:
            return False
        return digest == e.checksum

    def _drop_corrupt(self, e: Entry | EntryRef) -> None:
        log.warning("checksum mismatch in slot %d of %s (key %r); %s",
                    e.slot, self.path, display_key(e.canon),
                    "dropping the entry" if self.allocator else "serving a miss")
        self.uses.count("misses")
        self.uses.count("checksum_failures")
        if self.allocator is not None:
            # The failure is recorded in the transaction that drops the entry,
            # not at the next counter flush: `slabcache stats` shows it even if
            # the process is killed next (as vLLM kills a slow engine at exit).
            self.allocator.free_if_current(e, counters=self.uses)
