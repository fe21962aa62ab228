"""The SGLang backend's extra config and page map: checked before anything
is opened, and without SGLang installed (the pool is duck-typed)."""

from __future__ import annotations

import pytest
import torch

from slabcache import ConfigError
from slabcache.integrations.sglang.pages import PageMap, contiguous_parts
from slabcache.integrations.sglang.settings import backend_config

LOADER = {"backend_name": "slabcache", "module_path": "slabcache.integrations.sglang",
          "class_name": "SlabCacheStorage", "interface_v1": 1}


def cfg(tmp_path, **keys):
    extra = {**LOADER, "path": str(tmp_path / "store"), "capacity": "1G", **keys}
    return backend_config(extra)


def test_defaults_and_spellings(tmp_path):
    c = cfg(tmp_path)
    o = c.options
    assert c.zero_copy and o.capacity_bytes == 1 << 30 and o.slot_bytes is None
    assert (o.io, o.durability, o.policy, o.io_threads, o.checksum, o.use_refresh_seconds) == (
        "mmap", "fast", None, 4, True, 1.0)
    assert c.options_for(4096).slot_bytes == 4096  # one page a slot
    c = cfg(tmp_path, path="file://" + str(tmp_path / "s"), slot_bytes="1M", io="DIRECT", policy="LFU",
            checksum="false", use_refresh_seconds="0", interface_v1=0)
    assert (c.options.path, c.options.slot_bytes, c.options.io, c.options.policy) == (
        str(tmp_path / "s"), 1 << 20, "direct", "lfu")
    assert c.options.checksum is False and c.options.use_refresh_seconds == 0 and not c.zero_copy
    assert c.options_for(4096).slot_bytes == 1 << 20


@pytest.mark.parametrize("keys, names", [
    ({"path": None}, "needs 'path'"),
    ({"capacity": ""}, "needs 'capacity'"),
    ({"capacity": "-1G"}, "'capacity'"),
    ({"capacity": -5}, "'capacity'"),
    ({"capacity": "lots"}, "'capacity'.*cannot read size"),
    ({"slot_bytes": "2G"}, "'capacity'.*holds no slot"),
    ({"io": "uring"}, "'io'"),
    ({"policy": "random"}, "'policy'"),
    ({"io_threads": 0}, "'io_threads'"),
    ({"use_refresh_seconds": "inf"}, "'use_refresh_seconds'"),
    ({"checksum": "perhaps"}, "'checksum'"),
    ({"interface_v1": "yes please"}, "'interface_v1'"),
    ({"file_storage_path": "/tmp/x"}, r"unknown slabcache extra config key\(s\) \['file_storage_path'\]"),
    ({"path": 7}, "'path' must be a directory"),
])
def test_bad_keys_name_the_key(tmp_path, keys, names):
    with pytest.raises(ConfigError, match=names):
        cfg(tmp_path, **keys)


def test_an_unwritable_path_stops_start_up(tmp_path):
    # /proc takes no new files, for root too; a mode would not stop root.
    with pytest.raises(ConfigError, match="'path': cannot write in /proc"):
        cfg(tmp_path, path="/proc/slabcache-test/store")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ConfigError, match="'path'.*not a directory"):
        cfg(tmp_path, path=str(tmp_path / "file" / "store"))
    assert not (tmp_path / "store").exists() and list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_a_slot_smaller_than_a_page_names_both(tmp_path):
    with pytest.raises(ConfigError, match="'slot_bytes' is 4096, smaller than one page.*8192"):
        cfg(tmp_path, slot_bytes=4096).options_for(8192)


class _Pool:
    """The part of a host pool the page map reads: SGLang's MHA layouts."""

    def __init__(self, layout, page_size=4, layers=3, heads=2, dim=8, size=64):
        self.layout, self.page_size, self.size = layout, page_size, size
        dims = {"page_first": (2, size, layers, heads, dim),
                "layer_first": (2, layers, size, heads, dim),
                "page_first_direct": (2, size // page_size, layers, page_size, heads, dim)}[layout]
        self.kv_buffer = torch.arange(torch.Size(dims).numel(), dtype=torch.float32).reshape(dims)

    def get_data_page(self, index, flat=True):
        kv, ps = self.kv_buffer, self.page_size
        if self.layout == "page_first":
            page = kv[:, index:index + ps]
        elif self.layout == "layer_first":
            page = kv[:, :, index:index + ps]
        else:
            page = kv[:, index // ps:index // ps + 1]
        return page.flatten() if flat else page


@pytest.mark.parametrize("layout, parts", [("page_first", 2), ("page_first_direct", 2), ("layer_first", 6)])
def test_the_page_map_gives_the_pools_own_pages_as_views(layout, parts):
    pool = _Pool(layout)
    pm = PageMap(pool)
    assert pm.page_bytes == 2 * 3 * 4 * 2 * 8 * 4
    for start in (0, 4, 28, 60):
        got = pm.parts(start)
        assert len(got) == parts
        assert torch.equal(torch.cat(got), pool.get_data_page(start).view(torch.uint8))
        got[0].fill_(0)  # views of the pool, not copies
        assert (pool.get_data_page(start, flat=False).reshape(-1)[:4] == 0).all()
    idx = torch.arange(8, 16)
    assert [torch.cat(p).data_ptr() != 0 for p in pm.batch(idx, 2)] == [True, True]
    with pytest.raises(ValueError, match="not at the start of a page"):
        pm.parts(5)
    with pytest.raises(ValueError, match="8 host indices for 3 pages"):
        pm.batch(idx, 3)


def test_a_pool_whose_pages_are_copies_is_refused():
    class Copies(_Pool):
        def get_data_page(self, index, flat=True):
            return super().get_data_page(index, flat).clone()

    with pytest.raises(ConfigError, match="not where its first pages say"):
        PageMap(Copies("layer_first"))


def test_contiguous_parts_of_a_strided_view():
    t = torch.zeros(2, 5, 3, dtype=torch.int16)
    assert contiguous_parts(t[:, 1:3]) == [(6, 12), (36, 12)]
    assert contiguous_parts(t[1]) == [(30, 30)]
