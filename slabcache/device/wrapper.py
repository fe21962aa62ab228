"""EngineWrapper: the seam for anything that counts, throttles or injects
faults around a real engine (engine.py), so real engines carry no test
hooks."""

from __future__ import annotations

from ..format.header import Geometry
from .engine import Engine, read_or_error


class EngineWrapper:
    """Delegates every public Engine call to ``inner``.

    Subclass it to count, throttle or inject faults around a real engine;
    pass the subclass as ``SlabStore.open(..., engine_wrapper=...)``.
    """

    def __init__(self, inner: Engine):
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def path(self) -> str:
        return self.inner.path

    @property
    def geometry(self) -> Geometry:
        return self.inner.geometry

    @property
    def writes_to_cache(self) -> bool:
        return self.inner.writes_to_cache

    @property
    def parallel_writes(self) -> int:
        return self.inner.parallel_writes

    @property
    def bytes_read(self) -> int:
        return self.inner.bytes_read

    @property
    def bytes_written(self) -> int:
        return self.inner.bytes_written

    def write(self, slot, parts, hashed=False):
        return self.inner.write(slot, parts, hashed)

    def read_into(self, slot, parts, hashed=False):
        return self.inner.read_into(slot, parts, hashed)

    def coalesces(self, slots, parts_list):
        return self.inner.coalesces(slots, parts_list)

    def write_many(self, slots, parts_list, hashed=False):
        done = []  # through this wrapper's write, so a subclass sees every write
        for slot, parts in zip(slots, parts_list, strict=True):
            try:
                done.append(self.write(slot, parts, hashed))
            except BaseException as exc:
                return done, exc
        return done, None

    def read_many_into(self, slots, parts_list, hashed=False):
        # Through this wrapper's read_into, so a subclass that overrides it
        # sees every read of a batch too.
        return [read_or_error(self.read_into, slot, parts, hashed)
                for slot, parts in zip(slots, parts_list, strict=True)]

    def empty(self, nbytes):
        return self.inner.empty(nbytes)

    def submit(self, fn, *args):
        return self.inner.submit(fn, *args)

    def sync(self):
        self.inner.sync()

    def drop_cache(self):
        self.inner.drop_cache()

    def close(self):
        self.inner.close()
