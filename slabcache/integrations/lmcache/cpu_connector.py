"""CPUConnector: LMCache's engine with a CPU tensor as its "GPU" KV cache.

LMCache moves KV between its memory objects and the model's paged GPU cache
through a GPU connector.  On a machine without a GPU, tests and benchmarks
give the engine this stand-in: the KV cache is one CPU tensor
``kv[2, layers, tokens, hidden]`` passed to store/retrieve as ``kv=``.
"""

from __future__ import annotations

import torch
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface


class CPUConnector(GPUConnectorInterface):
    def __init__(self, layers: int, hidden: int):
        self.layers, self.hidden = layers, hidden

    def to_gpu(self, memory_obj, start, end, **kw):
        kw["kv"][:, :, start:end].copy_(memory_obj.tensor)

    def from_gpu(self, memory_obj, start, end, **kw):
        memory_obj.tensor.copy_(kw["kv"][:, :, start:end])

    def batched_from_gpu(self, memory_objs, starts, ends, **kw):
        for m, s, e in zip(memory_objs, starts, ends):
            self.from_gpu(m, s, e, **kw)

    def batched_to_gpu(self, memory_objs=None, starts=None, ends=None, **kw):
        for m, s, e in zip(memory_objs, starts, ends):
            self.to_gpu(m, s, e, **kw)

    def get_shape(self, num_tokens):
        return torch.Size([2, self.layers, num_tokens, self.hidden])
