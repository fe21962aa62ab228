"""Compaction: shrink, grow or re-slot a store; reclaim index space.

The live entries are copied (checksums verified) into a new store built in
``PATH/compact.new``; the most valuable entries by the store's policy are
kept when not all fit.  Then a marker file commits the switch, and the new
slab and index are moved into place (``device/storedir.py``), so a crash at
any point leaves the old or the new store, never a mix.  The new store
needs disk space beside the old one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from ..core import SlabStore
from ..device.slabfile import SlotRecords, read_slab_header
from ..device.storedir import (
    ExclusiveLock, commit_switch, finish_switch, keep_modes, recover_interrupted,
)
from ..errors import ConfigError, CorruptStoreError
from ..format.checksum import checksum
from ..format.keys import decode_key, display_key
from ..format.sizes import check_bytes
from ..index import Entry
from .common import existing_store, open_index, store_users
from .progress import Progress

log = logging.getLogger(__name__)

# The points compaction passes, in order, for ``on_phase`` observers
# (progress reporting; tests kill the process at each to prove recovery).
PHASES = ("copy", "marker", "swap")


@dataclass
class CompactResult:
    path: str
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    kept: int = 0
    dropped: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"path": self.path, "before": self.before, "after": self.after, "kept": self.kept,
                "dropped": self.dropped, "seconds": self.seconds}


def _no_phase(_phase: str) -> None:
    """The default observer: compaction phases are not reported."""


def compact(path, *, capacity_bytes: int | None = None, slot_bytes: int | None = None,
            progress: bool = True, on_phase: Callable[[str], None] = _no_phase) -> CompactResult:
    """Rewrite the store at ``path`` with a new capacity and/or slot size.

    ``on_phase`` is called with each name in PHASES as compaction reaches
    it ("copy" after each entry copied).  Raises ConfigError (no store, bad
    sizes), StoreBusyError (open elsewhere), CorruptStoreError (unreadable
    index: run fsck first).
    """
    paths = existing_store(path)
    for name, v in (("capacity", capacity_bytes), ("slot bytes", slot_bytes)):
        if v is not None:
            try:
                check_bytes(name, v)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    t0 = time.perf_counter()
    res = CompactResult(paths.root)
    # Exclusive for the whole run: entries written meanwhile would be lost
    # at the switch.  The source is read through its index and slab
    # directly, since opening it as a store would wait on our own lock.
    with ExclusiveLock(paths, lambda: store_users(paths)):
        recover_interrupted(paths)
        g, _ = read_slab_header(paths.slab)
        new_slot = slot_bytes or g.slot_bytes
        new_cap = capacity_bytes or g.slot_count * new_slot
        idx = open_index(paths, writable=False)
        if idx is None:
            raise CorruptStoreError(f"the index of {paths.root} is unreadable; run `slabcache fsck "
                                    f"{paths.root} --rebuild-index` first")
        try:
            with idx.read() as t:
                policy = t.policy()
                ordered = [ikey for _o, ikey in t.order_keys(reverse=policy.from_end)]
                raw = t.raw_entries()
            entries = {}
            for k, v in raw:
                e = _sound(k, v, g)
                if e is None:
                    res.dropped.append({"key": repr(display_key(k)), "bytes": 0,
                                        "why": "damaged index entry"})
                else:
                    entries[k] = e
            res.before = {"slots_total": g.slot_count, "slot_bytes": g.slot_bytes,
                          "capacity_bytes": g.capacity_bytes, "slots_used": len(raw)}
            with SlabStore.open(paths.compact_new, capacity_bytes=new_cap, slot_bytes=new_slot,
                                policy=policy.name) as dst, \
                    SlotRecords(paths.slab, g, writable=False) as src:
                _copy(src, ordered, entries, dst, res, progress, on_phase)
                res.after = {k: dst.stats()[k] for k in
                             ("slots_total", "slot_bytes", "capacity_bytes", "slots_used")}
                dst.sync()
        finally:
            idx.release()
        keep_modes(paths, paths.compact_new)
        on_phase("marker")
        commit_switch(paths)
        on_phase("swap")
        finish_switch(paths)
    res.seconds = time.perf_counter() - t0
    return res


def _sound(ikey: bytes, raw: bytes, g) -> Entry | None:
    """The entry, or None when what the index holds cannot be right (it
    does not decode, or names bytes its slot cannot hold)."""
    try:
        e = Entry.decode(ikey, raw)
        decode_key(e.canon)
        if e.length != e.meta.length or e.length > g.slot_bytes or not 0 <= e.slot < g.slot_count:
            return None
    except (CorruptStoreError, UnicodeDecodeError):
        return None
    return e


def _copy(src: SlotRecords, ordered, entries, dst: SlabStore, res: CompactResult, progress: bool,
          on_phase) -> None:
    # Eviction order runs least to most valuable: keep from the valuable end.
    ranked = [entries[k] for k in reversed(ordered) if k in entries]
    ranked += [e for k, e in entries.items() if e not in ranked]  # order records missing
    fits = [e for e in ranked if e.length <= dst.geometry.slot_bytes]
    keep = fits[:dst.geometry.slot_count]
    kept_ids = {e.ikey for e in keep}
    res.dropped += [{"key": repr(decode_key(e.canon)), "bytes": e.length,
                    "why": "larger than the new slot" if e.length > dst.geometry.slot_bytes
                    else "no room: the policy ranked it lowest"}
                   for e in ranked if e.ikey not in kept_ids]
    bar = Progress(sum(e.length for e in keep), "compact ", progress)
    for e in reversed(keep):  # least valuable first, so the policy order carries over
        data = src.read_payload(e.slot, e.length)
        if len(data) != e.length or (e.checksum and checksum([data]) != e.checksum):
            res.dropped.append({"key": repr(decode_key(e.canon)), "bytes": e.length,
                                "why": "failed its checksum"})
            continue
        dst.write([decode_key(e.canon)], [bytearray(data)], [e.meta])
        res.kept += 1
        bar.add(e.length)
        on_phase("copy")
