"""The device layer: the slab file, its directory, and the I/O engines.

``slabfile``  create / verify the slab, slot records
``storedir``  locks on the store directory, the compaction switch
``engine``    the checked I/O interface every engine (and wrapper) follows
``wrapper``   EngineWrapper: counting, throttling or faults around an engine
``mmap``      pwrite in, copy out of a shared mapping
``direct``    O_DIRECT in and out
``memory``    aligned host buffers;  ``syscalls``: vectored pread/pwrite
"""

from __future__ import annotations

from ..errors import ConfigError
from ..format.header import Geometry
from .engine import Engine
from .wrapper import EngineWrapper

ENGINES = ("mmap", "direct")


def make_engine(name: str, path: str, g: Geometry) -> Engine:
    """The engine ``name`` over the slab at ``path``.  Raises ConfigError."""
    if name == "mmap":
        from .mmap import MmapEngine

        return MmapEngine(path, g)
    if name == "direct":
        from .direct import DirectEngine

        return DirectEngine(path, g)
    raise ConfigError(f"unknown io engine {name!r}; use one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "EngineWrapper", "make_engine"]
