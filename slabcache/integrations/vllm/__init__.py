"""slabcache as a storage tier of vLLM's own KV offloading (no LMCache).

``tier``      SlabCacheTier, the SecondaryTierManager vLLM loads
``settings``  the tier's keys in ``secondary_tiers`` -> TierConfig (no vLLM import)
``keys``      OffloadKey -> slabcache key, namespaced like vLLM's own tiers

vLLM loads the tier with no patch: in ``kv_connector_extra_config``,
``"secondary_tiers": [{"type": "SlabCacheTier", "module_path":
"slabcache.integrations.vllm", "path": ..., "capacity": ...}]``.  This
package is the only place that imports vLLM.
"""

from .tier import SlabCacheTier

__all__ = ["SlabCacheTier"]
