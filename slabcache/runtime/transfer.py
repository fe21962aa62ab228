"""Moving bytes between the slab and CUDA tensors through pinned staging.

Disk I/O needs host memory; page-locked (pinned) host memory lets the
host-to-device copy run asynchronously at full PCIe speed.  Each I/O worker
takes a staging buffer from a small pool, reads into it, and enqueues the
copy on its own CUDA stream, so the disk read of one key overlaps the
device copy of another across a batch.

``torch.cuda`` is touched only here, and only when a CUDA tensor is passed.
"""

from __future__ import annotations

import threading

import torch


class StagingPool:
    """Reusable pinned host buffers, grown on demand, at most ``count`` live."""

    def __init__(self, count: int = 8):
        self._free: list[torch.Tensor] = []
        self._sem = threading.Semaphore(count)
        self._lock = threading.Lock()
        self._streams = threading.local()

    def acquire(self, nbytes: int) -> torch.Tensor:
        self._sem.acquire()
        with self._lock:
            for i, buf in enumerate(self._free):
                if buf.numel() >= nbytes:
                    return self._free.pop(i)
            if self._free:
                self._free.pop(0)  # too small: replace it with a bigger one
        # 4 KiB alignment of pinned allocations keeps O_DIRECT reads direct.
        try:
            raw = torch.empty(nbytes + 4096, dtype=torch.uint8, pin_memory=True)
        except BaseException:
            self._sem.release()  # the slot was never filled
            raise
        skip = (-raw.data_ptr()) % 4096
        return raw[skip:skip + nbytes]

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
        self._sem.release()

    def stream(self, device: torch.device):
        """This thread's CUDA stream for ``device``."""
        streams = getattr(self._streams, "by_device", None)
        if streams is None:
            streams = self._streams.by_device = {}
        s = streams.get(device)
        if s is None:
            s = streams[device] = torch.cuda.Stream(device=device)
        return s


def caller_marks(tensors: list[torch.Tensor]) -> dict:
    """Events on the calling thread's current stream of each CUDA device
    among ``tensors``.

    A worker thread's own current stream knows nothing of the caller's
    (vLLM computes on streams of its own): the work queued there so far,
    which may still be writing or reading these tensors, must finish before
    a worker's stream touches them.
    """
    marks = {}
    for t in tensors:
        if t.device.type == "cuda" and t.device not in marks:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(t.device))
            marks[t.device] = event
    return marks


def _after_caller(stream, device: torch.device, marks: dict | None) -> None:
    """Order ``stream`` after the caller's work: ``marks`` from
    :func:`caller_marks`, or None when the caller is this thread."""
    if marks is None:
        stream.wait_stream(torch.cuda.current_stream(device))
    elif device in marks:
        stream.wait_event(marks[device])


def to_host(tensors: list[torch.Tensor], pool: StagingPool,
            marks: dict | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Copy CUDA tensors into one pinned buffer; returns (byte parts, buffer)."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    buf = pool.acquire(max(1, sum(sizes)))
    device = next(t.device for t in tensors if t.device.type == "cuda")
    stream = pool.stream(device)
    _after_caller(stream, device, marks)
    parts, pos = [], 0
    with torch.cuda.stream(stream):
        for t, n in zip(tensors, sizes):
            part = buf[pos:pos + n]
            if n:
                part.copy_(t.detach().contiguous().reshape(-1).view(torch.uint8), non_blocking=True)
            parts.append(part)
            pos += n
    stream.synchronize()
    return parts, buf


def from_host(parts: list[torch.Tensor], outs: list[torch.Tensor], pool: StagingPool,
              marks: dict | None = None) -> None:
    """Copy host byte parts into CUDA tensors ``outs`` and wait for it."""
    device = next(o.device for o in outs if o.device.type == "cuda")
    stream = pool.stream(device)
    _after_caller(stream, device, marks)
    with torch.cuda.stream(stream):
        for part, out in zip(parts, outs):
            fill_from_bytes(out, part, non_blocking=True)
    stream.synchronize()


def fill_from_bytes(out: torch.Tensor, part: torch.Tensor, non_blocking: bool = False) -> None:
    """Copy the bytes ``part`` (1-D uint8, any device) into ``out``.

    A part can start at any byte offset of the staging buffer (it follows
    the earlier tensors of a list), so it is never reinterpreted as
    ``out``'s dtype: bytes go into a contiguous tensor on ``out``'s device
    (``out`` itself when it is contiguous) and a non-contiguous ``out`` is
    filled from that.
    """
    if part.numel() == 0:
        return
    dense = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    dense.reshape(-1).view(torch.uint8).copy_(part, non_blocking=non_blocking)
    if dense is not out:
        out.copy_(dense, non_blocking=non_blocking)
