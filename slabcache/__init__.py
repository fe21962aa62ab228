"""slabcache: a memory-mapped slab store for LLM KV-cache chunks on local NVMe."""

from .errors import (
    ConfigError, CorruptStoreError, EntryTooLargeError, InvalidKeyError, LayoutMismatchError,
    QueueFullError, SlabcacheError, SlabIOError, StorageFullError, StoreBusyError,
    StoreClosedError, UnsupportedValueError,
)
from .format import FORMAT_VERSION
from .store import SlabStore

__version__ = "0.1.0"

__all__ = [
    "SlabStore", "FORMAT_VERSION", "__version__",
    "SlabcacheError", "ConfigError", "LayoutMismatchError", "EntryTooLargeError",
    "InvalidKeyError", "UnsupportedValueError", "CorruptStoreError", "StoreClosedError",
    "StoreBusyError", "StorageFullError", "QueueFullError", "SlabIOError",
]
