"""SlabCacheStorage: a slabcache store as SGLang HiCache's storage backend.

SGLang's controller calls these methods from its backup and prefetch
threads, a batch of up to 128 pages at a time.  Each batch is one store
call: ``write`` (one transaction reserves every slot, one commits every
entry) or ``lookup`` + ``read_into`` (one lookup, one validation), the
bytes moving straight between the slab and the host pool's page buffers
(pages.py).  ``batch_exists`` is one read transaction.

A prefix is only as useful as its first pages: every later lookup of it
needs them.  So a chain is stored and read tail first, and, when SGLang
passes the keys before a batch (``hicache_storage_pass_prefix_keys``), those
are touched tail first after it: the policy's order then holds a chain's
pages newest-first from its head, and eviction takes tails before heads.

A failed batch answers False for its pages (SGLang counts them as misses)
and never raises: a damaged page is a miss, never bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from ...core.store import SlabStore
from ...core.values import describe
from ...errors import ConfigError, SlabcacheError
from ..stores import open_host_store
from .keys import namespace, store_keys
from .pages import PageMap
from .settings import backend_config

log = logging.getLogger(__name__)


class SlabCacheStorage(HiCacheStorage):
    """Pages of SGLang's host KV pool in one slabcache store."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None):
        self.storage_config = storage_config
        self.settings = backend_config(storage_config.extra_config)
        self.store: SlabStore | None = None
        self.pages: PageMap | None = None
        self._ns = b""
        self._desc = None
        self._writer = storage_config.is_storage_writer
        self._lock = threading.Lock()
        self._metrics = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [], "backup_bandwidth": []}

    # ---------------------------------------------------------------- set-up

    def register_mem_pool_host(self, mem_pool_host) -> None:
        """Open the store once the pool says what a page is."""
        super().register_mem_pool_host(mem_pool_host)
        pages = PageMap(mem_pool_host)
        self.settings.options_for(pages.page_bytes)  # a configured slot must hold a page
        store = open_host_store(self.settings.options, unit=pages.page_bytes,
                                unit_name="one page of the host pool", who="slabcache HiCache backend",
                                keys="The extra config keys 'capacity' and 'slot_bytes'")
        if self.store is not None:
            self.store.close()
        self.store, self.pages = store, pages
        self._ns = namespace(self.storage_config, pages, mem_pool_host)
        self._desc = describe([(pages.page_bytes,)], [torch.uint8], is_list=False, extra=b"sglang")
        log.info("slabcache HiCache backend at %s: %d slots of %d bytes, pages of %d bytes, namespace %r",
                 store.path, store.geometry.slot_count, store.geometry.slot_bytes, pages.page_bytes, self._ns)

    def _ready(self) -> SlabStore:
        if self.store is None:
            raise ConfigError("slabcache HiCache backend: no host pool registered yet; "
                              "SGLang calls register_mem_pool_host before any transfer")
        return self.store

    # ---------------------------------------------------------------- zero-copy

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info=None) -> List[bool]:
        if not keys:
            return []
        if not self._writer:  # an MLA page is the same on every rank: one rank stores it
            return [True] * len(keys)
        t0 = time.perf_counter()
        try:
            store = self._ready()
            parts = self.pages.batch(host_indices, len(keys))
            skeys = store_keys(self._ns, keys)
            # Tail first: the head of the chain ends up newest in the order.
            got = store.write(skeys[::-1], parts[::-1], [self._desc] * len(keys))[::-1]
            if all(got):
                self._touch_prefix(extra_info)
        except (SlabcacheError, OSError, ValueError) as exc:
            log.warning("slabcache HiCache backend: storing %d pages failed: %s", len(keys), exc)
            return [False] * len(keys)
        self._record("backup", len(keys), t0)
        return got

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info=None) -> List[bool]:
        if not keys:
            return []
        t0 = time.perf_counter()
        try:
            self._ready()
            got = self._read(store_keys(self._ns, keys), self.pages.batch(host_indices, len(keys)))
            if all(got):
                self._touch_prefix(extra_info)
        except (SlabcacheError, OSError, ValueError) as exc:
            log.warning("slabcache HiCache backend: reading %d pages failed: %s", len(keys), exc)
            return [False] * len(keys)
        self._record("prefetch", sum(got), t0)
        return got

    def _read(self, skeys: list[bytes], outs: list) -> list[bool]:
        """Read each page into its out (parts or a flat tensor), tail first."""
        store = self._ready()
        found = store.lookup(skeys[::-1])
        size = self.pages.page_bytes
        # A value of another size under this key is a miss, never a partial page.
        found = [f if f is not None and f.length == size else None for f in found]
        got = store.read_into(found, outs[::-1])
        return [d is not None for d in got[::-1]]

    def _touch_prefix(self, extra_info) -> None:
        prefix = getattr(extra_info, "prefix_keys", None)
        if prefix:
            self.store.touch(store_keys(self._ns, prefix[::-1]))

    def _record(self, kind: str, pages: int, t0: float) -> None:
        if not self.storage_config.enable_storage_metrics or not pages:
            return
        seconds = max(time.perf_counter() - t0, 1e-9)
        with self._lock:
            self._metrics[f"{kind}_pgs"].append(pages)
            self._metrics[f"{kind}_bandwidth"].append(pages * self.pages.page_bytes / seconds / 1e9)

    # ---------------------------------------------------------------- lookups

    def batch_exists(self, keys: List[str], extra_info=None) -> int:
        if not keys:
            return 0
        try:
            return self._ready().prefix(store_keys(self._ns, keys))
        except SlabcacheError as exc:
            log.warning("slabcache HiCache backend: lookup failed, answering 0: %s", exc)
            return 0

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # ---------------------------------------------------------------- copying path

    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None):
        return self.batch_get([key], [target_location])[0]

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[Optional[torch.Tensor]]:
        if not keys:
            return []
        try:
            self._ready()
            if target_locations is None:
                target_locations = [torch.empty(self.pages.page_bytes, dtype=torch.uint8) for _ in keys]
            got = self._read(store_keys(self._ns, keys), list(target_locations))
        except (SlabcacheError, OSError, ValueError) as exc:
            log.warning("slabcache HiCache backend: reading %d pages failed: %s", len(keys), exc)
            return [None] * len(keys)
        return [t if ok else None for t, ok in zip(target_locations, got)]

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        if not keys:
            return True
        if not self._writer:
            return True
        try:
            store = self._ready()
            values = list(values)
            for i, v in enumerate(values):
                n = v.numel() * v.element_size()
                if n != self.pages.page_bytes:
                    raise ValueError(f"values[{i}] holds {n} bytes, a page {self.pages.page_bytes}")
            skeys = store_keys(self._ns, keys)
            return all(store.write(skeys[::-1], values[::-1], [self._desc] * len(keys)))
        except (SlabcacheError, OSError, ValueError) as exc:
            log.warning("slabcache HiCache backend: storing %d pages failed: %s", len(keys), exc)
            return False

    # ---------------------------------------------------------------- housekeeping

    def clear(self) -> bool:
        """Remove this namespace's pages (other models and ranks sharing the
        path keep theirs; SGLang calls this on every rank)."""
        store = self._ready()
        mine = [k for k in store.keys() if isinstance(k, bytes) and k.startswith(self._ns)]
        store.remove(mine, force=True)
        log.info("slabcache HiCache backend: cleared %d pages of %r", len(mine), self._ns)
        return True

    def get_stats(self):
        """SGLang's StorageMetrics (pages and GB/s of each batch since the
        last call), with the store's counters as ``.slabcache``: hits,
        misses, bytes read and written, slots used and total."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        m = StorageMetrics()
        with self._lock:
            for name, values in self._metrics.items():
                getattr(m, name).extend(values)
                values.clear()
        if self.store is not None:
            s = self.store.stats()
            m.slabcache = {k: s[k] for k in ("hits", "misses", "bytes_read", "bytes_written", "slots_used",
                                            "slots_total", "slot_bytes", "capacity_bytes", "checksum_failures")}
        return m

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
