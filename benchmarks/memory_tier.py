"""The ceiling the disk tiers are measured against: chunks kept in a dict in
memory, no disk at all, as an LMCache storage plugin in the disk tier's
place.  What it costs is LMCache's own engine plus one copy each way; a
disk tier's share of the gap between file-per-chunk and this is how much
of what can be won it wins.  (A benchmark helper, not part of slabcache.)
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from typing import Optional

import torch
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface


class MemoryBackend(StoragePluginInterface):
    """A FIFO dict of chunk copies, bounded by ``max_local_disk_size``."""

    def __init__(self, config=None, dst_device: str = "cpu", metadata=None,
                 local_cpu_backend=None, loop: Optional[asyncio.AbstractEventLoop] = None):
        super().__init__(dst_device=dst_device, config=config, metadata=metadata,
                         local_cpu_backend=local_cpu_backend, loop=loop)
        self._chunks: OrderedDict = OrderedDict()
        self._bytes = 0
        self._room = int(float(getattr(config, "max_local_disk_size", 1.0)) * (1 << 30))
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return "LocalDiskBackend"

    def contains(self, key, pin: bool = False) -> bool:
        with self._lock:
            return key in self._chunks

    def batched_contains(self, keys, pin: bool = False) -> int:
        n = 0
        with self._lock:
            for k in keys:
                if k not in self._chunks:
                    break
                n += 1
        return n

    def exists_in_put_tasks(self, key) -> bool:
        return False

    def batched_submit_put_task(self, keys, objs, transfer_spec=None, on_complete_callback=None):
        for key, obj in zip(keys, objs):
            m = obj.metadata
            data = torch.frombuffer(obj.byte_array, dtype=torch.uint8).clone()
            with self._lock:
                if key in self._chunks:
                    continue
                self._chunks[key] = (data, m.shape, m.dtype, m.fmt)
                self._bytes += data.numel()
                while self._bytes > self._room and self._chunks:
                    _k, (old, *_rest) = self._chunks.popitem(last=False)
                    self._bytes -= old.numel()
            if on_complete_callback is not None:
                on_complete_callback(key)
        return None

    def get_blocking(self, key):
        return self.batched_get_blocking([key])[0]

    def batched_get_blocking(self, keys) -> list:
        out = []
        for key in keys:
            with self._lock:
                got = self._chunks.get(key)
            if got is None:
                out.append(None)
                continue
            data, shape, dtype, fmt = got
            obj = self.local_cpu_backend.allocate(shape, dtype, fmt)
            if obj is None:
                out.append(None)
                continue
            torch.frombuffer(obj.byte_array, dtype=torch.uint8)[:data.numel()].copy_(data)
            out.append(obj)
        return out

    async def batched_async_contains(self, lookup_id, keys, pin: bool = False) -> int:
        return self.batched_contains(keys, pin)

    async def batched_get_non_blocking(self, lookup_id, keys, transfer_spec=None) -> list:
        objs = self.batched_get_blocking(list(keys))
        out = []
        for obj in objs:
            if obj is None:
                break
            out.append(obj)
        return out

    def touch_cache(self) -> None:
        """Nothing to touch: a dict keeps no order."""

    def pin(self, key) -> bool:
        return self.contains(key)

    def unpin(self, key) -> bool:
        return self.contains(key)

    def remove(self, key, force: bool = True) -> bool:
        with self._lock:
            got = self._chunks.pop(key, None)
            if got is not None:
                self._bytes -= got[0].numel()
        return got is not None

    def get_allocator_backend(self):
        return self.local_cpu_backend

    def close(self) -> None:
        with self._lock:
            self._chunks.clear()
