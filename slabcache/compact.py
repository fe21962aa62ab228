"""Compaction: shrink, grow or re-slot a store; reclaim index space.

The live entries are copied (checksums verified) into a new store built in
``PATH/compact.new``; the most valuable entries by the store's policy are
kept when not all fit.  Then a marker file commits the switch, and the new
slab and index are renamed into place.  ``recover`` (run by every open)
finishes a switch whose marker exists and discards a half-built new store
whose marker does not, so a crash at any point leaves the old or the new
store, never a mix.  The new store needs disk space beside the old one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field

import torch

from .check import _Bar, _exclusive, _open_index
from .errors import ConfigError, CorruptStoreError
from .format import checksum, decode_key, index_key
from .policy import make_policy
from .slab import SLAB_NAME, read_slab_header

log = logging.getLogger(__name__)

NEW_DIR = "compact.new"
OLD_DIR = "compact.old"
MARKER = "compact.commit"
_PARTS = ("slab", "index")

# Fault injection for tests: name a phase ("copy", "marker", "swap") and the
# compaction kills itself there, as a crash or an operator's kill -9 would.
_CRASH_ENV = "SLABCACHE_COMPACT_CRASH_AT"


def _crash_point(phase: str) -> None:
    if os.environ.get(_CRASH_ENV) == phase:
        os.kill(os.getpid(), signal.SIGKILL)


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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(path: str) -> None:
    """Finish or undo an interrupted compaction (caller holds the directory lock)."""
    new = os.path.join(path, NEW_DIR)
    old = os.path.join(path, OLD_DIR)
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        os.makedirs(old, exist_ok=True)
        for part in _PARTS:
            src = os.path.join(new, part)
            if os.path.exists(src):
                cur = os.path.join(path, part)
                if os.path.exists(cur):
                    os.rename(cur, os.path.join(old, part))
                os.rename(src, cur)
        _fsync_dir(path)
        os.unlink(marker)
        _fsync_dir(path)
        log.warning("store %s: finished an interrupted compaction", path)
    for d in (new, old):
        if os.path.exists(d):
            shutil.rmtree(d)


def compact(path: str | os.PathLike, *, capacity_bytes: int | None = None,
            slot_bytes: int | None = None, progress: bool = True) -> CompactResult:
    """Rewrite the store at ``path`` with a new capacity and/or slot size.

    Raises ConfigError (no store, bad sizes), StoreBusyError (open elsewhere).
    """
    from .store import SlabStore

    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(os.path.join(path, SLAB_NAME)):
        raise ConfigError(f"no slabcache store at {path} (no {SLAB_NAME} file)")
    for name, v in (("capacity", capacity_bytes), ("slot bytes", slot_bytes)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ConfigError(f"{name} must be a positive number of bytes, got {v!r}")
    t0 = time.perf_counter()
    res = CompactResult(path)
    # Exclusive for the whole run: entries written meanwhile would be lost
    # at the switch.  The source is read through its index and slab
    # directly, since opening it as a store would wait on our own lock.
    dir_fd, lock_fd = _exclusive(path)
    try:
        recover(path)
        slab_path = os.path.join(path, SLAB_NAME)
        g, _ = read_slab_header(slab_path)
        new_slot = slot_bytes or g.slot_bytes
        new_cap = capacity_bytes or g.slot_count * new_slot
        idx = _open_index(path, writable=False)
        if idx is None:
            raise CorruptStoreError(f"the index of {path} is unreadable; run `slabcache fsck {path} "
                                    "--rebuild-index` first")
        new_dir = os.path.join(path, NEW_DIR)
        shutil.rmtree(new_dir, ignore_errors=True)
        try:
            with idx.read() as t:
                policy = make_policy((t.meta_get("policy") or b"lru").decode())
                ordered = [ikey for _o, ikey in t.order_keys(reverse=policy.from_end)]
                entries = {e.ikey: e for e in t.entries()}
            res.before = {"slots_total": g.slot_count, "slot_bytes": g.slot_bytes,
                          "capacity_bytes": g.capacity_bytes, "slots_used": len(entries)}
            dst = SlabStore.open(new_dir, capacity_bytes=new_cap, slot_bytes=new_slot,
                                 policy=policy.name)
            fd = os.open(slab_path, os.O_RDONLY)
            try:
                _copy(fd, g, policy, ordered, entries, dst, res, progress)
                res.after = {k: dst.stats()[k] for k in
                             ("slots_total", "slot_bytes", "capacity_bytes", "slots_used")}
                dst.index.env.sync(True)
                os.fsync(dst.records.fd)
            finally:
                os.close(fd)
                dst.close()
        finally:
            idx.release()
        os.unlink(os.path.join(new_dir, "lock"))
        _fsync_dir(new_dir)
        _crash_point("marker")
        with open(os.path.join(path, MARKER), "w") as f:
            json.dump({"started": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path)
        _crash_point("swap")
        recover(path)
    finally:
        os.close(lock_fd)
        os.close(dir_fd)
    res.seconds = time.perf_counter() - t0
    return res


def _copy(fd, g, policy, ordered, entries, dst, res: CompactResult, progress: bool) -> None:
    # Eviction order runs least to most valuable: keep from the valuable end.
    ranked = [entries[k] for k in reversed(ordered) if k in entries]
    ranked += [e for k, e in entries.items() if e not in ranked]  # order records missing
    fits = [e for e in ranked if e.length <= dst.geometry.slot_bytes]
    keep = fits[:dst.geometry.slot_count]
    kept_ids = {e.ikey for e in keep}
    res.dropped = [{"key": repr(decode_key(e.canon)), "bytes": e.length,
                    "why": "larger than the new slot" if e.length > dst.geometry.slot_bytes
                    else "no room: the policy ranked it lowest"}
                   for e in ranked if e.ikey not in kept_ids]
    bar = _Bar(sum(e.length for e in keep), "compact", progress)
    for e in reversed(keep):  # least valuable first, so the policy order carries over
        data = os.pread(fd, e.length, g.slot_offset(e.slot)) if e.length else b""
        if len(data) != e.length or (e.checksum and checksum([data]) != e.checksum):
            res.dropped.append({"key": repr(decode_key(e.canon)), "bytes": e.length,
                                "why": "failed its checksum"})
            continue
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        parts, pos = [], 0
        for n in e.meta.nbytes:
            parts.append(buf[pos:pos + n])
            pos += n
        dst._put_parts(e.canon, index_key(e.canon), parts, e.meta)
        res.kept += 1
        bar.add(e.length)
        _crash_point("copy")
