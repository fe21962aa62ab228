"""The plugin's place in LMCache's tier order: where its own disk tier sits.

LMCache 0.5.6 builds its tiers in one ordered dict that every lookup,
retrieve and store walks in order: its CPU tier, then its own disk tier,
then GDS, Maru and the remote tiers, and only then the storage plugins.
A plugin therefore lands behind a remote tier (``remote_url``,
``remote_storage_plugins``): a node would ask the network, or a dead
server, for chunks its own slab holds.  The plugin is built by
``storage_plugin_launcher``, which then stores it in that dict under its
name; so, while being built, the plugin puts itself under that name just
after the tiers LMCache builds before its disk tier.  The launcher's own
assignment then replaces the value in place, and the order stays.
Nothing of LMCache is changed; with another LMCache the launcher or its
dict may not be found, and the plugin says so and stays where it is put.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict

log = logging.getLogger(__name__)

# What LMCache 0.5.6 builds before its own disk tier (CreateStorageBackends).
BEFORE_DISK = ("PDBackend", "LocalCPUBackend", "P2PBackend", "NixlStorageBackend")
LAUNCHER = "storage_plugin_launcher"


def take_the_disk_tiers_place(backend, max_depth: int = 8) -> list[str]:
    """Put ``backend`` where LMCache's own disk tier sits, ahead of the
    tiers listed after it; returns the names it now precedes."""
    frame = sys._getframe(1)
    try:
        for _ in range(max_depth):
            if frame is None or frame.f_code.co_name == LAUNCHER:
                break
            frame = frame.f_back
        if frame is None or frame.f_code.co_name != LAUNCHER:
            log.info("slabcache: not built by LMCache's %s; the tier order is left as it is", LAUNCHER)
            return []
        tiers, name = frame.f_locals.get("storage_backends"), frame.f_locals.get("storage_plugin")
    finally:
        del frame
    if not isinstance(tiers, OrderedDict) or not isinstance(name, str):
        log.warning("slabcache: LMCache's tier list was not where LMCache 0.5.6 keeps it; the disk tier "
                    "stays after any remote tier, which is then asked first")
        return []
    after = [k for k in tiers if k not in BEFORE_DISK and k != name]
    moved = [(k, tiers.pop(k)) for k in after]
    tiers[name] = backend
    for k, v in moved:
        tiers[k] = v
    if after:
        log.info("slabcache: %s answers before %s, where LMCache's own disk tier sits", name, ", ".join(after))
    return after
