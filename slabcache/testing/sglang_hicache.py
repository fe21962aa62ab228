"""SGLang's own HiCache controller and host pool on CPU tensors, for tests
and benchmarks of storage backends (needs sglang==0.5.23: its own venv,
``tools/bootstrap.sh --with-sglang``).

No SGLang engine runs on a CPU-only machine (its CPU mode needs a build of
sgl-kernel the package index does not have), but the controller that
backs pages up to storage and prefetches them back, and the host pool it
moves them through, are plain Python over tensors.  ``Node`` builds both
the way SGLang's scheduler does and drives them as a request would:
``backup`` is ``write_storage`` then its ack; ``prefetch`` is the hit query,
host pages allocated for the hit, the transfer, and its acks.

SGLang imports torchvision at start-up, and the builds on the package
index do not load beside CPU torch 2.13; ``tools/torchvision_standin``
is put on ``sys.path`` by ``tools/bootstrap.sh`` (a .pth file) instead.
"""

from __future__ import annotations

import gc
import os
import socket
import threading

import torch

PAGE_LAYOUTS = ("page_first", "page_first_direct", "layer_first")
SLABCACHE = {"backend_name": "slabcache", "module_path": "slabcache.integrations.sglang",
             "class_name": "SlabCacheStorage"}
_started = threading.Lock()
_ready = False


def start_runtime() -> None:
    """Publish SGLang's runtime context and a one-rank gloo group (once a
    process), as SGLang's own tests do."""
    global _ready
    with _started:
        if _ready:
            return
        import torch.distributed as dist
        from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
        from sglang.srt.server_args import ServerArgs

        reset_context()
        publish(ServerArgs(model_path="dummy"), role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
        if not dist.is_initialized():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(port)
            dist.init_process_group("gloo", rank=0, world_size=1)
        _ready = True


class _Allocator:
    """What the controller asks of the device allocator: its KV pool."""

    def __init__(self, kv):
        self._kv = kv

    def get_kvcache(self):
        return self._kv


def make_host_pool(layout: str = "page_first", *, page_size: int = 4, layers: int = 2, heads: int = 2,
                   head_dim: int = 64, dtype=torch.float16, tokens: int = 256, mla: bool = False):
    """(device pool, host pool) over CPU tensors; the host pool holds
    ``tokens`` tokens (a page more, as SGLang sizes it).  The device pool,
    which only stands in for the GPU's, is kept to a few pages."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    device = 4 * page_size
    ratio = max(1.0, tokens / device)

    if mla:
        from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

        kv = MLATokenToKVPool(device, page_size, dtype, head_dim, 8, layers, "cpu", False,
                              start_layer=0, end_layer=layers)
        host = MLATokenToKVPoolHost(kv.get_device_pool_infos()[0].buffer_info, ratio, 0, page_size, layout,
                                    pin_memory=False, device="cpu", device_capacity_tokens=kv.size,
                                    start_layer=0, end_layer=layers, target_layer_num=layers)
        return kv, host
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

    kv = MHATokenToKVPool(device, page_size, dtype, heads, head_dim, layers, "cpu", False,
                          start_layer=0, end_layer=layers)
    host = MHATokenToKVPoolHost(kv.get_device_pool_infos()[0].buffer_info, ratio, 0, page_size, layout,
                                pin_memory=False, device="cpu", device_capacity_tokens=kv.size,
                                start_layer=0, end_layer=layers)
    return kv, host


class Node:
    """A HiCache controller with a host pool and a storage backend.

    ``backend`` is ``"dynamic"`` (``extra`` loads the class) or the name of
    one of SGLang's own (``"file"``).  Close it to stop its threads.
    """

    def __init__(self, extra: dict, *, backend: str = "dynamic", model: str = "test-model",
                 metrics: bool = False, **pool):
        from sglang.srt.managers.cache_controller import HiCacheController
        import torch.distributed as dist

        start_runtime()
        self.kv, self.host = make_host_pool(**pool)
        self.page_size = self.host.page_size
        self.controller = HiCacheController(
            _Allocator(self.kv), self.host, self.page_size, dist.group.WORLD, threading.Event(),
            io_backend="direct", storage_backend=backend, model_name=model,
            storage_backend_extra_config=dict(extra), enable_storage_metrics=metrics)
        self.backend = self.controller.storage_backend

    # -- what a request does

    def fill(self, tokens: int, seed: int) -> torch.Tensor:
        """Host pages for ``tokens`` tokens, filled with random values."""
        idx = self.host.alloc(tokens)
        if idx is None:
            raise RuntimeError(f"host pool has no room for {tokens} more tokens; free some first")
        g = torch.Generator().manual_seed(seed)
        for i in idx[::self.page_size].tolist():
            page = self.host.get_data_page(i, flat=False)
            page.copy_(torch.randn(page.shape, generator=g).to(page.dtype))
        return idx

    def pages(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Copies of the host pages at ``idx`` (flattened, as stored)."""
        return [self.host.get_data_page(i, flat=True).clone() for i in idx[::self.page_size].tolist()]

    def hashes(self, token_ids: list[int]) -> list[str]:
        from sglang.srt.mem_cache.utils import get_storage_hash_str

        return get_storage_hash_str(token_ids, None, page_size=self.page_size)

    def backup(self, idx: torch.Tensor, token_ids: list[int], timeout: float = 120) -> int:
        """Store the pages at ``idx`` (holding ``token_ids``); the tokens acked."""
        ctl = self.controller
        ctl.write_storage(idx, token_ids, hash_value=self.hashes(token_ids))
        return ctl.ack_backup_queue.get(timeout=timeout).completed_tokens

    def prefetch(self, token_ids: list[int], rid: str = "r", timeout: float = 120):
        """Fetch ``token_ids``'s pages from storage into new host pages:
        (tokens found by the hit query, tokens transferred, host indices)."""
        ctl = self.controller
        ctl.prefetch(rid, token_ids)
        op = ctl.prefetch_hit_queue.get(timeout=timeout)
        hit = op.storage_hit_count
        if hit == 0:
            return 0, 0, torch.empty(0, dtype=torch.int64)
        op.host_indices = self.host.alloc(hit)
        ctl.prefetch_buffer.put(op)
        done = 0
        while True:
            ack = ctl.ack_prefetch_queue.get(timeout=timeout)
            if ack.completed_tokens is not None:
                done = ack.completed_tokens
            if ack.completed_req:
                break
        return hit, done, op.host_indices[:done]

    def free(self, idx: torch.Tensor) -> None:
        self.host.free(idx)

    def close(self) -> None:
        """Stop the controller's storage threads, close the backend and let
        the pools go (they are the size of the working set).  Idempotent."""
        if self.controller is None:
            return
        self.controller.detach_storage_backend()
        self.controller = self.backend = self.host = self.kv = None
        gc.collect()
