"""A store on a filesystem that fills up: run as
``python -m slabcache.testing.fullfs DIR [reads]`` with DIR a small
filesystem of its own (a tmpfs mounted for the run); prints a JSON report.
``reads``: batched reads and key-list writes of thousands of keys instead
(run_reads).

The store is made, the filesystem is filled with another file, then puts
and gets go on until puts fail; the handle is closed and reopened
(read-only and writable) while full; then the filler is removed and
writing must work again.  A SIGBUS anywhere kills the process, which is
what the caller checks first.
"""

from __future__ import annotations

import errno
import json
import os
import sys

from ..admin.fsck import check
from ..core import SlabStore
from ..errors import StorageFullError
from ..index import room as index_room
from .values import expected


def _fill(path: str) -> int:
    """Write ``path`` until the filesystem has no room left; its size."""
    chunk = b"\xa5" * (1 << 20)
    size = 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                size += f.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        for n in (65536, 4096, 512):  # the last blocks too
            try:
                while True:
                    size += f.write(chunk[:n])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return size


def _check_all(s: SlabStore, keys) -> tuple[int, int, int]:
    right = miss = wrong = 0
    for k in keys:
        v = s.get(k)
        if v is None:
            miss += 1
        elif v.shape == expected(k).shape and bool((v == expected(k)).all()):
            right += 1
        else:
            wrong += 1
    return right, miss, wrong


def run(root: str) -> dict:
    # A small headroom, so the index runs out of room within the run.
    index_room.INDEX_HEADROOM = 256 << 10
    index_room.INDEX_MIN_HEADROOM = 64 << 10
    rep = {"acked_before": 0, "acked_full": 0, "refused_full": 0, "other_errors": [],
           "wrong": 0, "gets_full": 0, "reopen_full": None, "readonly_full": None,
           "acked_after": 0, "right_end": 0, "fsck_exit": None}
    path = os.path.join(root, "s")
    acked = []
    # Room for more entries than the index has headroom for, so it must grow.
    s = SlabStore.open(path, capacity_bytes=2048 * 4096, slot_bytes=4096)
    for i in range(40):
        if s.put(f"k{i}", expected(f"k{i}")):
            acked.append(f"k{i}")
    rep["acked_before"] = len(acked)
    _fill(os.path.join(root, "filler"))
    for i in range(40, 4000):
        k = f"k{i}"
        try:
            if s.put(k, expected(k)):
                acked.append(k)
                rep["acked_full"] += 1
        except StorageFullError:
            rep["refused_full"] += 1
        except Exception as exc:  # anything else is a defect
            rep["other_errors"].append(f"{type(exc).__name__}: {exc}")
        if rep["refused_full"] >= 50:
            break
        if i % 10 == 0:
            _r, _m, w = _check_all(s, acked[-20:])
            rep["wrong"] += w
            rep["gets_full"] += 20
    for _ in range(8):  # enough hits for their uses to be due for recording
        _r, _m, w = _check_all(s, acked)
        rep["wrong"] += w
        rep["gets_full"] += len(acked)
    s.close()
    try:
        with SlabStore.open(path) as s:
            rep["reopen_full"] = "opened"
            rep["wrong"] += _check_all(s, acked)[2]
    except StorageFullError as exc:
        rep["reopen_full"] = f"StorageFullError: {exc}"
    with SlabStore.open(path, readonly=True) as s:
        r, _m, w = _check_all(s, acked)
        rep["readonly_full"] = r
        rep["wrong"] += w
    os.unlink(os.path.join(root, "filler"))
    with SlabStore.open(path) as s:
        for i in range(4000, 4100):
            if s.put(f"k{i}", expected(f"k{i}")):
                acked.append(f"k{i}")
                rep["acked_after"] += 1
        r, _m, w = _check_all(s, acked)
        rep["right_end"] = r
        rep["wrong"] += w
    rep["fsck_exit"] = check(path, progress=False).exit_code
    return rep


def run_reads(root: str, keys: int = 4000) -> dict:
    """Batched reads and key-list writes of thousands of keys on a full
    filesystem: each records a use or a pin per key in one transaction,
    which must find its room first (a write into a hole of the index's
    map is a SIGBUS there).  Per operation: "ok" or "full" (refused with
    StorageFullError); anything else is listed in ``other_errors``."""
    index_room.INDEX_HEADROOM = 256 << 10
    index_room.INDEX_MIN_HEADROOM = 64 << 10
    rep: dict = {"stored": 0, "ops": {}, "other_errors": [], "wrong": 0, "right_after": 0}
    path = os.path.join(root, "s")
    names = [f"k{i}" for i in range(keys - 1)]
    with SlabStore.open(path, capacity_bytes=keys * 4096, slot_bytes=4096) as s:
        for j in range(0, len(names), 16):  # batches small enough to fit before the filler
            s.put_many(names[j:j + 16], [expected(k, 600) for k in names[j:j + 16]])
        rep["stored"] = len(s)
        _fill(os.path.join(root, "filler"))
        ops = (("get_many", lambda: s.get_many(names)), ("touch", lambda: s.touch(names)),
               ("pin_prefix", lambda: s.prefix(names, pin=True)), ("unpin_many", lambda: s.unpin(names)),
               ("get_many again", lambda: s.get_many(names)), ("put", lambda: s.put("x", expected("x"))),
               ("clear", s.clear))
        for name, op in ops:
            try:
                got = op()
                rep["ops"][name] = "ok"
                if name.startswith("get_many"):
                    rep["wrong"] += sum(1 for k, v in zip(names, got)
                                        if v is not None and not bool((v == expected(k, 600)).all()))
            except StorageFullError:
                rep["ops"][name] = "full"
            except Exception as exc:  # anything else is a defect
                rep["other_errors"].append(f"{name}: {type(exc).__name__}: {exc}")
    os.unlink(os.path.join(root, "filler"))
    with SlabStore.open(path) as s:
        got = s.get_many(names)
        rep["right_after"] = sum(1 for k, v in zip(names, got)
                                 if v is not None and bool((v == expected(k, 600)).all()))
        rep["wrong"] += sum(1 for k, v in zip(names, got)
                            if v is not None and not bool((v == expected(k, 600)).all()))
    rep["fsck_exit"] = check(path, progress=False).exit_code
    return rep


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "reads":
        print(json.dumps(run_reads(sys.argv[1])))
        sys.stdout.flush()
        sys.exit(0)
    print(json.dumps(run(sys.argv[1])))
    sys.stdout.flush()
    sys.exit(0)
