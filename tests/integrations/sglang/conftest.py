"""Fixtures for the SGLang backend tests.  The test modules need sglang
(its own venv: ./tools/bootstrap.sh --with-sglang) and skip without it;
nothing here imports it at collection."""

from __future__ import annotations

import pytest

SGLANG_MISSING = ("SGLang is not installed here: run ./tools/bootstrap.sh --with-sglang; "
                  "tests/integrations/test_sglang_venv.py runs these tests in .venv-sglang")


@pytest.fixture
def make_node(tmp_path):
    """A controller with a host pool over CPU tensors and a slabcache
    backend at tmp_path/store (``extra`` overrides the extra config)."""
    from slabcache.testing.sglang_hicache import SLABCACHE, Node

    made = []

    def make(extra=None, **kw):
        cfg = {**SLABCACHE, "interface_v1": 1, "path": str(tmp_path / "store"), "capacity": "8M",
               **(extra or {})}
        node = Node({k: v for k, v in cfg.items() if v is not None}, **kw)
        made.append(node)
        return node

    yield make
    for n in made:
        n.close()
