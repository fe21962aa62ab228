"""SlabCacheBackend: slabcache as LMCache's local disk tier (LMCache 0.5.6 plugin).

Configure it under the name ``LocalDiskBackend`` (and leave ``local_disk``
unset) so it takes the built-in disk tier's place::

    storage_plugins: ["LocalDiskBackend"]
    extra_config:
      storage_plugin.LocalDiskBackend.module_path: slabcache.integrations.lmcache
      storage_plugin.LocalDiskBackend.class_name: SlabCacheBackend
      slabcache.paths: "file:///mnt/nvme0/kvcache/"

Each chunk is stored with its real shapes and dtypes (so `slabcache ls`
shows them); LMCache's memory format and cached positions ride in the
entry's extra bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
from concurrent.futures import Future
from typing import Any, Callable, List, Optional, Sequence

import torch
from lmcache.observability import LMCStatsMonitor
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from ...core import SlabStore
from ...core.values import describe
from ...errors import QueueFullError, SlabcacheError
from .keys import canonical_key
from .placement import take_the_disk_tiers_place
from .settings import from_lmcache

log = logging.getLogger(__name__)


def _bytes_of(memory_obj) -> torch.Tensor:
    """The object's bytes as a uint8 tensor (no copy).  The buffer is
    writable, so torch.frombuffer has nothing to warn about."""
    return torch.frombuffer(memory_obj.byte_array, dtype=torch.uint8)


_EXTRAS: dict[bytes, dict] = {}


def _extra_of(raw: bytes) -> dict | None:
    """LMCache's part of an entry's description (parsed once per distinct
    value: chunks of one model share it), or None when it is not ours."""
    d = _EXTRAS.get(raw)
    if d is None:
        try:
            d = json.loads(raw)
        except ValueError:
            return None
        if len(_EXTRAS) > 1024:
            _EXTRAS.clear()
        _EXTRAS[raw] = d
    return d


_DESCS: dict[tuple, object] = {}


def _describe(memory_obj):
    """The value description of an object: its tensors' real shapes and
    dtypes, with what LMCache needs to rebuild it in the extra bytes.
    Chunks of one model share a few layouts: those are described once."""
    m = memory_obj.metadata
    multi = bool(m.shapes)
    shapes = m.shapes if multi else [m.shape]
    dtypes = m.dtypes if multi else [m.dtype]
    pos = m.cached_positions
    key = None
    if pos is None:
        key = (multi, m.fmt, *[tuple(s) for s in shapes], *dtypes)
        got = _DESCS.get(key)
        if got is not None:
            return got
    extra = json.dumps({
        "fmt": m.fmt.name if m.fmt is not None else None,
        "multi": multi,
        "cached_positions": pos.tolist() if isinstance(pos, torch.Tensor) else None,
    }).encode()
    desc = describe(shapes, dtypes, is_list=multi, extra=extra)
    if key is not None:
        if len(_DESCS) > 1024:
            _DESCS.clear()
        _DESCS[key] = desc
    return desc


class SlabCacheBackend(StoragePluginInterface):
    """LMCache storage plugin backed by one SlabStore per configured path."""

    def __init__(self, config=None, dst_device: str = "cpu", metadata=None,
                 local_cpu_backend=None, loop: Optional[asyncio.AbstractEventLoop] = None):
        super().__init__(dst_device=dst_device, config=config, metadata=metadata,
                         local_cpu_backend=local_cpu_backend, loop=loop)
        try:
            self.settings = from_lmcache(config, metadata, dst_device)
            self.path = self.settings.path
            self.store = SlabStore(self.settings.options)
        except Exception as exc:
            # LMCache logs constructor failures briefly and runs on without
            # the tier; say loudly what is wrong and how to fix it.
            log.error("slabcache: the LocalDiskBackend plugin could not start and LMCache "
                      "will run WITHOUT a disk tier: %s", exc)
            raise
        self._lock = threading.Lock()
        self._inflight: set[str] = set()
        self._keys_in_request: list[str] = []
        # lookup_id -> keys pinned by batched_async_contains, released after the prefetch
        self._lookup_pins: dict[str, list[str]] = {}
        self._stats_monitor = LMCStatsMonitor.GetOrCreate()
        self._report_usage()
        self._futures: set[Future] = set()
        self._drain_before_allocator_closes()
        log.info("slabcache: disk tier at %s (%s, %d slots of %d bytes)", self.path,
                 self.settings.options.io, self.store.geometry.slot_count, self.store.geometry.slot_bytes)
        take_the_disk_tiers_place(self)  # last: only a tier that started takes a place

    def _drain_before_allocator_closes(self) -> None:
        """LMCache 0.5.6's StorageManager.close() closes LocalCPUBackend,
        freeing the memory objects our queued puts still read, before it
        closes storage plugins: a put in flight then reads freed memory
        (a segfault).  So the allocator's close first waits for our puts."""
        cpu = self.local_cpu_backend
        if cpu is None:
            return
        close = cpu.close

        def close_after_our_puts():
            self.wait_for_puts()
            close()

        cpu.close = close_after_our_puts

    def wait_for_puts(self, timeout: float = 120.0) -> bool:
        """Wait until every accepted put is on disk (or failed); False if
        ``timeout`` seconds passed first."""
        with self._lock:
            futs = list(self._futures)
        done, pending = concurrent.futures.wait(futs, timeout=timeout)
        if pending:
            log.error("slabcache: %d puts still running after %.0f s", len(pending), timeout)
        return not pending

    def __str__(self) -> str:
        return "LocalDiskBackend"

    # ------------------------------------------------------------ lookups

    def contains(self, key, pin: bool = False) -> bool:
        k = canonical_key(key)
        if pin:
            if not self.store.pin(k):
                return False
            with self._lock:
                self._keys_in_request.append(k)
            return True
        return self.store.contains(k)

    def batched_contains(self, keys, pin: bool = False) -> int:
        ks = [canonical_key(k) for k in keys]
        if not pin:
            return self.store.prefix(ks)
        n = self.store.prefix(ks, pin=True)  # one transaction for the whole prefix
        with self._lock:
            self._keys_in_request.extend(ks[:n])
        return n

    def pending_puts(self) -> int:
        """Puts accepted and not yet on disk (or failed)."""
        with self._lock:
            return len(self._inflight)

    def exists_in_put_tasks(self, key) -> bool:
        with self._lock:
            return canonical_key(key) in self._inflight

    def touch_cache(self) -> None:
        with self._lock:
            keys, self._keys_in_request = self._keys_in_request, []
        if keys:
            # Prefix chunks are the most valuable: touch them last.
            self.store.touch(list(reversed(keys)))

    def pin(self, key) -> bool:
        return self.store.pin(canonical_key(key))

    def unpin(self, key) -> bool:
        return self.store.unpin(canonical_key(key))

    def remove(self, key, force: bool = True) -> bool:
        removed = self.store.remove(canonical_key(key), force=force)
        if removed:
            self._report_usage()
        return removed

    # ------------------------------------------------------------ put

    def batched_submit_put_task(self, keys: Sequence, objs: List, transfer_spec: Any = None,
                                on_complete_callback: Optional[Callable] = None):
        """Queue the batch as one put: one transaction reserves every slot,
        one commits every entry.  Keys already stored count as a use."""
        ks = [canonical_key(k) for k in keys]
        with self._lock:
            fresh = [i for i, k in enumerate(ks) if k not in self._inflight]
        present = self.store.contains([ks[i] for i in fresh])
        stored = [ks[i] for i, p in zip(fresh, present) if p]
        if stored:
            self.store.touch(stored)
        new = [i for i, p in zip(fresh, present) if not p]
        if not new:
            return None
        batch = [(ks[i], keys[i], objs[i]) for i in new]
        with self._lock:
            self._inflight.update(k for k, _key, _obj in batch)
        # The engine drops its references right after this call: hold one
        # on each object until its bytes are on disk.
        for _k, _key, obj in batch:
            obj.ref_count_up()
        try:
            descs = [_describe(obj) for _k, _key, obj in batch]
            fut = self.store.jobs.write(
                [k for k, _key, _obj in batch],
                [_bytes_of(obj)[:d.length] for (_k, _key, obj), d in zip(batch, descs)], descs)
        except (QueueFullError, SlabcacheError) as exc:
            log.warning("slabcache: put of %d chunks skipped: %s", len(batch), exc)
            self._puts_done(batch, None, on_complete_callback)
            return None
        with self._lock:
            self._futures.add(fut)
        fut.add_done_callback(lambda f: self._puts_done(batch, f, on_complete_callback))
        return [fut]

    def _puts_done(self, batch, fut: Optional[Future], callback) -> None:
        oks = [False] * len(batch)
        try:
            if fut is not None and not fut.cancelled():
                if fut.exception() is not None:
                    log.error("slabcache: writing %d chunks failed: %s", len(batch), fut.exception())
                else:
                    oks = fut.result()
        finally:
            for _k, _key, obj in batch:
                obj.ref_count_down()
            with self._lock:
                self._inflight.difference_update(k for k, _key, _obj in batch)
                self._futures.discard(fut)
        self._report_usage()
        if callback is None:
            return
        for (k, key, _obj), ok in zip(batch, oks):
            if ok:
                try:
                    callback(key)
                except Exception as exc:  # the engine's callback: report, do not propagate
                    log.warning("slabcache: on_complete_callback failed for %s: %s", k, exc)

    # ------------------------------------------------------------ get

    def _report_usage(self) -> None:
        """Tell LMCache's stats monitor how much of the disk tier is in use."""
        self._stats_monitor.update_local_storage_usage(len(self.store) * self.store.geometry.slot_bytes)

    def _allocate(self, k: str, found):
        """(object from the CPU allocator, byte view to read into, LMCache's
        extra description), or None when no object can be had."""
        d = _extra_of(found.desc.extra)
        if d is None:
            log.error("slabcache: entry %s has no LMCache description; dropping it", k)
            self.store.remove(k, force=True)
            return None
        # Entries written before shapes were recorded natively carry them
        # in the extra bytes.
        shapes = [torch.Size(s) for s in d.get("shapes", found.desc.shapes)]
        dtypes = [getattr(torch, t) for t in d.get("dtypes", found.desc.dtypes)]
        fmt = MemoryFormat[d["fmt"]] if d.get("fmt") else None
        if d.get("multi"):
            obj = self.local_cpu_backend.allocate(shapes, dtypes, fmt)
        else:
            obj = self.local_cpu_backend.allocate(shapes[0], dtypes[0], fmt)
        if obj is None:
            log.warning("slabcache: the CPU allocator has no room for %s", k)
            return None
        buf = _bytes_of(obj)
        if buf.numel() < found.length:
            log.error("slabcache: allocated object for %s is smaller than the stored bytes", k)
            obj.ref_count_down()
            return None
        return obj, buf[:found.length], d

    def get_blocking(self, key):
        return self.batched_get_blocking([key])[0]

    def batched_get_blocking(self, keys) -> list:
        """One lookup (which also gives each chunk's shapes and dtypes) and
        one validation for the whole batch; large batches read in parallel."""
        ks = [canonical_key(k) for k in keys]
        found = self.store.lookup(ks)
        jobs = []
        for i, (k, f) in enumerate(zip(ks, found)):
            if f is not None and (got := self._allocate(k, f)) is not None:
                jobs.append((i, got))
        descs = self.store.read_into([found[i] for i, _ in jobs],
                                              [got[1] for _, got in jobs]) if jobs else []
        results: list = [None] * len(ks)
        for (i, (obj, _out, d)), desc in zip(jobs, descs):
            if desc is None:
                obj.ref_count_down()
                continue
            pos = d.get("cached_positions")
            if pos is not None:
                obj.metadata.cached_positions = torch.tensor(pos, dtype=torch.long)
            results[i] = obj
        return results

    # ------------------------------------------------------------ async

    async def batched_async_contains(self, lookup_id: str, keys, pin: bool = False) -> int:
        ks = [canonical_key(k) for k in keys]
        if not pin:
            return self.store.prefix(ks)
        n = self.store.prefix(ks, pin=True)
        if n:
            with self._lock:
                self._lookup_pins.setdefault(lookup_id, []).extend(ks[:n])
        return n

    async def batched_get_non_blocking(self, lookup_id: str, keys, transfer_spec: Any = None) -> list:
        loop = asyncio.get_running_loop()
        try:
            objs = await loop.run_in_executor(None, self.batched_get_blocking, list(keys))
        finally:
            # The pins that made this prefetch safe are released here, once
            # (LMCache's own disk backend leaks them).
            with self._lock:
                pinned = self._lookup_pins.pop(lookup_id, [])
            if pinned:
                self.store.unpin(pinned)
        out = []
        for obj in objs:  # a prefix of hits, as the engine expects
            if obj is None:
                break
            out.append(obj)
        for obj in objs[len(out):]:
            if obj is not None:
                obj.ref_count_down()
        return out

    # ------------------------------------------------------------ life

    def get_allocator_backend(self):
        return self.local_cpu_backend

    def clear(self) -> int:
        n = self.store.clear()
        self._report_usage()
        return n

    def close(self) -> None:
        self.store.close()
