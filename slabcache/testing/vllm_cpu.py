"""vLLM's tiered offloading on a machine without a GPU (tests, benchmarks).

vLLM's ``TieringOffloadingSpec`` refuses to build its worker unless the
platform is CUDA-like, and that worker copies between the GPU KV cache and
the CPU tier with CUDA streams.  The scheduler side (the tiers, lookups,
jobs) does not care where the KV cache lives.  ``CPUTieringSpec`` keeps the
whole scheduler side unchanged and swaps only the worker for one that copies
the same bytes, at the same addresses vLLM's worker computes
(``compute_sub_block_ptrs``), with plain memory copies.

Load it with ``"spec_name": "CPUTieringSpec", "spec_module_path":
"slabcache.testing.vllm_cpu"`` in ``kv_connector_extra_config``.  Not for
production: it exists so the tier can be tested end to end on CPU.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np
import torch
from vllm.v1.kv_offload.base import OffloadingWorker, TransferResult
from vllm.v1.kv_offload.cpu.gpu_worker import compute_sub_block_ptrs
from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion
from vllm.v1.kv_offload.tiering.spec import TieringOffloadingSpec


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _MemcpyDirection:
    """One direction (KV cache -> CPU tier, or back), done synchronously."""

    def __init__(self, kv_tensors, cpu_tensors, blocks_per_chunk, refs_per_group, to_cpu: bool):
        self.src = kv_tensors if to_cpu else cpu_tensors
        self.dst = cpu_tensors if to_cpu else kv_tensors
        self.refs_per_group = refs_per_group
        self.to_cpu = to_cpu
        self.src_bpc = 1 if to_cpu else blocks_per_chunk
        self.dst_bpc = blocks_per_chunk if to_cpu else 1

    def transfer(self, src_spec, dst_spec) -> int:
        """Copy as vLLM's CUDA handler would (direct layout); returns bytes copied."""
        src_blocks, dst_blocks = src_spec.block_ids, dst_spec.block_ids
        kv_spec = src_spec if self.to_cpu else dst_spec
        src_off = dst_off = 0
        copied = 0
        for g, (size, block_idx) in enumerate(zip(kv_spec.group_sizes, kv_spec.block_indices)):
            if size == 0:
                continue
            src_skip = block_idx % self.src_bpc
            dst_skip = block_idx % self.dst_bpc
            src_n = _cdiv(size + src_skip, self.src_bpc)
            dst_n = _cdiv(size + dst_skip, self.dst_bpc)
            for ref in self.refs_per_group[g]:
                srcs = np.empty(size, dtype=np.uint64)
                dsts = np.empty(size, dtype=np.uint64)
                compute_sub_block_ptrs(src_blocks[src_off:src_off + src_n], self.src_bpc, srcs,
                                       self.src[ref.tensor_idx], skip_count=src_skip)
                compute_sub_block_ptrs(dst_blocks[dst_off:dst_off + dst_n], self.dst_bpc, dsts,
                                       self.dst[ref.tensor_idx], skip_count=dst_skip)
                for s, d in zip(srcs.tolist(), dsts.tolist()):
                    ctypes.memmove(d, s, ref.page_size_bytes)
                copied += size * ref.page_size_bytes
            src_off += src_n
            dst_off += dst_n
        assert src_off == len(src_blocks) and dst_off == len(dst_blocks)
        return copied


class MemcpyOffloadingWorker(OffloadingWorker):
    """CPUOffloadingWorker's job, with memory copies instead of CUDA streams."""

    def __init__(self, kv_caches, blocks_per_chunk: int, mmap_region: SharedOffloadRegion):
        self._region = mmap_region
        kv, cpu = [], []
        for t in kv_caches.tensors:
            page = t.page_size_bytes
            kv.append(t.tensor.view(torch.int8).view(-1, page))
            cpu.append(mmap_region.create_next_worker_view(page * blocks_per_chunk))
        self._store = _MemcpyDirection(kv, cpu, blocks_per_chunk, kv_caches.group_data_refs, True)
        self._load = _MemcpyDirection(kv, cpu, blocks_per_chunk, kv_caches.group_data_refs, False)
        self._done: list[TransferResult] = []

    def _run(self, direction, job_id, src_spec, dst_spec) -> bool:
        t0 = time.perf_counter()
        n = direction.transfer(src_spec, dst_spec)
        self._done.append(TransferResult(job_id=job_id, success=True, transfer_size=n,
                                         transfer_time=time.perf_counter() - t0))
        return True

    def submit_store(self, job_id, src_spec, dst_spec) -> bool:
        return self._run(self._store, job_id, src_spec, dst_spec)

    def submit_load(self, job_id, src_spec, dst_spec) -> bool:
        return self._run(self._load, job_id, src_spec, dst_spec)

    def get_finished(self) -> list[TransferResult]:
        done, self._done = self._done, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        return  # every copy finished inside submit_*

    def shutdown(self) -> None:
        self._store = self._load = None
        if self._region is not None:
            self._region.cleanup()
            self._region = None


class CPUTieringSpec(TieringOffloadingSpec):
    """TieringOffloadingSpec whose worker runs on CPU (see the module docstring)."""

    def get_worker(self, kv_caches):
        if not self._worker:
            rank = 0 if self.replicated_layout else self.config.parallel.rank
            region = SharedOffloadRegion(
                engine_id=self._engine_id, num_chunks=self.num_chunks, rank=rank,
                kv_bytes_per_chunk=self.kv_bytes_per_chunk,
                cpu_page_size=self.cpu_page_size_per_worker)
            try:
                self._worker = MemcpyOffloadingWorker(kv_caches, self.blocks_per_chunk, region)
            except BaseException:
                region.cleanup()
                raise
        return self._worker
