"""The index layer: LMDB, the single source of truth for what lives where.

``env``     the environment (one per store per process, shared)
``txn``     typed operations over a transaction; the one release path
``entry``   index entries and their codec
``policy``  eviction policies over use statistics (no disk needed)
``owner``   process identity for pins, reservations, open handles
"""

from .env import Index, default_map_size
from .entry import Entry
from .txn import COUNTERS, IndexTxn

__all__ = ["COUNTERS", "Entry", "Index", "IndexTxn", "default_map_size"]
