"""Host side of include/silu_backward.cuh: SiLU-and-mul backward fused with the quantisations
it feeds (training path; inputs validated by ``moe_fp8.gemm.silu_and_mul_backward_quant_fp8``).

``silu_and_mul_backward_quant(d_act, h, dh, dh_s, dh_t, dh_t_s, act_t, act_t_s, group_size,
pow2_scale)``:

    d_act    bf16 [M, I] contiguous       h        bf16 [M, 2I] contiguous (gate | up), I % 128 == 0
    dh       fp8 [M, 2I]                  dh_s     fp32 [M, 2I/128]       (1x128 along channels)
    dh_t     fp8 [2I, M]                  dh_t_s   fp32 [2I, ceil(M/128)] (1x128 along tokens)
    act_t    fp8 [I, M]                   act_t_s  fp32 [I, ceil(M/128)]  (1x128 along tokens)

Scales are written through their strides (the public op allocates them MN-major). One CTA per
128 tokens x 128 channels of I, grid ``(I/128, ceil(M/128))``, 112 KB of dynamic shared memory
(two CTAs per SM); the grid depends only on the shapes (graph-capturable).
"""
from __future__ import annotations

import functools

import torch

from ..jit import KernelSource, get_kernel, i32, i64, register_bundled
from .transpose_quant import check_token_tiles

kHeader = "silu_backward.cuh"
kThreads = 256  # silu_backward.cuh kSiluBwdThreads
kTile = 128  # silu_backward.cuh kSiluBwdTile
kSmemBytes = 3 * kTile * kTile * 2 + (kThreads // 32) * 3 * kTile * 4 + 3 * kTile * 4  # kSiluBwdSmemBytes
kSupportedInputs = {"silu_and_mul_backward_quant": (torch.bfloat16,)}  # d_act and h both bf16


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


@functools.lru_cache(maxsize=None)
def source(pow2_scale: bool) -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::quant::silu_and_mul_backward_quant_kernel<"
                                 f"{_bool(pow2_scale)}>")


@register_bundled
def bundled_sources() -> list[KernelSource]:
    return [source(False), source(True)]


def _strides(s: torch.Tensor) -> list:
    return [i64(s.stride(0)), i64(s.stride(1))]


def silu_and_mul_backward_quant(d_act: torch.Tensor, h: torch.Tensor, dh: torch.Tensor,
                                dh_s: torch.Tensor, dh_t: torch.Tensor, dh_t_s: torch.Tensor,
                                act_t: torch.Tensor, act_t_s: torch.Tensor, group_size: int = 128,
                                pow2_scale: bool = False) -> None:
    if group_size != kTile:
        raise ValueError(f"group_size must be {kTile}, got {group_size}")
    rows, inter = d_act.shape
    if d_act.dtype != torch.bfloat16 or h.dtype != torch.bfloat16:
        raise TypeError(f"the kernel reads d_act and h as bf16, got {d_act.dtype} and {h.dtype}")
    if rows == 0 or inter == 0:
        return
    check_token_tiles(rows, "d_act")
    for name, tensor in (("d_act", d_act), ("h", h), ("dh", dh), ("dh_t", dh_t), ("act_t", act_t)):
        if tensor.data_ptr() % 16:
            raise ValueError(f"{name} must start at a 16-byte aligned address, got "
                             f"{tensor.data_ptr():#x} (a sliced view?)")
    kernel = get_kernel(source(bool(pow2_scale)))
    kernel.launch((inter // kTile, -(-rows // kTile), 1), kThreads, kSmemBytes,
                  [d_act, h, dh, dh_s, dh_t, dh_t_s, act_t, act_t_s, i32(rows), i32(inter),
                   *_strides(dh_s), *_strides(dh_t_s), *_strides(act_t_s)])
