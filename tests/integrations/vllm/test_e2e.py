"""A real vLLM engine (CPU build) with slabcache as its storage tier, in
separate processes: what one process stores, the next loads from the slab,
and the output is the output of a run without the cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import VLLM_MISSING

pytest.importorskip("vllm", reason=VLLM_MISSING)

from slabcache import SlabStore  # noqa: E402

pytestmark = pytest.mark.vllm

BLOCKS = 8  # 2 prompts of 600 tokens: 4 full 128-token blocks each
LOGPROB_TOLERANCE = 1e-4  # a loaded prefix changes the batch shapes, not the math


def run(*args, timeout=600) -> None:
    proc = subprocess.run([sys.executable, "-m", "slabcache.testing.vllm_run", *args],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"vllm_run {args[0]} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    run("model", str(path))
    return path


def generate(model, store, out) -> dict:
    run("generate", "--model", str(model), "--store", str(store), "--out", str(out))
    return json.loads(out.read_text())


def same_output(a: dict, b: dict) -> None:
    for x, y in zip(a["results"], b["results"], strict=True):
        assert x["tokens"] == y["tokens"]
        assert max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"], strict=True)) <= LOGPROB_TOLERANCE


def damage_every_payload(store) -> int:
    with SlabStore.open(store, readonly=True) as s:
        with s.snapshot() as snap:
            offsets = [s.geometry.slot_offset(e.slot) + 4096 for e in snap.entries()]
    with open(store / "slab", "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))
    return len(offsets)


def test_a_second_engine_loads_what_the_first_stored(model, tmp_path):
    store = tmp_path / "kv"
    first = generate(model, store, tmp_path / "first.json")
    # The first engine found an empty store: its output is the uncached one.
    assert [r["cached_tokens"] for r in first["results"]] == [0, 0]
    assert first["store"]["slots_used"] == BLOCKS and first["store"]["hits"] == 0

    second = generate(model, store, tmp_path / "second.json")
    assert [r["cached_tokens"] for r in second["results"]] == [4 * 128, 4 * 128]
    assert second["store"]["hits"] == BLOCKS and second["store"]["misses"] == 0
    assert second["store"]["puts"] == BLOCKS  # nothing stored twice
    same_output(first, second)

    # Damaged blocks are misses: vLLM recomputes them, the output is unchanged.
    assert damage_every_payload(store) == BLOCKS
    third = generate(model, store, tmp_path / "third.json")
    assert [r["cached_tokens"] for r in third["results"]] == [0, 0]
    assert third["store"]["hits"] == BLOCKS and third["store"]["misses"] == BLOCKS
    same_output(first, third)
    # and the recomputed blocks were stored again, whole
    with SlabStore.open(store, readonly=True) as s:
        assert s.stats()["slots_used"] == BLOCKS
    fsck = subprocess.run([sys.executable, "-m", "slabcache", "fsck", str(store), "--deep"],
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_tier_setting_the_engine_cannot_use_stops_its_start_up(model, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "slabcache.testing.vllm_run", "generate", "--model", str(model),
         "--store", str(tmp_path / "kv"), "--out", str(tmp_path / "out.json"),
         "--tier-keys", json.dumps({"slot_bytes": "4K"})],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert ("tier key 'slot_bytes' is 4096, smaller than one block of the CPU tier (131072 bytes)"
            in proc.stdout + proc.stderr)
    assert not (tmp_path / "kv").exists() and not (tmp_path / "out.json").exists()
