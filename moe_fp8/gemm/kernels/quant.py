"""Host side of include/quant.cuh: FP8 quantisation kernels (inputs validated by the public ops).

All three write fp8 values and fp32 scales into caller-allocated tensors:

* ``per_token_group_quant(x, q, s, group_size, pow2_scale)``: x ``[M, K]`` or ``[E, M, K]``
  bf16/fp32 contiguous; q same shape fp8; s ``[.., M, K/group_size]`` fp32 in any strided layout
  (the GEMMs read MN-major, ``layout.empty_act_scales``), written through its strides.
* ``per_block_quant(w, q, s, block_size, pow2_scale)``: w ``[N, K]`` or ``[E, N, K]`` bf16/fp32;
  s ``[.., ceil(N/block), K/block]`` contiguous.
* ``silu_and_mul_quant(h, q, s, masked_m, group_size, pow2_scale)``: h ``[M, 2I]`` or
  ``[E, M_max, 2I]`` bf16 (gate | up); q ``[.., I]``; s ``[.., I/group_size]`` strided;
  masked_m int32 ``[E]`` on the device or None. Rows ``>= masked_m[e]`` are left untouched (counts
  are clamped to ``[0, M_max]``); the grid does not depend on masked_m, so the launch can be
  captured in a CUDA graph, and the work done is proportional to the valid rows.

Launch shapes (v2): the per-token and SiLU kernels loop over 16-value chunks on at most one
resident grid (SMs x kStreamBlocksPerSm CTAs of 128 threads): small inputs get one chunk per
thread on as many SMs as possible, large ones a grid-stride loop with the next chunk in flight.
The masked SiLU kernel always launches the full resident grid (its row count is on the device).
The SM count is read once per device (cached), so launches do no host sync.
"""
from __future__ import annotations

import functools

import torch

from ..jit import KernelSource, get_kernel, i32, i64, register_bundled

kHeader = "quant.cuh"
kStreamThreads = 128  # quant.cuh kStreamThreads (per-token and SiLU kernels)
kStreamBlocksPerSm = 8  # quant.cuh kStreamBlocksPerSm: resident CTAs per SM (launch bounds)
kBlockThreads = 256  # quant.cuh kBlockThreads (per-block kernel)
kValuesPerThread = 16  # quant.cuh kValuesPerThread
kGroupSizes = (16, 32, 64, 128, 256, 512)  # kGroupSize / 16 lanes: a power of two within a warp
kBlockSizes = (64, 128)
_kTypeNames = {torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _persistent_ctas(device: torch.device) -> int:
    """CTAs of a grid that fills every SM once (the streaming kernels loop over the rest)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * kStreamBlocksPerSm


def _stream_grid(num_chunks: int, device: torch.device) -> int:
    """One 16-value chunk per thread up to a full machine; beyond it the threads loop."""
    return max(1, min(-(-num_chunks // kStreamThreads), _persistent_ctas(device)))


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


@functools.lru_cache(maxsize=None)
def per_token_source(dtype: torch.dtype, group_size: int, pow2_scale: bool) -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::quant::per_token_group_quant_kernel<"
                                 f"{_kTypeNames[dtype]}, {group_size}, {_bool(pow2_scale)}>")


@functools.lru_cache(maxsize=None)
def per_block_source(dtype: torch.dtype, block_size: int, pow2_scale: bool) -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::quant::per_block_quant_kernel<"
                                 f"{_kTypeNames[dtype]}, {block_size}, {_bool(pow2_scale)}>")


@functools.lru_cache(maxsize=None)
def silu_source(group_size: int, pow2_scale: bool, masked: bool) -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::quant::silu_and_mul_quant_kernel<"
                                 f"{group_size}, {_bool(pow2_scale)}, {_bool(masked)}>")


@register_bundled
def bundled_sources() -> list[KernelSource]:
    """The variants the public ops use: group/block 128, bf16/fp32 inputs, both scale kinds."""
    sources = []
    for pow2 in (False, True):
        for dtype in _kTypeNames:
            sources += [per_token_source(dtype, 128, pow2), per_block_source(dtype, 128, pow2)]
        sources += [silu_source(128, pow2, masked) for masked in (False, True)]
    return sources


def _check_group(group_size: int, sizes: tuple, what: str) -> None:
    if group_size not in sizes:
        raise ValueError(f"{what} must be one of {sizes}, got {group_size}")


def _check_aligned(**tensors) -> None:
    """16-byte vector accesses need 16-byte aligned bases (a storage offset can break it)."""
    for name, tensor in tensors.items():
        if tensor.data_ptr() % 16:
            raise ValueError(f"{name} must start at a 16-byte aligned address, got "
                             f"{tensor.data_ptr():#x} (a sliced view?)")


def _scale_strides(s: torch.Tensor) -> list:
    """The kernels' sBatch, sRow, sGroup scalar parameters (element strides of the scales)."""
    s_batch = s.stride(0) if s.dim() == 3 else 0
    return [i64(s_batch), i64(s.stride(-2)), i64(s.stride(-1))]


def per_token_group_quant(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                          group_size: int = 128, pow2_scale: bool = False) -> None:
    _check_group(group_size, kGroupSizes, "group_size")
    k = x.shape[-1]
    if x.numel() == 0:
        return
    _check_aligned(x=x, q=q)
    kernel = get_kernel(per_token_source(x.dtype, group_size, bool(pow2_scale)))
    rows, chunks_per_row = x.numel() // k, k // kValuesPerThread
    grid = _stream_grid(rows * chunks_per_row, x.device)
    kernel.launch(grid, kStreamThreads, 0, [x, q, s, i32(rows), i32(chunks_per_row),
                                            i32(x.shape[-2]), *_scale_strides(s)])


def per_block_quant(w: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                    pow2_scale: bool = False) -> None:
    _check_group(block_size, kBlockSizes, "block_size")
    n, k = w.shape[-2], w.shape[-1]
    experts = w.shape[0] if w.dim() == 3 else 1
    if w.numel() == 0:
        return
    _check_aligned(w=w, q=q)
    kernel = get_kernel(per_block_source(w.dtype, block_size, bool(pow2_scale)))
    grid = (k // block_size, -(-n // block_size), experts)
    kernel.launch(grid, kBlockThreads, 0, [w, q, s, i32(n), i32(k)])


def silu_and_mul_quant(h: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                       masked_m: torch.Tensor | None = None, group_size: int = 128,
                       pow2_scale: bool = False) -> None:
    _check_group(group_size, kGroupSizes, "group_size")
    intermediate = h.shape[-1] // 2
    if h.numel() == 0:
        return
    _check_aligned(h=h, q=q)
    kernel = get_kernel(silu_source(group_size, bool(pow2_scale), masked_m is not None))
    rows, chunks_per_row = h.numel() // h.shape[-1], intermediate // kValuesPerThread
    batches = h.shape[0] if h.dim() == 3 else 1
    if masked_m is None:
        grid, smem = _stream_grid(rows * chunks_per_row, h.device), 0
    else:
        # NOTE: the valid-row count lives on the device: size the grid for a full machine (the
        # loop covers any count) and give each CTA room for the experts' prefix sums.
        grid, smem = _persistent_ctas(h.device), 4 * (batches + 1)
    kernel.launch(grid, kStreamThreads, smem,
                  [h, q, s, masked_m, i32(rows), i32(chunks_per_row), i32(h.shape[-2]),
                   i32(batches), *_scale_strides(s)])
