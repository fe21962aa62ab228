"""Eviction policies over slot numbers.

A policy never sees keys, the index or the disk: it turns an entry's use
statistics into a sortable byte string.  The index keeps those strings in an
LMDB table, so the eviction order is shared by every process and survives a
restart; the victim is the first unpinned slot in that order (from the end
for MRU).  This makes each policy testable with nothing but ``sorted()``.
"""

from __future__ import annotations

import abc
import struct
from typing import NamedTuple

from ..errors import ConfigError

_BE = struct.Struct(">Q")
# Order keys packed in one call (every put and every recorded use makes two).
_BE2 = struct.Struct(">QQ")
_BE3 = struct.Struct(">QQQ")


class UseStats(NamedTuple):
    """What the index tracks per entry on behalf of the policy."""

    tick: int  # logical clock of the last use (shared, monotonic)
    hits: int  # number of uses since insertion
    inserted: int  # logical clock at insertion


class Policy(abc.ABC):
    """Orders entries for eviction; subclasses define ``order_key``."""

    name: str = ""
    # True when the victim is the *last* entry in key order (MRU).
    from_end: bool = False
    # True when an entry's order key, new or after a use, sorts after every
    # other (it leads with the clock, which only grows): the index appends it.
    files_last: bool = False

    @abc.abstractmethod
    def order_key(self, slot: int, use: UseStats) -> bytes:
        """Sortable bytes ending with the slot number (see ``slot_of``)."""


class LRU(Policy):
    name = "lru"
    files_last = True

    def order_key(self, slot: int, use: UseStats) -> bytes:
        return _BE2.pack(use.tick, slot)


class MRU(LRU):
    name = "mru"
    from_end = True


class FIFO(Policy):
    name = "fifo"
    files_last = True  # for new entries; a use does not move one

    def order_key(self, slot: int, use: UseStats) -> bytes:
        return _BE2.pack(use.inserted, slot)


class LFU(Policy):
    """Least frequently used; ties go to the least recently used."""

    name = "lfu"

    def order_key(self, slot: int, use: UseStats) -> bytes:
        return _BE3.pack(use.hits, use.tick, slot)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LRU, LFU, FIFO, MRU)}


def make_policy(name: str) -> Policy:
    """Policy by LMCache's name (case-insensitive).  Raises ConfigError."""
    if not isinstance(name, str) or name.lower() not in POLICIES:
        raise ConfigError(
            f"unknown eviction policy {name!r}; use one of {', '.join(sorted(POLICIES))}"
        )
    return POLICIES[name.lower()]()


def slot_of(order_key: bytes) -> int:
    """The slot number every order key ends with."""
    return _BE.unpack(order_key[-8:])[0]
