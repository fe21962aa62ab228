"""Store settings read from LMCache's resolved configuration.

LMCache hands a plugin its ``LMCacheEngineConfig`` (YAML from
``LMCACHE_CONFIG_FILE`` overridden by ``LMCACHE_*`` variables).  Paths are
chosen by LMCache's own ``PathSharder``, extra settings read through the
config's ``get_extra_config_value``, so the plugin follows LMCache's
conventions instead of re-implementing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from lmcache.v1.storage_backend.path_sharder import PathSharder

from ...core import StoreOptions
from ...errors import ConfigError
from ...format.sizes import MAX_BYTES
from ..parsing import parse_bool, parse_seconds, split_paths

GB = 1024 ** 3


def parse_paths(csv) -> list[str]:
    """``"file:///a/,/b"`` -> ``["/a", "/b"]``.  Raises ConfigError."""
    out = split_paths(csv)
    if out is None:
        raise ConfigError(
            f"slabcache.paths must be a comma-separated string of directories, got {csv!r}"
        )
    if not out:
        raise ConfigError(
            "no disk path configured: set extra_config['slabcache.paths'] (or local_disk) "
            "to a comma-separated list of directories, e.g. file:///mnt/nvme0/kvcache/"
        )
    return out


# The store's settings as an LMCache configuration spells them (for errors).
NAMES = {
    "path": "slabcache.paths", "capacity_bytes": "max_local_disk_size (per path)",
    "slot_bytes": "slabcache.slot_bytes", "policy": "cache_policy", "io": "use_odirect",
    "durability": "slabcache.durability", "checksum": "slabcache.checksum",
    "io_threads": "disk_io_threads", "share_group": "slabcache.share_group",
    "trust_directory": "slabcache.trust_directory",
    "use_refresh_seconds": "slabcache.use_refresh_seconds",
}


@dataclass(frozen=True)
class PluginSettings:
    """What a plugin instance needs: the options of the store it opens (on
    the path LMCache's PathSharder picked for it), and the whole layout."""

    options: StoreOptions  # validated
    all_paths: tuple[str, ...]
    total_bytes: int  # over all paths
    path_sharding: str = "by_gpu"

    @property
    def path(self) -> str:
        return self.options.path


def chunk_bytes(metadata, chunk_size: int) -> int:
    """Bytes of one full chunk of the model's KV (all layers and KV groups)."""
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


def _whole(name: str, value) -> int:
    """A whole number as YAML or an environment variable gives it."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a whole number, got {value!r}") from None


def from_lmcache(config, metadata, dst_device: str = "cpu") -> PluginSettings:
    """Settings from an LMCacheEngineConfig (+ metadata for the slot size).

    Raises ConfigError naming the setting and the fix.
    """
    if config is None:
        raise ConfigError("the slabcache plugin got no LMCache config; it must be loaded by LMCache")
    extra = getattr(config, "extra_config", None)
    if extra is not None and not isinstance(extra, dict):
        raise ConfigError(f"extra_config must be a mapping, got {type(extra).__name__}")

    def setting(key, default=None):
        return config.get_extra_config_value(key, default)

    raw_paths = setting("slabcache.paths") or getattr(config, "local_disk", None)
    paths = parse_paths(raw_paths if raw_paths else "")
    sharding = setting("slabcache.path_sharding",
                       getattr(config, "local_disk_path_sharding", None) or "by_gpu")
    try:
        sharder = PathSharder(",".join(paths), strategy=sharding, dst_device=str(dst_device or "cpu"))
    except ValueError as exc:
        raise ConfigError(f"slabcache.path_sharding: {exc}; use 'by_gpu'") from None

    size_gb = getattr(config, "max_local_disk_size", 0) or 0
    try:
        total = int(float(size_gb) * GB)
    except (TypeError, ValueError, OverflowError):  # OverflowError: .inf
        raise ConfigError(f"max_local_disk_size must be a number of GB, got {size_gb!r}") from None
    if total > MAX_BYTES:
        raise ConfigError(f"max_local_disk_size of {size_gb!r} GB is more than slabcache addresses "
                          "(1 EiB); give the disk budget in GB, e.g. 20.0")
    if total <= 0:
        raise ConfigError(
            "max_local_disk_size is 0: set it to the disk budget in GB over all paths "
            "(e.g. max_local_disk_size: 20.0)"
        )
    slot = setting("slabcache.slot_bytes")
    if slot is None:
        slot = chunk_bytes(metadata, int(getattr(config, "chunk_size", 256) or 256))
    else:
        slot = _whole("slabcache.slot_bytes", slot)
    per_path = total // len(paths)
    if per_path < slot:
        raise ConfigError(
            f"max_local_disk_size gives each of {len(paths)} path(s) {per_path} bytes, less "
            f"than one slot of {slot} bytes; raise max_local_disk_size or lower slabcache.slot_bytes"
        )
    odirect = parse_bool("use_odirect", setting("use_odirect", False))
    options = StoreOptions(
        path=sharder.selected, capacity_bytes=per_path, slot_bytes=slot,
        policy=str(getattr(config, "cache_policy", "LRU") or "LRU"),
        io="direct" if odirect else "mmap",
        io_threads=_whole("disk_io_threads", setting("disk_io_threads", 4)),
        durability=setting("slabcache.durability", "fast"),
        checksum=parse_bool("slabcache.checksum", setting("slabcache.checksum", True)),
        share_group=parse_bool("slabcache.share_group", setting("slabcache.share_group", False)),
        trust_directory=parse_bool("slabcache.trust_directory",
                                   setting("slabcache.trust_directory", False)),
        # A read moves its chunk in the eviction order at most this often
        # (CacheLib's LRU refresh time): recording every use costs a quarter
        # of a small read, and an order exact to the millisecond buys a KV
        # cache nothing.
        use_refresh_seconds=parse_seconds("slabcache.use_refresh_seconds",
                                          setting("slabcache.use_refresh_seconds", 1.0)),
        # LMCache expects its puts to be taken: they wait for room.
        queue_full="wait",
    ).validate(NAMES)
    return PluginSettings(options=options, all_paths=tuple(sharder.all_paths), total_bytes=total,
                          path_sharding=sharder.strategy)
