"""vLLM ``OffloadKey`` -> slabcache key, in the engine's namespace.

An ``OffloadKey`` is a 32-byte block hash and a 4-byte group index: it says
nothing of the model, dtype or layout, so two models sharing a path would
read each other's blocks.  The namespace is the base path vLLM's own tiers
derive with ``FileMapper`` (a hash of model, dtype, tokens per block, KV
groups and, unless the layout is parallelism-agnostic, the parallel sizes),
so an engine reads exactly the blocks its file-system tier would.
"""

from __future__ import annotations

PREFIX = "vllm"


def namespace(offloading_spec) -> bytes:
    """``b"vllm/<model>_<hash of the run config>/"`` for this engine."""
    from vllm.v1.kv_offload.file_mapper import FileMapper

    mapper = FileMapper.from_offloading_spec(
        root_dir=PREFIX, offloading_spec=offloading_spec,
        blocks_per_file=offloading_spec.blocks_per_chunk, parallel_agnostic=True)
    return f"{mapper.base_path}/".encode()


def store_key(ns: bytes, key: bytes) -> bytes:
    """The namespace, then vLLM's 36 bytes as they are: a lookup of a whole
    request's keys spends more on building keys than on LMDB, so no hex."""
    return ns + key
