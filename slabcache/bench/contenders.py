"""What the benchmarks compare: slabcache and the file-per-chunk layouts it replaces."""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from ..core import SlabStore
from ..device.memory import aligned_empty

ALIGN = 4096


# What each contender is compared with: the same configuration of the
# layout it replaces.  LMCache writes buffered unless use_odirect is set.
BUFFERED = "file-per-chunk-buffered"
ODIRECT = "file-per-chunk-odirect"
BASELINE_OF = {
    "slabcache-mmap": BUFFERED,
    "slabcache-direct": ODIRECT,
    "lmcache-LocalDiskBackend-buffered": BUFFERED,
    "lmcache-LocalDiskBackend-odirect": ODIRECT,
}


def drop_file_cache(paths) -> None:
    """Evict files from the page cache.  Dirty pages survive fadvise, so
    each file is written back first; without that a "cold" read of a file
    just written is served from memory."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class FilePerChunk:
    """LMCache's on-disk layout, faithfully: one file per chunk in one
    directory, open/write/close, an in-memory dict index, unlink on
    eviction, LRU order.  Buffered by default, as LMCache runs it; with
    ``odirect`` (LMCache's use_odirect) sizes that are a multiple of the
    block size go through O_DIRECT."""

    def __init__(self, directory: str, capacity_bytes: int, odirect: bool = False, **_):
        self.dir = directory
        self.odirect = odirect
        self.name = ODIRECT if odirect else BUFFERED
        os.makedirs(directory, exist_ok=True)
        self.capacity = capacity_bytes
        self.used = 0
        self.index: OrderedDict[str, tuple[int, torch.dtype, tuple]] = OrderedDict()
        self._buf = aligned_empty(1 << 20)

    def _path(self, key: str) -> str:
        return os.path.join(self.dir, key.replace("/", "-") + ".pt")

    def _aligned(self, n: int) -> torch.Tensor:
        if self._buf.numel() < n:
            self._buf = aligned_empty(n)
        return self._buf[:n]

    def put(self, key: str, t: torch.Tensor) -> bool:
        if key in self.index:
            self.index.move_to_end(key)
            return True
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        n = raw.numel()
        while self.used + n > self.capacity and self.index:
            old, (size, _, _) = self.index.popitem(last=False)
            os.unlink(self._path(old))
            self.used -= size
        direct = self.odirect and n % ALIGN == 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        fd = os.open(self._path(key), flags, 0o644)
        try:
            if direct:
                buf = self._aligned(n)
                buf.copy_(raw)
                os.write(fd, buf.numpy())
            else:
                os.write(fd, raw.numpy())
        finally:
            os.close(fd)
        self.index[key] = (n, t.dtype, tuple(t.shape))
        self.used += n
        return True

    def get(self, key: str, out: torch.Tensor) -> bool:
        """Read into ``out`` (a 4 KiB-aligned buffer from the caller's pool,
        as LMCache's CPU allocator hands out)."""
        meta = self.index.get(key)
        if meta is None:
            return False
        n, dtype, shape = meta
        direct = self.odirect and n % ALIGN == 0
        fd = os.open(self._path(key), os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            pos = 0
            while pos < n:
                got = os.readv(fd, [view[pos:]])
                if got == 0:
                    return False
                pos += got
        finally:
            os.close(fd)
        self.index.move_to_end(key)
        return True

    def batched_contains(self, keys) -> int:
        n = 0
        for k in keys:
            if k not in self.index:
                break
            n += 1
        return n

    def drop_cache(self) -> None:
        drop_file_cache(self._path(key) for key in self.index)

    def reopen(self) -> "FilePerChunk":
        # The index lived in a Python dict: after a restart nothing is found.
        return FilePerChunk(self.dir, self.capacity, self.odirect)

    def close(self) -> None:
        """Nothing to release: every file is closed after each operation."""


class SlabContender:
    def __init__(self, directory: str, capacity_bytes: int, slot_bytes: int, io: str):
        self.name = f"slabcache-{io}"
        self.dir, self.io = directory, io
        self.store = SlabStore.open(directory, capacity_bytes=capacity_bytes, slot_bytes=slot_bytes,
                                    io=io, policy="lru")

    def put(self, key, t):
        return self.store.put(key, t)

    def get(self, key, out):
        return self.store.get_into(key, out)

    def batched_contains(self, keys):
        return self.store.prefix(keys)

    def drop_cache(self):
        self.store.engine.drop_cache()

    def reopen(self):
        self.store.close()
        new = object.__new__(SlabContender)
        new.name, new.dir, new.io = self.name, self.dir, self.io
        new.store = SlabStore.open(self.dir, io=self.io)
        return new

    def close(self):
        self.store.close()


class LMCacheDisk:
    """LMCache's own LocalDiskBackend, driven through its storage-backend API
    with a CPU LocalCPUBackend as allocator (needs lmcache installed)."""

    def __init__(self, directory: str, capacity_bytes: int, size: int, odirect: bool = False):
        self.name = "lmcache-LocalDiskBackend-" + ("odirect" if odirect else "buffered")
        os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
        # LMCache logs every backend start and stop at INFO: keep the table readable.
        os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.event_manager import EventManager
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.storage_manager import StorageManager

        self.dir, self.capacity, self.size, self.odirect = directory, capacity_bytes, size, odirect
        os.makedirs(directory, exist_ok=True)
        cfg = LMCacheEngineConfig.from_defaults(
            chunk_size=256, local_cpu=False, max_local_cpu_size=max(0.25, 6 * size / 1024 ** 3),
            local_disk=directory, max_local_disk_size=capacity_bytes / 1024 ** 3,
            lmcache_instance_id=f"bench-{os.getpid()}-{id(self)}")
        cfg.extra_config = {"use_odirect": odirect}
        md = LMCacheMetadata(model_name="bench", world_size=1, local_world_size=1, worker_id=0,
                             local_worker_id=0, kv_dtype=torch.bfloat16,
                             kv_shape=(1, 2, 256, 1, max(1, size // (2 * 256 * 2))))
        self.sm = StorageManager(config=cfg, metadata=md, event_manager=EventManager())
        self.disk = self.sm.storage_backends["LocalDiskBackend"]
        self.cpu = self.sm.allocator_backend

    def _key(self, key: str):
        from lmcache.utils import CacheEngineKey

        return CacheEngineKey(model_name="bench", world_size=1, worker_id=0,
                              chunk_hash=int.from_bytes(key.encode()[-8:].rjust(8, b"0"), "big")
                              ^ hash(key) & 0xFFFFFFFF, dtype=torch.bfloat16)

    def put(self, key, t) -> bool:
        import threading

        k = self._key(key)
        if self.disk.contains(k):
            self.disk.touch_cache()
            return True
        mo = self.cpu.allocate(torch.Size([t.numel()]), t.dtype)
        if mo is None:
            return False
        mo.tensor.view(-1).copy_(t.reshape(-1))
        done = threading.Event()
        self.disk.batched_submit_put_task([k], [mo], on_complete_callback=lambda _k: done.set())
        mo.ref_count_down()
        if not self.disk.exists_in_put_tasks(k) and not done.is_set():
            return self.disk.contains(k)  # skipped by admission control
        return done.wait(60)

    def get(self, key, out) -> bool:
        mo = self.disk.get_blocking(self._key(key))
        if mo is None:
            return False
        out.reshape(-1).copy_(mo.tensor.reshape(-1))
        mo.ref_count_down()
        return True

    def batched_contains(self, keys) -> int:
        return self.disk.batched_contains([self._key(k) for k in keys])

    def drop_cache(self) -> None:
        drop_file_cache(os.path.join(self.dir, name) for name in os.listdir(self.dir))

    def reopen(self) -> "LMCacheDisk":
        self.close()
        return LMCacheDisk(self.dir, self.capacity, self.size, self.odirect)

    def close(self) -> None:
        if self.sm is not None:
            self.sm.close()
            self.sm = None


def lmcache_available() -> bool:
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")
    os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
    try:
        import lmcache.v1.storage_backend.local_disk_backend  # noqa: F401
        return True
    except Exception:
        return False


def direct_supported(directory: str) -> bool:
    path = os.path.join(directory, ".odirect-probe")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        buf = aligned_empty(ALIGN)
        os.pwrite(fd, buf.numpy(), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)
