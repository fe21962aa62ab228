"""SGLang page hashes -> slabcache keys, in a namespace per model and layout.

A page key is a SHA-256 chain hash of tokens: it says nothing of the
model, the parallel layout or the host pool's layout, so two servers
sharing one path would read each other's pages.  The namespace holds all
of it: model, tensor-parallel rank and size (MHA; an MLA page is the same
on every rank, so it is shared), data-parallel attention rank, pipeline
and context-parallel ranks, the pool's class and layout, page size, dtype
and the page's shape.
"""

from __future__ import annotations

import hashlib

PREFIX = "sglang"


def namespace(config, page_map, pool) -> bytes:
    """``b"sglang/<model>/<digest of the rest>/"`` for this rank's pages."""
    model = (getattr(config, "model_name", None) or "").replace("/", "-") or "model"
    ident = {
        "pp": (config.pp_rank, config.pp_size),
        "cp": (config.attn_cp_rank, config.attn_cp_size),
        "dcp": (getattr(config, "dcp_rank", 0), getattr(config, "dcp_size", 1)),
        "pool": type(pool).__name__,
        "layout": getattr(pool, "layout", None),
        "page_size": page_map.page_size,
        "dtype": str(page_map.dtype),
        "page_shape": page_map.page_shape,
    }
    if config.is_mla_model:
        ident["tp"] = "replicated"
    else:
        ident["tp"] = (config.tp_rank, config.tp_size, getattr(config, "dp_rank", 0))
    digest = hashlib.blake2b(repr(sorted(ident.items())).encode(), digest_size=8).hexdigest()
    return f"{PREFIX}/{model}/{digest}/".encode()


def store_keys(ns: bytes, keys) -> list[bytes]:
    """The store's key of each page hash (a str, as SGLang passes them)."""
    return [ns + k.encode() for k in keys]
