"""Host side of include/transpose_quant.cuh: quantisation that also writes the transposed copy
(training path; inputs validated by the public ops in ``moe_fp8.gemm``).

* ``per_block_quant_transpose(w, q, s, q_t, s_t, block_size, pow2_scale)``: w ``[N, K]`` or
  ``[E, N, K]`` bf16/fp32 contiguous, N and K multiples of 128; q like w, s
  ``[.., N/128, K/128]``, q_t ``[.., K, N]``, s_t ``[.., K/128, N/128]``, all contiguous.
  One CTA per 128x128 block: grid ``(K/128, N/128, E)``.
* ``token_transpose_quant(x, q_t, s_t, group_size, pow2_scale, m_indices=None)``: x ``[T, C]``
  bf16/fp32 contiguous, C a multiple of 128, any T; rows with ``m_indices == -1`` (int32 ``[T]``,
  optional) read as zero; q_t ``[C, T]`` fp8 contiguous, s_t ``[C, ceil(T/128)]``
  fp32 through its strides (the public op allocates it MN-major, what the k-grouped
  weight-gradient GEMM reads). One CTA per 128 tokens x 128 channels: grid ``(C/128, ceil(T/128))``.
* ``token_transpose_requant(a, sa, m_indices, q_t, s_t, group_size, pow2_scale)``: the same from an
  fp8 ``a [T, C]`` with 1x128 scales ``sa [T, C/128]`` (any strides): values dequantised
  (``a * sa``, one fp32 rounding), rows with ``m_indices == -1`` read as zero (``m_indices`` int32
  ``[T]`` or None), then quantised along tokens (the backward's x', no fp32 copy in memory).

Both launch on a grid that depends only on the shapes (graph-capturable, no host sync).
"""
from __future__ import annotations

import ctypes
import functools

import torch

from ..jit import KernelSource, get_kernel, i32, i64, register_bundled

kHeader = "transpose_quant.cuh"
kTileThreads = 256  # transpose_quant.cuh kTileThreads
kTile = 128  # transpose_quant.cuh kTile: the block / group size the kernels are written for
_kTypeNames = {torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}
kSupportedInputs = {
    "per_block_quant_transpose": tuple(_kTypeNames),
    "token_transpose_quant": tuple(_kTypeNames),
    "token_transpose_requant": (torch.float8_e4m3fn,),
}


class RowInput(ctypes.Structure):
    """transpose_quant.cuh ``RowInput``, passed by value."""
    _fields_ = [("row_scale", ctypes.c_uint64), ("row_mask", ctypes.c_uint64),
                ("rs_row", ctypes.c_int64), ("rs_group", ctypes.c_int64)]


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


@functools.lru_cache(maxsize=None)
def per_block_transpose_source(dtype: torch.dtype, pow2_scale: bool) -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::quant::per_block_quant_transpose_kernel<"
                                 f"{_kTypeNames[dtype]}, {_bool(pow2_scale)}>")


@functools.lru_cache(maxsize=None)
def token_transpose_source(dtype: torch.dtype, pow2_scale: bool) -> KernelSource:
    """dtype bf16/fp32: quantise x; float8_e4m3fn: the requantising (dequant) variant."""
    dequant = dtype == torch.float8_e4m3fn
    type_name = "__nv_fp8_storage_t" if dequant else _kTypeNames[dtype]
    return KernelSource(kHeader, f"moe_fp8::quant::token_transpose_quant_kernel<"
                                 f"{type_name}, {_bool(pow2_scale)}, {_bool(dequant)}>")


@register_bundled
def bundled_sources() -> list[KernelSource]:
    """Every variant the public ops use: bf16/fp32 inputs, both scale kinds."""
    sources = []
    for pow2 in (False, True):
        for dtype in _kTypeNames:
            sources += [per_block_transpose_source(dtype, pow2), token_transpose_source(dtype, pow2)]
        sources.append(token_transpose_source(torch.float8_e4m3fn, pow2))
    return sources


def _check_size(size: int, what: str) -> None:
    if size != kTile:
        raise ValueError(f"{what} must be {kTile}, got {size}")


kMaxGridY = 65535  # the launch limit of gridDim.y, which counts 128-token tiles here


def check_token_tiles(tokens: int, name: str) -> None:
    """The token-tile grid dimension (y) allows at most 65535 x 128 tokens."""
    if -(-tokens // kTile) > kMaxGridY:
        raise ValueError(f"{name} has {tokens} rows; the transposing quantisers take at most "
                         f"{kMaxGridY * kTile}")


def _check_aligned(**tensors) -> None:
    """16-byte vector accesses need 16-byte aligned bases (a storage offset can break it)."""
    for name, tensor in tensors.items():
        if tensor.data_ptr() % 16:
            raise ValueError(f"{name} must start at a 16-byte aligned address, got "
                             f"{tensor.data_ptr():#x} (a sliced view?)")


def per_block_quant_transpose(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                              q_t: torch.Tensor, s_t: torch.Tensor, block_size: int = 128,
                              pow2_scale: bool = False) -> None:
    _check_size(block_size, "block_size")
    n, k = w.shape[-2], w.shape[-1]
    experts = w.shape[0] if w.dim() == 3 else 1
    if w.numel() == 0:
        return
    _check_aligned(w=w, q=q, q_t=q_t)
    kernel = get_kernel(per_block_transpose_source(w.dtype, bool(pow2_scale)))
    kernel.launch((k // kTile, n // kTile, experts), kTileThreads, 0,
                  [w, q, s, q_t, s_t, i32(n), i32(k)])


def token_transpose_quant(x: torch.Tensor, q_t: torch.Tensor, s_t: torch.Tensor,
                          group_size: int = 128, pow2_scale: bool = False,
                          m_indices: torch.Tensor | None = None) -> None:
    _check_size(group_size, "group_size")
    tokens, channels = x.shape
    if x.numel() == 0:
        return
    check_token_tiles(tokens, "x")
    _check_aligned(x=x, q_t=q_t)
    _launch_token_transpose(x, q_t, s_t, pow2_scale,
                            RowInput(0, 0 if m_indices is None else m_indices.data_ptr(), 0, 0))


def token_transpose_requant(a: torch.Tensor, sa: torch.Tensor, m_indices, q_t: torch.Tensor,
                            s_t: torch.Tensor, group_size: int = 128,
                            pow2_scale: bool = False) -> None:
    _check_size(group_size, "group_size")
    tokens, channels = a.shape
    if a.numel() == 0:
        return
    check_token_tiles(tokens, "a")
    _check_aligned(a=a, q_t=q_t)
    _launch_token_transpose(a, q_t, s_t, pow2_scale,
                            RowInput(sa.data_ptr(), 0 if m_indices is None else m_indices.data_ptr(),
                                     sa.stride(0), sa.stride(1)))


def _launch_token_transpose(x, q_t, s_t, pow2_scale, rows: "RowInput") -> None:
    """One token_transpose_quant_kernel launch over ``x [T, C]`` (bf16/fp32 values, or fp8 with
    its scales in ``rows``): a CTA per 128 channels x 128 tokens."""
    tokens, channels = x.shape
    kernel = get_kernel(token_transpose_source(x.dtype, bool(pow2_scale)))
    kernel.launch((channels // kTile, -(-tokens // kTile), 1), kTileThreads, 0,
                  [x, q_t, s_t, i32(tokens), i32(channels), i64(s_t.stride(0)),
                   i64(s_t.stride(1)), rows])
