"""The ceiling the SGLang backends are measured against: pages kept in a
dict in memory, no disk at all, as a zero-copy HiCache storage backend.
What it costs is SGLang's controller plus one copy each way.  (A benchmark
helper, not part of slabcache; loaded with ``--hicache-storage-backend
dynamic`` like any other.)
"""

from __future__ import annotations

import collections

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage

from slabcache.integrations.sglang.pages import PageMap


class MemoryStorage(HiCacheStorage):
    """A FIFO dict of page copies in rows of one buffer of ``capacity``
    bytes, allocated and touched up front (so no copy pays for a page fault)."""

    def __init__(self, storage_config, kwargs=None):
        self.capacity = int(storage_config.extra_config["capacity"])
        self.pages_: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        self.map = PageMap(mem_pool_host)
        room = max(1, self.capacity // self.map.page_bytes)
        self.rows = list(torch.zeros(room, self.map.page_bytes, dtype=torch.uint8))

    def batch_set_v1(self, keys, host_indices, extra_info=None):
        for k, parts in zip(keys, self.map.batch(host_indices, len(keys))):
            if k not in self.pages_:
                if not self.rows:
                    self.rows.append(self.pages_.popitem(last=False)[1])
                row, at = self.rows.pop(), 0
                for p in parts:
                    row[at:at + p.numel()].copy_(p)
                    at += p.numel()
                self.pages_[k] = row
        return [True] * len(keys)

    def batch_get_v1(self, keys, host_indices, extra_info=None):
        out = []
        for k, parts in zip(keys, self.map.batch(host_indices, len(keys))):
            page = self.pages_.get(k)
            if page is not None:
                at = 0
                for p in parts:
                    p.copy_(page[at:at + p.numel()])
                    at += p.numel()
            out.append(page is not None)
        return out

    def batch_exists(self, keys, extra_info=None) -> int:
        for i, k in enumerate(keys):
            if k not in self.pages_:
                return i
        return len(keys)

    def exists(self, key) -> bool:
        return key in self.pages_

    # The copying path (without interface_v1): flat pages in and out.

    def get(self, key, target_location=None, target_sizes=None):
        page = self.pages_.get(key)
        if page is None or target_location is None:
            return None
        target_location.view(-1).view(torch.uint8).copy_(page)
        return target_location

    def batch_get(self, keys, target_locations=None, target_sizes=None):
        return [self.get(k, t) for k, t in zip(keys, target_locations or [None] * len(keys))]

    def set(self, key, value=None, target_location=None, target_sizes=None):
        return self.batch_set([key], [value])

    def batch_set(self, keys, values=None, target_locations=None, target_sizes=None):
        for k, v in zip(keys, values):
            if k not in self.pages_:
                if not self.rows:
                    self.rows.append(self.pages_.popitem(last=False)[1])
                row = self.rows.pop()
                row.copy_(v.contiguous().view(-1).view(torch.uint8))
                self.pages_[k] = row
        return True
