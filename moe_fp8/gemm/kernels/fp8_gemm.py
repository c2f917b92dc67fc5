"""Host side of the FP8 GEMM family (``include/fp8_gemm.cuh``): dense, grouped contiguous, masked.

Per call: pick a ``GemmConfig`` (``moe_fp8.gemm.heuristics``, or the caller's pinned one) ->
build the four TMA descriptors -> fetch the compiled instance from the JIT -> launch on torch's
current stream. Inputs arrive validated by ``moe_fp8.gemm`` (public ops) with outputs allocated:

    a   fp8 e4m3 [M, K] (grouped masked: [E, M_max, K]), K-major
    sa  fp32 [M, K/128] MN-major (stride (1, align(M, 4))); masked: [E, M_max, K/128]
    b   fp8 e4m3 [N, K] (grouped: [E, N, K]), K-major
    sb  fp32 [ceil(N/128), K/128] (grouped: [E, ceil(N/128), K/128]), contiguous
    out bf16 [M, N] (masked: [E, M_max, N]), contiguous

No host synchronisation and no device allocation happen here, so every op can be captured in a
CUDA graph once its kernel is compiled and loaded (``precompile`` or one eager call first).
"""
from __future__ import annotations

import ctypes
import dataclasses
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

from .. import heuristics as H
from .. import validate as check
from .. import jit
from ..jit import driver

kHeader = "fp8_gemm.cuh"
kSplitKHeader = "split_k.cuh"
kSwiGluHeader = "fused_swiglu.cuh"
kLayoutDense, kLayoutContiguous, kLayoutMasked, kLayoutContiguousOffsets = 0, 1, 2, 4
kLayoutContiguousZeroPad = 5  # the m_indices form, padding rows written as zeros


# Experiments only: macros added to every GEMM instance built from here on (part of the source,
# so of both caches), e.g. (("MOE_FP8_TILE_TRACE", 32),) for include/tile_trace.cuh.
extra_defines: Tuple = ()


kClaimableLayouts = (kLayoutContiguous, kLayoutContiguousOffsets, kLayoutContiguousZeroPad)


def kernel_source(n: int, k: int, config: H.GemmConfig, layout: int,
                  dynamic: bool = False) -> "jit.KernelSource":
    """The JIT source of one instance; ``config`` must be resolved (stages filled in).
    ``dynamic``: a contiguous layout's tiles claimed at run time (``fp8_gemm_dynamic_kernel``)."""
    c = config
    if dynamic:
        if (layout not in kClaimableLayouts or c.split_k != 1 or c.swap_ab or c.early_b
                or c.cluster_n != 1 or c.a_row_chunk):
            raise ValueError(f"dynamic tiles need a contiguous layout and a config without split "
                             f"K, swap AB, early B, A multicast or row chunks, got layout "
                             f"{layout} and {c}")
        return jit.KernelSource(
            kHeader,
            f"moe_fp8::fp8_gemm_dynamic_kernel<{n}, {k}, {c.block_m}, {c.block_n}, {c.stages}, "
            f"{c.group_n}, {layout}, {int(c.double_buffer)}, {c.cluster_m}>", extra_defines)
    if c.split_k > 1:
        if layout != kLayoutDense:
            raise ValueError(f"GemmConfig.split_k = {c.split_k} needs the dense layout")
        return jit.KernelSource(
            kSplitKHeader,
            f"moe_fp8::fp8_gemm_split_k_kernel<{n}, {k}, {c.block_m}, {c.block_n}, {c.stages}, "
            f"{c.group_n}, {int(c.double_buffer)}, {c.split_k}>", extra_defines)
    if c.swap_ab:
        if layout != kLayoutMasked or c.block_n != 128:
            raise ValueError(f"GemmConfig.swap_ab needs the masked layout and block_n = 128 (256: "
                             f"the fused SwiGLU GEMM), got layout {layout} and {c}")
        return jit.KernelSource(
            kHeader,
            f"moe_fp8::fp8_gemm_swap_ab_kernel<{n}, {k}, {c.block_m}, {c.stages}, {c.group_n}, "
            f"{c.a_row_chunk}, {'true' if c.early_b else 'false'}>", extra_defines)
    if c.early_b and layout not in (kLayoutMasked, kLayoutDense):
        raise ValueError("GemmConfig.early_b needs the masked or dense layout (it reads the layout "
                         "before the kernel's PDL wait)")
    # optional trailing parameters only when set: older instances keep their names
    tail = f", {c.cluster_n}, {c.a_row_chunk}" if c.a_row_chunk or c.early_b else (
        f", {c.cluster_n}" if c.cluster_n != 1 else "")
    tail += ", true" if c.early_b else ""
    return jit.KernelSource(
        kHeader,
        f"moe_fp8::fp8_gemm_kernel<{n}, {k}, {c.block_m}, {c.block_n}, {c.stages}, {c.group_n}, "
        f"{layout}, {int(c.double_buffer)}, {c.cluster_m}{tail}>", extra_defines)


# NOTE: the launch path is per call Python; these caches keep it to dictionary lookups plus one
# cuLaunchKernelEx (the first version built 4 TMA descriptors per call: ~50 us of host time,
# which showed up as a ~50 us floor in the first benchmark).
_kernels: Dict[tuple, object] = {}
_tma_cache: "OrderedDict[tuple, object]" = OrderedDict()
kTmaCacheSize = 512


def _cached_kernel(key: tuple, source, device: int):
    """The kernel cached under ``key``; ``source()`` (its KernelSource) is built only on a miss."""
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = jit.get_kernel(source(), device)
    return kernel


def _get_kernel(n: int, k: int, config: H.GemmConfig, layout: int, device: int,
                dynamic: bool = False):
    return _cached_kernel((n, k, config, layout, device, extra_defines, dynamic),
                          lambda: kernel_source(n, k, config, layout, dynamic), device)


_active_clusters: Dict[tuple, int] = {}


def max_active_clusters(kernel, cluster_m: int, threads: int, smem_bytes: int) -> int:
    """Clusters of ``cluster_m`` CTAs (the cluster size, along x) that can be resident at once
    (cuOccupancyMaxActiveClusters),
    memoised per kernel and launch shape. A persistent grid needs no more: clusters beyond it
    start only when earlier ones have finished all their tiles (a 2x slower kernel)."""
    key = (kernel.compiled.key, kernel.device_index, cluster_m, threads, smem_bytes)
    count = _active_clusters.get(key)
    if count is None:
        query = driver.lib().lib.cuOccupancyMaxActiveClusters
        query.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                          ctypes.POINTER(driver.LaunchConfig)]
        query.restype = ctypes.c_int
        driver.set_function_attribute(kernel._function, driver.kFuncAttrMaxDynamicSmem,
                                      smem_bytes)
        attribute = driver.LaunchAttribute(id=driver.kLaunchAttrClusterDimension)
        attribute.value[0], attribute.value[1], attribute.value[2] = cluster_m, 1, 1
        config = driver.LaunchConfig(cluster_m, 1, 1, threads, 1, 1, smem_bytes, None)
        config.attrs = ctypes.pointer(attribute)
        config.numAttrs = 1
        result = ctypes.c_int()
        driver.check(query(ctypes.byref(result), kernel._function, ctypes.byref(config)),
                     "cuOccupancyMaxActiveClusters")
        count = _active_clusters[key] = max(1, result.value)
    return count


def persistent_grid(kernel, config: H.GemmConfig, max_tiles: int, smem_bytes: int,
                    device: int) -> int:
    """CTAs of the persistent grid: ``heuristics.grid_size``, capped at the resident clusters."""
    sms = H.num_sms(device)
    if config.cluster_size > 1:
        resident = max_active_clusters(kernel, config.cluster_size, config.num_threads, smem_bytes)
        sms = min(sms, resident * config.cluster_size)
    return H.grid_size(config, max_tiles, sms)


def _memo_tma(key: tuple, make):
    """The descriptor cached under ``key`` (everything it encodes), made by ``make()`` on a miss;
    the oldest entries leave past kTmaCacheSize."""
    tmap = _tma_cache.get(key)
    if tmap is None:
        tmap = _tma_cache[key] = make()
        if len(_tma_cache) > kTmaCacheSize:
            _tma_cache.popitem(last=False)
    return tmap


def _tma(tensor: torch.Tensor, box_inner: int, box_outer: int, swizzle: int, inner_dim=None,
         outer_dim=None, outer_stride=None):
    """make_tma_2d, memoised on everything the descriptor encodes (address, shape, strides, box):
    a reused address with the same geometry gives the same descriptor, so reuse is safe."""
    key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()),
           box_inner, box_outer, swizzle, inner_dim, outer_dim, outer_stride)
    return _memo_tma(key, lambda: jit.make_tma_2d(tensor, box_inner, box_outer, swizzle,
                                                  inner_dim=inner_dim, outer_dim=outer_dim,
                                                  outer_stride=outer_stride))


def _tma_f32_tiles(tensor: torch.Tensor):
    """make_tma_3d of an fp32 ``[S or E, M, N]`` output as the fp32 epilogue writes it (one
    32-column x 64-row box per math warpgroup and chunk, 128-byte swizzle; epilogue.cuh,
    EpilogueAddF32), memoised like ``_tma``."""
    key = ("f32_tiles", tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
    return _memo_tma(key, lambda: jit.make_tma_3d(tensor, 32, 64, 1, 128))


def _k_major(t: torch.Tensor) -> torch.Tensor:
    # NOTE: TMA needs unit stride along K and 16-byte row strides; the public ops pass
    # contiguous operands, anything else takes this (slow, allocating) copy.
    return t if t.is_contiguous() else t.contiguous()


def _sa_view(sa: torch.Tensor) -> torch.Tensor:
    """MN-major scales as a 2-D ``[outer = (E *) K/128, inner = M]`` view with unit inner stride."""
    if sa.dim() == 2:
        return sa.t()
    e, m, g = sa.shape
    return sa.permute(0, 2, 1).reshape(e * g, m)  # a view: stride(0) == g * stride(2)


def _m_pad(m: int) -> int:
    return (max(m, 1) + 3) // 4 * 4


def _operand_tmas(a2: torch.Tensor, sa2: torch.Tensor, sa_rows: int, b2: torch.Tensor,
                  c: H.GemmConfig, b_box_rows: int) -> tuple:
    """The descriptors of A (box: a chunk of rows (a_row_chunk), a cluster CTA's share, or the
    whole tile), B (``b_box_rows`` rows per box) and A's scales."""
    tma_a = _tma(a2, 128, c.a_row_chunk or c.block_m // c.cluster_n, 128)
    tma_b = _tma(b2, 128, b_box_rows, 128)
    tma_sa = _tma(sa2, c.block_m, 1, 0, sa_rows, sa2.shape[0],
                  sa2.stride(0) if sa2.shape[0] > 1 else _m_pad(sa_rows))
    return tma_a, tma_b, tma_sa


def _launch(layout: int, a2: torch.Tensor, sa2: torch.Tensor, sa_rows: int, b2: torch.Tensor,
            sb: torch.Tensor, d2: torch.Tensor, layout_arg: Optional[torch.Tensor], m: int,
            num_experts: int, n: int, k: int, config: H.GemmConfig, max_tiles: int,
            tile_counter: Optional[torch.Tensor] = None) -> None:
    """One launch. ``a2``/``b2``/``d2``: 2-D views ``[rows, K]``/``[E*N, K]``/``[rows, N]``;
    ``sa2``: ``[outer, sa_rows]`` scale view; ``m``: M, M_sum or M_max (see scheduler.cuh);
    ``tile_counter``: claim the tiles at run time (contiguous layouts, tile_claim.cuh)."""
    c = config.resolved(k)
    dynamic = tile_counter is not None
    if c.cluster_m != 1 and layout == kLayoutMasked:
        raise ValueError(f"GemmConfig.cluster_m = {c.cluster_m} needs the dense or a contiguous "
                         "layout (B-multicast pairs of row blocks)")
    if c.a_row_chunk and layout not in (kLayoutMasked, kLayoutDense):
        raise ValueError(f"GemmConfig.a_row_chunk = {c.a_row_chunk} needs the masked or dense "
                         "layout (it loads the rows below masked_m or M)")
    if c.cluster_n != 1 and not H.pairs_columns(c, n):
        raise ValueError(f"GemmConfig.cluster_n = {c.cluster_n} needs the column blocks to pair "
                         f"up: ceil(N / block_n) = {H._ceil_div(n, c.block_n)} is odd (N = {n})")
    device = a2.device.index if a2.device.index is not None else torch.cuda.current_device()
    kernel = _get_kernel(n, k, c, layout, device, dynamic)
    smem = H.smem_bytes(c.block_m, c.block_n, c.stages, k, split_k=c.split_k,
                        dynamic_tiles=dynamic)
    if smem > H.kMaxSmemBytes:
        raise ValueError(f"{c} needs {smem} bytes of shared memory with dynamic tiles (at most "
                         f"{H.kMaxSmemBytes}): pin one stage fewer")
    # split K: each output tile is S work units (one per K slice)
    grid = persistent_grid(kernel, c, max_tiles * c.split_k, smem, device)
    tma_a, tma_b, tma_sa = _operand_tmas(a2, sa2, sa_rows, b2, c, c.block_n // c.cluster_m)
    if c.split_k > 1:
        _launch_split_k(kernel, tma_a, tma_b, tma_sa, sb, d2, m, n, c, grid, smem, device)
        return
    if c.swap_ab:  # the epilogue stores 16-byte pieces itself (swap_ab.cuh): no D descriptor
        if d2.data_ptr() % 16 or n % 128:
            raise ValueError(f"GemmConfig.swap_ab needs out 16-byte aligned and N % 128 == 0, got "
                             f"address {d2.data_ptr():#x}, N = {n}")
        kernel.launch((grid, 1, 1), (c.num_threads, 1, 1), smem,
                      [tma_a, tma_b, tma_sa, jit.i32(m), jit.i32(num_experts), layout_arg, sb, d2])
        return
    # Output: one 16-column x 64-row box per math warpgroup and chunk, 32-byte swizzle
    # (epilogue.cuh explains the layout).
    tma_d = _tma(d2, 16, 64, 32)
    args: List[object] = [tma_a, tma_b, tma_sa, tma_d, jit.i32(m), jit.i32(num_experts),
                          layout_arg if layout_arg is not None else sb, sb, d2]
    if dynamic:
        args.append(tile_counter)
    kernel.launch((grid, 1, 1), (c.num_threads, 1, 1), smem, args, cluster=(c.cluster_size, 1, 1))


kSplitKReduceThreads = 256  # split_k.cuh kSplitKReduceThreads
kSplitKReduceCtasPerSm = 8


def _launch_split_k(kernel, tma_a, tma_b, tma_sa, sb: torch.Tensor, d2: torch.Tensor, m: int,
                    n: int, c: H.GemmConfig, grid: int, smem: int, device: int) -> None:
    """The split-K GEMM into an fp32 workspace [S, M, N] (from torch's caching allocator: no
    device allocation of its own, graph-capturable), then the in-order sum into ``d2``."""
    if d2.data_ptr() % 16:
        # NOTE: the bf16 path checks this through its TMA descriptor; the reduction's vector
        # stores need it too (a misaligned one faults and kills the context)
        raise ValueError(f"out must start 16-byte aligned for the split-K GEMM, got address "
                         f"{d2.data_ptr():#x}")
    workspace = torch.empty((c.split_k, m, n), dtype=torch.float32, device=d2.device)
    tma_w = _tma_f32_tiles(workspace)
    kernel.launch((grid, 1, 1), (c.num_threads, 1, 1), smem,
                  [tma_a, tma_b, tma_sa, tma_w, jit.i32(m), sb])
    reduce = _get_reduce_kernel(c.split_k, device)
    quads = m * n // 4
    ctas = max(1, min(H._ceil_div(quads, kSplitKReduceThreads),
                      H.num_sms(device) * kSplitKReduceCtasPerSm))
    reduce.launch((ctas, 1, 1), (kSplitKReduceThreads, 1, 1), 0, [workspace, d2, jit.i64(m * n)])


def reduce_source(split_k: int) -> "jit.KernelSource":
    return jit.KernelSource(kSplitKHeader, f"moe_fp8::split_k_reduce_kernel<{split_k}>")


def _get_reduce_kernel(split_k: int, device: int):
    return _cached_kernel(("reduce", split_k, device), lambda: reduce_source(split_k), device)


def fp8_gemm_nt(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                out: torch.Tensor, config: Optional[H.GemmConfig] = None) -> torch.Tensor:
    """``out [M, N] = (a . sa)(b . sb)^T`` (bf16); see the module docstring for layouts."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0:
        return out
    dev = a.device.index if a.device.index is not None else torch.cuda.current_device()
    config = config or H.dense_config(m, n, k, H.num_sms(dev))
    tiles = H._ceil_div(m, config.block_m) * H._ceil_div(n, config.block_n)
    _launch(kLayoutDense, _k_major(a), _sa_view(sa), m, _k_major(b), sb.contiguous(), out, None,
            m, 1, n, k, config, tiles)
    return out


def _contiguous(layout: int, a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor,
                sb: torch.Tensor, layout_arg: torch.Tensor, out: torch.Tensor,
                config: Optional[H.GemmConfig],
                tile_counter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One launch over the contiguous layout, its rows described by ``layout_arg``; with
    ``tile_counter`` (``new_tile_counter``) its tiles are claimed at run time."""
    m_sum, k = a.shape
    num_experts, n, _ = b.shape
    if m_sum == 0:
        return out
    dev = a.device.index if a.device.index is not None else torch.cuda.current_device()
    config = config or H.contiguous_config(m_sum, n, k, H.num_sms(dev))
    tiles = H._ceil_div(m_sum, config.block_m) * H._ceil_div(n, config.block_n)
    if tile_counter is not None:
        check.tile_counter(tile_counter, a.device)
    _launch(layout, _k_major(a), _sa_view(sa), m_sum, _k_major(b).view(num_experts * n, k),
            sb.contiguous(), out, layout_arg.contiguous(), m_sum, num_experts, n, k, config, tiles,
            tile_counter)
    return out


def m_grouped_contiguous(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                         m_indices: torch.Tensor, out: torch.Tensor,
                         config: Optional[H.GemmConfig] = None,
                         zero_padding: bool = False,
                         tile_counter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[r] = a[r] . b[m_indices[r]]^T`` for rows with ``m_indices[r] >= 0``; padding rows
    (-1) are neither computed nor written, or with ``zero_padding`` written as zeros (every row of
    ``out`` is written: it may come from ``torch.empty``). ``tile_counter``: dynamic tiles."""
    layout = kLayoutContiguousZeroPad if zero_padding else kLayoutContiguous
    return _contiguous(layout, a, sa, b, sb, m_indices, out, config, tile_counter)


def m_grouped_contiguous_offsets(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor,
                                 sb: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor,
                                 config: Optional[H.GemmConfig] = None,
                                 tile_counter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[r] = a[r] . b[e]^T`` for ``offsets[e] <= r < offsets[e + 1]`` (``offsets`` [E+1]
    int32 on the device, multiples of 128, nondecreasing, from 0); rows >= offsets[E] are
    neither computed nor written. Every row of a segment is computed and written, padding rows
    inside it included (the ``m_indices`` form leaves those untouched)."""
    return _contiguous(kLayoutContiguousOffsets, a, sa, b, sb, offsets, out, config, tile_counter)


def m_grouped_masked(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                     masked_m: torch.Tensor, expected_m: int, out: torch.Tensor,
                     config: Optional[H.GemmConfig] = None) -> torch.Tensor:
    """``out[e, :masked_m[e]] = a[e, :masked_m[e]] . b[e]^T``; rows >= masked_m[e] untouched.

    ``masked_m`` stays on the device (read by the kernel's scheduler): no host sync, graph-safe.
    ``expected_m`` (host int) only steers the tile choice.
    """
    num_experts, m_max, k = a.shape
    n = b.shape[1]
    if num_experts == 0 or m_max == 0:
        return out
    dev = a.device.index if a.device.index is not None else torch.cuda.current_device()
    config = config or H.masked_config(num_experts, min(expected_m, m_max), n, k, H.num_sms(dev))
    tiles = num_experts * H._ceil_div(m_max, config.block_m) * H._ceil_div(n, config.block_n)
    _launch(kLayoutMasked, _k_major(a).view(num_experts * m_max, k), _sa_view(sa), m_max,
            _k_major(b).view(num_experts * n, k), sb.contiguous(), out.view(num_experts * m_max, n),
            masked_m.contiguous(), m_max, num_experts, n, k, config, tiles)
    return out


def swiglu_source(n: int, k: int, config: H.GemmConfig, pow2: bool,
                  layout: int = kLayoutMasked, gather: bool = False,
                  dynamic: bool = False) -> "jit.KernelSource":
    """The fused SwiGLU gate-up GEMM over ``n = 2I`` weight rows (``config``: 256-wide, resolved)
    on the masked or the contiguous (m_indices) layout; ``gather`` (masked): A's rows read from
    the unpermuted token matrix (``fused_swiglu_gather_kernel``; the config's row chunks unused);
    ``dynamic`` (contiguous): tiles claimed at run time (``fused_swiglu_dynamic_kernel``)."""
    c = config
    if c.block_n != 256 or c.cluster_n != 1 or c.split_k != 1 or n % 256 or c.early_b:
        raise ValueError(f"the fused SwiGLU GEMM needs 256-wide tiles without A multicast, split K "
                         f"or early B and 2I % 256 == 0, got {c} with 2I = {n}")
    if layout not in (kLayoutMasked, kLayoutContiguous):
        raise ValueError(f"the fused SwiGLU GEMM runs on the masked or the contiguous (m_indices) "
                         f"layout, got layout {layout}")
    if layout == kLayoutContiguous and (c.block_m != 128 or c.a_row_chunk):
        raise ValueError(f"the contiguous fused SwiGLU GEMM needs 128-row tiles of whole A loads, "
                         f"got {c}")
    if layout == kLayoutMasked and c.cluster_m != 1:
        raise ValueError(f"the masked fused SwiGLU GEMM takes no cluster, got {c}")
    if c.swap_ab and layout != kLayoutMasked:
        raise ValueError(f"the swap-AB fused SwiGLU GEMM runs on the masked layout, got {c}")
    if dynamic:
        if layout != kLayoutContiguous or gather:
            raise ValueError("dynamic tiles: the contiguous fused SwiGLU GEMM only")
        return jit.KernelSource(
            kSwiGluHeader,
            f"moe_fp8::fused_swiglu_dynamic_kernel<{n}, {k}, {c.stages}, {c.group_n}, "
            f"{'true' if pow2 else 'false'}, {c.cluster_m}>", extra_defines)
    swap = ", true" if c.swap_ab else ""  # trailing: the other instances keep their names
    if gather:
        if layout != kLayoutMasked:
            raise ValueError("the gathering fused SwiGLU GEMM runs on the masked layout")
        return jit.KernelSource(
            kSwiGluHeader,
            f"moe_fp8::fused_swiglu_gather_kernel<{n}, {k}, {c.block_m}, {c.stages}, {c.group_n}, "
            f"{'true' if pow2 else 'false'}{swap}>", extra_defines)
    # the masked instances keep the name (and cache key) they were measured under
    tail = "" if layout == kLayoutMasked and not swap else f", {layout}"
    tail += f", {c.cluster_m}" if c.cluster_m != 1 or swap else ""
    tail += swap
    return jit.KernelSource(
        kSwiGluHeader,
        f"moe_fp8::fused_swiglu_gemm_kernel<{n}, {k}, {c.block_m}, {c.stages}, {c.group_n}, "
        f"{c.a_row_chunk}, {'true' if pow2 else 'false'}{tail}>", extra_defines)


def m_grouped_masked_swiglu(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                            masked_m: torch.Tensor, expected_m: int, act: torch.Tensor,
                            act_s: torch.Tensor, pow2: bool = False,
                            config: Optional[H.GemmConfig] = None,
                            gather: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """``act, act_s = silu_and_mul_quant(m_grouped_masked(a, b))`` in one kernel (the same bytes):
    ``a`` fp8 ``[E, M_max, K]`` + MN-major ``sa``, ``b`` W13 fp8 ``[E, 2I, K]`` (gate rows, then
    up rows) + ``sb`` ``[E, 2I/128, K/128]``; ``act`` fp8 ``[E, M_max, I]`` contiguous and
    ``act_s`` ``[E, M_max, I/128]`` MN-major (``layout.empty_act_scales``): rows >= masked_m[e]
    untouched. Checked tensors only (the caller validates).

    ``gather = (x, row_token)``: ``a``'s rows are not read (only its shape); row m of expert e is
    ``x[row_token[e, m]]`` instead, ``x`` fp8 ``[T, K]`` (the unpermuted tokens, contiguous,
    16-byte aligned), ``row_token`` int64 ``[>= E, M_max]`` with contiguous rows (the dispatch's;
    read below masked_m only). ``sa`` stays the masked layout's scales."""
    num_experts, m_max, k = a.shape
    n = b.shape[1]
    if num_experts == 0 or m_max == 0:
        return
    if act_s.stride(1) != 1 or not act.is_contiguous():
        raise ValueError("act must be contiguous and act_s MN-major (layout.empty_act_scales)")
    dev = a.device.index if a.device.index is not None else torch.cuda.current_device()
    # a pinned config may leave stages to the heuristics (0 would build a kernel without a ring);
    # the heuristics' own are resolved already
    c = (config.resolved(k, swiglu=True) if config is not None else
         H.masked_swiglu_config(num_experts, min(expected_m, m_max), n, k, H.num_sms(dev)))
    if gather is not None:
        x, row_token = gather
        if (x.dim() != 2 or x.shape[1] != k or x.dtype != a.dtype or not x.is_contiguous()
                or x.data_ptr() % 16 or x.numel() >= 1 << 32  # 32-bit offsets (kGatherA)
                or row_token.dtype != torch.int64 or row_token.dim() != 2
                or row_token.shape[0] < num_experts or row_token.shape[1] != m_max
                or row_token.stride(1) != 1 or row_token.stride(0) != m_max):
            raise ValueError(f"gather needs x [T, K = {k}] {a.dtype} contiguous, 16-byte aligned, "
                             f"under 2^32 bytes, and "
                             f"row_token int64 [>= {num_experts}, {m_max}] with contiguous rows, "
                             f"got x {tuple(x.shape)} {x.dtype} and row_token "
                             f"{tuple(row_token.shape)} {row_token.dtype} {row_token.stride()}")
    kernel = _cached_kernel(("swiglu", n, k, c, pow2, dev, extra_defines, gather is not None),
                            lambda: swiglu_source(n, k, c, pow2, gather=gather is not None), dev)
    smem = H.smem_bytes(c.block_m, c.block_n, c.stages, k, swiglu=True, swap_ab=c.swap_ab)
    tiles = num_experts * H._ceil_div(m_max, c.block_m) * (n // 256)
    grid = persistent_grid(kernel, c, tiles, smem, dev)
    # B in 128-row boxes: a tile's gate and up halves are I rows apart
    tma_a, tma_b, tma_sa = _operand_tmas(_k_major(a).view(num_experts * m_max, k), _sa_view(sa),
                                         m_max, _k_major(b).view(num_experts * n, k), c, 128)
    # tma_d: unused by the SwiGLU epilogue (it stores act itself); the gather kernel reads A's rows
    # from x by pointer (gemm_core.cuh kGatherA) and takes no A descriptor
    operands = [tma_a, tma_b, tma_sa, tma_a] if gather is None else [tma_b, tma_sa, tma_b]
    kernel.launch((grid, 1, 1), (c.num_threads, 1, 1), smem,
                  [*operands, jit.i32(m_max), jit.i32(num_experts),
                   masked_m.contiguous(), sb.contiguous(), act, act_s,
                   jit.i64(act_s.stride(0)), jit.i64(act_s.stride(2)),
                   *([] if gather is None else [gather[1], gather[0]])])


def m_grouped_contiguous_swiglu(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor,
                                sb: torch.Tensor, m_indices: torch.Tensor, act: torch.Tensor,
                                act_s: torch.Tensor, pow2: bool = False,
                                config: Optional[H.GemmConfig] = None,
                                tile_counter: Optional[torch.Tensor] = None) -> None:
    """``act, act_s = silu_and_mul_quant(m_grouped_contiguous(a, b, m_indices))`` in one kernel
    (the same bytes on every row of a tile that is not padding): ``a`` fp8 ``[M_sum, K]`` +
    MN-major ``sa``, ``b`` W13 fp8 ``[E, 2I, K]`` (gate rows, then up rows) + ``sb``
    ``[E, 2I/128, K/128]``, ``m_indices`` int32 ``[M_sum]`` (constant per 128-row segment, -1 on
    padding); ``act`` fp8 ``[M_sum, I]`` contiguous and ``act_s`` ``[M_sum, I/128]`` MN-major
    (``layout.empty_act_scales``). Padding rows (-1) of both are left untouched. Checked
    tensors only (the caller validates). ``tile_counter`` (``new_tile_counter``): the tiles are
    claimed at run time."""
    m_sum, k = a.shape
    num_experts, n, _ = b.shape
    if m_sum == 0:
        return
    if act_s.dim() != 2 or act_s.stride(0) != 1 or not act.is_contiguous():
        raise ValueError("act must be contiguous and act_s a 2-D MN-major view "
                         "(layout.empty_act_scales)")
    dev = a.device.index if a.device.index is not None else torch.cuda.current_device()
    # a pinned config may leave stages to the heuristics (as in m_grouped_masked_swiglu)
    c = (config.resolved(k, swiglu=True) if config is not None else
         H.contiguous_swiglu_config(m_sum, n, k, H.num_sms(dev)))
    dynamic = tile_counter is not None
    if dynamic:
        check.tile_counter(tile_counter, a.device)
    kernel = _cached_kernel(("swiglu", kLayoutContiguous, n, k, c, pow2, dev, extra_defines,
                             dynamic),
                            lambda: swiglu_source(n, k, c, pow2, kLayoutContiguous,
                                                  dynamic=dynamic), dev)
    smem = H.smem_bytes(c.block_m, c.block_n, c.stages, k, swiglu=True, dynamic_tiles=dynamic)
    if smem > H.kMaxSmemBytes:
        raise ValueError(f"{c} needs {smem} bytes of shared memory with dynamic tiles (at most "
                         f"{H.kMaxSmemBytes}): pin one stage fewer")
    tiles = H._ceil_div(m_sum, c.block_m) * (n // 256)
    grid = persistent_grid(kernel, c, tiles, smem, dev)
    tma_a, tma_b, tma_sa = _operand_tmas(_k_major(a), _sa_view(sa), m_sum,
                                         _k_major(b).view(num_experts * n, k), c, 128)
    kernel.launch((grid, 1, 1), (c.num_threads, 1, 1), smem,
                  [tma_a, tma_b, tma_sa, tma_a, jit.i32(m_sum), jit.i32(num_experts),
                   m_indices.contiguous(), sb.contiguous(), act, act_s, jit.i64(0),
                   jit.i64(act_s.stride(1)), *([tile_counter] if dynamic else [])],
                  cluster=(c.cluster_size, 1, 1))


# ----------------------------------------------------------------------------- bundled variants

kH100Sms = 132
# DeepSeek-V3 shapes of TARGETS.md: dense (M, N, K), grouped (N, K) with typical row counts.
kDenseShapes = [(m, n, k) for m in (64, 128, 4096)
                for n, k in ((2112, 7168), (24576, 1536), (32768, 512), (7168, 16384),
                             (4096, 7168), (7168, 2048))]
kGroupedNK = [(4096, 7168), (7168, 2048)]


def bundled_sources() -> List["jit.KernelSource"]:
    """The instances the heuristics pick for the TARGETS.md shapes on a 132-SM H100."""
    sources = []
    for m, n, k in kDenseShapes:
        config = H.dense_config(m, n, k, kH100Sms)
        sources.append(kernel_source(n, k, config, kLayoutDense))
        if config.split_k > 1:
            sources.append(reduce_source(config.split_k))
    for n, k in kGroupedNK:
        for m_sum in (4096, 32768):
            for layout in (kLayoutContiguous, kLayoutContiguousOffsets, kLayoutContiguousZeroPad):
                sources.append(kernel_source(n, k, H.contiguous_config(m_sum, n, k, kH100Sms),
                                             layout))
            if n == 4096:  # the prefill's gate-up with SiLU-and-mul (MOE_FP8_PREFILL_SWIGLU)
                sources.append(swiglu_source(n, k, H.contiguous_swiglu_config(
                    m_sum, n, k, kH100Sms), pow2=False, layout=kLayoutContiguous))
        for num_experts, expected_m in ((1, 1024), (2, 512), (4, 256), (32, 8), (32, 64)):
            config = H.masked_config(num_experts, expected_m, n, k, kH100Sms)
            sources.append(kernel_source(n, k, config, kLayoutMasked))
            if num_experts == 32 and n == 7168:  # the decode step's down GEMM as the layer runs
                # it by default: weights before the PDL wait, tokens on the wgmma N side
                # (layers/experts.py: MOE_FP8_EARLY_WEIGHTS, MOE_FP8_SWAP_AB_DOWN; the expected
                # rows too, so MOE_FP8_SWAP_AB_96 picks the same token tile here as there)
                down = H.as_swap_ab(dataclasses.replace(config, early_b=True), k, expected_m)
                sources.append(kernel_source(n, k, down, kLayoutMasked))
            if num_experts == 32 and n == 4096:  # the decode step's gate-up (MOE_FP8_FUSED_SWIGLU)
                swiglu = H.masked_swiglu_config(num_experts, expected_m, n, k, kH100Sms)
                sources.append(swiglu_source(n, k, swiglu, pow2=False))
                # ... reading the tokens unpermuted (MOE_FP8_DECODE_GATHER)
                sources.append(swiglu_source(n, k, swiglu, pow2=False, gather=True))
    return list(dict.fromkeys(sources))  # unique, in order


jit.register_bundled(bundled_sources)
