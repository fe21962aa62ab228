"""Where a page of SGLang's host pool lives in the pool's memory.

A page is what the pool's ``get_data_page(index)`` gives, flattened: for a
``page_first`` MHA pool its K then its V rows, for ``layer_first`` each
layer's K rows, then each layer's V rows.  Those are views of one buffer,
so a page is a few contiguous byte ranges ("parts") at offsets that move
by a fixed step from one page to the next.  The map is worked out once
from the pool's own views and checked against them, and the slab reads
and writes those ranges directly (no staging copy).  The bytes stored are
those of the flattened page, whichever method stored them, so the copying
methods (``batch_get`` / ``batch_set``) and the zero-copy ones share
entries.  Nothing here imports SGLang: the pool is duck-typed.
"""

from __future__ import annotations

import itertools

import torch

from ...errors import ConfigError


def contiguous_parts(view: torch.Tensor) -> list[tuple[int, int]]:
    """``(byte offset in its storage, byte length)`` of each contiguous run
    of ``view``, in flattening order."""
    shape, stride, item = view.shape, view.stride(), view.element_size()
    k, run = view.dim(), 1
    while k > 0 and (shape[k - 1] == 1 or stride[k - 1] == run):
        run *= shape[k - 1]
        k -= 1
    base = view.storage_offset()
    out = []
    for idx in itertools.product(*(range(n) for n in shape[:k])):
        start = base + sum(i * s for i, s in zip(idx, stride))
        out.append((start * item, run * item))
    return out


class PageMap:
    """The byte ranges of every page of one host pool.

    ``parts(i)`` is the list of uint8 views holding the page that starts at
    token index ``i`` (a multiple of the page size), in flattening order.
    Raises ConfigError for a pool whose pages are not views of one buffer.
    """

    def __init__(self, pool):
        self.page_size = int(pool.page_size)
        first = _page_view(pool, 0)
        if first.device.type != "cpu":
            raise ConfigError(f"the host pool is on {first.device}; slabcache reads and writes host (CPU) pools")
        self._storage = torch.empty(0, dtype=torch.uint8).set_(first.untyped_storage())
        self.dtype = first.dtype
        self.page_shape = tuple(first.shape)
        self._runs = contiguous_parts(first)
        self.page_bytes = sum(n for _o, n in self._runs)
        pages = max(1, int(pool.size) // self.page_size)
        self._step = 0
        if pages > 1:
            second = _page_view(pool, self.page_size)
            steps = {b - a for (a, _), (b, _) in zip(self._runs, contiguous_parts(second))}
            if len(steps) != 1:
                raise ConfigError(f"the pages of {type(pool).__name__} (layout {pool.layout!r}) are not "
                                  "evenly spaced in its buffer; drop 'interface_v1' to use the copying path")
            self._step = steps.pop()
        for p in {0, pages // 2, pages - 1}:  # the map must say what the pool's own views say
            view = _page_view(pool, p * self.page_size)
            if view.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or \
                    contiguous_parts(view) != self._at(p):
                raise ConfigError(f"page {p} of {type(pool).__name__} (layout {pool.layout!r}) is not where "
                                  "its first pages say; drop 'interface_v1' to use the copying path")

    def _at(self, page: int) -> list[tuple[int, int]]:
        shift = page * self._step
        return [(o + shift, n) for o, n in self._runs]

    def parts(self, token_index: int) -> list[torch.Tensor]:
        """The page at ``token_index`` as uint8 views of the pool's memory."""
        page, rest = divmod(int(token_index), self.page_size)
        if rest:
            raise ValueError(f"host index {token_index} is not at the start of a page of {self.page_size} tokens")
        st = self._storage
        shift = page * self._step
        return [st[o + shift:o + shift + n] for o, n in self._runs]

    def batch(self, host_indices: torch.Tensor, count: int) -> list[list[torch.Tensor]]:
        """The parts of ``count`` pages whose tokens are ``host_indices``
        (``page_size`` indices a page, as SGLang passes them)."""
        if host_indices.numel() != count * self.page_size:
            raise ValueError(f"got {host_indices.numel()} host indices for {count} pages of "
                             f"{self.page_size} tokens; pass page_size indices a page")
        starts = host_indices[::self.page_size].tolist() if count else []
        return [self.parts(i) for i in starts]


def _page_view(pool, token_index: int) -> torch.Tensor:
    try:
        view = pool.get_data_page(token_index, flat=False)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        raise ConfigError(f"{type(pool).__name__} gives no page view ({exc}); "
                          "slabcache stores pools that do") from None
    if not isinstance(view, torch.Tensor):
        raise ConfigError(f"{type(pool).__name__}.get_data_page gave a {type(view).__name__}, not a tensor")
    return view
