"""FP8 GEMMs and quantisation for Hopper, with a pure-torch reference behind every op.

Operand pairs are ``(values float8_e4m3fn, scales float32)``; "dequantise = value x scale".

* activations: one scale per row per 128 channels, logical ``[M, K/128]``, stored MN-major
  (``moe_fp8.gemm.layout``); the quantisation ops produce that layout directly.
* weights: one scale per 128x128 block, ``[ceil(N/128), K/128]`` (``[E, ...]`` per expert).

Contract shared by the ops: K (the reduction dim) is a multiple of 128, N a multiple of 16, any M.
Every op validates its arguments first (``ValueError``/``TypeError`` naming the argument), then runs
either the sm_90a kernel or the reference: ``backend="auto"`` picks the kernel for tensors on a
compute-capability-9.0 GPU and the reference elsewhere; ``"kernel"``/``"reference"`` force one;
the environment variable ``MOE_FP8_BACKEND`` replaces ``"auto"``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import validate as check
from .backend import check_backend, run
from .layout import ceil_div, empty_act_scales, is_mn_major, kScaleBlock
from .reference import calc_diff

__all__ = [
    "per_token_group_quant_fp8", "per_block_quant_fp8", "silu_and_mul_quant_fp8",
    "per_block_quant_transpose_fp8", "transpose_token_group_quant_fp8",
    "transpose_token_group_requant_fp8",
    "silu_and_mul_backward_quant_fp8",
    "fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
    "k_grouped_fp8_gemm_tn_contiguous", "new_tile_counter", "calc_diff", "precompile",
]

Fp8Pair = Tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- quantisation

def _quant_outputs(out, shape, groups_shape, device, name="out"):
    """Allocate (or check a caller-provided) ``(fp8 values, MN-major scales)`` pair."""
    if out is None:
        batch = shape[0] if len(shape) == 3 else None
        return (torch.empty(shape, dtype=torch.float8_e4m3fn, device=device),
                empty_act_scales(shape[-2], groups_shape[-1], batch, device=device))
    q, s = check.fp8_pair(name, out, dims=(len(shape),))
    check.shape(f"{name}[0]", q, shape)
    check.shape(f"{name}[1]", s, groups_shape)
    for part, t in ((f"{name}[0]", q), (f"{name}[1]", s)):
        if t.device != device:
            raise ValueError(f"{part} is on {t.device} but the input is on {device}")
    if not is_mn_major(s):
        raise ValueError(f"{name}[1] must be MN-major (see moe_fp8.gemm.layout.empty_act_scales)")
    return q, s


def _group_size(group_size) -> int:
    if group_size != kScaleBlock:
        raise ValueError(f"group_size must be {kScaleBlock} (the GEMMs' scale granularity), "
                         f"got {group_size}")
    return group_size


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128, *, pow2_scale: bool = False,
                              out: Optional[Fp8Pair] = None, backend: str = "auto") -> Fp8Pair:
    """Quantise activations per row per 128 channels.

    ``x [M, K]`` or ``[E, M, K]`` (bf16/fp16/fp32, K % 128 == 0) -> ``(q, s)``: ``q`` fp8 of x's
    shape, ``s`` fp32 ``[.., M, K/128]`` MN-major. ``pow2_scale`` rounds scales up to powers of two
    (UE8M0-compatible). ``out`` optionally receives the result.
    """
    check.tensor("x", x, dtypes=check.kFloatInputs, dims=(2, 3))
    _group_size(group_size)
    check.multiple_of("x.shape[-1]", x.shape[-1], group_size)
    check.finite("x", x)
    groups = (*x.shape[:-1], x.shape[-1] // group_size)
    q, s = _quant_outputs(out, tuple(x.shape), groups, x.device)
    run("per_token_group_quant", x, q, s, group_size, pow2_scale, check_backend(backend))
    return q, s


def per_block_quant_fp8(w: torch.Tensor, block_size: int = 128, *, pow2_scale: bool = False,
                        backend: str = "auto") -> Fp8Pair:
    """Quantise weights per 128x128 block.

    ``w [N, K]`` or ``[E, N, K]`` (K % 128 == 0) -> ``(q, s)``: ``q`` fp8 of w's shape, ``s`` fp32
    ``[.., ceil(N/128), K/128]`` contiguous.
    """
    check.tensor("w", w, dtypes=check.kFloatInputs, dims=(2, 3))
    _group_size(block_size)
    check.multiple_of("w.shape[-1]", w.shape[-1], block_size)
    check.finite("w", w)
    n, k = w.shape[-2:]
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((*w.shape[:-2], -(-n // block_size), k // block_size), dtype=torch.float32,
                    device=w.device)
    run("per_block_quant", w, q, s, block_size, pow2_scale, check_backend(backend))
    return q, s


def silu_and_mul_quant_fp8(h: torch.Tensor, *, masked_m: Optional[torch.Tensor] = None,
                           group_size: int = 128, pow2_scale: bool = False,
                           out: Optional[Fp8Pair] = None, backend: str = "auto",
                           expected_m: Optional[int] = None) -> Fp8Pair:
    """``silu(gate) * up`` quantised per row per 128 channels, gate = ``h[..., :I]``, up = ``h[..., I:]``.

    ``h [M, 2I]`` (contiguous layout) or ``[E, M_max, 2I]`` (masked layout), bf16/fp16/fp32,
    I % 128 == 0 -> ``(q [.., I] fp8, s [.., I/128] MN-major)``. With ``masked_m`` (int32 ``[E]``,
    3-D input only) rows ``>= masked_m[e]`` are not written. ``expected_m`` (host int, masked
    only): the typical masked_m, a kernel-choice hint as for the masked GEMM, never a bound.
    """
    check.tensor("h", h, dtypes=check.kFloatInputs, dims=(2, 3))
    _group_size(group_size)
    check.multiple_of("h.shape[-1]", h.shape[-1], 2 * group_size)
    if masked_m is not None:
        if h.dim() != 3:
            raise ValueError(f"masked_m needs h of shape [E, M_max, 2I], got {tuple(h.shape)}")
        check.int32_vector("masked_m", masked_m, h.shape[0])
        check.same_device(h=h, masked_m=masked_m)
        check.masked_m_values(masked_m, h.shape[1])
    if expected_m is not None and (isinstance(expected_m, bool) or not isinstance(expected_m, int)
                                   or expected_m <= 0):
        raise ValueError(f"expected_m must be a positive host int or None, got {expected_m!r}")
    check.finite("h", h)
    inter = h.shape[-1] // 2
    shape = (*h.shape[:-1], inter)
    q, s = _quant_outputs(out, shape, (*h.shape[:-1], inter // group_size), h.device)
    run("silu_and_mul_quant", h, q, s, masked_m, group_size, pow2_scale, check_backend(backend),
        expected_m if masked_m is not None else None)
    return q, s


# ----------------------------------------------------------------------------- training quantisation

def per_block_quant_transpose_fp8(w: torch.Tensor, block_size: int = 128, *,
                                  pow2_scale: bool = False, backend: str = "auto"
                                  ) -> Tuple[Fp8Pair, Fp8Pair]:
    """Quantise weights per 128x128 block and write the transposed copy in the same pass.

    ``w [N, K]`` or ``[E, N, K]`` (bf16/fp16/fp32, N and K multiples of 128) ->
    ``((q, s), (q_t, s_t))``: ``q`` fp8 of w's shape with ``s`` fp32 ``[.., N/128, K/128]``
    (what ``per_block_quant_fp8`` returns), and ``q_t`` fp8 ``[.., K, N]`` with ``s_t`` fp32
    ``[.., K/128, N/128]``: the same blocks transposed (bit-identical to quantising ``w^T``), the
    dgrad GEMM's weight operand. All contiguous.
    """
    check.tensor("w", w, dtypes=check.kFloatInputs, dims=(2, 3))
    _group_size(block_size)
    check.multiple_of("w.shape[-2]", w.shape[-2], block_size)
    check.multiple_of("w.shape[-1]", w.shape[-1], block_size)
    check.finite("w", w)
    n, k = w.shape[-2:]
    lead = tuple(w.shape[:-2])
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((*lead, n // block_size, k // block_size), dtype=torch.float32, device=w.device)
    q_t = torch.empty((*lead, k, n), dtype=torch.float8_e4m3fn, device=w.device)
    s_t = torch.empty((*lead, k // block_size, n // block_size), dtype=torch.float32,
                      device=w.device)
    run("per_block_quant_transpose", w, q, s, q_t, s_t, block_size, pow2_scale,
        check_backend(backend))
    return (q, s), (q_t, s_t)


def transpose_token_group_quant_fp8(x: torch.Tensor, group_size: int = 128, *,
                                    m_indices: Optional[torch.Tensor] = None,
                                    pow2_scale: bool = False, out: Optional[Fp8Pair] = None,
                                    backend: str = "auto") -> Fp8Pair:
    """Transpose and quantise 1x128 *along tokens*, in one pass (weight-gradient operands).

    ``x [T, C]`` (bf16/fp16/fp32, C a multiple of 128, any T) -> ``(q_t, s_t)``: ``q_t`` fp8
    ``[C, T]`` (token-contiguous) and ``s_t`` fp32 ``[C, ceil(T/128)]`` MN-major: one scale per
    channel per 128 tokens, exactly the operand layout ``k_grouped_fp8_gemm_tn_contiguous`` reads.
    Tokens are grouped from 0 in runs of 128 (the contiguous layout's expert segments are
    128-aligned, so no group spans two experts); a partial last group uses the tokens it has.
    Rows where ``m_indices`` (int32 ``[T]``, optional) is -1 read as zero (the contiguous
    layout's padding rows). ``out`` optionally receives the result.
    """
    check.tensor("x", x, dtypes=check.kFloatInputs, dims=(2,))
    _group_size(group_size)
    check.multiple_of("x.shape[1]", x.shape[1], group_size)
    check.finite("x", x)
    tokens, channels = x.shape
    if m_indices is not None:
        check.int32_vector("m_indices", m_indices, tokens)
        check.same_device(x=x, m_indices=m_indices)
    q, s = _quant_outputs(out, (channels, tokens), (channels, ceil_div(tokens, group_size)),
                          x.device)
    run("transpose_token_group_quant", x, m_indices, q, s, group_size, pow2_scale,
        check_backend(backend))
    return q, s


def transpose_token_group_requant_fp8(a: Fp8Pair, *, m_indices: Optional[torch.Tensor] = None,
                                      group_size: int = 128, pow2_scale: bool = False,
                                      out: Optional[Fp8Pair] = None,
                                      backend: str = "auto") -> Fp8Pair:
    """Re-quantise an operand from 1x128 along channels to 1x128 along tokens, transposed.

    ``a = (fp8 [T, C], fp32 [T, C/128])`` (any scale strides; C a multiple of 128) -> the
    ``transpose_token_group_quant_fp8`` of its dequantised values (``a[0] * a[1]`` in fp32), with
    the rows where ``m_indices`` (int32 ``[T]``, optional) is -1 read as zero: the weight-gradient
    operand x' of training, made from the forward's saved FP8 x without an fp32 copy in memory.
    """
    qa, sa = check.fp8_pair("a", a, dims=(2,))
    _group_size(group_size)
    tokens, channels = qa.shape
    check.multiple_of("a[0].shape[1]", channels, group_size)
    check.act_scales("a[1]", sa, (tokens,), channels)
    check.same_device(**{"a[0]": qa, "a[1]": sa})
    if m_indices is not None:
        check.int32_vector("m_indices", m_indices, tokens)
        check.same_device(**{"a[0]": qa, "m_indices": m_indices})
    q, s = _quant_outputs(out, (channels, tokens), (channels, ceil_div(tokens, group_size)),
                          qa.device)
    run("transpose_token_group_requant", qa, sa, m_indices, q, s, group_size, pow2_scale,
        check_backend(backend))
    return q, s


def silu_and_mul_backward_quant_fp8(d_act: torch.Tensor, h: torch.Tensor, *,
                                    group_size: int = 128, pow2_scale: bool = False,
                                    backend: str = "auto") -> Tuple[Fp8Pair, Fp8Pair, Fp8Pair]:
    """Backward of ``act = silu(gate) * up`` fused with the three quantisations it feeds.

    ``d_act [M, I]`` and ``h [M, 2I]`` (gate | up), bf16 (fp16/fp32 run the reference),
    I % 128 == 0, any M. With ``dh = [d_gate | d_up]`` and ``act`` formed in fp32 as
    ``reference.silu_mul_backward`` does, returns three (fp8, fp32 scales) pairs:

    * ``dh`` quantised 1x128 along channels: fp8 ``[M, 2I]``, scales ``[M, 2I/128]`` MN-major
      (the dgrad GEMM ``dX = dH . W13``);
    * ``dh^T`` quantised along tokens: fp8 ``[2I, M]``, scales ``[2I, ceil(M/128)]`` MN-major
      (the weight gradient of W13);
    * ``act^T`` quantised along tokens: fp8 ``[I, M]``, scales ``[I, ceil(M/128)]`` MN-major
      (the weight gradient of W2).
    """
    check.tensor("d_act", d_act, dtypes=check.kFloatInputs, dims=(2,))
    check.tensor("h", h, dtypes=check.kFloatInputs, dims=(2,))
    _group_size(group_size)
    check.multiple_of("h.shape[1]", h.shape[1], 2 * group_size)
    rows, inter = h.shape[0], h.shape[1] // 2
    check.shape("d_act", d_act, (rows, inter))
    check.same_device(d_act=d_act, h=h)
    check.finite("d_act", d_act)
    check.finite("h", h)
    groups = ceil_div(rows, group_size)
    dh = _quant_outputs(None, (rows, 2 * inter), (rows, 2 * inter // group_size), h.device)
    dh_t = _quant_outputs(None, (2 * inter, rows), (2 * inter, groups), h.device)
    act_t = _quant_outputs(None, (inter, rows), (inter, groups), h.device)
    run("silu_and_mul_backward_quant", d_act, h, *dh, *dh_t, *act_t, group_size, pow2_scale,
        check_backend(backend))
    return dh, dh_t, act_t


# ----------------------------------------------------------------------------- GEMMs

def _gemm_operands(a, b, a_dims: int, b_dims: int):
    """Validate ``a = (values [.., M, K], 1x128 scales)`` and ``b = (values [.., N, K], 128x128 scales)``."""
    qa, sa = check.fp8_pair("a", a, dims=(a_dims,))
    qb, sb = check.fp8_pair("b", b, dims=(b_dims,))
    k = qa.shape[-1]
    check.multiple_of("K (a[0].shape[-1])", k, kScaleBlock)
    if qb.shape[-1] != k:
        raise ValueError(f"b[0].shape[-1] must equal K = a[0].shape[-1] = {k}, got {qb.shape[-1]}")
    n = qb.shape[-2]
    check.multiple_of("N (b[0].shape[-2])", n, 16)
    check.act_scales("a[1]", sa, qa.shape[:-1], k)
    check.block_scales("b[1]", sb, qb.shape[:-2], n, k)
    device = check.same_device(**{"a[0]": qa, "a[1]": sa, "b[0]": qb, "b[1]": sb})
    return qa, sa, qb, sb.contiguous(), device


def _gemm_out(out, shape, device):
    if out is None:
        return torch.empty(shape, dtype=torch.bfloat16, device=device)
    return check.output("out", out, shape, torch.bfloat16, device)


def fp8_gemm_nt(a: Fp8Pair, b: Fp8Pair, out: Optional[torch.Tensor] = None, *,
                backend: str = "auto", config=None) -> torch.Tensor:
    """``out [M, N] bf16 = (a . sa)(b . sb)^T``.

    ``a = (fp8 [M, K], fp32 [M, K/128])`` per-token scales; ``b = (fp8 [N, K], fp32
    [ceil(N/128), K/128])`` per-block scales. ``config`` pins a kernel configuration (tests).
    """
    qa, sa, qb, sb, device = _gemm_operands(a, b, 2, 2)
    out = _gemm_out(out, (qa.shape[0], qb.shape[0]), device)
    if qa.shape[0] == 0:
        return out
    run("fp8_gemm_nt", qa, sa, qb, sb, out, check_backend(backend), config=config)
    return out


def new_tile_counter(device) -> torch.Tensor:
    """A claim counter for the contiguous GEMMs' dynamic tiles (``tile_counter=``): int32 ``[2]``
    zeros on ``device``. Every launch leaves it at zero; launches that may run at the same time
    (two streams) need one each."""
    return torch.zeros(2, dtype=torch.int32, device=device)


def m_grouped_fp8_gemm_nt_contiguous(a: Fp8Pair, b: Fp8Pair, m_indices: torch.Tensor,
                                     out: Optional[torch.Tensor] = None, *,
                                     backend: str = "auto", config=None,
                                     zero_padding: bool = False,
                                     tile_counter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped GEMM over the contiguous layout (prefill, training).

    ``a = (fp8 [M_sum, K], fp32 [M_sum, K/128])``, ``b = (fp8 [E, N, K], fp32 [E, ceil(N/128), K/128])``,
    ``m_indices`` int32 ``[M_sum]``: the expert of every row, -1 for padding; every 128-row block
    belongs to one expert (M_sum % 128 == 0). ``out[r] = a[r] . b[m_indices[r]]^T`` bf16
    ``[M_sum, N]``; padding rows are not written, or with ``zero_padding`` written as zeros (then
    every row is written and ``out`` may come from ``torch.empty``).

    ``tile_counter`` (``new_tile_counter(device)``): the kernel's persistent CTAs claim their
    tiles at run time from this counter instead of a fixed stride, so CTAs that start late (SMs
    held by a kernel on another stream) take fewer tiles. Every launch leaves it at zero; launches
    that may overlap (two streams) need a counter each. The same results either way.
    """
    qa, sa, qb, sb, device = _gemm_operands(a, b, 2, 3)
    check.multiple_of("M_sum (a[0].shape[0])", qa.shape[0], kScaleBlock)
    check.int32_vector("m_indices", m_indices, qa.shape[0])
    check.same_device(**{"a[0]": qa, "m_indices": m_indices})
    check.m_indices_values(m_indices, qb.shape[0])
    if tile_counter is not None:
        check.tile_counter(tile_counter, qa.device)
    out = _gemm_out(out, (qa.shape[0], qb.shape[1]), device)
    if qa.shape[0] == 0:
        return out
    run("m_grouped_contiguous", qa, sa, qb, sb, m_indices, out, check_backend(backend),
        bool(zero_padding), tile_counter, config=config)
    return out


def m_grouped_fp8_gemm_nt_contiguous_offsets(a: Fp8Pair, b: Fp8Pair, offsets: torch.Tensor,
                                             out: Optional[torch.Tensor] = None, *,
                                             backend: str = "auto", config=None,
                                             tile_counter: Optional[torch.Tensor] = None
                                             ) -> torch.Tensor:
    """The contiguous grouped GEMM with the layout given as segment starts instead of m_indices.

    ``offsets`` int32 ``[E + 1]`` on the device: expert e owns rows ``[offsets[e], offsets[e+1])``;
    every entry a multiple of 128, non-decreasing, from 0, ``offsets[E] <= M_sum``. All rows of a
    segment are computed and written (padding rows inside a segment too: the m_indices form is the
    one that leaves them untouched); rows ``>= offsets[E]`` are not written. The same tiles as the
    m_indices form (its speed against that form is not measured yet: bench_grouped's
    ``offsets_form_us``); use it when the dispatcher already has the cumulative segment sizes (no
    [M_sum] index to build). ``tile_counter``: as for ``m_grouped_fp8_gemm_nt_contiguous``.
    """
    qa, sa, qb, sb, device = _gemm_operands(a, b, 2, 3)
    check.multiple_of("M_sum (a[0].shape[0])", qa.shape[0], kScaleBlock)
    check.int32_vector("offsets", offsets, qb.shape[0] + 1)
    check.same_device(**{"a[0]": qa, "offsets": offsets})
    check.segment_starts_values(offsets, qa.shape[0])
    if tile_counter is not None:
        check.tile_counter(tile_counter, qa.device)
    out = _gemm_out(out, (qa.shape[0], qb.shape[1]), device)
    if qa.shape[0] == 0:
        return out
    run("m_grouped_contiguous_offsets", qa, sa, qb, sb, offsets, out, check_backend(backend),
        tile_counter, config=config)
    return out


def m_grouped_fp8_gemm_nt_masked(a: Fp8Pair, b: Fp8Pair, masked_m: torch.Tensor, expected_m: int,
                                 out: Optional[torch.Tensor] = None, *,
                                 backend: str = "auto", config=None) -> torch.Tensor:
    """Grouped GEMM over the masked layout (decode; CUDA-graph safe: no host sync).

    ``a = (fp8 [E, M_max, K], fp32 [E, M_max, K/128])``, ``b = (fp8 [E, N, K], fp32
    [E, ceil(N/128), K/128])``, ``masked_m`` int32 ``[E]`` on the device: rows used per expert;
    ``expected_m`` host int, a hint of the typical ``masked_m`` for the tile choice.
    ``out[e, :masked_m[e]] = a[e, :masked_m[e]] . b[e]^T`` bf16 ``[E, M_max, N]``; other rows not written.
    """
    qa, sa, qb, sb, device = _gemm_operands(a, b, 3, 3)
    if qa.shape[0] != qb.shape[0]:
        raise ValueError(f"a[0] has {qa.shape[0]} experts but b[0] has {qb.shape[0]}")
    check.int32_vector("masked_m", masked_m, qa.shape[0])
    check.same_device(**{"a[0]": qa, "masked_m": masked_m})
    check.positive_int("expected_m", expected_m)
    check.masked_m_values(masked_m, qa.shape[1])
    out = _gemm_out(out, (qa.shape[0], qa.shape[1], qb.shape[1]), device)
    run("m_grouped_masked", qa, sa, qb, sb, masked_m, expected_m, out, check_backend(backend),
        config=config)
    return out


def k_grouped_fp8_gemm_tn_contiguous(a: Fp8Pair, b: Fp8Pair, offsets: torch.Tensor,
                                     out: torch.Tensor, *, accumulate: bool = True,
                                     backend: str = "auto") -> torch.Tensor:
    """Weight-gradient GEMM, grouped along the reduction (token) dimension; accumulates into ``out``
    (``accumulate=False``: overwrites it, zeros for experts without tokens — no zeroing pass and
    no read of ``out`` needed, e.g. for a fresh gradient buffer from ``torch.empty``).

    ``a = (dY^T fp8 [N, T], fp32 [N, T/128])`` and ``b = (X^T fp8 [K, T], fp32 [K, T/128])``: both
    token-contiguous with 1x128 scales along tokens; ``offsets`` int32 ``[E + 1]``: expert e owns
    tokens ``offsets[e]:offsets[e+1]`` (multiples of 128). ``out`` fp32 ``[E, N, K]``:
    ``out[e] += a[:, seg_e] . b[:, seg_e]^T``; or bf16 ``[E, N, K]`` with ``accumulate=False``
    (bf16 master weights: the fp32 sum rounded once, no fp32 buffer or conversion pass; K % 8 == 0).
    """
    qa, sa = check.fp8_pair("a", a, dims=(2,))
    qb, sb = check.fp8_pair("b", b, dims=(2,))
    tokens = qa.shape[1]
    check.multiple_of("T (a[0].shape[1])", tokens, kScaleBlock)
    if qb.shape[1] != tokens:
        raise ValueError(f"b[0].shape[1] must equal T = a[0].shape[1] = {tokens}, got {qb.shape[1]}")
    check.act_scales("a[1]", sa, qa.shape[:1], tokens)
    check.act_scales("b[1]", sb, qb.shape[:1], tokens)
    device = check.same_device(**{"a[0]": qa, "a[1]": sa, "b[0]": qb, "b[1]": sb,
                                  "offsets": offsets})
    check.tensor("offsets", offsets, dtypes=(torch.int32,), dims=(1,))
    if offsets.shape[0] < 2:
        raise ValueError(f"offsets must hold E + 1 >= 2 entries, got shape {tuple(offsets.shape)}")
    num_experts = offsets.shape[0] - 1
    check.tensor("out", out, dtypes=(torch.float32, torch.bfloat16), dims=(3,))
    check.output("out", out, (num_experts, qa.shape[0], qb.shape[0]), out.dtype, device)
    check.offsets_values(offsets, tokens)
    if not isinstance(accumulate, bool):
        raise TypeError(f"accumulate must be a bool, got {type(accumulate).__name__}")
    if out.dtype == torch.bfloat16:
        if accumulate:
            raise ValueError("out is bf16: a bf16 weight gradient is overwritten "
                             "(accumulate=False); accumulate into an fp32 out instead")
        check.multiple_of("K (b[0].shape[0], bf16 out's rows)", qb.shape[0], 8)
    run("k_grouped_tn", qa, sa, qb, sb, offsets, out, check_backend(backend), accumulate)
    return out


def precompile(*args, **kwargs):
    """Compile kernels ahead of time (all bundled variants when called with no arguments)."""
    from .precompile import precompile as _precompile
    return _precompile(*args, **kwargs)
