"""StoreOptions: every setting of an open store, validated once."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable

from ..device import ENGINES
from ..errors import ConfigError
from ..format.sizes import check_bytes
from ..index.policy import make_policy
from ..runtime.workers import WorkerPool

DURABILITY = ("fast", "strict")


def _positive_int(name: str, v) -> int | None:
    if v is None:
        return None
    try:
        return check_bytes(name, v)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class StoreOptions:
    """How to open a store; see :meth:`SlabStore.open` for each field.

    ``engine_wrapper`` is the testing and monitoring seam: a callable that
    takes the I/O engine and returns an object with the same public calls
    (see ``slabcache.device.EngineWrapper``), e.g. a fault injector.
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
    use_refresh_seconds: float = 0.0

    def validate(self) -> "StoreOptions":
        """A checked copy with an absolute path.  Raises ConfigError naming
        the setting and what to use instead."""
        if not isinstance(self.path, (str, os.PathLike)):
            raise ConfigError(f"path must be a str or os.PathLike, got {type(self.path).__name__}")
        for name in ("capacity_bytes", "slot_bytes", "index_map_bytes"):
            _positive_int(name, getattr(self, name))
        if self.policy is not None:
            make_policy(self.policy)
        if self.io not in ENGINES:
            raise ConfigError(f"unknown io engine {self.io!r}; use one of {', '.join(ENGINES)}")
        if self.durability not in DURABILITY:
            raise ConfigError(f"unknown durability {self.durability!r}; use 'fast' or 'strict'")
        if not isinstance(self.checksum, bool):
            raise ConfigError(f"checksum must be True or False, got {self.checksum!r}")
        for name in ("readonly", "share_group", "trust_directory"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.engine_wrapper is not None and not callable(self.engine_wrapper):
            raise ConfigError("engine_wrapper must be a callable taking the engine and returning its wrapper")
        WorkerPool.check_settings(self.io_threads, self.max_pending_puts, self.queue_full)
        r = self.use_refresh_seconds
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < float("inf"):
            raise ConfigError(f"use_refresh_seconds must be a number of seconds >= 0 (0: every use "
                              f"moves the entry in the policy's order), got {r!r}")
        return dataclasses.replace(self, path=os.path.abspath(os.fspath(self.path)))

    @property
    def strict(self) -> bool:
        return self.durability == "strict"
