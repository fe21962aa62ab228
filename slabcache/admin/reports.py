"""Read-only summaries of a store for `slabcache stats` and `slabcache ls`.

Everything here peeks: no use is recorded, nothing is written.
"""

from __future__ import annotations

import time
from collections import Counter

from ..core import SlabStore
from ..format.keys import display_key


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def store_stats(s: SlabStore) -> dict:
    st = s.stats()
    by_kind: Counter = Counter()
    oldest = newest = None
    with s.snapshot() as snap:
        for e in snap.entries():
            kind = ", ".join(f"{d}{list(sh)}" for d, sh in zip(e.meta.dtypes, e.meta.shapes))
            by_kind[kind] += e.length
            if oldest is None or e.created < oldest[1]:
                oldest = (display_key(e.canon), e.created)
            if newest is None or e.created > newest[1]:
                newest = (display_key(e.canon), e.created)
        open_by = snap.open_pids()
    st["open_by_pids"] = open_by
    st["oldest_entry"] = f"{oldest[0]!r} at {_when(oldest[1])}" if oldest else "-"
    st["newest_entry"] = f"{newest[0]!r} at {_when(newest[1])}" if newest else "-"
    st["bytes_by_dtype_shape"] = dict(by_kind.most_common())
    return st


def list_entries(s: SlabStore) -> list[dict]:
    rows = []
    with s.snapshot() as snap:
        pinned = snap.pinned()
        for e in snap.entries():
            rows.append({
                "key": display_key(e.canon),
                "bytes": e.length,
                "shapes": [list(sh) for sh in e.meta.shapes],
                "dtypes": list(e.meta.dtypes),
                "pinned": e.ikey in pinned,
                "last_use": _when(e.used),
                "hits": e.use.hits,
                "slot": e.slot,
            })
    return rows
