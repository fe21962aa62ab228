"""Checking a store others may be writing: a disagreement fsck finds
against its snapshot of the index counts only if it still holds in fresh
transactions; and what a slot's record or payload proves."""

from __future__ import annotations

import struct
import time

from ..device.slabfile import SlotRecords
from ..errors import CorruptStoreError
from ..format.checksum import checksum
from ..format.header import Geometry
from ..format.keys import key_hash
from ..format.records import unpack_record_meta
from ..index import Entry, Index

CONFIRM_TRIES = 5
CONFIRM_PAUSE = 0.02  # seconds: a writer between its record write and its commit


def confirmed(idx: Index, still_wrong, in_use: bool) -> bool:
    """Whether a disagreement found against the snapshot is real.  In a
    store others may be writing, records and payloads are read after the
    snapshot was taken: the disagreement must hold in fresh transactions,
    a few times over, since a writer writes a slot's record before it
    commits the entry (and clears it before committing an eviction)."""
    if not in_use:
        return True
    for i in range(CONFIRM_TRIES):
        if i:
            time.sleep(CONFIRM_PAUSE)
        with idx.read() as t:
            if not still_wrong(t):
                return False
    return True


def agrees(rec, e: Entry) -> bool:
    return (rec is not None and rec.key_hash == key_hash(e.canon) and rec.generation == e.generation
            and rec.length == e.length and rec.checksum == e.checksum)


def _current(t, e: Entry) -> bool:
    cur = t.entry(e.ikey)
    return cur is not None and (cur.slot, cur.generation) == (e.slot, e.generation)


def still_disagrees(t, records: SlotRecords, e: Entry) -> bool:
    return _current(t, e) and not agrees(records.read(e.slot), e)


def still_fails(t, records: SlotRecords, e: Entry) -> bool:
    return _current(t, e) and checksum([records.read_payload(e.slot, e.length)]) != e.checksum


def still_free_with_record(t, records: SlotRecords, slot: int) -> bool:
    return t.is_free(slot) and records.read(slot) is not None


def record_entry(rec, data: bytes, g: Geometry):
    """(key, value description) of a record that describes the payload
    ``data`` (its key, length and checksum all hold), or None."""
    if rec is None or not rec.meta or not rec.checksum or rec.length > g.slot_bytes:
        return None
    try:
        canon, meta = unpack_record_meta(rec.meta)
    except (CorruptStoreError, struct.error):
        return None
    if (key_hash(canon) != rec.key_hash or meta.length != rec.length
            or checksum([data[:rec.length]]) != rec.checksum):
        return None
    return canon, meta
