"""StoreOptions: every setting of an open store, validated once.

The integrations read their hosts' spellings (strings from YAML and
environment variables, sizes such as ``20G``) into a StoreOptions and
validate it here, passing the names their users wrote (``names``), so
every check lives in one place and every error names the setting as the
user knows it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping

from ..device import ENGINES
from ..errors import ConfigError
from ..format.sizes import check_bytes
from ..index.policy import POLICIES
from ..runtime.workers import MAX_THREADS, ON_FULL

DURABILITY = ("fast", "strict")


@dataclass(frozen=True)
class StoreOptions:
    """How to open a store.

    ``path``: the store's directory.  Creating needs ``capacity_bytes`` and
    ``slot_bytes``; reopening reads them from the slab (given values must
    agree).  ``policy``: lru, lfu, fifo or mru (None: the store's own, lru
    when new).  ``io``: mmap or direct (O_DIRECT).  ``durability``: fast, or
    strict (fdatasync before a put returns).  ``checksum``: verify every
    read.  ``readonly``: write nothing.  ``io_threads``: worker threads for
    queued work and large batches.  ``max_pending_puts``: queued writes at
    most; when full, ``queue_full`` 'reject' (QueueFullError) or 'wait'.
    ``index_map_bytes``: the index's map size.  ``engine_wrapper``: a
    callable that takes the I/O engine and returns an object with its
    public calls (``slabcache.device.EngineWrapper``: monitoring, fault
    injection).  ``share_group``: files 0660 / directories 0770 instead of
    0600 / 0700.  ``trust_directory``: open a directory another user owns,
    or others can write.  ``use_refresh_seconds``: a read moves its entry
    in the policy's order (and counts in its entry's hits) only if it was
    not used for this long (the store's hit counter counts every read); 1 s
    by default, as in every host integration (CacheLib's
    LRU refresh time, memcached's bump interval): recording each use costs
    about 3 us a read; 0 makes the order exact.
    """

    path: str
    capacity_bytes: int | None = None
    slot_bytes: int | None = None
    policy: str | None = None
    io: str = "mmap"
    durability: str = "fast"
    checksum: bool = True
    readonly: bool = False
    io_threads: int = 4
    max_pending_puts: int = 64
    queue_full: str = "reject"
    index_map_bytes: int | None = None
    engine_wrapper: Callable | None = None
    share_group: bool = False
    trust_directory: bool = False
    use_refresh_seconds: float = 1.0

    def validate(self, names: Mapping[str, str] | None = None) -> "StoreOptions":
        """A checked copy with an absolute path and the policy's name in
        lower case.  Raises ConfigError naming the setting (as ``names``
        maps it: the spelling of the host that gave it) and what to use."""

        def name(field: str) -> str:
            return names.get(field, field) if names else field

        if not isinstance(self.path, (str, os.PathLike)):
            raise ConfigError(f"{name('path')} must be a str or os.PathLike, got {type(self.path).__name__}")
        for field in ("capacity_bytes", "slot_bytes", "index_map_bytes"):
            v = getattr(self, field)
            if v is not None:
                try:
                    check_bytes(name(field), v)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        policy = self.policy
        if policy is not None:
            policy = _choice(name("policy"), policy, sorted(POLICIES), "eviction policy")
        io = _choice(name("io"), self.io, ENGINES, "io engine")
        durability = _choice(name("durability"), self.durability, DURABILITY, "durability")
        queue_full = _choice(name("queue_full"), self.queue_full, ON_FULL, "queue_full")
        for field in ("checksum", "readonly", "share_group", "trust_directory"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"{name(field)} must be True or False, got {getattr(self, field)!r}")
        _whole(name("io_threads"), self.io_threads, 1, MAX_THREADS)
        _whole(name("max_pending_puts"), self.max_pending_puts, 1, None)
        r = self.use_refresh_seconds
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < math.inf:
            raise ConfigError(f"{name('use_refresh_seconds')} must be a number of seconds >= 0 "
                              f"(0: every use moves the entry in the policy's order), got {r!r}")
        if self.engine_wrapper is not None and not callable(self.engine_wrapper):
            raise ConfigError("engine_wrapper must be a callable taking the engine and returning its wrapper")
        return dataclasses.replace(self, path=os.path.abspath(os.fspath(self.path)), policy=policy,
                                   io=io, durability=durability, queue_full=queue_full)

    @classmethod
    def fields(cls) -> set[str]:
        """The names of every setting."""
        return {f.name for f in dataclasses.fields(cls)}

    @property
    def strict(self) -> bool:
        return self.durability == "strict"


def _choice(name: str, value, choices, what: str) -> str:
    word = value.strip().lower() if isinstance(value, str) else None
    if word not in choices:
        raise ConfigError(f"unknown {what} {value!r} for {name}; use one of {', '.join(choices)}")
    return word


def _whole(name: str, value, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
            high is not None and value > high):
        most = f" to {high}" if high is not None else " or more"
        raise ConfigError(f"{name} must be a whole number from {low}{most}, got {value!r}")
    return value
