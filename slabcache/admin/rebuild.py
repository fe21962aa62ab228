"""Rebuilding a store's index from its slot records (fsck --rebuild-index,
and fsck --repair when the index cannot be used)."""

from __future__ import annotations

import os
import shutil
import struct
import time

from ..device.slabfile import SlotRecords, read_header_bytes
from ..device.storedir import keep_modes_of
from ..errors import CorruptStoreError
from ..format.checksum import checksum
from ..format.header import Geometry
from ..format.keys import index_key, key_hash
from ..format.layout import StorePaths
from ..format.records import unpack_record_meta
from ..index import Index, default_map_size
from ..index.policy import make_policy
from .findings import CheckResult, add
from .progress import Progress


def rebuild_from_records(paths: StorePaths, g: Geometry, creation_id: bytes, res: CheckResult, progress) -> None:
    """Rebuild the index from the slot records, keeping every intact entry.

    A free slot has no record (the store clears it before the slot leaves
    the index), so every record names an entry that was stored, unless a
    crash cut a put or an eviction short.  A key found in two slots cannot
    be told apart (generations count per slot), so neither is restored.
    Of two long keys whose hashes are one index key, the later slot's is
    restored (which was put last cannot be told; either is a right value)
    and the other's record cleared.
    The new index takes the modes and owner of the old one, or the slab's.
    """
    tmp = paths.index_rebuild
    shutil.rmtree(tmp, ignore_errors=True)
    found: dict[bytes, list[tuple]] = {}
    unused: list[int] = []  # slots whose record no entry will match: cleared
    with SlotRecords(paths.slab, g, writable=True) as records:
        size = records.file_size()
        bar = Progress(g.slot_count, "rebuild ", progress)
        for slot in range(g.slot_count):
            bar.step()
            rec = records.read(slot)
            if rec is None:
                continue
            if rec.length > g.slot_bytes or g.slot_offset(slot) + rec.length > size:
                unused.append(slot)
                continue
            if not rec.meta:
                add(res, "unrecoverable entry", "the slot's record had no room for its key",
                     fixed=False, slot=slot)
                continue
            try:
                canon, meta = unpack_record_meta(rec.meta)
            except (CorruptStoreError, struct.error):
                unused.append(slot)
                continue
            data = records.read_payload(slot, rec.length)
            res.bytes_scrubbed += len(data)
            if key_hash(canon) != rec.key_hash or (rec.checksum and checksum([data]) != rec.checksum):
                add(res, "damaged entry", "payload fails its checksum; not restored", fixed=True,
                     slot=slot, key=canon)
                unused.append(slot)
                continue
            found.setdefault(canon, []).append((slot, rec, canon, meta))
        for canon, copies in list(found.items()):
            if len(copies) > 1:
                slots = [c[0] for c in copies]
                add(res, "ambiguous entry", f"the key has records in slots {slots}, and which is "
                     "newer cannot be told; neither is restored", fixed=True, key=canon)
                unused += slots
                del found[canon]
        header = read_header_bytes(paths.slab)
        idx = Index.acquire(tmp, map_size=default_map_size(g.slot_count), create=True)
        try:
            # One large transaction follows: every entry with its key.
            idx.ensure_room(len(found), sum(len(c[0][2]) * 2 + 256 for c in found.values()))
            with idx.write(durable=True) as t:
                pol = make_policy("lru")
                t.init_store(creation_id, header, pol)
                now = time.time()
                used = set()
                for slot, rec, canon, meta in sorted((c[0] for c in found.values()),
                                                     key=lambda x: x[0]):
                    t.add(index_key(canon), canon, slot, rec.generation, rec.length, rec.checksum,
                             meta.encode(), pol, now)
                    used.add(slot)
                # An entry that a long key's entry replaced (their hashes the
                # same index key: EntryOps.add) left its slot vacated, as any
                # dropped entry does: its record goes with the unused ones.
                # Taken before the free slots below are released (vacated too).
                collided, t.vacated = t.vacated or [], None
                mark = max(used) + 1 if used else 0
                t.set_next_unused(mark)
                for s in range(mark):
                    if s not in used:
                        t.release_slot(s, 0)
        finally:
            idx.release()
        if collided:
            at = {c[0][0]: canon for canon, c in found.items()}
            for slot in collided:
                add(res, "colliding entry", "its key shares an index key with a key in a later "
                     "slot, whose entry is restored", fixed=True, slot=slot, key=at[slot])
                del found[at[slot]]
        for slot in unused + collided:  # free now: a record there would come back at the next rebuild
            records.clear(slot)
    res.entries = len(found)
    _take_modes(paths, tmp)
    if os.path.exists(paths.index):
        shutil.rmtree(paths.index)
    os.rename(tmp, paths.index)
    add(res, "index rebuilt", f"restored {len(found)} entries from the slot records", fixed=True)


def _take_modes(paths: StorePaths, new: str) -> None:
    """Give a rebuilt index the modes and owner of the one it replaces, or,
    when that is gone, the slab's (a directory also searchable where the
    slab is readable): run by root, fsck must not leave an index the
    store's owner cannot open."""
    if os.path.exists(paths.lmdb_data):
        keep_modes_of(paths.index, new)
        return
    st = os.stat(paths.slab)
    file_mode = st.st_mode & 0o666
    dir_mode = file_mode | (file_mode & 0o444) >> 2
    for name in os.listdir(new):
        os.chmod(os.path.join(new, name), file_mode)
        _chown(os.path.join(new, name), st)
    os.chmod(new, dir_mode)
    _chown(new, st)


def _chown(path: str, st: os.stat_result) -> None:
    try:
        os.chown(path, st.st_uid, st.st_gid)
    except PermissionError:
        pass  # not root: the files are ours, as the slab is
