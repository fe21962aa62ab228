"""The core layer: a store built from the device and index layers.

``options``    StoreOptions, validated once
``opener``     lock, recover, create or verify, assemble the parts
``allocator``  slots taken and given back in one place (typed outcomes)
``reader``     reads proven to be the entry's (generation + checksum)
``uses``       counters and entry uses, batched into index writes
``values``     tensors <-> byte parts and value descriptions
``store``      SlabStore, the facade
"""

from .allocator import PutStatus
from .options import StoreOptions
from .store import SlabStore, Snapshot

__all__ = ["PutStatus", "SlabStore", "Snapshot", "StoreOptions"]
