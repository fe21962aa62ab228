"""Fixtures every layer's tests share."""

import pytest

from slabcache import SlabStore

ENGINES = ["mmap", "direct"]


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture
def make_store(tmp_path, engine):
    """Open (or create) a store under tmp_path with the parametrized engine."""
    opened = []

    def make(name="store", capacity_bytes=16 * 4096, slot_bytes=4096, **kw):
        kw.setdefault("io", engine)
        s = SlabStore.open(tmp_path / name, capacity_bytes=capacity_bytes,
                           slot_bytes=slot_bytes, **kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()
