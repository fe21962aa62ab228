"""Tensors in and out: the typed verbs over the store's byte core.

A value is a tensor or a list of tensors; it is stored as its bytes, back
to back, with a description of its dtypes and shapes, and comes back as
fresh tensors (``get``) or in the caller's (``get_into``).  CUDA tensors
go through pinned staging buffers (runtime/transfer.py, the only user of
torch.cuda), which is only touched when a CUDA tensor is passed.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import EntryTooLargeError
from ..format.keys import Key, make_key
from ..format.values import ValueDesc
from .items import Item, new_item
from .values import (
    Plan, as_bytes, as_list, check_disjoint, described, direct_parts, host_parts, match_out, on_cuda,
    plain_host_value, split,
)


HOST = object()  # where a value in CPU memory is (see _tensor_item)


class TensorVerbs:
    """put / get / get_into and their batch forms (a mixin of SlabStore)."""

    # -- put -------------------------------------------------------------

    def put(self, key: str | bytes, value, *, extra: bytes = b"") -> bool:
        """Store ``value`` (a tensor or list of tensors) under ``key``.

        Returns True when stored or already present (then it counts as a use
        and is not rewritten), False when no slot is free and every entry is
        pinned.  Raises EntryTooLargeError, InvalidKeyError,
        UnsupportedValueError, SlabIOError (nothing stored is lost).
        """
        writer = self._writable()
        item, marks = self._tensor_item(make_key(key), value, extra)
        with self._guard:
            if marks is HOST:
                return writer.put(item)
            return self._put_tensor_item(item, marks)

    def put_many(self, keys: Sequence[str | bytes], values: Sequence, *,
                 extra: bytes = b"") -> list[bool]:
        """:meth:`put` for each (key, value) pair: with the ``mmap`` engine
        and ``fast`` durability, values of up to 256 KiB in groups of up to
        1 MiB, each written inside one index transaction where slots are
        free; other batches with one transaction to reserve every slot and
        one to commit every entry.

        Every key and value is checked before anything is reserved.  If a
        write fails, the entries written without error are still committed
        (a small batch stops writing at the failure; a large one, written
        side by side, has written the rest too) and the SlabIOError is raised.
        """
        self._writable()
        return self._put_tensor_items(*self._tensor_items(keys, values, extra))

    def _tensor_item(self, key: Key, value, extra: bytes, hold: bool = False):
        """(Item, where): ``where`` is HOST for a value in CPU memory; for a
        CUDA value (whose parts are its tensors until staged), the events
        its copies wait for when ``hold`` (work queued for later), else
        None (the current stream).  Raises as put does."""
        plain = plain_host_value(value, extra)
        if plain is not None:
            desc, parts = plain
            if desc.length > self.geometry.slot_bytes:
                self._too_large(desc)
            return new_item(key, parts, desc), HOST
        tensors, is_list = as_list(value)
        desc = described(tensors, is_list, extra)
        if desc.length > self.geometry.slot_bytes:
            self._too_large(desc)
        if not on_cuda(tensors):
            return new_item(key, host_parts(tensors), desc), HOST
        marks = None
        if hold:
            from ..runtime.transfer import caller_marks

            marks = caller_marks(tensors)
        return new_item(key, tensors, desc), marks

    def _tensor_items(self, keys, values, extra: bytes, hold: bool = False):
        """(Items, {position: marks} of the CUDA values or None), every
        value checked first."""
        keys, values = list(keys), list(values)
        if len(keys) != len(values):
            raise ValueError(f"got {len(keys)} keys but {len(values)} values; pass one value per key")
        items, device = [], None
        for i, (k, v) in enumerate(zip(keys, values)):
            item, where = self._tensor_item(make_key(k), v, extra, hold)
            items.append(item)
            if where is not HOST:
                device = device or {}
                device[i] = where
        return items, device

    def _put_tensor_items(self, items: list[Item], device: dict | None) -> list[bool]:
        with self._guard:
            if device is None:
                return self._writer.put_many(items)
            # Device values go through pinned staging one at a time.
            return [self._writer.put(it) if i not in device else self._put_tensor_item(it, device[i])
                    for i, it in enumerate(items)]

    def _put_tensor_item(self, item: Item, marks) -> bool:
        if marks is HOST:
            return self._writer.put(item)
        from ..runtime.transfer import to_host

        pool = self._staging_pool()
        parts, buf = to_host(item.parts, pool, marks)
        try:
            return self._writer.put(item._replace(parts=parts))
        finally:
            pool.release(buf)

    def _check_size(self, desc: ValueDesc) -> None:
        if desc.length > self.geometry.slot_bytes:
            self._too_large(desc)

    def _too_large(self, desc: ValueDesc):
        raise EntryTooLargeError(
            f"value of {desc.length} bytes does not fit a slot of "
            f"{self.geometry.slot_bytes} bytes; split it, or re-slot the store with "
            "`slabcache compact --slot-bytes`"
        )

    def _staging_pool(self):
        from ..runtime.transfer import StagingPool

        with self._lock:
            if self._staging is None:
                self._staging = StagingPool(count=2 * self.options.io_threads)
            return self._staging

    # -- get -------------------------------------------------------------

    def get(self, key: str | bytes):
        """The stored value (same dtypes, shapes, bytes), or None on a miss.

        A checksum mismatch is a miss (counted in ``checksum_failures``, the
        entry dropped); wrong bytes are never returned.
        """
        k = make_key(key)
        with self._guard:
            got = self._reader.find(k)
            if got is None:
                return None
            ref, plan = got
            value, parts = plan.allocate(self.engine.empty)
            return value if self._reader.read(ref, parts) else None

    def get_into(self, key: str | bytes, out) -> bool:
        """Read the value into ``out`` (same dtypes and shapes).  False on a miss.

        When False is returned the contents of ``out`` are unspecified.
        Raises UnsupportedValueError when ``out`` does not match the entry.
        """
        return self._get_into(make_key(key), out, None)

    def _get_into(self, key: Key, out, marks: dict | None) -> bool:
        with self._guard:
            got = self._reader.find(key)
            if got is None:
                return False
            ref, plan = got
            parts, copy, outs = self._target(plan, out)
            if parts is None:
                return self._read_to_cuda(ref, plan, outs, marks)
            ok = self._reader.read(ref, parts)
            if ok and copy is not None:
                _copy_back(copy)
            return ok

    def get_many(self, keys: Sequence[str | bytes]) -> list:
        """Values for ``keys`` (None for misses): one lookup transaction for
        the batch, each value verified (Reader.read_many); large reads run
        in parallel on the workers."""
        found = self.lookup(keys)
        hits = [i for i, f in enumerate(found) if f is not None]
        values, parts = {}, []
        for i in hits:
            values[i], p = found[i].plan.allocate(self.engine.empty)
            parts.append(p)
        oks = self._read_found([found[i] for i in hits], parts)
        out: list = [None] * len(found)
        for i, ok in zip(hits, oks):
            if ok:
                out[i] = values[i]
        return out

    def get_many_into(self, keys: Sequence[str | bytes], outs: Sequence) -> list[bool]:
        """get_into for each (key, out) pair, batched like :meth:`get_many`.
        CUDA outs go through pinned staging on the workers so disk reads and
        device copies overlap, and are written only after the work queued so
        far on the caller's current stream (which may still be using them)."""
        keys, outs = list(keys), list(outs)
        if len(keys) != len(outs):
            raise ValueError(f"got {len(keys)} keys but {len(outs)} outs; pass one out per key")
        flat = [t for o in outs for t in as_list(o)[0]]
        if len(flat) > 1:
            check_disjoint(flat)
        if on_cuda(flat):
            from ..runtime.transfer import caller_marks

            marks = caller_marks(flat)
            jobs = self.jobs
            return [f.result() for f in [jobs.read(self._get_into, make_key(k), o, marks)
                                         for k, o in zip(keys, outs)]]
        found = self.lookup(keys)
        jobs, parts, copies = [], [], {}
        for i, (f, out) in enumerate(zip(found, outs)):
            if f is not None:
                p, copies[i], _outs = self._target(f.plan, out)  # host outs only: CUDA went above
                jobs.append(i)
                parts.append(p)
        oks = self._read_found([found[i] for i in jobs], parts)
        res = [False] * len(keys)
        for i, ok in zip(jobs, oks):
            if ok and copies[i] is not None:
                _copy_back(copies[i])
            res[i] = ok
        return res

    def _target(self, plan: Plan, out):
        """Where a read into ``out`` lands: (parts, copy, outs).  ``parts``
        are out's own bytes when it is dense CPU memory; otherwise fresh
        buffers, and ``copy`` says what to copy into out after the read.
        ``parts`` is None when out is on CUDA (``outs`` are its tensors).
        Raises UnsupportedValueError when out does not match the value."""
        parts = plan.direct_parts(out)
        if parts is not None:
            return parts, None, None
        outs = match_out(out, plan.desc)
        parts = direct_parts(outs)
        if parts is not None:
            return parts, None, outs
        if on_cuda(outs):
            return None, None, outs
        value, parts = plan.allocate(self.engine.empty)
        return parts, (outs, value if plan.desc.is_list else [value]), outs

    def _read_to_cuda(self, ref, plan: Plan, outs: list[torch.Tensor], marks: dict | None) -> bool:
        from ..runtime.transfer import from_host

        pool = self._staging_pool()
        buf = pool.acquire(max(1, ref.length))
        try:
            parts = split(buf, plan.desc.nbytes)
            if not self._reader.read(ref, parts):
                return False
            from_host(parts, outs, pool, marks)
            return True
        finally:
            pool.release(buf)


def _copy_back(copy) -> None:
    """After a read into fresh buffers: copy them into the caller's outs."""
    outs, values = copy
    for dst, src in zip(outs, values):
        dst.copy_(src)


def raw_parts(data, desc: ValueDesc) -> list[torch.Tensor]:
    """``data`` (bytes, or a list of parts written back to back) as byte
    parts.  Raises TypeError / ValueError when ``desc`` is not a
    description of exactly these bytes."""
    if not isinstance(desc, ValueDesc):
        raise TypeError(f"desc must be a ValueDesc, got {type(desc).__name__}")
    if isinstance(data, (list, tuple)):
        parts = [as_bytes(p) for p in data]
        total = sum(p.numel() for p in parts)
        if total != desc.length:
            raise ValueError(f"the parts hold {total} bytes but desc describes {desc.length}; "
                             "pass exactly the described bytes")
        return parts
    buf = as_bytes(data)
    if buf.numel() != desc.length:
        raise ValueError(f"data holds {buf.numel()} bytes but desc describes {desc.length}; "
                         "pass exactly the described bytes")
    return split(buf, desc.nbytes)
