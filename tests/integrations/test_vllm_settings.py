"""The vLLM tier's keys: checked before anything is opened (no vLLM needed)."""

from __future__ import annotations

import os

import pytest

from slabcache import ConfigError
from slabcache.integrations.vllm.settings import tier_config

BLOCK = 64 << 10


def cfg(**keys):
    keys.setdefault("path", "/kv")
    keys.setdefault("capacity", "1G")
    return tier_config(keys, block_size_bytes=BLOCK)


def test_defaults():
    c = cfg()
    o = c.options
    assert c.paths == ("/kv",) and c.bytes_per_path == 1 << 30 and o.path == "/kv"
    assert o.slot_bytes is None  # one block, or an existing store's own
    assert (o.io, o.durability, o.policy, o.io_threads, o.checksum) == ("mmap", "fast", None, 4, True)
    assert o.use_refresh_seconds == 1.0
    assert cfg(use_refresh_seconds=0).options.use_refresh_seconds == 0.0
    assert c.options_for("/other", 4096).path == "/other" and c.options_for("/o", 4096).slot_bytes == 4096


def test_values_as_json_and_yaml_spell_them():
    c = cfg(path="file:///a/, /b", capacity=8 << 30, slot_bytes="128K", io="DIRECT", policy="LFU",
            durability="strict", io_threads=8, checksum="false", share_group=1, locality="remote")
    o = c.options
    assert c.paths == ("/a", "/b") and c.bytes_per_path == 4 << 30 and o.slot_bytes == 128 << 10
    assert (o.io, o.policy, o.durability, o.io_threads, o.checksum, o.share_group, c.locality) == (
        "direct", "lfu", "strict", 8, False, True, "REMOTE")
    assert cfg(path=["rel", "/b"]).paths == (os.path.abspath("rel"), "/b")


def test_by_engine_gives_each_data_parallel_engine_one_path():
    keys = {"path": "/a,/b,/c", "capacity": "3G", "path_sharding": "by_engine"}
    got = [tier_config(keys, block_size_bytes=BLOCK, data_parallel_index=i).paths for i in range(4)]
    assert got == [("/a",), ("/b",), ("/c",), ("/a",)]
    assert tier_config(keys, block_size_bytes=BLOCK).bytes_per_path == 1 << 30


@pytest.mark.parametrize("keys, names", [
    ({"path": None}, "'path'"),
    ({"capacity": None}, "'capacity'"),
    ({"capacity": "lots"}, "'capacity'.*cannot read size"),
    ({"capacity": "32K"}, "'capacity' gives each of 1 path"),
    ({"capacity": True}, "'capacity'"),
    ({"slot_bytes": "4K"}, "'slot_bytes' is 4096, smaller than one block"),
    ({"io": "uring"}, "tier key 'io'; use one of mmap, direct"),
    ({"policy": "random"}, "'policy'"),
    ({"durability": "maybe"}, "'durability'"),
    ({"io_threads": 0}, "'io_threads'"),
    ({"io_threads": "4"}, "'io_threads'"),
    ({"enable_kv_events": "loudly"}, "'enable_kv_events'"),
    ({"checksum": "yes please"}, "'checksum' must be true or false"),
    ({"path_sharding": "by_gpu"}, "'path_sharding' must be one of by_key, by_engine"),
    ({"locality": "nearby"}, "'locality' must be one of local, remote"),
    ({"use_refresh_seconds": -1}, "'use_refresh_seconds' must be a number of seconds"),
    ({"path": "/a,/a"}, "names a directory twice"),
    ({"path": ","}, "names no directory"),
    ({"pth": "/kv"}, r"unknown slabcache tier key\(s\) \['pth'\].*path: directory"),
])
def test_bad_keys_name_the_key_and_the_fix(keys, names):
    with pytest.raises(ConfigError, match=names):
        cfg(**keys)
