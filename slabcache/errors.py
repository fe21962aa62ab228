"""One error hierarchy for slabcache.

Every error names what was wrong and what to do about it.  Where a builtin
fits, the error also inherits it, so callers' existing ``except ValueError``
or ``except KeyError`` keep working.
"""

from __future__ import annotations


class SlabcacheError(Exception):
    """Base of every error slabcache raises on purpose."""


class ConfigError(SlabcacheError, ValueError):
    """A setting or argument is invalid; the message says which and why."""


class LayoutMismatchError(ConfigError):
    """The store on disk was created with another geometry than requested."""


class EntryTooLargeError(SlabcacheError, ValueError):
    """A value does not fit in one slot."""


class InvalidKeyError(SlabcacheError, ValueError):
    """A key is not a non-empty str or bytes."""


class UnsupportedValueError(SlabcacheError, TypeError):
    """A value is not a tensor (or list of tensors) slabcache can store."""


class CorruptStoreError(SlabcacheError):
    """The slab or its index is damaged; ``slabcache fsck`` can say how."""


class StoreClosedError(SlabcacheError, RuntimeError):
    """The store was closed; open it again to keep using it."""


class StoreForkedError(StoreClosedError):
    """A handle opened before ``fork()`` was used in the child: LMDB handles
    cannot cross a fork, so the child must open the store itself."""


class StoreBusyError(SlabcacheError, RuntimeError):
    """Another process holds the store in a way that forbids this operation."""


class StorageFullError(SlabcacheError, OSError):
    """The filesystem has no room for what was asked."""


class QueueFullError(SlabcacheError, RuntimeError):
    """The asynchronous put queue is full and the store rejects new puts."""


class SlabIOError(SlabcacheError, OSError):
    """Reading or writing the slab failed at the operating-system level."""
