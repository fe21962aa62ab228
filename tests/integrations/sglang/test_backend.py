"""slabcache as SGLang HiCache's storage backend, driven by SGLang's own
HiCacheController and host pools (CPU tensors)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_py
from tests.integrations.sglang.conftest import SGLANG_MISSING

sglang = pytest.importorskip("sglang.srt.managers.cache_controller", reason=SGLANG_MISSING)

from slabcache import ConfigError  # noqa: E402
from slabcache.testing.sglang_hicache import PAGE_LAYOUTS  # noqa: E402

PS = 4  # tokens a page
PAGE = PS * 2 * 2 * 64 * 2 * 2  # K and V of 2 layers, 2 heads of 64 fp16 values a token: 4 KiB


def tokens(n_pages: int, base: int) -> list[int]:
    return list(range(base, base + n_pages * PS))


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


CHILD = r"""
import json, sys, torch
from slabcache.testing.sglang_hicache import SLABCACHE, Node
want = torch.load(sys.argv[2])
out = {}
for layout, (toks, pages) in want.items():
    node = Node({**SLABCACHE, "interface_v1": 1, "path": sys.argv[1], "capacity": "8M"}, layout=layout)
    hit, done, idx = node.prefetch(toks)
    got = node.pages(idx)
    out[layout] = [hit, done, len(got) == len(pages) and all(torch.equal(a, b) for a, b in zip(got, pages))]
    node.close()
print(json.dumps(out))
"""


def test_pages_stored_in_one_process_are_prefetched_by_the_next_in_every_layout(make_node, tmp_path):
    want = {}
    for i, layout in enumerate(PAGE_LAYOUTS):
        node = make_node(layout=layout)
        toks = tokens(10, 1000 * i)
        idx = node.fill(len(toks), seed=i)
        assert node.backup(idx, toks) == len(toks)
        want[layout] = (toks, node.pages(idx))
        node.close()
    torch.save(want, tmp_path / "want.pt")
    got = json.loads(run_py(CHILD, str(tmp_path / "store"), str(tmp_path / "want.pt")).stdout.splitlines()[-1])
    assert got == {layout: [40, 40, True] for layout in PAGE_LAYOUTS}


def test_zero_copy_and_copying_paths_share_pages(make_node):
    """A page stored through batch_set_v1 reads back through batch_get, and
    the other way round (the same bytes: the flattened page)."""
    zero = make_node()
    toks = tokens(6, 0)
    idx = zero.fill(len(toks), seed=1)
    assert zero.backup(idx, toks) == len(toks)
    want = zero.pages(idx)
    zero.close()
    copying = make_node(extra={"interface_v1": None})
    assert copying.controller.page_get_func.__name__ == "_generic_page_get"
    hit, done, got = copying.prefetch(toks)
    assert (hit, done) == (24, 24) and same(copying.pages(got), want)
    toks2 = tokens(3, 500)
    idx2 = copying.fill(len(toks2), seed=2)
    assert copying.backup(idx2, toks2) == len(toks2)
    want2 = copying.pages(idx2)
    copying.close()
    zero = make_node()
    hit, done, got = zero.prefetch(toks2)
    assert (hit, done) == (12, 12) and same(zero.pages(got), want2)


def test_a_store_smaller_than_the_working_set_gives_a_shorter_prefix_never_wrong_bytes(make_node, tmp_path):
    node = make_node(extra={"capacity": 12 * PAGE, "path": str(tmp_path / "small")}, tokens=512)
    assert node.backend.pages.page_bytes == PAGE
    chains = []
    for c in range(3):  # 3 chains of 8 pages in 12 slots
        toks = tokens(8, 10_000 * (c + 1))
        idx = node.fill(len(toks), seed=c)
        assert node.backup(idx, toks) == len(toks)
        chains.append((toks, node.pages(idx)))
        node.free(idx)
    found = []
    for toks, pages in chains:
        hit, done, idx = node.prefetch(toks)
        assert done == hit and hit % PS == 0
        assert same(node.pages(idx), pages[:hit // PS])
        found.append(hit // PS)
        node.free(idx)
    # The newest chain whole; the middle one's head (4 of its pages survive,
    # its tail went first); nothing of the oldest.
    assert found == [0, 4, 8]


def test_eviction_takes_a_chains_tail_before_its_head_across_batches(make_node):
    """Chains longer than one batch: SGLang passes the keys before each
    batch, and those are touched so the head stays newest."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageExtraInfo

    node = make_node(extra={"capacity": 10 * PAGE})
    backend = node.backend
    toks = tokens(8, 7)
    idx = node.fill(len(toks), seed=3)
    keys = node.hashes(toks)
    for start in (0, 4):  # two batches of 4 pages
        sub = idx[start * PS:(start + 4) * PS]
        extra = HiCacheStorageExtraInfo(prefix_keys=keys[:start] or None)
        assert backend.batch_set_v1(keys[start:start + 4], sub, extra) == [True] * 4
    other = tokens(4, 90_000)
    oidx = node.fill(len(other), seed=4)
    assert node.backup(oidx, other) == len(other)  # 4 more pages: 2 of the chain go
    assert backend.batch_exists(keys) == 6  # its last two pages, not its first


def test_a_damaged_page_is_a_shorter_prefix_and_no_exception(make_node, tmp_path):
    node = make_node()
    toks = tokens(6, 0)
    idx = node.fill(len(toks), seed=5)
    assert node.backup(idx, toks) == len(toks)
    want = node.pages(idx)
    store = node.backend.store
    key = node.backend._ns + node.hashes(toks)[3].encode()
    e = store.entry(key)
    with open(tmp_path / "store" / "slab", "r+b") as f:
        f.seek(store.geometry.slot_offset(e.slot) + 10)
        b = f.read(1)
        f.seek(store.geometry.slot_offset(e.slot) + 10)
        f.write(bytes([b[0] ^ 0x01]))
    store.engine.drop_cache()
    hit, done, got = node.prefetch(toks)
    assert hit == 24 and done == 12  # the query saw 6 pages; 3 came back whole
    assert same(node.pages(got), want[:3])
    assert store.stats()["checksum_failures"] == 1
    hit, done, got = node.prefetch(toks, rid="again")
    assert (hit, done) == (12, 12) and same(node.pages(got), want[:3])


def test_two_models_and_two_layouts_on_one_path_never_read_each_others_pages(make_node):
    a = make_node(model="model-a")
    toks = tokens(4, 0)
    idx = a.fill(len(toks), seed=6)
    assert a.backup(idx, toks) == len(toks)
    b = make_node(model="model-b")
    assert b.prefetch(toks)[:2] == (0, 0)
    c = make_node(model="model-a", layout="layer_first")
    assert c.prefetch(toks)[:2] == (0, 0)
    d = make_node(model="model-a", heads=4, head_dim=32)  # another shape, pages of the same size
    assert d.prefetch(toks)[:2] == (0, 0)
    assert a.prefetch(toks)[:2] == (16, 16)
    b.backend.clear()  # clears model-b's pages only
    assert a.backend.batch_exists(a.hashes(toks)) == 4


def test_mla_pages_are_stored_by_the_writer_rank_only(make_node, tmp_path):
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from slabcache.integrations.sglang import SlabCacheStorage
    from slabcache.testing.sglang_hicache import SLABCACHE

    node = make_node(mla=True, layout="page_first")
    assert node.backend.storage_config.is_mla_model
    toks = tokens(5, 0)
    idx = node.fill(len(toks), seed=7)
    assert node.backup(idx, toks) == len(toks)
    want = node.pages(idx)
    hit, done, got = node.prefetch(toks)
    assert (hit, done) == (20, 20) and same(node.pages(got), want)
    keys = node.hashes(toks)
    other = node.hashes(tokens(5, 50))
    extra = {**SLABCACHE, "interface_v1": 1, "path": str(tmp_path / "store"), "capacity": "8M"}
    rank1 = SlabCacheStorage(HiCacheStorageConfig(
        tp_rank=1, tp_size=2, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1, is_mla_model=True,
        enable_storage_metrics=False, is_page_first_layout=True, model_name="test-model",
        extra_config=extra), {})
    rank1.register_mem_pool_host(node.host)
    assert rank1.batch_exists(keys) == 5  # the writer's pages: MLA is the same on every rank
    assert rank1.batch_set_v1(other, idx) == [True] * 5 and rank1.batch_exists(other) == 0
    rank1.close()


def test_bad_extra_config_stops_start_up_naming_the_key(make_node, tmp_path):
    for extra, names in (({"colour": "blue"}, r"unknown slabcache extra config key\(s\) \['colour'\]"),
                         ({"capacity": "-4M"}, "'capacity'"),
                         ({"path": "/proc/slabcache/store"}, "'path': cannot write"),
                         ({"slot_bytes": 256}, "'slot_bytes' is 256, smaller than one page")):
        with pytest.raises((ConfigError, ValueError), match=names):
            make_node(extra=extra)


def test_stats_count_pages_and_bandwidth_and_the_stores_counters(make_node):
    node = make_node(metrics=True)
    toks = tokens(6, 0)
    idx = node.fill(len(toks), seed=8)
    node.backup(idx, toks)
    node.prefetch(toks)
    node.prefetch(tokens(2, 99_999), rid="miss")
    m = node.backend.get_stats()
    assert m.backup_pgs == [6] and m.prefetch_pgs == [6]
    assert all(bw > 0 for bw in m.backup_bandwidth + m.prefetch_bandwidth)
    page = node.backend.pages.page_bytes
    s = m.slabcache
    assert s["slots_used"] == 6 and s["bytes_written"] == 6 * page and s["bytes_read"] == 6 * page
    assert s["hits"] == 6 and s["capacity_bytes"] >= 6 * page
    again = node.backend.get_stats()
    assert again.backup_pgs == [] and again.prefetch_pgs == []  # drained, as SGLang's backends do
