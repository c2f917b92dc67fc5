"""Host side of include/quant.cuh: FP8 quantisation kernels (inputs validated by the public ops).

All three write fp8 values and fp32 scales into caller-allocated tensors:

* ``per_token_group_quant(x, q, s, group_size, pow2_scale)``: x ``[M, K]`` or ``[E, M, K]``
  bf16/fp32 contiguous; q same shape fp8; s ``[.., M, K/group_size]`` fp32 in any strided layout
  (the GEMMs read MN-major, ``layout.empty_act_scales``), written through its strides.
* ``per_block_quant(w, q, s, block_size, pow2_scale)``: w ``[N, K]`` or ``[E, N, K]`` bf16/fp32;
  s ``[.., ceil(N/block), K/block]`` contiguous.
* ``silu_and_mul_quant(h, q, s, masked_m, group_size, pow2_scale, expected_m=None)``: h ``[M, 2I]`` or
  ``[E, M_max, 2I]`` bf16 (gate | up); q ``[.., I]``; s ``[.., I/group_size]`` strided;
  masked_m int32 ``[E]`` on the device or None. Rows ``>= masked_m[e]`` are left untouched (counts
  are clamped to ``[0, M_max]``); the grid does not depend on masked_m, so the launch can be
  captured in a CUDA graph. ``expected_m`` (host int, masked only): the typical masked_m, which
  picks the kernel.

Kernel choice (v2, by what was measured on an H100, 2026-11-25; include/quant.cuh says more):
* "stream" (per-token and SiLU): 16-value chunks on at most one resident grid (SMs x
  kStreamBlocksPerSm CTAs of 128 threads, the next chunk staged by cp.async). Used while every
  thread has at most one chunk (decode sizes: M=128 was 15-30 % faster than v1) and for masked
  SiLU by default (its valid-row count is on the device: the full resident grid, work
  proportional to the valid rows; 1135 of 8192 rows 47 -> 13 us) unless ``expected_m`` says a
  quarter or more of the rows are valid.
* "oneshot" (v1's structure, the hoisted-reciprocal division) for larger contiguous inputs, where
  the looping stream kernels measured 30-45 % slower than v1. The hoisted division beat v1's
  per-value one there (H100, 2026-12-05: SiLU M=16384 75 -> 66 us, per-token a tie), so v1's
  math is gone. Masked, it covers all E x M_max rows and warps of masked-out rows leave at once:
  better where many rows are valid (H100, 2026-12-05: 4182 of 8192 rows 34 -> 24 us), worse for
  light loads (262 rows 7.7 -> 11 us): picked where ``expected_m`` (the public op's hint) is at
  least M_max / 4.
``variant=`` forces one (tests, benchmarks). The SM count is read once per device (cached), so
launches do no host sync.
"""
from __future__ import annotations

import functools

import torch

from ..jit import KernelSource, env, get_kernel, i32, i64, register_bundled

kHeader = "quant.cuh"
kStreamThreads = 128  # quant.cuh kStreamThreads (per-token and SiLU kernels)
kStreamBlocksPerSm = 8  # quant.cuh kStreamBlocksPerSm: resident CTAs per SM (launch bounds)
kBlockThreads = 256  # quant.cuh kBlockThreads (per-block kernel)
kOneShotThreads = 256  # quant.cuh kOneShotThreads
kOneShotUnroll = 2  # quant.cuh kOneShotUnroll
kVariants = ("stream", "oneshot")
kValuesPerThread = 16  # quant.cuh kValuesPerThread
kGroupSizes = (16, 32, 64, 128, 256, 512)  # kGroupSize / 16 lanes: a power of two within a warp
kBlockSizes = (64, 128)
_kTypeNames = {torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}
# input dtypes each kernel is instantiated for; the public ops run their reference for others
kSupportedInputs = {
    "per_token_group_quant": tuple(_kTypeNames),
    "per_block_quant": tuple(_kTypeNames),
    "silu_and_mul_quant": (torch.bfloat16,),  # the kernel reads h as bf16
}


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


def _streams(num_chunks: int, device: torch.device) -> bool:
    """At most one chunk per thread of one resident grid: the regime the stream kernels won."""
    return num_chunks <= _persistent_ctas(device) * kStreamThreads


def _checked_variant(variant) -> str:
    if variant not in kVariants:
        raise ValueError(f"variant must be one of {kVariants} or None, got {variant!r}")
    return variant


def _pick_variant(variant, num_chunks: int, device: torch.device) -> str:
    if variant is None:
        return "stream" if _streams(num_chunks, device) else "oneshot"
    return _checked_variant(variant)


def _pick_masked_variant(variant, expected_m, m_max: int) -> str:
    """Masked SiLU: the one-shot kernel (every E x M_max row) where a quarter or more of the rows
    are expected valid, else the stream kernel (work follows the valid rows). H100, 2026-12-05:
    4182 of 8192 rows 34 -> 24 us; 1135 rows 13 vs 14 us; 262 rows 7.7 vs 11 us.
    ``MOE_FP8_MASKED_SILU`` pins it where ``variant`` is None."""
    if variant is None:
        variant = env.masked_silu_variant()
        if variant is not None and variant not in kVariants:
            raise ValueError(f"MOE_FP8_MASKED_SILU must be one of {kVariants}, got {variant!r}")
    if variant is None:
        return "oneshot" if expected_m is not None and 4 * expected_m >= m_max else "stream"
    return _checked_variant(variant)


def _oneshot_grid(num_units: int, group_size: int) -> int:
    """v1's launch: kOneShotUnroll units of group_size values per group of lanes, 256 threads."""
    return -(-num_units // (kOneShotThreads // (group_size // kValuesPerThread) * kOneShotUnroll))


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


@functools.lru_cache(maxsize=None)
def per_token_oneshot_source(dtype: torch.dtype, group_size: int, pow2_scale: bool) -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::quant::per_token_group_quant_oneshot_kernel<"
                                 f"{_kTypeNames[dtype]}, {group_size}, {_bool(pow2_scale)}>")


@functools.lru_cache(maxsize=None)
def silu_oneshot_source(group_size: int, pow2_scale: bool, masked: bool = False) -> KernelSource:
    masked_arg = ", true" if masked else ""  # the contiguous instance keeps its measured name
    return KernelSource(kHeader, f"moe_fp8::quant::silu_and_mul_quant_oneshot_kernel<"
                                 f"{group_size}, {_bool(pow2_scale)}{masked_arg}>")


@register_bundled
def bundled_oneshot_sources() -> list[KernelSource]:
    """The one-shot kernels the public ops dispatch for large inputs (group 128, both scale
    kinds). NOTE: a separate registration keeps bundled_sources() the 12 it always was."""
    sources = []
    for pow2 in (False, True):
        sources += [per_token_oneshot_source(dtype, 128, pow2) for dtype in _kTypeNames]
        sources += [silu_oneshot_source(128, pow2, masked) for masked in (False, True)]
    return sources


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


def _unit_layout(s: torch.Tensor, rows_per_batch: int, groups_per_row: int) -> list:
    """The one-shot kernels' rowsPerBatch, groupsPerRow, sBatch, sRow, sGroup parameters."""
    return [i32(rows_per_batch), i32(groups_per_row), *_scale_strides(s)]


def per_token_group_quant(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor,
                          group_size: int = 128, pow2_scale: bool = False, *,
                          variant: str | None = None) -> None:
    _check_group(group_size, kGroupSizes, "group_size")
    k = x.shape[-1]
    if x.numel() == 0:
        return
    _check_aligned(x=x, q=q)
    rows, chunks_per_row = x.numel() // k, k // kValuesPerThread
    variant = _pick_variant(variant, rows * chunks_per_row, x.device)
    if variant == "stream":
        kernel = get_kernel(per_token_source(x.dtype, group_size, bool(pow2_scale)))
        grid = _stream_grid(rows * chunks_per_row, x.device)
        kernel.launch(grid, kStreamThreads, 0, [x, q, s, i32(rows), i32(chunks_per_row),
                                                i32(x.shape[-2]), *_scale_strides(s)])
        return
    kernel = get_kernel(per_token_oneshot_source(x.dtype, group_size, bool(pow2_scale)))
    units = x.numel() // group_size
    kernel.launch(_oneshot_grid(units, group_size), kOneShotThreads, 0,
                  [x, q, s, i64(units), *_unit_layout(s, x.shape[-2], k // group_size)])


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
                       pow2_scale: bool = False, *, variant: str | None = None,
                       expected_m: int | None = None) -> None:
    _check_group(group_size, kGroupSizes, "group_size")
    intermediate = h.shape[-1] // 2
    if h.numel() == 0:
        return
    _check_aligned(h=h, q=q)
    rows, chunks_per_row = h.numel() // h.shape[-1], intermediate // kValuesPerThread
    batches = h.shape[0] if h.dim() == 3 else 1
    masked = masked_m is not None
    if masked:
        variant = _pick_masked_variant(variant, expected_m, h.shape[-2])
    else:
        variant = _pick_variant(variant, rows * chunks_per_row, h.device)
    if variant == "oneshot":
        # masked: every E x M_max row gets a unit; warps of masked-out rows leave at once
        kernel = get_kernel(silu_oneshot_source(group_size, bool(pow2_scale), masked))
        units = rows * (intermediate // group_size)
        kernel.launch(_oneshot_grid(units, group_size), kOneShotThreads, 0,
                      [h, q, s, masked_m, i64(units),
                       *_unit_layout(s, h.shape[-2], intermediate // group_size)])
        return
    if masked:
        # NOTE: the valid-row count lives on the device: size the grid for a full machine (the
        # loop covers any count) and give each CTA room for the experts' prefix sums.
        grid, smem = _persistent_ctas(h.device), 4 * (batches + 1)
    else:
        grid, smem = _stream_grid(rows * chunks_per_row, h.device), 0
    kernel = get_kernel(silu_source(group_size, bool(pow2_scale), masked))
    kernel.launch(grid, kStreamThreads, smem,
                  [h, q, s, masked_m, i32(rows), i32(chunks_per_row), i32(h.shape[-2]),
                   i32(batches), *_scale_strides(s)])
