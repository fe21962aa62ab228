"""Turning values (a tensor or a list of tensors) into byte parts and back."""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch

from ..errors import UnsupportedValueError
from ..format.values import DTYPE_CODES, ValueDesc


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


# The dtypes a value may have, as torch objects (a set lookup on the hot
# path instead of formatting the dtype's name).
_FIXED_DTYPES = frozenset(getattr(torch, n) for n in DTYPE_CODES if hasattr(torch, n))


def _check_tensor(t, where: str) -> None:
    if (isinstance(t, torch.Tensor) and t.dtype in _FIXED_DTYPES and t.layout is torch.strided
            and not t.is_meta and not t.is_conj() and not t.is_neg()):
        return  # the usual case, in one test; the checks below name what is wrong
    if not isinstance(t, torch.Tensor):
        raise UnsupportedValueError(
            f"{where} is a {type(t).__name__}, not a torch.Tensor; store tensors "
            "(torch.as_tensor(...) converts arrays)"
        )
    if t.layout != torch.strided or t.is_quantized:
        raise UnsupportedValueError(
            f"{where} has layout {t.layout}; only dense (strided) tensors are stored: "
            "call .to_dense() first"
        )
    if dtype_name(t.dtype) not in DTYPE_CODES:
        raise UnsupportedValueError(
            f"{where} has dtype {t.dtype}, which has no fixed element size slabcache "
            f"knows; use one of {', '.join(sorted(DTYPE_CODES))}"
        )
    if t.device.type == "meta":
        raise UnsupportedValueError(
            f"{where} is on the meta device and holds no data; store a tensor with data "
            "(e.g. torch.empty_like(t, device='cpu') filled with it)"
        )
    if t.is_conj() or t.is_neg():
        raise UnsupportedValueError(
            f"{where} is a lazy {'conjugate' if t.is_conj() else 'negative'} view, whose "
            "bytes are not its values; call .resolve_conj() / .resolve_neg() first"
        )


# A value's tensor count is stored in 16 bits (format/values.py).
MAX_TENSORS = 0xFFFF


def as_list(value) -> tuple[list[torch.Tensor], bool]:
    """The tensors of a value and whether it was a list.  Raises UnsupportedValueError."""
    if isinstance(value, torch.Tensor):
        _check_tensor(value, "value")
        return [value], False
    if isinstance(value, (list, tuple)):
        if not value:
            raise UnsupportedValueError("value is an empty list; store at least one tensor")
        if len(value) > MAX_TENSORS:
            raise UnsupportedValueError(
                f"value is a list of {len(value)} tensors; at most {MAX_TENSORS} fit one "
                "entry: concatenate them, or split the value over several keys"
            )
        for i, t in enumerate(value):
            _check_tensor(t, f"value[{i}]")
        return list(value), True
    raise UnsupportedValueError(
        f"value is a {type(value).__name__}; store a torch.Tensor or a list of them "
        "(torch.as_tensor(...) converts arrays)"
    )


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a contiguous CPU tensor (no copy).

    Each torch view costs microseconds here, so only the ones needed run.
    """
    flat = t if t.dim() == 1 else t.reshape(-1)
    if flat.dtype is torch.uint8:
        return flat
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return flat.view(torch.uint8)


def meta_for(tensors: Sequence[torch.Tensor], is_list: bool, extra: bytes = b"") -> ValueDesc:
    if not isinstance(extra, (bytes, bytearray)):
        raise UnsupportedValueError(f"extra must be bytes, got {type(extra).__name__}")
    return ValueDesc(
        is_list=is_list,
        dtypes=tuple(dtype_name(t.dtype) for t in tensors),
        shapes=tuple(tuple(t.shape) for t in tensors),
        nbytes=tuple(t.numel() * t.element_size() for t in tensors),
        extra=bytes(extra),
    )


def host_parts(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Byte views of CPU tensors (a copy only where one is not contiguous)."""
    out = []
    for t in tensors:
        if t.requires_grad:
            t = t.detach()
        out.append(byte_view(t if t.is_contiguous() else t.contiguous()))
    return out


def on_cuda(tensors: Sequence[torch.Tensor]) -> bool:
    for t in tensors:  # a loop, not any(...): every put asks, mostly of one tensor
        if t.is_cuda:
            return True
    return False


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The address range a CPU tensor's elements occupy."""
    start = t.data_ptr()
    if t.is_contiguous():  # most outs: skip the shape and stride calls
        return start, start + t.nbytes
    if t.numel() == 0:
        return 0, 0
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def check_disjoint(tensors: Sequence[torch.Tensor], where: str = "outs") -> None:
    """Raise UnsupportedValueError when two CPU tensors share memory: a read
    into both would mix two values' bytes (and fail as corruption)."""
    spans = sorted(s for s in (_span(t) for t in tensors if t.is_cpu) if s[1] > s[0])
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        if b0 < a1:
            raise UnsupportedValueError(
                f"{where} overlap in memory; read each value into its own tensor "
                "(views of one buffer must not overlap)"
            )


def _overlaps_itself(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` may share memory (an expanded or
    as_strided view): a value cannot be copied into it.  Exact for every
    layout torch's own views make; conservative for exotic strides."""
    if t.is_contiguous() or t.numel() <= 1:
        return False
    reach = 0  # the furthest element offset the dims taken so far cover
    for stride, n in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride <= reach:
            return True
        reach += (n - 1) * stride
    return False


def match_out(out, meta: ValueDesc) -> list[torch.Tensor]:
    """Check ``out`` against ``meta``; raises UnsupportedValueError naming the difference."""
    tensors, is_list = as_list(out)
    if is_list != meta.is_list or len(tensors) != len(meta.dtypes):
        raise UnsupportedValueError(
            f"out holds {len(tensors)} tensor(s){' in a list' if is_list else ''} but the "
            f"stored value has {len(meta.dtypes)}{' in a list' if meta.is_list else ''}; "
            "pass an out shaped like the stored value (see store.describe(key))"
        )
    for i, (t, dt, shape) in enumerate(zip(tensors, meta.dtypes, meta.shapes)):
        if dtype_name(t.dtype) != dt or tuple(t.shape) != tuple(shape):
            raise UnsupportedValueError(
                f"out[{i}] is {dtype_name(t.dtype)}{list(t.shape)} but the stored tensor is "
                f"{dt}{list(shape)}; allocate out with the stored dtype and shape"
            )
        if _overlaps_itself(t):
            raise UnsupportedValueError(
                f"out[{i}] has elements that share memory (an expanded or as_strided view), so "
                "it cannot hold a value; pass a tensor with storage of its own, e.g. "
                "torch.empty(shape, dtype=dtype)"
            )
    if len(tensors) > 1:
        check_disjoint(tensors)
    return tensors


def direct_parts(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """Byte views to read straight into, or None when a copy is needed."""
    parts = []
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        parts.append(byte_view(t))
    return parts


class Plan:
    """How to rebuild a stored value: its description and, per tensor, the
    byte count, torch dtype and shape.  Cached per encoded description, so
    the hot path decodes each distinct layout once."""

    __slots__ = ("desc", "length", "_tensors", "_complex")

    def __init__(self, desc: ValueDesc):
        self.desc = desc
        self.length = desc.length
        self._tensors = [(n, getattr(torch, dt), tuple(shape))
                         for dt, shape, n in zip(desc.dtypes, desc.shapes, desc.nbytes)]
        self._complex = self._tensors[0][1].is_complex  # only these can be conjugate views

    def direct_parts(self, out) -> list[torch.Tensor] | None:
        """The byte part to read straight into ``out`` when it is exactly a
        dense CPU tensor of this (single-tensor) value's dtype and shape;
        None when the general path must check or copy."""
        if self.desc.is_list or type(out) is not torch.Tensor:
            return None
        n, dtype, shape = self._tensors[0]
        # A lazy negative or conjugate view is refused by the general path:
        # its bytes are not its values.
        if (out.dtype is dtype and out.shape == shape and out.is_cpu and n
                and out.layout is torch.strided and out.is_contiguous() and not out.is_neg()
                and not (self._complex and out.is_conj())):
            # Each torch view costs microseconds here: only the ones needed.
            flat = out if len(shape) == 1 else out.view(-1)
            return [flat if dtype is torch.uint8 else flat.view(torch.uint8)]
        return None

    def allocate(self, empty: Callable[[int], torch.Tensor]):
        """Fresh tensors for the value (one buffer each) and their byte parts."""
        tensors, parts = [], []
        for n, dtype, shape in self._tensors:
            buf = empty(n)
            if n == 0:
                t = torch.empty(shape, dtype=dtype)
            else:
                t = buf if dtype is torch.uint8 else buf.view(dtype)
                if t.shape != shape:
                    t = t.view(shape)
            tensors.append(t)
            parts.append(buf)
        return (tensors if self.desc.is_list else tensors[0]), parts


_PLANS: dict[bytes, Plan] = {}
_DESCS: dict[tuple, ValueDesc] = {}
# Distinct layouts are few (a model has a handful of chunk shapes); the
# caches are cleared if a workload makes them grow past this anyway.
_CACHE_LIMIT = 4096


def plan_for(meta_raw: bytes) -> Plan:
    """The Plan of an encoded description.  Raises CorruptStoreError when it
    does not decode."""
    plan = _PLANS.get(meta_raw)
    if plan is None:
        plan = Plan(ValueDesc.decode(meta_raw))
        if len(_PLANS) >= _CACHE_LIMIT:
            _PLANS.clear()
        _PLANS[meta_raw] = plan
    return plan


def described(tensors: Sequence[torch.Tensor], is_list: bool, extra: bytes = b"") -> ValueDesc:
    """The description of checked tensors; cached per layout (its encoding
    is cached with it, ``desc.encoded``)."""
    if type(extra) is not bytes:
        if not isinstance(extra, (bytes, bytearray)):
            raise UnsupportedValueError(f"extra must be bytes, got {type(extra).__name__}")
        extra = bytes(extra)
    if is_list:
        key = (True, extra, *[(t.dtype, t.shape) for t in tensors])
    else:  # one tensor (every put of a KV chunk or block): no list to build
        t = tensors[0]
        key = (False, extra, t.dtype, t.shape)  # the key plain_host_value looks up
    desc = _DESCS.get(key)
    if desc is None:
        desc = meta_for(tensors, is_list, extra)
        desc.encoded  # noqa: B018 - encoded once, with the description
        if len(_DESCS) >= _CACHE_LIMIT:
            _DESCS.clear()
        _DESCS[key] = desc
    return desc


def plain_host_value(t, extra: bytes):
    """(description, byte parts) of a value that is one dense, contiguous
    CPU tensor of a stored dtype, ready to write as it is, whose layout was
    described before; None otherwise, for the general path (as_list,
    described, host_parts), which checks everything and names what is wrong.

    One test instead of that path's dozen calls: every put of a KV chunk or
    block is this case, and each torch attribute costs 50-90 ns here."""
    if type(t) is not torch.Tensor or type(extra) is not bytes:
        return None
    dt = t.dtype
    if not (t.is_cpu and dt in _FIXED_DTYPES and t.layout is torch.strided and t.is_contiguous()
            and not t.requires_grad and not t.is_conj() and not t.is_neg()):
        return None
    desc = _DESCS.get((False, extra, dt, t.shape))
    if desc is None:
        return None
    return desc, [t if dt is torch.uint8 and t.dim() == 1 else byte_view(t)]


def split(buf: torch.Tensor, nbytes) -> list[torch.Tensor]:
    """Consecutive byte parts of ``buf``, one per size in ``nbytes``."""
    parts, pos = [], 0
    for n in nbytes:
        parts.append(buf[pos:pos + n])
        pos += n
    return parts


def as_bytes(data) -> torch.Tensor:
    """A 1-D uint8 CPU tensor over ``data`` (a tensor or a buffer), no copy."""
    if (type(data) is torch.Tensor and data.dtype is torch.uint8 and data.dim() == 1
            and data.is_cpu and data.is_contiguous()):
        return data  # already what is asked for (uint8 cannot require grad)
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise UnsupportedValueError(
                f"raw bytes must be in CPU memory, got a tensor on {data.device}; copy it to the CPU"
            )
        return byte_view(data.detach().contiguous())
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise UnsupportedValueError(
            f"raw bytes must be a tensor or a buffer (bytes, bytearray, memoryview), "
            f"got {type(data).__name__}"
        ) from None
    if not len(view):
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        # Read-only buffers are only ever read from (written to the slab).
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


def out_bytes(out, where: str = "out") -> torch.Tensor:
    """A 1-D uint8 view of ``out``'s own memory, to read raw bytes into:
    a contiguous CPU tensor (any dtype) or a writable buffer.  Never a copy:
    a read into a copy would leave ``out`` untouched.  Raises
    UnsupportedValueError naming what to pass instead."""
    if (type(out) is torch.Tensor and out.dtype is torch.uint8 and out.dim() == 1
            and out.is_cpu and out.is_contiguous()):
        return out
    if isinstance(out, torch.Tensor):
        if out.device.type != "cpu":
            raise UnsupportedValueError(
                f"{where} is on {out.device}; raw reads fill CPU memory: pass a CPU tensor "
                "(get_into takes CUDA outs)")
        if not out.is_contiguous():
            raise UnsupportedValueError(
                f"{where} is not contiguous (a slice with a step, or a transposed view), so the "
                "bytes cannot land in it in order; pass a contiguous tensor (read into "
                "torch.empty(n, dtype=torch.uint8), then copy where they belong)")
        return byte_view(out.detach())
    try:
        view = memoryview(out)
    except TypeError:
        raise UnsupportedValueError(
            f"{where} is a {type(out).__name__}; pass a uint8 tensor or a writable buffer "
            "(bytearray, writable memoryview)") from None
    if view.readonly:
        raise UnsupportedValueError(
            f"{where} is read-only ({type(out).__name__}); pass a bytearray or a tensor to read into")
    if not view.c_contiguous:
        raise UnsupportedValueError(f"{where} is a buffer that is not contiguous; pass a contiguous one")
    view = view.cast("B")
    if not len(view):
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


def describe(shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype], *,
             is_list: bool, extra: bytes = b"") -> ValueDesc:
    """The description of tensors with these shapes and dtypes, stored back
    to back (for values handed over as raw bytes).  Raises UnsupportedValueError."""
    if len(shapes) != len(dtypes) or not shapes:
        raise UnsupportedValueError(
            f"got {len(shapes)} shapes and {len(dtypes)} dtypes; give one dtype per shape, at least one"
        )
    if not is_list and len(shapes) != 1:
        raise UnsupportedValueError("a value that is not a list describes exactly one tensor")
    names, nbytes = [], []
    for shape, dt in zip(shapes, dtypes):
        name = dtype_name(dt)
        if name not in DTYPE_CODES:
            raise UnsupportedValueError(f"dtype {dt} has no fixed element size slabcache knows")
        n = 1
        for d in shape:
            n *= int(d)
        names.append(name)
        nbytes.append(n * dt.itemsize)
    if not isinstance(extra, (bytes, bytearray)):
        raise UnsupportedValueError(f"extra must be bytes, got {type(extra).__name__}")
    return ValueDesc(is_list=is_list, dtypes=tuple(names),
                     shapes=tuple(tuple(int(d) for d in s) for s in shapes),
                     nbytes=tuple(nbytes), extra=bytes(extra))
