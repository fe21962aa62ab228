"""On-disk formats, with nothing below them but ``errors``.

``layout``    names of a store's files and folders
``header``    the slab header and its geometry (FORMAT_VERSION lives here)
``records``   per-slot self-descriptions (enough to rebuild the index)
``values``    value descriptions: dtypes, shapes, sizes, caller's extra bytes
``keys``      canonical keys, LMDB keys, key hashes
``checksum``  payload checksums
``sizes``     sizes as people write them: "20G" -> bytes (settings, the CLI)
"""

from .header import FORMAT_VERSION

__all__ = ["FORMAT_VERSION"]
