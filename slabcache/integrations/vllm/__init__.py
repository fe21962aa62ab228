"""slabcache as a storage tier of vLLM's own KV offloading (no LMCache).

``tier``      SlabCacheTier, the SecondaryTierManager vLLM loads
``settings``  the tier's keys in ``secondary_tiers`` -> TierConfig (no vLLM import)
``keys``      OffloadKey -> slabcache key, namespaced like vLLM's own tiers

vLLM loads the tier with no patch: in ``kv_connector_extra_config``,
``"secondary_tiers": [{"type": "SlabCacheTier", "module_path":
"slabcache.integrations.vllm", "path": ..., "capacity": ...}]``.  This
package is the only place that imports vLLM.
"""

__all__ = ["SlabCacheTier"]


def __getattr__(name: str):
    # Imported on first use (vLLM's getattr(module, "SlabCacheTier")), so the
    # settings can be checked and tested without vLLM installed.
    if name == "SlabCacheTier":
        from .tier import SlabCacheTier

        return SlabCacheTier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
