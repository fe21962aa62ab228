"""Fixtures for the vLLM tier tests.  The test modules need vLLM (its own
venv: ./tools/bootstrap.sh --with-vllm) and skip without it; nothing here
imports it at collection."""

from __future__ import annotations

import pytest

VLLM_MISSING = ("vLLM is not installed here: run ./tools/bootstrap.sh --with-vllm; "
                "tests/integrations/test_vllm_venv.py runs these tests in .venv-vllm")


@pytest.fixture
def primary():
    from slabcache.testing.vllm_tier import Primary

    p = Primary()
    yield p
    if not p.mm.closed:  # after the tiers shut down: a view they kept fails here
        p.close()


@pytest.fixture
def make_tier(tmp_path):
    from slabcache.integrations.vllm import SlabCacheTier

    from slabcache.testing.vllm_tier import BLOCK, CHUNKS, offloading_spec

    made = []

    def make(primary, spec=None, **keys):
        keys.setdefault("path", str(tmp_path / "store"))
        keys.setdefault("capacity", str(CHUNKS * BLOCK))
        tier = SlabCacheTier(spec or offloading_spec(), primary.view, "SlabCacheTier", **keys)
        made.append(tier)
        return tier

    yield make
    for t in made:
        t.shutdown()

