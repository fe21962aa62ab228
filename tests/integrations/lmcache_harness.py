"""Helpers to drive a real LMCache 0.5.6 engine on CPU with slabcache as its disk tier.

Imported only by tests that first check lmcache is installed.
"""

from __future__ import annotations

import os
import time
import uuid

import torch

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")

from lmcache.v1.cache_engine import LMCacheEngineBuilder  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402

from slabcache.integrations.lmcache.cpu_connector import CPUConnector  # noqa: E402

LAYERS, HEADS, HEAD_DIM, CHUNK = 2, 2, 16, 16
HIDDEN = HEADS * HEAD_DIM
PLUGIN = {
    "storage_plugin.LocalDiskBackend.module_path": "slabcache.integrations.lmcache",
    "storage_plugin.LocalDiskBackend.class_name": "SlabCacheBackend",
}


def metadata(worker_id: int = 0, world_size: int = 1) -> LMCacheMetadata:
    return LMCacheMetadata(
        model_name="org/test-model", world_size=world_size, local_world_size=world_size,
        worker_id=worker_id, local_worker_id=worker_id, kv_dtype=torch.bfloat16,
        kv_shape=(LAYERS, 2, CHUNK, HEADS, HEAD_DIM),
    )


def config(path: str, async_loading: bool = False, **extra) -> LMCacheEngineConfig:
    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=0.05,
        max_local_disk_size=0.01, lmcache_instance_id=f"t-{uuid.uuid4().hex[:8]}",
        enable_async_loading=async_loading, save_unfull_chunk=True,
    )
    cfg.storage_plugins = ["LocalDiskBackend"]
    cfg.extra_config = {**PLUGIN, "slabcache.paths": f"file://{path}", **extra}
    return cfg


class LookupServerStandIn:
    """Receives what the async path would send to vLLM's scheduler."""

    def __init__(self):
        self.responses: dict[str, int] = {}

    def send_response_to_scheduler(self, lookup_id, num_tokens):
        self.responses[lookup_id] = num_tokens


def engine(cfg, md=None):
    md = md or metadata()
    eng = LMCacheEngineBuilder.get_or_create(
        cfg.lmcache_instance_id, cfg, md, CPUConnector(LAYERS, HIDDEN),
        broadcast_fn=lambda t, s: None, broadcast_object_fn=lambda o, s: o,
    )
    eng.post_init()
    if cfg.enable_async_loading:
        eng.storage_manager.async_lookup_server = LookupServerStandIn()
    return eng


def backend(eng):
    return eng.storage_manager.storage_backends["LocalDiskBackend"]


def prompt(n_tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 30000, (n_tokens,), generator=g)
    kv = torch.randn(2, LAYERS, n_tokens, HIDDEN, generator=g).to(torch.bfloat16)
    return tokens, kv


def wait_stored(eng, n_chunks: int, timeout: float = 30) -> None:
    b = backend(eng)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not b.pending_puts() and len(b.store) >= n_chunks:
            return
        time.sleep(0.01)
    raise AssertionError(f"only {len(b.store)} of {n_chunks} chunks reached the disk tier")


def cpu_usage(eng) -> tuple[int, int]:
    """(live allocations, bytes) of the engine's CPU allocator."""
    cpu = eng.storage_manager.storage_backends.get("LocalCPUBackend") or \
        eng.storage_manager.allocator_backend
    alloc = cpu.memory_allocator
    inner = getattr(alloc, "pin_allocator", alloc)
    return inner.num_active_allocations, inner.total_allocated_size


def pins(eng) -> list[int]:
    s = backend(eng).store
    return [s.pin_count(k) for k in s.keys()]


def wait_loaded(eng, lookup_id: str, timeout: float = 30) -> None:
    from lmcache.v1.event_manager import EventStatus, EventType

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if eng.event_manager.get_event_status(EventType.LOADING, lookup_id) == EventStatus.DONE:
            return
        time.sleep(0.01)
    raise AssertionError(f"prefetch {lookup_id} did not finish in {timeout}s")


def destroy(cfg) -> None:
    LMCacheEngineBuilder.destroy(cfg.lmcache_instance_id)
