"""Drive a vLLM secondary tier without a vLLM engine (tests, benchmarks).

What a tier gets from vLLM, built by hand: the offloading spec it reads its
namespace from, the CPU tier's shared buffer as a memoryview, transfer jobs,
and the scheduler's polling of finished jobs.  Needs vLLM installed.
"""

from __future__ import annotations

import hashlib
import mmap
import time
from types import SimpleNamespace

import numpy as np
from vllm.v1.kv_offload.config import (
    OffloadingCacheConfig,
    OffloadingConfig,
    OffloadingGroupConfig,
    OffloadingModelConfig,
    OffloadingParallelConfig,
)
from vllm.v1.kv_offload.tiering.base import TransferJob

BLOCK = 16 << 10  # bytes of one CPU-tier block, unless a caller says otherwise
CHUNKS = 64


def offloading_spec(model: str = "org/tiny", dtype: str = "bfloat16", dp_index: int = 0,
                    block: int = BLOCK):
    """What a tier reads of vLLM's OffloadingSpec: its config and blocks_per_chunk."""
    config = OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("l0", "l1"), group_id=0),),
        worker_kv_bytes_per_block=block, enable_kv_cache_events=False, extra_config={},
        engine_id="test", model=OffloadingModelConfig(name=model, dtype=dtype),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1,
                                          dcp_size=1, data_parallel_index=dp_index,
                                          data_parallel_size=1, data_parallel_rank_local=None,
                                          is_parallelism_agnostic=True))
    return SimpleNamespace(config=config, blocks_per_chunk=1)


class Primary:
    """A CPU tier's shared buffer as vLLM hands it to a tier: a memoryview
    of shape (chunks, block bytes) over an anonymous mapping."""

    def __init__(self, chunks: int = CHUNKS, block: int = BLOCK):
        self.mm = mmap.mmap(-1, chunks * block)
        self.view = memoryview(self.mm).cast("B", (chunks, block))
        self.array = np.frombuffer(self.mm, dtype=np.uint8).reshape(chunks, block)

    def fill(self, chunk_ids, seed: int = 0) -> dict[int, bytes]:
        rng = np.random.default_rng(seed)
        out = {}
        for c in chunk_ids:
            self.array[c] = rng.integers(0, 256, self.array.shape[1], dtype=np.uint8)
            out[c] = self.array[c].tobytes()
        return out

    def close(self) -> None:
        """What vLLM does at shutdown: raises BufferError if a tier kept a view."""
        del self.array
        self.view.release()
        self.mm.close()


def key(i: int, group: int = 0) -> bytes:
    """An OffloadKey as vLLM makes them: a sha256 block hash and a group index."""
    return hashlib.sha256(i.to_bytes(8, "big")).digest() + group.to_bytes(4, "big")


_JOB = iter(range(1, 1 << 30))


def job(keys, chunk_ids) -> TransferJob:
    return TransferJob(job_id=next(_JOB), keys=list(keys), chunk_ids=np.asarray(chunk_ids, dtype=np.int64),
                       is_promotion=False, req_context=None)


def wait_jobs(tier, job_ids, timeout: float = 30.0) -> dict:
    """Poll get_finished_jobs as the scheduler does until every job reports."""
    want, got = set(job_ids), {}
    deadline = time.monotonic() + timeout
    while want - set(got):
        for r in tier.get_finished_jobs():
            got[r.job_id] = r
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs {sorted(want - set(got))} did not finish in {timeout} s")
        time.sleep(0.001)
    return got
