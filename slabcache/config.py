"""Store settings, and reading them from LMCache's configuration.

LMCache hands a plugin its resolved ``LMCacheEngineConfig`` (YAML from
``LMCACHE_CONFIG_FILE`` overridden by ``LMCACHE_*`` variables).  This module
reads that object by attribute, so it never imports lmcache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError

GB = 1024 ** 3
SHARDING = ("by_gpu",)


def parse_paths(csv) -> list[str]:
    """``"file:///a/,/b"`` -> ``["/a", "/b"]``.  Raises ConfigError."""
    if isinstance(csv, (list, tuple)):
        items = [str(x) for x in csv]
    elif isinstance(csv, str):
        items = csv.split(",")
    else:
        raise ConfigError(
            f"slabcache.paths must be a comma-separated string of directories, got {csv!r}"
        )
    out = []
    for raw in items:
        p = raw.strip()
        if p.startswith("file://"):
            p = p[len("file://"):]
        if p:
            out.append(os.path.abspath(p))
    if not out:
        raise ConfigError(
            "no disk path configured: set extra_config['slabcache.paths'] (or local_disk) "
            "to a comma-separated list of directories, e.g. file:///mnt/nvme0/kvcache/"
        )
    return out


def device_index(dst_device: str) -> int:
    """``"cuda:2"`` -> 2; ``"cuda"`` -> the current device; ``"cpu"`` -> 0."""
    dst_device = str(dst_device or "cpu")
    if ":" in dst_device:
        try:
            return int(dst_device.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"cannot read a device index from dst_device={dst_device!r}") from None
    if dst_device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.current_device()
    return 0


@dataclass(frozen=True)
class StoreConfig:
    """What a plugin instance needs to open its store."""

    paths: tuple[str, ...]
    total_bytes: int  # over all paths
    slot_bytes: int
    policy: str = "lru"
    io: str = "mmap"
    io_threads: int = 4
    path_sharding: str = "by_gpu"
    durability: str = "fast"
    checksum: bool = True

    def path_for(self, device: int) -> str:
        return self.paths[device % len(self.paths)]

    @property
    def bytes_per_path(self) -> int:
        return self.total_bytes // len(self.paths)


def _extra(config) -> dict:
    extra = getattr(config, "extra_config", None) or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"extra_config must be a mapping, got {type(extra).__name__}")
    return extra


def chunk_bytes(metadata, chunk_size: int) -> int:
    """Bytes of one full chunk of the model's KV (all layers and KV groups)."""
    import torch

    shapes = getattr(metadata, "kv_shapes", None) or [getattr(metadata, "kv_shape", None)]
    dtypes = getattr(metadata, "kv_dtypes", None) or [getattr(metadata, "kv_dtype", None)]
    total = 0
    for shape, dtype in zip(shapes, dtypes):
        if shape is None or dtype is None:
            raise ConfigError(
                "the engine metadata carries no kv_shape/kv_dtype to size slots from; "
                "set extra_config['slabcache.slot_bytes']"
            )
        # kv_shape is (layers, 2, chunk_size, heads, head_dim): scale by the
        # configured chunk size in case the metadata was built for another.
        n = 1
        for d in shape:
            n *= int(d)
        if len(shape) >= 3 and int(shape[2]) and chunk_size:
            n = n // int(shape[2]) * int(chunk_size)
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


def from_lmcache(config, metadata) -> StoreConfig:
    """Settings from an LMCacheEngineConfig (+ metadata for the slot size).

    Raises ConfigError naming the setting and the fix.
    """
    if config is None:
        raise ConfigError("the slabcache plugin got no LMCache config; it must be loaded by LMCache")
    extra = _extra(config)
    raw_paths = extra.get("slabcache.paths") or getattr(config, "local_disk", None)
    paths = tuple(parse_paths(raw_paths)) if raw_paths else parse_paths("")
    size_gb = getattr(config, "max_local_disk_size", 0) or 0
    try:
        total = int(float(size_gb) * GB)
    except (TypeError, ValueError):
        raise ConfigError(f"max_local_disk_size must be a number of GB, got {size_gb!r}") from None
    if total <= 0:
        raise ConfigError(
            "max_local_disk_size is 0: set it to the disk budget in GB over all paths "
            "(e.g. max_local_disk_size: 20.0)"
        )
    slot = extra.get("slabcache.slot_bytes")
    if slot is None:
        slot = chunk_bytes(metadata, int(getattr(config, "chunk_size", 256) or 256))
    else:
        try:
            slot = int(slot)
        except (TypeError, ValueError):
            raise ConfigError(f"slabcache.slot_bytes must be an int, got {slot!r}") from None
    if slot <= 0:
        raise ConfigError(f"slabcache.slot_bytes must be positive, got {slot}")
    sharding = extra.get("slabcache.path_sharding",
                         getattr(config, "local_disk_path_sharding", None) or "by_gpu")
    if sharding not in SHARDING:
        raise ConfigError(f"slabcache.path_sharding {sharding!r} is not supported; use 'by_gpu'")
    threads = extra.get("disk_io_threads", 4)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"disk_io_threads must be a positive int, got {threads!r}")
    odirect = extra.get("use_odirect", False)
    if not isinstance(odirect, bool):
        raise ConfigError(f"use_odirect must be true or false, got {odirect!r}")
    durability = extra.get("slabcache.durability", "fast")
    policy = str(getattr(config, "cache_policy", "LRU") or "LRU").lower()
    per_path = total // len(paths)
    if per_path < slot:
        raise ConfigError(
            f"max_local_disk_size gives each of {len(paths)} path(s) {per_path} bytes, less "
            f"than one slot of {slot} bytes; raise max_local_disk_size or lower slabcache.slot_bytes"
        )
    return StoreConfig(paths=paths, total_bytes=total, slot_bytes=slot, policy=policy,
                       io="direct" if odirect else "mmap", io_threads=threads,
                       path_sharding=sharding, durability=durability,
                       checksum=bool(extra.get("slabcache.checksum", True)))
