"""The host benchmarks' reports of several runs (``--from-json RUN1 RUN2``):
every round of every run pooled, each round's contenders still paired.
The README's LMCache and vLLM tables are made this way."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORK = ("store", "warm_load", "cold_load", "churn")


def _report(script: str, *files: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, f"benchmarks/{script}", "--from-json", *map(str, files)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _row(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _vllm_run(path: Path, fs: list[float], mmap: list[float]) -> Path:
    def contender(vals):
        runs = {w: list(vals) for w in WORK} | {"lookup_1000_ms": [1.0] * len(vals),
                                               "churn_loads": [1] * len(vals), "churn_stores": [1] * len(vals)}
        return {w: sorted(v)[len(v) // 2] for w, v in runs.items()} | {"runs": runs}

    path.write_text(json.dumps({"rounds": len(fs), "job_blocks": 8, "results": {
        "1M": {"fs": contender(fs), "slabcache-mmap": contender(mmap)}}}))
    return path


def test_vllm_tier_pools_the_rounds_of_several_runs_in_pairs(tmp_path):
    # Round by round, slabcache / fs: 2, 4 in the first run, 3, 8 in the second.
    a = _vllm_run(tmp_path / "a.json", fs=[1, 1], mmap=[2, 4])
    b = _vllm_run(tmp_path / "b.json", fs=[2, 1], mmap=[6, 8])
    text = _report("vllm_tier.py", a, b)
    assert "4 rounds in 2 run(s)" in text
    cells = _row(text, "| 1M | mmap vs fs")
    # Medians over all four rounds: 5 / 1; the range over the rounds' own ratios.
    assert cells[2].startswith("**5.00x** (2.00-8.00)")
    one = _report("vllm_tier.py", a)
    assert _row(one, "| 1M | mmap vs fs")[2].startswith("**3.00x** (2.00-4.00)")


def test_lmcache_engine_pools_the_rounds_of_several_runs_in_pairs(tmp_path):
    pytest.importorskip("lmcache", reason="benchmarks/lmcache_engine.py needs lmcache "
                        "(./tools/bootstrap.sh --with-lmcache)")
    workloads = ("store", "warm retrieve", "cold retrieve", "churn")

    def rounds(vals):
        return [{w: v for w in workloads} | {"store_blocks_ms": 1.0, "warm retrieve backend_ms": 1.0}
                for v in vals]

    def run(path, theirs, ours):
        results = []
        for contender, vals in (("lmcache-buffered", theirs), ("slabcache-mmap", ours)):
            results.append({"chunk": 8 << 20, "contender": contender, "prompts": 8,
                            "median": rounds([sorted(vals)[len(vals) // 2]])[0], "runs": rounds(vals)})
        path.write_text(json.dumps({"rounds": len(theirs), "results": results}))
        return path

    a = run(tmp_path / "a.json", theirs=[1, 1], ours=[2, 4])
    b = run(tmp_path / "b.json", theirs=[2, 1], ours=[6, 8])
    text = _report("lmcache_engine.py", a, b)
    assert "4 rounds in 2 run(s)" in text
    cells = _row(text, "| 8 MiB | slabcache-mmap vs lmcache-buffered")
    assert cells[2].startswith("**5.00x** (2.00-8.00)")
