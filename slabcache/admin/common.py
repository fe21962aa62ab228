"""What the admin commands share: opening a possibly damaged index, and
naming the processes that have a store open."""

from __future__ import annotations

import os

import lmdb

from ..errors import ConfigError, CorruptStoreError
from ..format.layout import SLAB, StorePaths
from ..index import Index, default_map_size


def existing_store(path: str | os.PathLike) -> StorePaths:
    """The paths of the store at ``path``.  Raises ConfigError when there is none."""
    paths = StorePaths(path)
    if not os.path.isdir(paths.root) or not os.path.exists(paths.slab):
        raise ConfigError(f"no slabcache store at {paths.root} (no {SLAB} file)")
    return paths


def open_index(paths: StorePaths, writable: bool) -> Index | None:
    """The store's index, or None when it is missing or too damaged to read."""
    if not os.path.exists(paths.lmdb_data):
        return None
    try:
        idx = Index.acquire(paths.index, map_size=default_map_size(0), readonly=not writable)
    except (CorruptStoreError, lmdb.Error):
        return None
    try:
        with idx.read() as t:
            t.creation_id()
            t.entry_count()
        return idx
    except (CorruptStoreError, lmdb.Error):
        idx.release()
        return None


def store_users(paths: StorePaths) -> list[int]:
    """Pids of live processes that have the store open (best effort)."""
    try:
        idx = Index.acquire(paths.index, map_size=1 << 20, readonly=True)
    except Exception:
        return []
    try:
        with idx.read() as t:
            return t.live_pids()
    finally:
        idx.release()
