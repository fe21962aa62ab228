import subprocess
import sys
import textwrap

import pytest
import torch

from slabcache import SlabStore
from slabcache.testing import child_env

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


def run_py(code: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run a Python snippet in a fresh interpreter (the repo on sys.path)."""
    env = child_env()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def rand_tensor(n_bytes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=g)
