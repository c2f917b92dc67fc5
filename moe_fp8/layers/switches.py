"""When the layer's own kernels (router, permute/index/combine) run instead of their torch code.

Each family has one environment switch: ``1`` on, ``0`` off, unset = the family's default — on
only for paths measured right on a GPU (the permute family: H200, 2026-11-25); new paths stay off
until a device run has verified them. The kernels run only for tensors on an sm_90 GPU and never
inside ``torch.compile`` tracing (they are launched by pointer, which fake tensors do not have).
"""
from __future__ import annotations

import functools

import torch

from ..gemm.jit.env import lookup


@functools.lru_cache(maxsize=None)
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def switch_on(env_name: str, default: bool) -> bool:
    """The environment switch alone: ``0`` off, any other value on, unset ``default``."""
    value = lookup(env_name)
    return default if value is None else value.strip() != "0"


def switch_up_to_rows(env_name: str, rows: float, max_rows: float) -> bool:
    """A switch for decode-sized work: ``0`` off, any other value on, unset on where ``rows``
    (a batch's expected rows per expert) is at most ``max_rows``."""
    return switch_on(env_name, rows <= max_rows)


def int_setting(env_name: str, default: int) -> int:
    """A non-negative integer from the environment (unset: ``default``); anything else raises."""
    value = lookup(env_name)
    if value is None or not value.strip():
        return default
    if not value.strip().isdigit():
        raise ValueError(f"{env_name} must be a non-negative integer, got {value!r}")
    return int(value)


def kernels_enabled(t: torch.Tensor, env_name: str, default: bool) -> bool:
    """True when a kernel family switched by ``env_name`` should run for tensors like ``t``."""
    if not t.is_cuda or not switch_on(env_name, default) or torch.compiler.is_compiling():
        return False
    return _is_sm90(t.device.index if t.device.index is not None else torch.cuda.current_device())
