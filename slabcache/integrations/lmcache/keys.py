"""LMCache keys as slabcache keys."""

from __future__ import annotations


def canonical_key(key) -> str:
    """One string per CacheEngineKey, bytes chunk hashes included.

    ``CacheEngineKey.to_string`` writes int and bytes hashes as the same hex
    digits; the ``i``/``b`` tag here keeps them apart.
    """
    h = key.chunk_hash
    hh = ("b" + bytes(h).hex()) if isinstance(h, (bytes, bytearray)) else ("i" + format(h, "x"))
    dtype = getattr(key, "_dtype_str", None) or str(getattr(key, "dtype", ""))
    s = f"{key.model_name}@{key.world_size}@{key.worker_id}@{hh}@{dtype}"
    layer = getattr(key, "layer_id", None)
    if layer is not None:
        s += f"@L{layer}"
    tags = getattr(key, "tags", None)
    if tags:
        s += "@" + "@".join(f"{k}%{v}" for k, v in tags)
    return s
