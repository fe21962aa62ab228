"""CUDA tensors through the store: staging, streams, odd layouts.

Marked ``gpu``; they skip when torch.cuda.is_available() is False (no CUDA
device), and tools/gpu_check.sh runs them on a CUDA machine.
"""

import pytest
import torch

from slabcache import SlabStore

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_roundtrip(tmp_path, engine):
    with SlabStore.open(tmp_path / "s", capacity_bytes=16 << 20, slot_bytes=1 << 20, io=engine) as s:
        v = torch.randn(256, 512, device="cuda").to(torch.bfloat16)
        assert s.put("k", v)
        out = torch.empty_like(v)
        assert s.get_into("k", out)
        assert torch.equal(out, v)
        assert torch.equal(s.get("k"), v.cpu())
        vals = [torch.randn(128, 1024, device="cuda") for _ in range(6)]
        assert all(f.result() for f in [s.jobs.put(f"b{i}", x) for i, x in enumerate(vals)])
        outs = [torch.empty_like(x) for x in vals]
        assert s.get_many_into([f"b{i}" for i in range(6)], outs) == [True] * 6
        assert all(torch.equal(a, b) for a, b in zip(outs, vals))
        # A list whose second tensor starts at an odd byte offset, read into
        # a non-contiguous out.
        pair = [torch.arange(3, dtype=torch.bfloat16, device="cuda"),
                torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)]
        assert s.put("pair", pair)
        outs = [torch.empty(3, dtype=torch.bfloat16, device="cuda"),
                torch.empty(4, 3, device="cuda").t()]
        assert s.get_into("pair", outs)
        assert torch.equal(outs[0], pair[0]) and torch.equal(outs[1], pair[1])
        # A list mixing host and device tensors, host first.
        mixed = [torch.arange(5, dtype=torch.int16), torch.arange(7.0, device="cuda")]
        assert s.put("mixed", mixed)
        outs = [torch.empty(5, dtype=torch.int16), torch.empty(7, device="cuda")]
        assert s.get_into("mixed", outs)
        assert torch.equal(outs[0], mixed[0]) and torch.equal(outs[1], mixed[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_workers_order_cuda_copies_after_the_callers_stream(tmp_path):
    n = 1 << 18
    with SlabStore.open(tmp_path / "s", capacity_bytes=16 << 20, slot_bytes=1 << 20) as s:
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            # The value is still being produced on the caller's stream when
            # put_async returns: the worker must wait for it.
            v = torch.zeros(n, device="cuda")
            torch.cuda._sleep(200_000_000)
            v.fill_(7.0)
            assert s.jobs.put("k", v).result(30)
        assert torch.equal(s.get("k"), torch.full((n,), 7.0))
        with torch.cuda.stream(side):
            # The out is still being read on the caller's stream: the worker
            # must not overwrite it before that read.
            out = torch.zeros(n, device="cuda")
            torch.cuda._sleep(200_000_000)
            before = out.clone()
            assert s.get_many_into(["k"], [out]) == [True]
        side.synchronize()
        assert torch.equal(before.cpu(), torch.zeros(n))
        assert torch.equal(out.cpu(), torch.full((n,), 7.0))
