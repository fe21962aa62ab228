"""Reading an entry's bytes and proving they are the entry's.

Readers look an entry up, copy its bytes, then check in the index that the
entry still names the same slot and generation: a slot is rewritten only
after its entry is gone and with a new generation, so a read that passes
that check saw no rewrite, and a read that fails it is a miss.  A checksum
mismatch is a miss too (counted, and the entry is dropped); wrong bytes
are never served.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from ..device import Engine
from ..format.keys import decode_key
from ..index import Entry, Index
from ..index.entry import EntryRef
from .allocator import SlotAllocator
from .uses import UseTracker

log = logging.getLogger(__name__)


class Reader:
    def __init__(self, engine: Engine, index: Index, allocator: SlotAllocator | None,
                 uses: UseTracker, checksum: bool, path: str):
        self.engine = engine
        self.index = index
        self.allocator = allocator  # None for a read-only handle
        self.uses = uses
        self.checksum = checksum
        self.path = path

    def read(self, e: Entry | EntryRef, parts: list[torch.Tensor]) -> bool:
        """Fill ``parts`` with ``e``'s bytes; False (a miss) unless they are
        verified to be the entry's."""
        try:
            digest = self.engine.read_into(e.slot, parts, hashed=self.checksum)
        except OSError as exc:  # SlabIOError, or an OSError from a wrapper
            log.error("%s; serving a miss", exc)
            self.uses.count("misses")
            self.uses.count("io_errors")
            return False
        # A checksum of 0 marks an entry written with checksum=False.
        bad = self.checksum and e.checksum != 0 and digest != e.checksum
        if self.index.slot_gen(e.ikey) != (e.slot, e.generation):
            self.uses.count("misses")  # evicted or replaced while we read
            return False
        if bad:
            self._drop_corrupt(e)
            return False
        if self.uses.hit(e) and self.allocator is not None:
            with self.index.write() as t:
                self.uses.flush(t)
        return True

    def read_many(self, refs: Sequence[EntryRef], parts_list: Sequence[list[torch.Tensor]],
                  submit: Callable | None = None) -> list[bool]:
        """:meth:`read` for many entries with one validation transaction.

        ``submit(fn, *args) -> Future`` runs the reads in parallel (worker
        threads); without it they run here, one after another.
        """
        digests: list = [None] * len(refs)
        failed = [False] * len(refs)
        if submit is None:
            for i, (e, parts) in enumerate(zip(refs, parts_list)):
                try:
                    digests[i] = self.engine.read_into(e.slot, parts, self.checksum)
                except OSError as exc:
                    log.error("%s; serving a miss", exc)
                    failed[i] = True
        else:
            futs = [submit(self.engine.read_into, e.slot, parts, self.checksum)
                    for e, parts in zip(refs, parts_list)]
            for i, f in enumerate(futs):
                try:
                    digests[i] = f.result()
                except OSError as exc:
                    log.error("%s; serving a miss", exc)
                    failed[i] = True
        now_at = self.index.slot_gens([e.ikey for e in refs])
        ok = []
        due = False
        for e, digest, bad_io, cur in zip(refs, digests, failed, now_at):
            if bad_io:
                self.uses.count("misses")
                self.uses.count("io_errors")
                ok.append(False)
            elif cur != (e.slot, e.generation):
                self.uses.count("misses")
                ok.append(False)
            elif self.checksum and e.checksum != 0 and digest != e.checksum:
                self._drop_corrupt(e)
                ok.append(False)
            else:
                due = self.uses.hit(e) or due
                ok.append(True)
        if due and self.allocator is not None:
            with self.index.write() as t:
                self.uses.flush(t)
        return ok

    def _drop_corrupt(self, e: Entry | EntryRef) -> None:
        log.warning("checksum mismatch in slot %d of %s (key %r); %s",
                    e.slot, self.path, decode_key(e.canon),
                    "dropping the entry" if self.allocator else "serving a miss")
        self.uses.count("misses")
        self.uses.count("checksum_failures")
        if self.allocator is not None:
            self.allocator.free_if_current(e)
