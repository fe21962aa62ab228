"""The command line: thin over the library, clean errors, exit codes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from slabcache import SlabStore
from slabcache.format.sizes import parse_size
from slabcache.bench.contenders import FilePerChunk, SlabContender
from slabcache.bench.suite import run_size
from tests.helpers import copy_tree_sparse
from slabcache.cli import main
from slabcache.testing import child_env


def _cli(*args):
    env = child_env()
    return subprocess.run([sys.executable, "-m", "slabcache.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture
def store_path(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=8 * 4096, slot_bytes=4096, use_refresh_seconds=0) as s:
        s.put("a", torch.zeros(10, dtype=torch.bfloat16))
        s.put(b"b", [torch.ones(3, 4), torch.arange(5)])
        s.get("a")
    return p


def test_help():
    r = _cli("--help")
    assert r.returncode == 0 and "bench" in r.stdout and "stats" in r.stdout


def test_python_dash_m_runs_the_cli(store_path):
    r = subprocess.run([sys.executable, "-m", "slabcache", "fsck", str(store_path)],
                       capture_output=True, text=True, env=child_env())
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr


def test_stats_json(store_path, capsys):
    assert main(["stats", str(store_path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["slots_total"] == 8 and st["slots_used"] == 2 and st["hits"] == 1
    assert st["bytes_by_dtype_shape"] == {"float32[3, 4], int64[5]": 88, "bfloat16[10]": 20}


def test_ls(store_path, capsys):
    assert main(["ls", str(store_path), "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"a", "b'b'"}  # bytes keys print as Python bytes literals
    assert rows["a"]["dtypes"] == ["bfloat16"] and rows["a"]["hits"] == 1
    assert rows["b'b'"]["shapes"] == [[3, 4], [5]] and rows["b'b'"]["bytes"] == 88
    assert main(["ls", str(store_path)]) == 0
    assert "bfloat16[10]" in capsys.readouterr().out


def test_stats_is_safe_while_open(store_path, capsys):
    with SlabStore.open(store_path) as s:
        s.pin("a")
        assert main(["stats", str(store_path), "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["pinned"] == 1 and os.getpid() in st["open_by_pids"]
        assert torch.equal(s.get("a"), torch.zeros(10, dtype=torch.bfloat16))


def test_errors_are_one_line(tmp_path):
    r = _cli("stats", str(tmp_path / "nothing"))
    assert r.returncode == 8
    assert r.stderr.count("\n") == 1 and "no slabcache store" in r.stderr and "Traceback" not in r.stderr
    r = _cli("bench", "--sizes", "12X")
    assert r.returncode == 2 and "cannot read size" in r.stderr


@pytest.mark.parametrize("text,value", [("20G", 20 << 30), ("512MiB", 512 << 20), ("4096", 4096),
                                        ("256K", 256 << 10), ("1.5M", 3 << 19)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "-4K", "abc", "0"])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("make", [
    lambda d: FilePerChunk(str(d), capacity_bytes=8 * 8192),
    lambda d: FilePerChunk(str(d), capacity_bytes=8 * 8192, odirect=True),
    lambda d: SlabContender(str(d), capacity_bytes=8 * 8192, slot_bytes=8192, io="mmap"),
])
def test_bench_workloads_measure_real_hits(tmp_path, make):
    pool = [torch.randint(0, 256, (8192,), dtype=torch.uint8).view(torch.bfloat16) for _ in range(2)]
    rows = {r.workload: r for r in run_size(lambda: make(tmp_path / "c"), 8192, 8, 32, pool)}
    assert rows["fill"].ops == 8
    assert rows["cold get"].hits == 8 and rows["warm get"].hits == 8
    assert 0 < rows["churn"].hits < 32
    restart = rows["restart to first hit"]
    assert restart.hits == (0 if isinstance(make(tmp_path / "x"), FilePerChunk) else 1)


def test_read_only_commands_work_on_a_store_copied_without_its_lock_file(store_path, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    copy_tree_sparse(store_path, copy, ignore=shutil.ignore_patterns("lock"))
    for cmd in (["stats", str(copy), "--json"], ["ls", str(copy)]):
        r = _cli(*cmd)  # it used to wait forever on its own lock
        assert r.returncode == 0, r.stderr
    assert not (copy / "lock").exists()
