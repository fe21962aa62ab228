"""Tier settings from the keys of a vLLM ``secondary_tiers`` entry.

vLLM passes every key of the tier's dict other than ``type``,
``module_path`` and ``backpressure`` to the tier's constructor.  A bad or
missing key must stop vLLM's start-up with a message that names the key and
the fix: a tier that silently came up without a disk would look like a
working cache that never hits.  Nothing here imports vLLM.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...core import StoreOptions
from ...errors import ConfigError
from ..parsing import parse_bool, parse_choice, parse_seconds, parse_size_setting, split_paths

# Every key the tier takes, with what it means (for the error that lists them).
KEYS = {
    "path": "directory of the store, or a list / comma list of directories",
    "capacity": "disk budget over all paths, e.g. '20G'",
    "slot_bytes": "slot size (default: one block of the CPU tier, block_size_bytes)",
    "policy": "lru, lfu, fifo or mru",
    "io": "mmap (buffered) or direct (O_DIRECT)",
    "durability": "fast or strict",
    "io_threads": "store I/O threads per path",
    "checksum": "verify every load (true/false)",
    "path_sharding": "by_key (blocks spread over paths) or by_engine (one path per data-parallel rank)",
    "share_group": "files 0660 / directories 0770 (true/false)",
    "trust_directory": "use a directory another user owns or others can write (true/false)",
    "locality": "LOCAL or REMOTE, as vLLM's own tiers take it",
    "use_refresh_seconds": "a load moves a block in the LRU order at most this often (0: every load)",
    "enable_kv_events": "publish KV events for blocks stored and evicted (true/false; needs vLLM's KV events on)",
}
SHARDINGS = ("by_key", "by_engine")
EXAMPLE = ('{"type": "SlabCacheTier", "module_path": "slabcache.integrations.vllm", '
           '"path": "/mnt/nvme0/kvcache", "capacity": "20G"}')


# The store's settings as the tier's keys spell them (for errors).
NAMES = {f: f"tier key '{k}'" for f, k in (
    ("path", "path"), ("capacity_bytes", "capacity"), ("slot_bytes", "slot_bytes"),
    ("policy", "policy"), ("io", "io"), ("durability", "durability"),
    ("io_threads", "io_threads"), ("checksum", "checksum"), ("share_group", "share_group"),
    ("trust_directory", "trust_directory"), ("use_refresh_seconds", "use_refresh_seconds"))}


@dataclass(frozen=True)
class TierConfig:
    """What one tier needs to open its stores: the paths this engine uses
    (in shard order) and the options of each store, validated once
    (``options_for`` gives one path's)."""

    paths: tuple[str, ...]
    options: StoreOptions  # the first path's; the others differ only in path
    path_sharding: str = "by_key"
    locality: str | None = None  # "LOCAL" or "REMOTE"
    kv_events: bool = False

    @property
    def bytes_per_path(self) -> int:
        return self.options.capacity_bytes

    def options_for(self, path: str, slot_bytes: int | None) -> StoreOptions:
        """The options of the store at ``path`` (``slot_bytes``: None to take
        an existing store's own)."""
        return dataclasses.replace(self.options, path=path, slot_bytes=slot_bytes)


def _paths(value) -> list[str]:
    out = split_paths(value)
    if out is None:
        raise ConfigError(f"tier key 'path' must be a directory or a list of directories, got {value!r}; "
                          f"e.g. {EXAMPLE}")
    if not out:
        raise ConfigError(f"tier key 'path' names no directory; e.g. {EXAMPLE}")
    if len(set(out)) != len(out):
        raise ConfigError(f"tier key 'path' names a directory twice: {out}; list each once")
    return out


def tier_config(keys: dict, *, block_size_bytes: int, data_parallel_index: int = 0) -> TierConfig:
    """Check the tier's keys (as vLLM passes them) and build its settings.

    Raises ConfigError naming the key and the fix.
    """
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in KEYS.items())
        raise ConfigError(f"unknown slabcache tier key(s) {unknown}; the tier takes {known}")
    if keys.get("path") in (None, ""):
        raise ConfigError(f"slabcache tier needs 'path', the directory of its store; e.g. {EXAMPLE}")
    if keys.get("capacity") in (None, ""):
        raise ConfigError(f"slabcache tier needs 'capacity', its disk budget over all paths; e.g. {EXAMPLE}")
    paths = _paths(keys["path"])
    total = parse_size_setting("tier key 'capacity'", keys["capacity"])
    slot = parse_size_setting("tier key 'slot_bytes'", keys["slot_bytes"]) if keys.get("slot_bytes") is not None else None
    if slot is not None and slot < block_size_bytes:
        raise ConfigError(
            f"tier key 'slot_bytes' is {slot}, smaller than one block of the CPU tier "
            f"({block_size_bytes} bytes); remove it or set it to at least {block_size_bytes}")
    sharding = parse_choice("tier key 'path_sharding'", keys.get("path_sharding", "by_key"), SHARDINGS)
    # by_engine: each data-parallel engine uses one path, as LMCache's by_gpu
    # gives each GPU worker one; either way the budget is split evenly.
    use = [paths[data_parallel_index % len(paths)]] if sharding == "by_engine" else paths
    per_path = total // len(paths)
    if per_path < (slot or block_size_bytes):
        raise ConfigError(
            f"tier key 'capacity' gives each of {len(paths)} path(s) {per_path} bytes, less than "
            f"one slot of {slot or block_size_bytes} bytes; raise 'capacity' (e.g. '20G')")
    refresh = parse_seconds("tier key 'use_refresh_seconds'", keys.get("use_refresh_seconds", 1.0))
    locality = keys.get("locality")
    if locality is not None:
        locality = parse_choice("tier key 'locality'", locality, ("local", "remote")).upper()

    def flag(name, default):
        return parse_bool(f"tier key '{name}'", keys.get(name, default))

    options = StoreOptions(
        path=use[0], capacity_bytes=per_path, slot_bytes=slot, policy=keys.get("policy"),
        io=keys.get("io", "mmap"), durability=keys.get("durability", "fast"),
        io_threads=keys.get("io_threads", 4), checksum=flag("checksum", True),
        share_group=flag("share_group", False), trust_directory=flag("trust_directory", False),
        # A block loaded again within a second keeps its place in the
        # policy's order: recording each use is about a quarter of a small
        # block's load, and second-resolution LRU loses nothing for a cache
        # of minutes to hours.
        use_refresh_seconds=refresh,
    ).validate(NAMES)
    return TierConfig(paths=tuple(use), options=options, path_sharding=sharding, locality=locality,
                      kv_events=flag("enable_kv_events", False))
