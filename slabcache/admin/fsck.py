"""fsck for slab stores: report by default, repair only when asked.

Exit codes follow e2fsck: 0 clean, 1 errors found and all corrected,
4 errors left uncorrected, 8 operational error (raised as an exception
here; the CLI maps it).  Without ``repair`` nothing is written.
"""

from __future__ import annotations

import logging
import os
import time

from ..device.slabfile import SlotRecords, extend_slab, read_header_bytes, write_header_bytes
from ..device.storedir import ExclusiveLock
from ..errors import ConfigError, CorruptStoreError
from ..format.checksum import checksum
from ..format.files import check_regular
from ..format.header import Geometry, unpack_header
from ..format.keys import index_key, key_hash
from ..format.layout import StorePaths
from ..format.records import record_meta
from ..index import Entry, Index
from ..index.owner import pid_of
from .common import existing_store, open_index, store_users
from .findings import (  # noqa: F401 - the findings' names are fsck's API
    EXIT_CLEAN, EXIT_FIXED, EXIT_OPERATIONAL, EXIT_UNFIXED, CheckResult, Finding, add,
)
from .live import agrees, confirmed, record_entry, still_disagrees, still_fails, still_free_with_record
from .progress import Progress
from .rebuild import rebuild_from_records

log = logging.getLogger(__name__)


def check(path: str | os.PathLike, *, repair: bool = False, deep: bool = False,
          rebuild_index: bool = False, progress: bool = True) -> CheckResult:
    """Check (and with ``repair`` fix) the store at ``path``.

    Raises ConfigError when there is no store, StoreBusyError when repairing
    a store someone has open.
    """
    paths = existing_store(path)
    res = CheckResult(paths.root)
    t0 = time.perf_counter()
    writing = repair or rebuild_index
    lock = ExclusiveLock(paths, lambda: store_users(paths)) if writing else None
    try:
        _check(paths, res, repair=writing, deep=deep, rebuild=rebuild_index, progress=progress)
    finally:
        if lock is not None:
            lock.close()
    res.seconds = time.perf_counter() - t0
    res.repaired = writing
    return res


def _check(paths: StorePaths, res, *, repair, deep, rebuild, progress) -> None:
    try:
        check_regular(paths.lock, "lock file")
    except ConfigError as exc:  # every open would refuse the store: say so
        add(res, "lock file not a regular file", str(exc), fixed=False)
    idx = open_index(paths, repair)
    try:
        g, creation_id, foreign = _check_header(paths.slab, idx, res, repair)
        if g is None:
            return
        res.slots_total = g.slot_count
        found_size = _check_size(paths.slab, g, res, repair)
        if foreign:
            # Another store's index: every entry in it is wrong here, while
            # the slot records still name every entry of this slab.  A
            # repair is the rebuild; nothing is taken from that index.
            add(res, "index belongs to another slab",
                 f"the index's creation id is not the slab's; run `slabcache fsck {paths.root} "
                 "--rebuild-index`, which rebuilds it from the slot records", fixed=repair)
            rebuild = repair
        if idx is None or rebuild:
            if idx is None:
                add(res, "index unreadable",
                     f"the LMDB index of {paths.root} is missing or damaged; run `slabcache fsck "
                     f"{paths.root} --rebuild-index`, which rebuilds it from the slot records",
                     fixed=rebuild)
            if not rebuild:
                return
            if idx is not None:
                idx.release()
                idx = None
            rebuild_from_records(paths, g, creation_id, res, progress)
            return
        before = len(res.findings)
        try:
            with SlotRecords(paths.slab, g, writable=repair) as records:
                _check_index(records, g, creation_id, idx, res, repair, deep, progress, found_size)
                if repair and len(res.findings) > before:
                    # A repair must leave a clean index: when damage keeps
                    # what was fixed from sticking, rebuild from the records.
                    again = CheckResult(paths.root)
                    _check_index(records, g, creation_id, idx, again, False, False, False,
                                 os.path.getsize(paths.slab))
                    if again.findings:
                        raise CorruptStoreError(
                            f"repairs did not hold: {again.findings[0].kind}")
        except CorruptStoreError as exc:
            # The B-tree itself is damaged (LMDB cannot walk it): what was
            # found in it so far is moot; the slot records still name every
            # entry, so a repair rebuilds the index from them.
            del res.findings[before:]
            add(res, "index damaged", str(exc).split("; run")[0], fixed=repair)
            if repair:
                idx.release()
                idx = None
                rebuild_from_records(paths, g, creation_id, res, progress)
    finally:
        if idx is not None:
            idx.release()


def _check_header(slab_path, idx, res, repair) -> tuple[Geometry | None, bytes | None, bool]:
    """The slab's geometry and creation id, and whether the index belongs
    to another slab.  A damaged header is restored from the index's copy
    only when that copy fits this slab; a sound header is never replaced
    by the copy of a foreign index."""
    raw = read_header_bytes(slab_path)
    copy = index_id = None
    if idx is not None:
        try:
            with idx.read() as t:
                copy, index_id = t.header_copy(), t.creation_id()
        except CorruptStoreError:
            pass  # the index check reports it

    try:
        found = unpack_header(raw, slab_path)
    except CorruptStoreError as exc:
        fixable = copy is not None and "newer than" not in str(exc) and _copy_fits(
            slab_path, copy, idx)
        if fixable and repair:
            write_header_bytes(slab_path, copy)
        detail = str(exc) if copy is None or fixable else (
            f"{exc}; the index's copy of the header does not fit this slab (another store's "
            "index?), so nothing restores it")
        add(res, "slab header damaged", detail, fixed=fixable and repair)
        return (*unpack_header(copy, slab_path), False) if fixable else (None, None, False)
    if index_id is not None and index_id != found[1]:
        return (*found, True)
    if copy is None or copy == raw[:len(copy)]:
        return (*found, False)
    # The header's checksum holds but it disagrees with the copy the index
    # took at creation: the entries were laid out by the copy, so trust it.
    try:
        expected = unpack_header(copy, slab_path)
    except CorruptStoreError:
        return (*found, False)
    if expected[0] == found[0] and expected[1] == found[1]:
        return (*found, False)  # the same store, only the version differs (an upgrade)
    if repair:
        write_header_bytes(slab_path, copy)
    add(res, "slab header differs from the index's copy",
         f"the header says {found[0].slot_count} slots of {found[0].slot_bytes} bytes, the "
         f"index's copy {expected[0].slot_count} of {expected[0].slot_bytes}", fixed=repair)
    return (*expected, False)


def _copy_fits(slab_path: str, copy: bytes, idx: Index) -> bool:
    """Whether the index's copy of the header describes this slab: the size
    matches, and the slot records agree with the index's entries (a copied
    index of a store with the same geometry passes the first test only)."""
    try:
        g, _ = unpack_header(copy, slab_path)
    except CorruptStoreError:
        return False
    if os.path.getsize(slab_path) != g.file_bytes:
        return False
    with idx.read() as t:
        sample = [e for _, e in zip(range(16), t.entries())]
    if not sample:
        return True  # nothing to go wrong: the index names no entry
    with SlotRecords(slab_path, g, writable=False) as records:
        agree = sum(1 for e in sample if 0 <= e.slot < g.slot_count
                    and (rec := records.read(e.slot)) is not None and rec.key_hash == key_hash(e.canon))
    return agree * 2 > len(sample)


def _check_size(slab_path, g: Geometry, res, repair) -> int:
    """The file's size as found (before any repair extends it)."""
    size = os.path.getsize(slab_path)
    if size >= g.file_bytes:
        return size
    lost = [s for s in range(g.slot_count) if g.slot_offset(s) + g.slot_bytes > size]
    if repair:
        extend_slab(slab_path, g.file_bytes)
    add(res, "slab truncated",
         f"file is {size} bytes, its header says {g.file_bytes}; slots {lost[0]}.. lost their data"
         if lost else f"file is {size} bytes, its header says {g.file_bytes}", fixed=repair)
    return size


def _check_index(records: SlotRecords, g, creation_id, idx: Index, res, repair, deep, progress,
                 size) -> None:
    """Check the index against the slot records (and, with ``deep``, the
    payloads).  Without ``repair`` the store may be in use: what disagrees
    with the snapshot read here is a finding only if it still disagrees in
    a fresh transaction (see _confirmed)."""
    with idx.read() as t:
        if t.creation_id() != creation_id:
            add(res, "index belongs to another slab", "creation ids differ; use --rebuild-index",
                 fixed=False)
            return
        policy = t.policy()
        raw_entries = t.raw_entries()
        free = dict(t.free_slots())
        next_unused = t.next_unused()
        reserved = t.reservations()
        pins = t.all_pins()
        handles = t.owners()
        order = dict(t.order_keys())
    in_use = not repair

    drop: dict[bytes, Entry] = {}
    bad_raw: list[bytes] = []
    entries: list[Entry] = []
    for k, v in raw_entries:
        try:
            e = Entry.decode(k, v)
            e.meta  # noqa: B018 - decoding validates the description
            entries.append(e)
        except CorruptStoreError:
            bad_raw.append(k)
            add(res, "unreadable entry", "index entry cannot be decoded", fixed=repair, key=k)
    res.entries = len(entries)

    by_slot: dict[int, list[Entry]] = {}
    for e in entries:
        key = e.canon
        if not 0 <= e.slot < g.slot_count:
            add(res, "slot out of range", f"entry points at slot {e.slot} of {g.slot_count}",
                 repair, e.slot, key)
            drop[e.ikey] = e
            continue
        if e.length > g.slot_bytes or e.length != e.meta.length:
            add(res, "bad length", f"{e.length} bytes in a slot of {g.slot_bytes}", repair, e.slot, key)
            drop[e.ikey] = e
            continue
        if g.slot_offset(e.slot) + g.slot_bytes > size:
            add(res, "slot past end of file", "the slab was truncated under this entry",
                 repair, e.slot, key)
            drop[e.ikey] = e
            continue
        by_slot.setdefault(e.slot, []).append(e)

    stored = {e.canon for e in entries}
    rewrite: list[Entry] = []  # entries kept whose record is rewritten from them
    restore: list[tuple[int, object, bytes, object]] = []  # records that become entries again
    for slot, es in by_slot.items():
        rec = records.read(slot)
        good = [e for e in es if agrees(rec, e)]
        if len(es) > 1:
            add(res, "shared slot", f"{len(es)} entries point at slot {slot}", repair, slot,
                 [x.canon for x in es])
            for e in es:
                if e not in good or len(good) > 1:  # cannot tell which is right: keep none
                    drop[e.ikey] = e
            continue
        e = es[0]
        if good or not confirmed(idx, lambda t, e=e: still_disagrees(t, records, e), in_use):
            continue
        # The record and the entry disagree: keep whichever the payload proves.
        data = records.read_payload(slot, g.slot_bytes)
        if not e.checksum or checksum([data[:e.length]]) == e.checksum:
            add(res, "record out of date", "the slot's own record disagrees with the index; the "
                 "payload matches the index entry, so the record is rewritten from it", repair,
                 slot, e.canon)
            rewrite.append(e)
            continue
        drop[e.ikey] = e
        own = record_entry(rec, data, g)
        if own is not None and (own[0] == e.canon or own[0] not in stored):
            add(res, "entry does not match its payload", "the slot's own record does, so the "
                 "entry is restored from the record", repair, slot, e.canon)
            restore.append((slot, rec, *own))
        else:
            add(res, "entry does not match its payload", "nor does the slot's own record; the "
                 "entry is dropped", repair, slot, e.canon)

    if deep:
        bar = Progress(sum(e.length for e in entries if e.ikey not in drop), "scrub ", progress)
        for e in entries:
            if e.ikey in drop:
                continue
            data = records.read_payload(e.slot, e.length)
            res.bytes_scrubbed += len(data)
            bar.add(len(data))
            if e.checksum and checksum([data]) != e.checksum and confirmed(
                    idx, lambda t, e=e: still_fails(t, records, e), in_use):
                add(res, "checksum mismatch", "payload bytes differ from their checksum",
                     repair, e.slot, e.canon)
                drop[e.ikey] = e

    live = {e.slot: e for e in entries if e.ikey not in drop and 0 <= e.slot < g.slot_count}
    live.update({slot: None for slot, *_ in restore})
    live_res = {s: (gen, who) for s, gen, who in reserved if idx.alive(who)}
    for s, _gen, who in reserved:
        if not idx.alive(who):
            add(res, "stale reservation", f"slot {s} was being written by dead pid "
                 f"{pid_of(who)}", repair, s)
    both = sorted(set(free) & set(live))
    for s in both:
        add(res, "slot free and used", f"slot {s} is on the free list and holds an entry", repair, s)
    beyond = sorted(s for s in free if s >= g.slot_count)
    for s in beyond:
        add(res, "free slot out of range", f"free list names slot {s}", repair, s)
    # A free slot keeps no record: an index rebuilt from the records would
    # bring back what was evicted, removed or never committed.
    stale = [s for s in sorted(free) if s < g.slot_count and s not in live
             and records.read(s) is not None
             and confirmed(idx, lambda t, s=s: still_free_with_record(t, records, s), in_use)]
    for s in stale:
        add(res, "stale record", f"free slot {s} still has a record (a put or an eviction was "
             "cut short); a rebuilt index would bring its entry back", repair, s)
    high = max([next_unused - 1, *live.keys(), *free.keys(), *live_res.keys()], default=-1)
    if next_unused < g.slot_count and any(s >= next_unused for s in live):
        add(res, "allocation mark too low", f"entries above the mark {next_unused}", repair)
    mark = min(g.slot_count, max(next_unused, high + 1))
    leaked = [s for s in range(mark) if s not in live and s not in free and s not in live_res]
    dropped_slots = {e.slot for e in drop.values() if 0 <= e.slot < g.slot_count}
    leaked_reported = [s for s in leaked if s not in dropped_slots
                       and s not in {r[0] for r in reserved}]
    for s in leaked_reported:
        add(res, "leaked slot", f"slot {s} is neither free nor used", repair, s)

    expected = {policy.order_key(e.slot, e.use): e.ikey for e in entries}
    if expected != order:
        add(res, "policy order out of step",
             f"{len(set(order) ^ set(expected))} order records disagree with the entries", repair)
    stale_pins = [(k, w) for k, w, _n in pins if not idx.alive(w)]
    for k, w in stale_pins:
        add(res, "stale pin", f"pin held by dead pid {pid_of(w)}", repair, key=k)
    stale_handles = [w for w, _t, _wr in handles if not idx.alive(w)]

    if not repair:
        return
    now = time.time()
    with idx.write(durable=True) as t:
        for k in bad_raw:
            t.drop_entry_key(k)
        for e in drop.values():
            t.drop_entry_key(e.ikey)
        for s in both + beyond:
            t.forget_free(s)
        for s, _gen, who in reserved:
            if not idx.alive(who):
                t.unreserve(s)
        t.set_next_unused(mark)
        for s in range(mark):
            if s not in live and s not in live_res and (s not in free or s in both):
                t.release_slot(s, free.get(s, 0) if s not in both else 0)
        t.rebuild_order(policy, [e for e in live.values() if e is not None])
        for slot, rec, canon, meta in restore:
            t.add(index_key(canon), canon, slot, rec.generation, rec.length, rec.checksum,
                     meta.encode(), policy, now)
        for k, w in stale_pins:
            t.delete_pin(k, w)
        for w in stale_handles:
            t.unregister_owner(w)
        vacated = set(t.vacated or ())
    for e in rewrite:
        records.write_fields(e.slot, e.generation, e.length, e.checksum, key_hash(e.canon),
                             record_meta(e.canon, e.meta_raw))
    # Every slot left free has no record: what was dropped, reaped or stale.
    for s in sorted((vacated | set(stale) | dropped_slots) - set(live)):
        records.clear(s)


