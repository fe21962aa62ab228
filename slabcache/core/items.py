"""The one type a value to write travels as, from the verbs to the slab."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..format.keys import Key
from ..format.values import ValueDesc


class Item(NamedTuple):
    """One value to write: its key, its bytes (one CPU byte part per
    tensor, back to back) and its description (``desc.encoded`` is what
    the index and the slot record keep; ``desc.length`` its size)."""

    key: Key
    parts: list[torch.Tensor]
    desc: ValueDesc


_new = tuple.__new__


def new_item(key: Key, parts: list[torch.Tensor], desc: ValueDesc) -> Item:
    """``Item(key, parts, desc)`` without NamedTuple's Python-level
    constructor (every put makes one)."""
    return _new(Item, (key, parts, desc))
