"""The core layer: a store built from the device and index layers.

``options``    StoreOptions, validated once
``opener``     lock, recover, create or verify, assemble the parts
``handle``     a handle's life: open, operations in flight, close, fork
``store``      SlabStore: the batch-first verbs over keys and bytes
``typed``      the tensor verbs (put, get, get_into, ...) over them
``jobs``       queued work as futures (``store.jobs``)
``writer``     writing values into slots in the crash protocol's order
``reader``     finding entries, reads proven to be theirs (generation + checksum)
``allocator``  slots taken and given back in one place (typed outcomes)
``uses``       counters and entry uses, owed to the index's next write
``values``     tensors <-> byte parts and value descriptions
``items``      Item, the one type a value to write travels as
"""

from .allocator import PutStatus
from .options import StoreOptions
from .reader import Found
from .store import SlabStore, Snapshot

__all__ = ["Found", "PutStatus", "SlabStore", "Snapshot", "StoreOptions"]
