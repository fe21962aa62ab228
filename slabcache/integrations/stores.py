"""Opening a host's store: what the vLLM tier and the SGLang backend share.

A host hands over values of one size (a CPU-tier block, a host-pool page).
A new store gets slots of that size unless the settings name one; an
existing store keeps its own, and one whose slots cannot hold a value is
refused with what to do.  Errors keep their class (callers match on it)
and say which host and path they concern.
"""

from __future__ import annotations

import dataclasses
import os

from ..core import StoreOptions
from ..core.store import SlabStore
from ..errors import ConfigError, LayoutMismatchError, SlabcacheError


def open_host_store(options: StoreOptions, *, unit: int, unit_name: str, who: str, keys: str) -> SlabStore:
    """The store at ``options.path`` for values of ``unit`` bytes (``unit_name``
    in messages, e.g. "one CPU-tier block").  ``options.slot_bytes`` None:
    one unit a slot for a new store, the store's own for an existing one.
    ``who`` names the host in errors; ``keys`` the settings that size it."""
    path = options.path
    if options.slot_bytes is None and not os.path.exists(os.path.join(path, "slab")):
        options = dataclasses.replace(options, slot_bytes=unit)  # new store: one unit a slot
    try:
        store = SlabStore(options)
    except LayoutMismatchError as exc:
        raise LayoutMismatchError(
            f"{who} at {path}: {exc}. {keys} must match the store: change them, or "
            f"resize the store with 'slabcache compact {path} --capacity SIZE'") from exc
    except SlabcacheError as exc:
        raise type(exc)(f"{who} at {path}: {exc}") from exc
    if store.geometry.slot_bytes < unit:  # a store made for another model
        store.close()
        raise ConfigError(
            f"{who}: the store at {path} has slots of {store.geometry.slot_bytes} bytes, smaller than "
            f"{unit_name} ({unit}); point 'path' at another directory or rebuild it with "
            f"'slabcache compact {path} --slot-bytes {unit}'")
    return store
