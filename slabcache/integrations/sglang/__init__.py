"""slabcache as SGLang HiCache's storage backend.

``backend``   SlabCacheStorage, the HiCacheStorage SGLang loads
``settings``  the extra config's keys -> BackendConfig (no SGLang import)
``pages``     where each page of a host pool lives in its memory (no SGLang import)
``keys``      page hash -> slabcache key, namespaced by model and layout

SGLang loads it with no patch: ``--hicache-storage-backend dynamic
--hicache-storage-backend-extra-config '{"backend_name": "slabcache",
"module_path": "slabcache.integrations.sglang", "class_name":
"SlabCacheStorage", "interface_v1": 1, "path": ..., "capacity": ...}'``.
This package is the only place that imports SGLang.
"""

__all__ = ["SlabCacheStorage"]


def __getattr__(name: str):
    # Imported on first use (SGLang's getattr(module, "SlabCacheStorage")), so
    # the settings can be checked and tested without SGLang installed.
    if name == "SlabCacheStorage":
        from .backend import SlabCacheStorage

        return SlabCacheStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
