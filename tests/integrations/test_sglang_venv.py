"""Runs the SGLang backend tests (tests/integrations/sglang) in SGLang's own venv.

SGLang pins its own numpy and many packages, so it lives in .venv-sglang
(built by ``./tools/bootstrap.sh --with-sglang``; CI builds it), not in this
venv.  This test runs those tests there, so one ``pytest`` covers both.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import run_suite_in_venv

ROOT = Path(__file__).resolve().parents[2]
SGLANG_PYTHON = Path(os.environ.get("SLABCACHE_SGLANG_PYTHON", ROOT / ".venv-sglang" / "bin" / "python"))


@pytest.mark.sglang
@pytest.mark.skipif(not SGLANG_PYTHON.exists(),
                    reason=f"no SGLang venv at {SGLANG_PYTHON}: run ./tools/bootstrap.sh --with-sglang "
                           "(or set SLABCACHE_SGLANG_PYTHON to a python with sglang==0.5.23 and slabcache)")
def test_sglang_backend_suite_passes_in_the_sglang_venv(tmp_path):
    run_suite_in_venv(SGLANG_PYTHON, "tests/integrations/sglang", tmp_path, "SGLang", timeout=900)
