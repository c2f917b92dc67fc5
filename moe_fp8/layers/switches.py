"""When the layer's own kernels (router, permute/index/combine) run instead of their torch code.

Each family has one environment switch, on unless set to ``0``; the kernels run only for tensors
on an sm_90 GPU and never inside ``torch.compile`` tracing (they are launched by pointer, which
fake tensors do not have).
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def switch_on(env_name: str) -> bool:
    """The environment switch alone: ``<env_name>=0`` turns the family off (default on)."""
    return os.environ.get(env_name, "1").strip() != "0"


def kernels_enabled(t: torch.Tensor, env_name: str) -> bool:
    """True when a kernel family switched by ``env_name`` should run for tensors like ``t``."""
    if not t.is_cuda or not switch_on(env_name) or torch.compiler.is_compiling():
        return False
    return _is_sm90(t.device.index if t.device.index is not None else torch.cuda.current_device())
