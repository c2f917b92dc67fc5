"""The routed experts (grouped FP8 GEMMs over either layout) and the shared experts (dense FP8).

One expert: ``y = W2 · (silu(W_gate · x) * (W_up · x))``. Weights live in FP8 with 128x128 block
scales (``weight_scale_inv`` in DeepSeek's checkpoints); gate and up are fused into one
``W13 = [gate; up]`` ``[2I, H]`` so GEMM1 is one grouped GEMM and the SiLU-and-mul reads one row.

    GEMM1  a [rows, H] fp8 · W13[e]^T   -> h [rows, 2I] bf16
    ACT    silu(h[:, :I]) * h[:, I:]    -> fp8 [rows, I] + 1x128 scales (one fused op)
    GEMM2  act · W2[e]^T                -> y [rows, H] bf16
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .. import gemm as G
from ..gemm import heuristics as H
from ..gemm.layout import empty_act_scales, to_mn_major
from ..gemm.jit.env import lookup
from ..gemm.validate import debug_mode
from .layouts import ContiguousLayout, MaskedLayout
from .switches import switch_on, switch_up_to_rows

FP8 = torch.float8_e4m3fn
kInitStd = 0.02  # random-init std (transformers' initializer_range for DeepSeek-V3)
# The masked (decode) path's gate-up GEMM with SiLU-and-mul + quantisation in its epilogue
# (include/fused_swiglu.cuh): one kernel and no h round trip instead of two, the same act bytes.
# H100, 2026-12-05 (session 11, two rounds): decode 32 / 64 / 128 / 256 tokens 520 -> 514 / 530
# -> 524 / 550 -> 538-539 / 589 -> 578-580 us, but 2 tokens 267 -> 270-271 and 1-16 tokens within
# -4..+2 with the down GEMM's weights loaded after its PDL wait. With them loaded before it (early
# weights, below) the fused kernel's longer tail is hidden: 2 / 4 / 8 / 16 tokens 261 -> 259 /
# 374 -> 372 / 502 -> 500 / 508 -> 505 us, 1 token 160 -> 159-161 (H100, clean flush, two rounds,
# 2026-12-06, session 14). So: from one expected row per expert on without early weights, always
# with them; MOE_FP8_FUSED_SWIGLU=1 always, 0 never.
kFusedSwiGluEnv = "MOE_FP8_FUSED_SWIGLU"
kFusedSwiGluMinRows = 1.0
kFusedSwiGluMinRowsEarlyWeights = 0.0
# The down GEMM of the masked path loads the weights of its first ring slots before it waits for
# the kernel before it (GemmConfig.early_b; with PDL, the decode graph's, they stream while the
# SiLU / fused gate-up finishes). Safe here: that kernel writes only the act, never w2 or masked_m
# (the dispatch's, two kernels back). H100, clean flush, 2026-12-06 (session 14): the one-token
# GEMM chain under PDL 146 -> 145 us (gate-up, SiLU, down) and 143 -> 140 us (fused SwiGLU, down),
# bits equal; decode 1 / 32 / 256 tokens 160 -> 159 / 516 -> 512 / 583 -> 582 us.
kEarlyWeightsEnv = "MOE_FP8_EARLY_WEIGHTS"
kEarlyWeightsDefault = True
# The decode step's down GEMM with the tokens on the wgmma N side, rounded up to 16 per tile, and
# the weights on M (GemmConfig.swap_ab, include/swap_ab.cuh): the same bits. On (`0` turns it
# off): H100, 2026-12-06, session 24, two machines, 3 and 5 interleaved rounds: 256 tokens -3.3 /
# -3.1 us (7 of 8 rounds lower), 1 / 128 tokens -0.2 / -0.1 (results/
# decode_switches_ab_h100_2026-12-06_s24.md). Session 16, 3 interleaved rounds:
# with 64-row token tiles (up to 128 tokens) 1 / 8 / 32 / 64 / 128 tokens +1.4 / -1.2 / -1.1 /
# -1.8 / -0.1 us against off, the spread of two equal builds at 256 tokens 1.9 us
# (results/decode_build_ab_swap_ab_default_h100_2026-12-06_s16.md); at 256 tokens (128-row
# tiles) +5 us in an earlier build. The 256-token down GEMM streams at the same 2.7 TB/s with
# half its MMA rows (benchmarks/swap_ab_pair.py): it is not MMA-bound. Unset: on up to
# kSwapAbDownMaxRows expected rows per expert (`1` always): a graph runner at prefill sizes runs
# the plain (wide) tiles faster (H100, 2026-12-07, session 32, 3 interleaved rounds, same bits,
# runners at 512 / 1024 / 2048 tokens, 128 / 256 / 512 rows per expert: off -7 / -79 / -53 us).
kSwapAbDownEnv = "MOE_FP8_SWAP_AB_DOWN"
kSwapAbDownMaxRows = 64.0
# The prefill's (contiguous layout's) gate-up GEMM with SiLU-and-mul + quantisation in its
# epilogue, the fused SwiGLU kernel on m_indices tiles: no h [M_sum, 2I] bf16 written and read
# again (at 8192 tokens x top-8: 537 MB each way and a ~440 us SiLU kernel), the same act bytes
# (GPU tests). Session 14 (no multicast): alone 6-11 % faster than GEMM + SiLU, in the layer 4096
# tokens -3..-5 %, 8192 / 32768 even, 16384 +2..4 %. Session 15, both GEMMs with B multicast (H100
# at its 700 W power cap, results/prefill_swiglu_ab_h100_2026-12-06_s15.md): alone 0.87-0.94x;
# layer 4096 / 8192 / 16384 / 32768 tokens -5..-6 / -2.0 / -1.2 (10 rounds) / -1.4 %: on.
kPrefillSwiGluEnv = "MOE_FP8_PREFILL_SWIGLU"
kPrefillSwiGluDefault = True
# The prefill's contiguous GEMMs (the fused SwiGLU gate-up and the down GEMM) with dynamic tiles
# (include/tile_claim.cuh): each persistent cluster claims its next tile from a counter instead of
# walking a fixed stride, so CTAs that start late, their SMs still running the shared expert on
# the side stream, take fewer tiles (the 1024-token graph bucket's fused SwiGLU ran 631 us against
# 527 eagerly, the shared down GEMM holding 100 SMs at its start: H100, session 33). The same
# bits. Off until a device run measures it (`1` on).
kDynamicTilesEnv = "MOE_FP8_DYNAMIC_TILES"
kDynamicTilesDefault = False
kQuantChunkElems = 1 << 28  # quantise big expert stacks in chunks of this many weights (bf16 temp)


def _blocks(n: int) -> int:
    return -(-n // 128)


def quantize_stack(w: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [E, N, K]`` (any float dtype) -> (fp8 ``[E, N, K]``, fp32 ``[E, ceil(N/128), K/128]``),
    a few experts at a time so the temporary stays small."""
    experts, n, k = w.shape
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    s = torch.empty(experts, _blocks(n), k // 128, dtype=torch.float32, device=w.device)
    step = max(1, kQuantChunkElems // max(1, n * k))
    for e0 in range(0, experts, step):
        part = w[e0:e0 + step].contiguous()
        q[e0:e0 + step], s[e0:e0 + step] = G.per_block_quant_fp8(part, 128, pow2_scale=pow2_scale)
    return q, s


@dataclass
class MaskedWorkspace:
    """Intermediates of the masked path, allocated once (zeros: unused rows stay finite)."""
    act: tuple  # (fp8 [E_loc, M_max, I], fp32 [E_loc, M_max, I/128] MN-major): SiLU-mul output
    y: torch.Tensor  # bf16 [E_loc, M_max, H]: GEMM2 output
    # bf16 [E_loc, M_max, 2I]: the unfused GEMM1's output, made at its first use (``gate_up``).
    # NOTE: the fused SwiGLU GEMM, the GPU default, never needs it: 67 MB at 32 experts x 256 rows
    h: Optional[torch.Tensor] = None

    @classmethod
    def allocate(cls, experts: int, m_max: int, hidden: int, inter: int, device, dtype=torch.bfloat16):
        act_s = empty_act_scales(m_max, inter // 128, experts, device=device)
        act_s.fill_(1.0)
        return cls((torch.zeros(experts, m_max, inter, dtype=FP8, device=device), act_s),
                   torch.zeros(experts, m_max, hidden, dtype=dtype, device=device))

    def gate_up(self) -> torch.Tensor:
        """``h``, allocated (zeros) at the first call. A decode runner's first call is an eager
        warm-up step before any capture, so the tensor never comes from a graph's pool."""
        if self.h is None:
            experts, m_max, _ = self.y.shape
            self.h = torch.zeros(experts, m_max, 2 * self.act[0].shape[-1], dtype=self.y.dtype,
                                 device=self.y.device)
        return self.h


class RoutedExperts(nn.Module):
    """``num_experts_local`` experts held by this rank, as FP8 buffers."""

    def __init__(self, num_experts_local: int, hidden: int, inter: int, device=None,
                 dtype=torch.bfloat16, pow2_scale: bool = False):
        super().__init__()
        self.num_experts_local, self.hidden, self.inter = num_experts_local, hidden, inter
        self.dtype, self.pow2_scale = dtype, pow2_scale
        e = num_experts_local
        self.register_buffer("w13", torch.empty(e, 2 * inter, hidden, dtype=FP8, device=device))
        self.register_buffer("w13_scale", torch.ones(e, _blocks(2 * inter), hidden // 128,
                                                     dtype=torch.float32, device=device))
        self.register_buffer("w2", torch.empty(e, hidden, inter, dtype=FP8, device=device))
        self.register_buffer("w2_scale", torch.ones(e, _blocks(hidden), inter // 128,
                                                    dtype=torch.float32, device=device))
        # the claim counter of the contiguous GEMMs' dynamic tiles (left at zero by every launch;
        # the layer's GEMMs run one after another on one stream, so one counter serves them all)
        self.register_buffer("tile_counter", G.new_tile_counter(device), persistent=False)

    @torch.no_grad()
    def random_init(self, generator: Optional[torch.Generator] = None, std: float = kInitStd) -> None:
        """Random bf16 weights, quantised, a chunk of experts at a time."""
        step = max(1, kQuantChunkElems // (2 * self.inter * self.hidden))
        for e0 in range(0, self.num_experts_local, step):
            e1 = min(e0 + step, self.num_experts_local)
            w13 = torch.randn(e1 - e0, 2 * self.inter, self.hidden, generator=generator,
                              device=self.w13.device) * std
            w2 = torch.randn(e1 - e0, self.hidden, self.inter, generator=generator,
                             device=self.w2.device) * std
            self.load_fp8(*quantize_stack(w13), *quantize_stack(w2), experts=slice(e0, e1))

    @torch.no_grad()
    def load_fp8(self, w13, w13_scale, w2, w2_scale, experts: slice = slice(None)) -> None:
        """Copy quantised weights in: ``w13 [e, 2I, H]`` fp8 + ``[e, 2I/128, H/128]``, ``w2 [e, H, I]``
        fp8 + ``[e, ceil(H/128), I/128]`` for the local experts ``experts``."""
        for name, value in (("w13", w13), ("w13_scale", w13_scale), ("w2", w2), ("w2_scale", w2_scale)):
            target = getattr(self, name)[experts]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{name} must have shape {tuple(target.shape)}, got {tuple(value.shape)}")
            target.copy_(value)

    @torch.no_grad()
    def load_dense(self, w13: torch.Tensor, w2: torch.Tensor, experts: slice = slice(None)) -> None:
        """Quantise unquantised weights ``w13 [e, 2I, H]`` (gate rows then up rows), ``w2 [e, H, I]``."""
        self.load_fp8(*quantize_stack(w13), *quantize_stack(w2), experts=experts)

    @torch.no_grad()
    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 weights dequantised to fp32: ``(w13 [E, 2I, H], w2 [E, H, I])``."""
        from ..gemm.reference import dequant_blocks
        return dequant_blocks(self.w13, self.w13_scale), dequant_blocks(self.w2, self.w2_scale)

    def forward_contiguous(self, layout: ContiguousLayout, weights=None) -> torch.Tensor:
        """-> ``y_rows [M_sum, H]`` bf16; padding rows are not written (arbitrary values).
        ``weights``: ``(w13, w13_scale, w2, w2_scale)`` to use instead of the buffers (the stack
        with the shared expert folded in, ``MoE.folded_weights``)."""
        w13, w13_scale, w2, w2_scale = weights or (self.w13, self.w13_scale, self.w2, self.w2_scale)
        counter = self._tile_counter(layout.a)
        act = self._prefill_swiglu(layout, w13, w13_scale, counter)
        if act is not None:
            return G.m_grouped_fp8_gemm_nt_contiguous(act, (w2, w2_scale), layout.m_indices,
                                                      tile_counter=counter)
        rows = layout.num_rows
        # NOTE: GEMM1 skips padding rows, so they hold garbage that the SiLU-mul op quantises too;
        # harmless (GEMM rows are independent and GEMM2 skips them again) except that the debug
        # mode's finiteness check would reject it: zero them only then (a memset of M_sum x 2I).
        alloc = torch.zeros if debug_mode() else torch.empty
        h = alloc(rows, 2 * self.inter, dtype=self.dtype, device=layout.a.device)
        G.m_grouped_fp8_gemm_nt_contiguous((layout.a, layout.sa), (w13, w13_scale),
                                           layout.m_indices, out=h, tile_counter=counter)
        act = G.silu_and_mul_quant_fp8(h, pow2_scale=self.pow2_scale)
        return G.m_grouped_fp8_gemm_nt_contiguous(act, (w2, w2_scale), layout.m_indices,
                                                  tile_counter=counter)

    def _tile_counter(self, a: torch.Tensor) -> Optional[torch.Tensor]:
        """The claim counter where ``MOE_FP8_DYNAMIC_TILES`` asks for dynamic tiles and the
        GEMMs run as kernels (eagerly, on this buffer's device), else None (fixed strides)."""
        if (not switch_on(kDynamicTilesEnv, kDynamicTilesDefault) or not a.is_cuda
                or torch.compiler.is_compiling() or self.tile_counter.device != a.device):
            return None
        return self.tile_counter

    def forward_masked(self, layout: MaskedLayout,
                       workspace: Optional[MaskedWorkspace] = None) -> torch.Tensor:
        """-> ``y [E_loc, M_max, H]`` bf16; rows >= masked_m[e] keep the workspace's old values."""
        if workspace is None:
            workspace = MaskedWorkspace.allocate(self.num_experts_local, layout.max_tokens_per_expert,
                                                 self.hidden, self.inter, layout.a.device, self.dtype)
        if not self._fused_swiglu(layout, workspace):
            if layout.token_source is not None:  # rows left unpermuted for a gather: copy them
                _materialize_rows(layout)
            h = workspace.gate_up()
            G.m_grouped_fp8_gemm_nt_masked((layout.a, layout.sa), (self.w13, self.w13_scale),
                                           layout.masked_m, layout.expected_m, out=h,
                                           config=_masked_config(layout, 2 * self.inter, self.hidden))
            G.silu_and_mul_quant_fp8(h, masked_m=layout.masked_m,
                                     pow2_scale=self.pow2_scale, out=workspace.act,
                                     expected_m=layout.expected_m)
        down = _masked_config(layout, self.hidden, self.inter)
        if down is not None and _early_weights():
            down = dataclasses.replace(down, early_b=True)
        if down is not None and _swap_ab_down(layout.expected_rows):
            down = H.as_swap_ab(down, self.inter, _expected_m(layout))
        return G.m_grouped_fp8_gemm_nt_masked(workspace.act, (self.w2, self.w2_scale), layout.masked_m,
                                              layout.expected_m, out=workspace.y, config=down)

    def _prefill_swiglu(self, layout: ContiguousLayout, w13: torch.Tensor, w13_scale: torch.Tensor,
                        tile_counter: Optional[torch.Tensor] = None):
        """``act = (fp8 [M_sum, I], MN-major scales)`` from the fused SwiGLU gate-up GEMM where
        ``MOE_FP8_PREFILL_SWIGLU`` allows it (the contiguous GEMM runs as a kernel, 2I % 256 ==
        0, not in the debug mode: its finiteness checks would read the padding rows, which the
        kernel leaves unwritten), else None (nothing done). ``tile_counter``: dynamic tiles."""
        if (not switch_on(kPrefillSwiGluEnv, kPrefillSwiGluDefault) or (2 * self.inter) % 256
                or debug_mode() or torch.compiler.is_compiling()):
            return None
        from ..gemm.backend import pick
        if pick("auto", layout.a.device, "fp8_gemm", "m_grouped_contiguous") is None:
            return None
        from ..gemm.kernels import fp8_gemm
        rows = layout.num_rows
        q = torch.empty(rows, self.inter, dtype=FP8, device=layout.a.device)
        s = empty_act_scales(rows, self.inter // 128, device=layout.a.device)
        fp8_gemm.m_grouped_contiguous_swiglu(layout.a, to_mn_major(layout.sa), w13, w13_scale,
                                             layout.m_indices, q, s,
                                             pow2=self.pow2_scale, tile_counter=tile_counter)
        return q, s

    def _fused_swiglu(self, layout: MaskedLayout, workspace: MaskedWorkspace) -> bool:
        """Gate-up GEMM + SiLU-and-mul + quantisation in one kernel into ``workspace.act`` where
        ``MOE_FP8_FUSED_SWIGLU`` allows it (unset: always with early weights, else from
        ``kFusedSwiGluMinRows`` expected rows per expert on; ``1`` always; ``0`` never), the masked
        GEMM runs as a kernel and 2I % 256 == 0; False (nothing done) otherwise."""
        setting = lookup(kFusedSwiGluEnv, "").strip()
        if setting == "0" or (2 * self.inter) % 256:
            return False
        min_rows = kFusedSwiGluMinRowsEarlyWeights if _early_weights() else kFusedSwiGluMinRows
        if not setting and (layout.expected_rows or layout.expected_m) < min_rows:
            return False
        from ..gemm.backend import pick
        if pick("auto", layout.a.device, "fp8_gemm", "m_grouped_masked") is None:
            return False
        from ..gemm.kernels import fp8_gemm
        fp8_gemm.m_grouped_masked_swiglu(layout.a, to_mn_major(layout.sa), self.w13,
                                         self.w13_scale, layout.masked_m, layout.expected_m,
                                         workspace.act[0], workspace.act[1], pow2=self.pow2_scale,
                                         gather=layout.token_source)
        return True


def _materialize_rows(layout: MaskedLayout) -> None:
    """Write the rows a gathering dispatch left out (``layout.token_source``) into ``layout.a``:
    x_fp8[row_token] below masked_m, the rows past it unchanged. Graph-safe (no host sync)."""
    x, row_token = layout.token_source
    rows = x.view(torch.uint8).index_select(0, row_token.clamp(min=0).flatten())
    a = layout.a.view(torch.uint8)
    a.copy_(torch.where((row_token >= 0).unsqueeze(-1), rows.view(a.shape), a))
    layout.token_source = None


def _early_weights() -> bool:
    return switch_on(kEarlyWeightsEnv, kEarlyWeightsDefault)


def _swap_ab_down(expected_rows: float) -> bool:
    """Whether the decode down GEMM runs as its swap-AB twin (``MOE_FP8_SWAP_AB_DOWN``; unset: up
    to kSwapAbDownMaxRows ``expected_rows`` per expert)."""
    return switch_up_to_rows(kSwapAbDownEnv, expected_rows, kSwapAbDownMaxRows)


def _masked_config(layout: MaskedLayout, n: int, k: int):
    """The masked GEMM's config for the layout's expected rows per expert (heuristics.masked_config:
    the op's own choice, made here so the caller can adjust it, e.g. early weights), or None (the
    op chooses) off the GPU, for layouts without a decode mean or while tracing."""
    if layout.expected_rows <= 0 or not layout.a.is_cuda or torch.compiler.is_compiling():
        return None
    device = layout.a.device.index if layout.a.device.index is not None else torch.cuda.current_device()
    return H.masked_config(layout.a.shape[0], _expected_m(layout), n, k, H.num_sms(device))


def _expected_m(layout: MaskedLayout) -> int:
    """The rows per expert the masked GEMM configs are sized for: the layout's mean, at most its
    capacity."""
    return min(layout.expected_m, layout.max_tokens_per_expert)


def _budget_config(a: torch.Tensor, w: torch.Tensor, num_sms: Optional[int]):
    """The dense GEMM config for ``a [M, K] x w [N, K]^T`` on ``num_sms`` SMs (at most the
    device's: tiles chosen for that many, persistent grid capped), or None (the op's own choice)."""
    if num_sms is None or not a.is_cuda or torch.compiler.is_compiling():
        return None
    config = H.dense_config(max(a.shape[0], 1), w.shape[0], w.shape[1], num_sms)
    return dataclasses.replace(config, num_sms=num_sms)


class SharedExperts(nn.Module):
    """The always-on experts, fused into one FP8 MLP of width ``n_shared * I``."""

    def __init__(self, hidden: int, inter: int, device=None, dtype=torch.bfloat16,
                 pow2_scale: bool = False):
        super().__init__()
        self.hidden, self.inter, self.dtype, self.pow2_scale = hidden, inter, dtype, pow2_scale
        self.register_buffer("w13", torch.empty(2 * inter, hidden, dtype=FP8, device=device))
        self.register_buffer("w13_scale", torch.ones(_blocks(2 * inter), hidden // 128,
                                                     dtype=torch.float32, device=device))
        self.register_buffer("w2", torch.empty(hidden, inter, dtype=FP8, device=device))
        self.register_buffer("w2_scale", torch.ones(_blocks(hidden), inter // 128,
                                                    dtype=torch.float32, device=device))

    @torch.no_grad()
    def random_init(self, generator: Optional[torch.Generator] = None, std: float = kInitStd) -> None:
        device = self.w13.device
        self.load_dense(torch.randn(2 * self.inter, self.hidden, generator=generator, device=device) * std,
                        torch.randn(self.hidden, self.inter, generator=generator, device=device) * std)

    @torch.no_grad()
    def load_fp8(self, w13, w13_scale, w2, w2_scale) -> None:
        for name, value in (("w13", w13), ("w13_scale", w13_scale), ("w2", w2), ("w2_scale", w2_scale)):
            target = getattr(self, name)
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"shared {name} must have shape {tuple(target.shape)}, "
                                 f"got {tuple(value.shape)}")
            target.copy_(value)

    @torch.no_grad()
    def load_dense(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        q13, s13 = G.per_block_quant_fp8(w13.contiguous(), 128)
        q2, s2 = G.per_block_quant_fp8(w2.contiguous(), 128)
        self.load_fp8(q13, s13, q2, s2)

    def forward(self, xq: torch.Tensor, xs: torch.Tensor, num_sms: Optional[int] = None) -> torch.Tensor:
        """Quantised tokens ``(fp8 [T, H], fp32 [T, H/128])`` -> ``[T, H]`` bf16. ``num_sms`` (at
        most the device's SM count): run the two GEMMs on that many SMs (tiles chosen for them),
        leaving the others to kernels that run beside them (the decode graph's router branch)."""
        h = G.fp8_gemm_nt((xq, xs), (self.w13, self.w13_scale),
                          config=_budget_config(xq, self.w13, num_sms))  # [T, 2I]
        act = G.silu_and_mul_quant_fp8(h, pow2_scale=self.pow2_scale)  # [T, I]
        return G.fp8_gemm_nt(act, (self.w2, self.w2_scale),
                             config=_budget_config(act[0], self.w2, num_sms))  # [T, H]
