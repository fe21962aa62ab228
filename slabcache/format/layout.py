"""Names of everything a store keeps on disk, in one place.

A store is a directory::

    PATH/slab            the preallocated slab file (header, slot records, slots)
    PATH/index/          the LMDB environment (data.mdb, lock.mdb)
    PATH/lock            held shared by every open handle, exclusively by repair
    PATH/compact.new/    a store being built by `slabcache compact`
    PATH/compact.commit  marker: the compaction is committed, finish the switch
    PATH/compact.old/    what a finished switch moved aside (removed after)
    PATH/index.rebuild/  an index being rebuilt by `slabcache fsck --rebuild-index`

Every module that opens, checks or rewrites a store takes names from here.
"""

from __future__ import annotations

import os

SLAB = "slab"
INDEX = "index"
LOCK = "lock"
LMDB_DATA = "data.mdb"
COMPACT_NEW = "compact.new"
COMPACT_OLD = "compact.old"
COMPACT_MARKER = "compact.commit"
INDEX_REBUILD = "index.rebuild"
# The parts a compaction replaces, in the order it moves them.
SWAPPED = (SLAB, INDEX)
# A slab being created is written under this suffix and renamed when whole.
CREATING_SUFFIX = ".new"


# A KV cache holds enough to reconstruct users' prompts: by default only the
# owner may read it.  ``share_group`` stores give their group the same access.
FILE_MODE, DIR_MODE = 0o600, 0o700
GROUP_FILE_MODE, GROUP_DIR_MODE = 0o660, 0o770


def modes(share_group: bool) -> tuple[int, int]:
    """(file mode, directory mode) for a store's files."""
    return (GROUP_FILE_MODE, GROUP_DIR_MODE) if share_group else (FILE_MODE, DIR_MODE)


class StorePaths:
    """The absolute paths of one store's files."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        self.slab = os.path.join(self.root, SLAB)
        self.index = os.path.join(self.root, INDEX)
        self.lmdb_data = os.path.join(self.index, LMDB_DATA)
        self.lock = os.path.join(self.root, LOCK)
        self.slab_creating = self.slab + CREATING_SUFFIX
        self.compact_new = os.path.join(self.root, COMPACT_NEW)
        self.compact_old = os.path.join(self.root, COMPACT_OLD)
        self.compact_marker = os.path.join(self.root, COMPACT_MARKER)
        self.index_rebuild = os.path.join(self.root, INDEX_REBUILD)

    def __repr__(self) -> str:
        return f"StorePaths({self.root!r})"
