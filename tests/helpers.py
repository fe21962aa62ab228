"""Helpers for tests (not fixtures): child interpreters, reproducible bytes."""

import subprocess
import sys
import textwrap

import torch

from slabcache.testing import child_env


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
