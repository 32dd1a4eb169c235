"""The process environment CUDA reads once, set in one place before torch touches the device (no torch import here).

The trainer calls set_cuda_env() at the top of embxlib/train.py, before it imports torch; the GPU check's stages
(each its own process) call it at the top of embxlib/gpucheck.py, so its medium run and its kernel checks use the
allocator that `python -m embxlib.train` and upstream use."""
from __future__ import annotations

import os

ALLOC_CONF = "expandable_segments:True"  # upstream's allocator setting


def set_cuda_env() -> None:
    """Upstream's allocator setting (large, changing activation sizes fragment the default allocator). The caching
    allocator reads it at the first CUDA allocation, so call this before then (before importing torch is safest).
    A setting the user made (PYTORCH_ALLOC_CONF, or the older PYTORCH_CUDA_ALLOC_CONF) is kept."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ.setdefault("PYTORCH_ALLOC_CONF", ALLOC_CONF)
