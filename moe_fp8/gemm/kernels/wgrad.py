"""Host side of the k-grouped FP8 weight-gradient GEMM (``include/wgrad.cuh``).

``out[e] += a[:, seg_e] . b[:, seg_e]^T`` (fp32), with inputs validated by
``moe_fp8.gemm.k_grouped_fp8_gemm_tn_contiguous``:

    a       fp8 e4m3 [M, T]  token-contiguous (dY^T); sa fp32 [M, T/128] MN-major (1x128 along T)
    b       fp8 e4m3 [N, T]  token-contiguous (X^T);  sb fp32 [N, T/128] MN-major (1x128 along T)
    offsets int32 [E + 1] on the device, token offsets of the experts' segments (multiples of 128)
    out     fp32 [E, M, N], contiguous; accumulated in place, experts without tokens untouched
            (``accumulate=False``: overwritten, zeros for experts without tokens); or bf16
            [E, M, N], overwritten (``accumulate=False`` only), rounded once from the fp32 sum

The kernel reads ``offsets`` itself (no host synchronisation): the call is CUDA-graph safe once
the kernel is loaded.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import heuristics as H
from .. import jit
from .fp8_gemm import _k_major, _m_pad, _memo_tma, _tma, _tma_f32_tiles, kH100Sms, persistent_grid

kHeader = "wgrad.cuh"


def kernel_source(n: int, config: H.GemmConfig, accumulate: bool = True,
                  bf16_out: bool = False) -> "jit.KernelSource":
    """The JIT source of one instance; ``config`` must be resolved (stages filled in)."""
    if bf16_out and accumulate:
        raise ValueError("a bf16 weight gradient is overwritten, never accumulated")
    c = config
    if c.early_b:
        raise ValueError("GemmConfig.early_b is for the NT GEMMs (its B is written by the step "
                         "before a weight gradient)")
    # the accumulating (and the fp32 overwriting) instances keep their names
    tail = ", false, true" if bf16_out else "" if accumulate else ", false"
    return jit.KernelSource(
        kHeader,
        f"moe_fp8::k_grouped_wgrad_kernel<{n}, {c.block_m}, {c.block_n}, {c.stages}, "
        f"{c.group_n}, {int(c.double_buffer)}, {c.cluster_m}{tail}>")


_kernels: dict = {}


def _tma_bf16_slices(out: torch.Tensor):
    """make_tma_3d of a bf16 ``[E, M, N]`` D as EpilogueSliceBf16 writes it (one 16-column x
    64-row box per math warpgroup and chunk, 32-byte swizzle), memoised like ``_tma``."""
    key = ("bf16_slices", out.data_ptr(), tuple(out.shape), tuple(out.stride()))
    return _memo_tma(key, lambda: jit.make_tma_3d(out, 16, 64, 1, 32))


def _scale_tma(s: torch.Tensor, rows: int, box: int):
    """MN-major 1x128 scales ``[rows, T/128]`` (stride (1, rows_pad)) as the 2-D view
    ``[outer = T/128, inner = rows]`` with a ``box x 1`` box."""
    groups = s.shape[1]
    view = s.t()
    return _tma(view, box, 1, 0, rows, groups, view.stride(0) if groups > 1 else _m_pad(rows))


def k_grouped_tn(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                 offsets: torch.Tensor, out: torch.Tensor,
                 config: Optional[H.GemmConfig] = None, accumulate: bool = True) -> torch.Tensor:
    """``out[e] += a[:, offsets[e]:offsets[e+1]] . b[:, offsets[e]:offsets[e+1]]^T`` (``=``
    with ``accumulate=False``: every expert's D written, zeros where it has no tokens)."""
    m, tokens = a.shape
    n = b.shape[0]
    num_experts = offsets.shape[0] - 1
    if num_experts == 0 or m == 0 or n == 0:
        return out
    if tokens == 0:
        return out if accumulate else out.zero_()
    bf16_out = out.dtype == torch.bfloat16
    d_bytes = out.element_size()
    device = a.device.index if a.device.index is not None else torch.cuda.current_device()
    sms = H.num_sms(device)
    c = (config or H.wgrad_config(m, n, sms, d_bytes)).resolved(0, wgrad=True,
                                                                 wgrad_d_bytes=d_bytes)
    if c.split_k != 1:
        raise ValueError("GemmConfig.split_k must be 1 for the k-grouped kernel (its tiles already "
                         "reduce over one expert's tokens)")
    if c.cluster_n != 1:
        raise ValueError("GemmConfig.cluster_n must be 1 for the k-grouped kernel (A multicast "
                         "is for the NT layouts)")
    key = (n, c, accumulate, bf16_out, device)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = jit.get_kernel(kernel_source(n, c, accumulate, bf16_out), device)
    tiles = num_experts * H._ceil_div(m, c.block_m) * H._ceil_div(n, c.block_n)
    smem = H.smem_bytes(c.block_m, c.block_n, c.stages, 0, wgrad=True, wgrad_d_bytes=d_bytes)
    grid = persistent_grid(kernel, c, tiles, smem, device)
    a, b = _k_major(a), _k_major(b)
    tma_a = _tma(a, 128, c.block_m, 128)
    tma_b = _tma(b, 128, c.block_n // c.cluster_m, 128)
    tma_sa = _scale_tma(sa, m, c.block_m)
    tma_sb = _scale_tma(sb, n, c.block_n)
    tma_d = _tma_bf16_slices(out) if bf16_out else _tma_f32_tiles(out)  # D: [E, M, N]
    args: List[object] = [tma_a, tma_b, tma_sa, tma_sb, tma_d, jit.i32(m), jit.i32(num_experts),
                          offsets]
    kernel.launch((grid, 1, 1), (c.num_threads, 1, 1), smem, args, cluster=(c.cluster_m, 1, 1))
    return out


# DeepSeek-V3 expert shapes: D = [2I, H] (GEMM1's weight) and [H, I] (GEMM2's weight).
kWgradShapes = [(4096, 7168), (7168, 2048)]


def bundled_sources() -> List["jit.KernelSource"]:
    fp32 = [kernel_source(n, H.wgrad_config(m, n, kH100Sms), accumulate)
            for m, n in kWgradShapes for accumulate in (True, False)]
    bf16 = [kernel_source(n, H.wgrad_config(m, n, kH100Sms, 2), False, True)
            for m, n in kWgradShapes]
    return fp32 + bf16


jit.register_bundled(bundled_sources)
