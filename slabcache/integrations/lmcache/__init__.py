"""slabcache as LMCache's local disk tier (LMCache 0.5.6 storage plugin).

``backend``   SlabCacheBackend, the plugin class LMCache loads
``settings``  the store's options from LMCache's config (its PathSharder, its extra config)
``keys``      CacheEngineKey -> slabcache key
``cpu_connector``  lets the engine run with a CPU tensor as its KV cache (tests, benchmarks)

This package is the only place that imports lmcache.  Point LMCache at
``module_path: slabcache.integrations.lmcache`` and
``class_name: SlabCacheBackend``.
"""

from .backend import SlabCacheBackend
from .keys import canonical_key

__all__ = ["SlabCacheBackend", "canonical_key"]
