"""Keys: canonical bytes, LMDB keys, and the hash a slot record carries."""

from __future__ import annotations

import hashlib
from typing import NamedTuple

from ..errors import InvalidKeyError

# Keys up to this many bytes are used verbatim as LMDB keys (LMDB's limit is
# 511); longer ones are replaced by a hash and the full key is kept in the
# entry to detect collisions.
MAX_INLINE_KEY = 400


def canonical_key(key: str | bytes) -> bytes:
    """Type-tagged key bytes: ``"a"`` and ``b"a"`` are different keys."""
    # Plain str and bytes first, without isinstance or a copy: every
    # operation runs this once per key, and a request's lookups are little else.
    kind = type(key)
    if kind is bytes and key:
        return b"b" + key
    if kind is str and key:
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, str):
        if not key:
            raise InvalidKeyError("key is an empty string; use a non-empty str or bytes key")
        return b"s" + key.encode("utf-8", "surrogatepass")
    if isinstance(key, (bytes, bytearray, memoryview)):
        b = bytes(key)
        if not b:
            raise InvalidKeyError("key is empty bytes; use a non-empty str or bytes key")
        return b"b" + b
    raise InvalidKeyError(
        f"key must be str or bytes, got {type(key).__name__}; convert it (e.g. key.to_string())"
    )


def decode_key(canon: bytes) -> str | bytes:
    if canon[:1] == b"s":
        return canon[1:].decode("utf-8", "surrogatepass")
    return canon[1:]


def display_key(canon: bytes) -> str | bytes:
    """:func:`decode_key` for reports and logs: a key whose bytes were
    damaged is shown escaped rather than failing."""
    try:
        return decode_key(canon)
    except UnicodeDecodeError:
        return canon[1:].decode("utf-8", "backslashreplace")


def index_key(canon: bytes) -> bytes:
    """The LMDB key: the canonical key itself, or a hash of a long one."""
    if len(canon) <= MAX_INLINE_KEY:
        return canon
    return b"#" + hashlib.blake2b(canon, digest_size=32).digest()


def key_hash(canon: bytes) -> bytes:
    return hashlib.blake2b(canon, digest_size=8).digest()


class Key(NamedTuple):
    """A key as the store uses it, built once per call: its canonical bytes
    (type-tagged, compared) and its LMDB key (the same bytes, or a hash of
    a long key)."""

    canon: bytes
    ikey: bytes


_new_key = tuple.__new__  # a Key without NamedTuple's Python-level __new__ (hot path)


def make_key(key: str | bytes) -> Key:
    """The Key of ``key``.  Raises InvalidKeyError."""
    # canonical_key's common cases inline: every operation runs this.
    kind = type(key)
    if kind is str and key:
        canon = b"s" + key.encode("utf-8", "surrogatepass")
    elif kind is bytes and key:
        canon = b"b" + key
    else:
        canon = canonical_key(key)
    return _new_key(Key, (canon, canon if len(canon) <= MAX_INLINE_KEY else index_key(canon)))
