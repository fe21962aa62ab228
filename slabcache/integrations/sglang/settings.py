"""Backend settings from SGLang's ``--hicache-storage-backend-extra-config``.

The whole extra config reaches the backend: SGLang's own keys for loading
it (``backend_name``, ``module_path``, ``class_name``, ``interface_v1``)
and slabcache's, spelt, parsed and checked as the vLLM tier's keys are.
A bad key must stop start-up with a message naming it: a backend that
came up without its disk would look like a cache that never hits.  Nothing
here imports SGLang.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass

from ...core import StoreOptions
from ...errors import ConfigError
from ..parsing import parse_bool, parse_seconds, parse_size_setting

# What SGLang itself reads from the extra config of a dynamic backend
# (the prefetch keys and tp_lcm_size are taken out before the backend sees it).
SGLANG_KEYS = ("backend_name", "module_path", "class_name", "interface_v1")

KEYS = {
    "path": "directory of the store (one per node; ranks and models share it)",
    "capacity": "disk budget of the store, e.g. '200G'",
    "slot_bytes": "slot size (default: one page of the host pool)",
    "policy": "lru, lfu, fifo or mru",
    "io": "mmap (buffered) or direct (O_DIRECT)",
    "durability": "fast or strict",
    "io_threads": "store I/O threads",
    "checksum": "verify every read (true/false)",
    "share_group": "files 0660 / directories 0770 (true/false)",
    "trust_directory": "use a directory another user owns or others can write (true/false)",
    "use_refresh_seconds": "a read moves a page in the LRU order at most this often (0: every read)",
}
EXAMPLE = ('{"backend_name": "slabcache", "module_path": "slabcache.integrations.sglang", '
           '"class_name": "SlabCacheStorage", "interface_v1": 1, '
           '"path": "/mnt/nvme0/hicache", "capacity": "200G"}')

NAMES = {f: f"extra config key '{k}'" for f, k in (
    ("path", "path"), ("capacity_bytes", "capacity"), ("slot_bytes", "slot_bytes"),
    ("policy", "policy"), ("io", "io"), ("durability", "durability"),
    ("io_threads", "io_threads"), ("checksum", "checksum"), ("share_group", "share_group"),
    ("trust_directory", "trust_directory"), ("use_refresh_seconds", "use_refresh_seconds"))}


@dataclass(frozen=True)
class BackendConfig:
    """The store's options (slot size still open: one page, once the host
    pool is known) and whether SGLang will call the zero-copy methods."""

    options: StoreOptions
    zero_copy: bool

    def options_for(self, page_bytes: int) -> StoreOptions:
        """The options with the slot size settled.  Raises ConfigError when
        the configured slot cannot hold one page."""
        slot = self.options.slot_bytes
        if slot is None:
            return dataclasses.replace(self.options, slot_bytes=page_bytes)
        if slot < page_bytes:
            raise ConfigError(
                f"extra config key 'slot_bytes' is {slot}, smaller than one page of the host pool "
                f"({page_bytes} bytes); remove it or set it to at least {page_bytes}")
        return self.options


def backend_config(extra: dict | None) -> BackendConfig:
    """Check the extra config and build the backend's settings.  Raises
    ConfigError naming the key and the fix."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(KEYS) - set(SGLANG_KEYS))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in KEYS.items())
        raise ConfigError(f"unknown slabcache extra config key(s) {unknown}; the backend takes {known}")
    for need, what in (("path", "the directory of its store"), ("capacity", "its disk budget")):
        if extra.get(need) in (None, ""):
            raise ConfigError(f"slabcache HiCache backend needs '{need}', {what}; e.g. {EXAMPLE}")
    path = extra["path"]
    if not isinstance(path, str):
        raise ConfigError(f"extra config key 'path' must be a directory, got {path!r}; e.g. {EXAMPLE}")
    path = os.path.abspath(path.removeprefix("file://"))
    _check_writable(path)
    capacity = parse_size_setting("extra config key 'capacity'", extra["capacity"])
    slot = extra.get("slot_bytes")
    slot = parse_size_setting("extra config key 'slot_bytes'", slot) if slot is not None else None

    def flag(name, default):
        return parse_bool(f"extra config key '{name}'", extra.get(name, default))

    options = StoreOptions(
        path=path, capacity_bytes=capacity, slot_bytes=slot, policy=extra.get("policy"),
        io=extra.get("io", "mmap"), durability=extra.get("durability", "fast"),
        io_threads=extra.get("io_threads", 4), checksum=flag("checksum", True),
        share_group=flag("share_group", False), trust_directory=flag("trust_directory", False),
        # As the vLLM tier: a page read again within a second keeps its place.
        use_refresh_seconds=parse_seconds("extra config key 'use_refresh_seconds'",
                                          extra.get("use_refresh_seconds", 1.0)),
    ).validate(NAMES)
    if slot is not None and capacity < slot:
        raise ConfigError(f"extra config key 'capacity' ({capacity} bytes) holds no slot of {slot} "
                          f"bytes; raise 'capacity' (e.g. '200G')")
    zero_copy = bool(parse_bool("extra config key 'interface_v1'", extra.get("interface_v1", 0)))
    return BackendConfig(options=options, zero_copy=zero_copy)


def _check_writable(path: str) -> None:
    """A file can be made in ``path``, or in its nearest existing parent
    (the store makes the rest): said at start-up, not at the first backup.
    Tried, not inferred from the mode bits, which say nothing of read-only
    mounts or of root."""
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"extra config key 'path': {probe} is not a directory; point 'path' at a directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".slabcache-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"extra config key 'path': cannot write in {probe} ({exc.strerror}); choose a "
                          "directory this user can write, or change the directory's owner or mode") from None
