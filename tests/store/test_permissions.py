"""A KV cache holds enough to reconstruct users' prompts: who may read and
replace a store's files."""

import os
import stat

import pytest
import torch

from slabcache import ConfigError, SlabStore
from slabcache.admin.compact import compact
from slabcache.admin.fsck import check

V = torch.arange(10, dtype=torch.int16)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_new_stores_are_private_whatever_the_umask(tmp_path, umask_022):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=8 * 4096, slot_bytes=4096) as s:
        s.put("k", V)
    assert _mode(p) == 0o700 and _mode(p / "index") == 0o700
    for f in ("slab", "lock", "index/data.mdb", "index/lock.mdb"):
        assert _mode(p / f) == 0o600, f


def test_share_group_gives_the_group_the_same_access(tmp_path, umask_022):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=8 * 4096, slot_bytes=4096, share_group=True) as s:
        s.put("k", V)
    assert _mode(p) == 0o770 and _mode(p / "slab") == 0o660 and _mode(p / "index/data.mdb") == 0o660
    with SlabStore.open(p, share_group=True) as s:  # a group-writable directory is expected then
        assert torch.equal(s.get("k"), V)


@pytest.mark.parametrize("mode,fragment", [(0o777, "writable by others"), (0o770, "writable by its group")])
def test_directories_others_can_write_are_refused(tmp_path, mode, fragment):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(ConfigError, match=fragment):
        SlabStore.open(d, capacity_bytes=8 * 4096, slot_bytes=4096)
    assert not (d / "slab").exists()
    with SlabStore.open(d, capacity_bytes=8 * 4096, slot_bytes=4096, trust_directory=True) as s:
        assert s.put("k", V)


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a directory to another user needs root")
def test_a_directory_owned_by_another_user_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, 12345)
    with pytest.raises(ConfigError, match="belongs to uid 12345"):
        SlabStore.open(d, capacity_bytes=8 * 4096, slot_bytes=4096)


def test_compact_and_rebuild_keep_the_operators_modes(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=8 * 4096, slot_bytes=4096) as s:
        s.put("k", V)
    os.chmod(p / "slab", 0o640)
    os.chmod(p / "index" / "data.mdb", 0o640)
    compact(p, capacity_bytes=16 * 4096, progress=False)
    assert _mode(p / "slab") == 0o640 and _mode(p / "index" / "data.mdb") == 0o640
    assert check(p, rebuild_index=True, progress=False).exit_code == 1
    assert _mode(p / "index" / "data.mdb") == 0o640
    with SlabStore.open(p) as s:
        assert torch.equal(s.get("k"), V)
