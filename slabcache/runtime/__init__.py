"""The runtime layer: threads and devices, with no knowledge of stores.

``workers``   a priority queue drained by I/O threads (Priority is an IntEnum)
``transfer``  pinned host staging and CUDA streams; torch.cuda is touched
              only here, and only when a CUDA tensor is passed
"""
