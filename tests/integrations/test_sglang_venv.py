"""Runs the SGLang backend tests (tests/integrations/sglang) in SGLang's own venv.

SGLang pins its own numpy and many packages, so it lives in .venv-sglang
(built by ``./tools/bootstrap.sh --with-sglang``; CI builds it), not in this
venv.  This test runs those tests there, so one ``pytest`` covers both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SGLANG_PYTHON = Path(os.environ.get("SLABCACHE_SGLANG_PYTHON", ROOT / ".venv-sglang" / "bin" / "python"))


@pytest.mark.sglang
@pytest.mark.skipif(not SGLANG_PYTHON.exists(),
                    reason=f"no SGLang venv at {SGLANG_PYTHON}: run ./tools/bootstrap.sh --with-sglang "
                           "(or set SLABCACHE_SGLANG_PYTHON to a python with sglang==0.5.23 and slabcache)")
def test_sglang_backend_suite_passes_in_the_sglang_venv(tmp_path):
    if Path(sys.prefix).resolve() == SGLANG_PYTHON.parent.parent.resolve():
        pytest.skip("already running in the SGLang venv: tests/integrations/sglang run here directly")
    proc = subprocess.run(
        [str(SGLANG_PYTHON), "-m", "pytest", "tests/integrations/sglang", "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'sglang'}", "-rs"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, f"SGLang backend tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " skipped" not in proc.stdout.splitlines()[-1], "SGLang backend tests skipped in the SGLang venv"
