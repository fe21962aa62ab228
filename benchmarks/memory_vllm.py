"""The ceiling the vLLM tiers are measured against: blocks kept in a dict in
memory, no disk at all, as a vLLM secondary tier.  Jobs are copies done at
once on the scheduler's thread; what they cost is vLLM's tier API plus one
copy each way.  (A benchmark helper, not part of slabcache.)
"""

from __future__ import annotations

import collections
from typing import ClassVar

import numpy as np
import torch
from vllm.v1.kv_offload.base import LookupResult, Medium, RequestOffloadingContext
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager


class MemoryTier(SecondaryTierManager):
    """A FIFO dict of block copies, ``capacity_blocks`` at most."""

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(self, offloading_spec, primary_kv_view, tier_type, backpressure_detector=None,
                 capacity_blocks: int = 1 << 20):
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        self._rows = torch.from_numpy(np.asarray(primary_kv_view).view(np.uint8))
        self._blocks: collections.OrderedDict = collections.OrderedDict()
        self._capacity = capacity_blocks
        self._finished: collections.deque = collections.deque()

    def lookup(self, key, req_context) -> LookupResult:
        return LookupResult.HIT if key in self._blocks else LookupResult.MISS

    def submit_store(self, job) -> None:
        for key, chunk in zip(job.keys, job.chunk_ids):
            if key not in self._blocks:
                self._blocks[key] = self._rows[int(chunk)].clone()
                while len(self._blocks) > self._capacity:
                    self._blocks.popitem(last=False)
        self._finished.append(JobResult(job_id=job.job_id, success=True,
                                        transfer_bytes=len(job.keys) * self.block_size_bytes))

    def submit_load(self, job) -> None:
        loaded = []
        for key, chunk in zip(job.keys, job.chunk_ids):
            got = self._blocks.get(key)
            if got is not None:
                self._rows[int(chunk)].copy_(got)
                loaded.append(key)
        ok = len(loaded) == len(job.keys)
        self._finished.append(JobResult(job_id=job.job_id, success=ok,
                                        transfer_bytes=len(loaded) * self.block_size_bytes,
                                        successful_keys=None if ok else tuple(loaded) or None))

    def get_finished_jobs(self):
        out = list(self._finished)
        self._finished.clear()
        return out

    def has_pending_work(self) -> bool:
        return bool(self._finished)

    def on_new_request(self, req_context) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def drain_jobs(self) -> None:
        """Nothing queued: every job finished when it was submitted."""

    def shutdown(self) -> None:
        self._blocks.clear()
        self._rows = None
