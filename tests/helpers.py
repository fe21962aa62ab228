"""Helpers for tests (not fixtures): child interpreters, reproducible bytes,
what the page cache holds."""

import mmap
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from slabcache.device.syscalls import cached_pages, mapping_address
from slabcache.testing import child_env


def run_py(code: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter (the repo on sys.path)."""
    env = child_env()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_tree_sparse(src, dst, ignore=None) -> None:
    """shutil.copytree that keeps holes: an index file is mostly holes, and a
    plain copy writes its whole map size (1 GB) as zeros."""
    import shutil

    def copy(a, b):
        subprocess.run(["cp", "--sparse=always", "--preserve=mode", a, b], check=True)

    shutil.copytree(src, dst, ignore=ignore, copy_function=copy)


def rand_tensor(n_bytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=g)


def run_suite_in_venv(python: Path, suite: str, tmp_path, host: str, timeout: float = 1500) -> None:
    """Run the tests in ``suite`` with another venv's ``python`` (a host that
    pins its own packages); fail with their output if any fails or skips."""
    import pytest

    if Path(sys.prefix).resolve() == python.parent.parent.resolve():
        pytest.skip(f"already running in the {host} venv: {suite} runs here directly")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [str(python), "-m", "pytest", suite, "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / host.lower()}", "-rs"],
        cwd=root, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, f"{host} tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " skipped" not in proc.stdout.splitlines()[-1], f"{host} tests skipped in the {host} venv"


def resident_pages(path: str, offset: int, length: int) -> int:
    """Pages of ``path`` in [offset, offset+length) that sit in the page cache (mincore)."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), offset + length, prot=mmap.PROT_READ)
        try:
            vec = cached_pages(mapping_address(mm) + offset, length)
        finally:
            mm.close()
    if vec is None:
        raise OSError("mincore cannot say what the page cache holds here")
    return sum(v & 1 for v in vec)


def drop_until_cold(store, tries: int = 20) -> None:
    """``store.engine.drop_cache()`` until none of its slab's payload pages
    is in the page cache (mincore, which reads nothing): the kernel keeps a
    page that a drop finds busy, and a test of the cold path must start
    cold."""
    g = store.geometry
    slab = os.path.join(store.path, "slab")
    for _ in range(tries):
        store.engine.drop_cache()
        left = resident_pages(slab, g.data_offset, g.capacity_bytes)
        if left == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"{left} payload pages of {slab} stayed in the page cache through {tries} drops")
