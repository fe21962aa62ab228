"""slabcache: a memory-mapped slab store for LLM KV-cache chunks on local NVMe.

The package is layered; each layer imports only those before it:

``errors`` <- ``format`` <- ``device``, ``index``, ``runtime`` <- ``core``
<- ``admin``, ``bench``, ``testing``, ``integrations`` <- ``cli``

See ARCHITECTURE.md for the rooms and how a put and a get flow through them.
"""

from .core import PutStatus, SlabStore, StoreOptions
from .errors import (
    ConfigError, CorruptStoreError, EntryTooLargeError, InvalidKeyError, LayoutMismatchError,
    QueueFullError, SlabcacheError, SlabIOError, StorageFullError, StoreBusyError,
    StoreClosedError, StoreForkedError, UnsupportedValueError,
)
from .format import FORMAT_VERSION
from .format.values import ValueDesc

__version__ = "0.1.0"

__all__ = [
    "SlabStore", "StoreOptions", "PutStatus", "ValueDesc", "FORMAT_VERSION", "__version__",
    "SlabcacheError", "ConfigError", "LayoutMismatchError", "EntryTooLargeError",
    "InvalidKeyError", "UnsupportedValueError", "CorruptStoreError", "StoreClosedError",
    "StoreForkedError", "StoreBusyError", "StorageFullError", "QueueFullError", "SlabIOError",
]
