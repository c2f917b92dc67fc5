"""Pure-torch twins of every op, following the kernels' block-by-block scale math.

They are the oracle of the GPU tests and the CPU implementation of the public ops. Inputs are
assumed validated (``moe_fp8.gemm.validate``). Quantisation, per group of 128 values:

    amax  = max |x|                       (fp32)
    scale = max(amax, kAmaxFloor) / 448   (optionally rounded up to a power of two)
    q     = fp8_e4m3(clamp(x / scale, -448, 448))   (IEEE fp32 division, round to nearest even)

GEMMs (two-level accumulation): for every 128-wide K block ``kb``, the exact fp32 product of
the fp8 values of that block is scaled by ``sa[m, kb] * sb[n, kb]`` and added into an fp32
accumulator; the result is rounded to bf16 once at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import ceil_div, kScaleBlock

kFp8Max = 448.0  # largest finite float8_e4m3fn
kAmaxFloor = 1e-10  # all-zero groups get scale kAmaxFloor / 448 (q = 0), never 0 or inf
FP8 = torch.float8_e4m3fn


def ceil_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``scale`` (positive normal fp32), bit-exact as the kernels do it."""
    bits = scale.view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    pow2 = (exponent << 23).view(torch.float32)
    return torch.where(torch.isfinite(scale), pow2, scale)  # keep NaN/inf visible


def _scale_from_amax(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    # NOTE: divide by a tensor: torch turns division by a Python scalar on CUDA into a multiply
    # by its reciprocal (last-bit differences); the kernels do an IEEE division.
    scale = amax.clamp_min(kAmaxFloor) / torch.full_like(amax, kFp8Max)
    scale = torch.where(torch.isnan(amax), amax, scale)  # clamp_min would hide a NaN
    return ceil_pow2(scale) if pow2_scale else scale


def _cast(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-kFp8Max, kFp8Max).to(FP8)


def per_token_group_quant(x: torch.Tensor, group_size: int = kScaleBlock,
                          pow2_scale: bool = False):
    """``x [.., K]`` -> ``(q [.., K] fp8, s [.., K/group_size] fp32)``; scales contiguous here."""
    xg = x.float().unflatten(-1, (x.shape[-1] // group_size, group_size))  # [.., G, 128]
    scale = _scale_from_amax(xg.abs().amax(dim=-1), pow2_scale)  # [.., G]
    q = _cast(xg, scale.unsqueeze(-1)).flatten(-2)
    return q, scale


def per_block_quant(w: torch.Tensor, block_size: int = kScaleBlock, pow2_scale: bool = False):
    """``w [.., N, K]`` -> ``(q [.., N, K] fp8, s [.., ceil(N/128), K/128] fp32)``.

    A partial last row-block (N not a multiple of 128) takes its amax over the rows it has.
    """
    n, k = w.shape[-2], w.shape[-1]
    n_blocks, k_blocks = ceil_div(n, block_size), k // block_size
    wf = F.pad(w.float(), (0, 0, 0, n_blocks * block_size - n))  # zero rows do not change amax
    wb = wf.unflatten(-1, (k_blocks, block_size)).unflatten(-3, (n_blocks, block_size))
    # wb: [.., n_blocks, 128 rows, k_blocks, 128 cols]
    scale = _scale_from_amax(wb.abs().amax(dim=(-3, -1)), pow2_scale)  # [.., n_blocks, k_blocks]
    q = _cast(wb, scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)[..., :n, :]
    return q, scale


def silu_and_mul_quant(h: torch.Tensor, group_size: int = kScaleBlock, pow2_scale: bool = False):
    """``h [.., 2I]`` (gate | up) -> quantised ``silu(gate) * up`` ``[.., I]`` with 1x128 scales.

    The product is formed in fp32 and quantised directly (no bf16 rounding in between).
    """
    gate, up = h.float().chunk(2, dim=-1)
    return per_token_group_quant(F.silu(gate) * up, group_size, pow2_scale)


def per_block_quant_transpose(w: torch.Tensor, block_size: int = kScaleBlock,
                              pow2_scale: bool = False):
    """``w [.., N, K]`` (N, K multiples of 128) -> ``((q, s), (q_t, s_t))``: the 128x128 block
    quantisation of w and the same blocks transposed, ``q_t [.., K, N]``, ``s_t [.., K/128, N/128]``
    (equal, bit for bit, to ``per_block_quant(w.transpose(-2, -1))``: a block and its transpose
    share their amax)."""
    q, s = per_block_quant(w, block_size, pow2_scale)
    return (q, s), (q.transpose(-2, -1).contiguous(), s.transpose(-2, -1).contiguous())


def transpose_token_group_quant(x: torch.Tensor, group_size: int = kScaleBlock,
                                pow2_scale: bool = False, m_indices=None):
    """``x [T, C]`` -> ``(q_t [C, T] fp8, s_t [C, ceil(T/128)] fp32)``: x transposed and quantised
    1x128 *along tokens* (one scale per channel per 128 tokens; scales contiguous here). A partial
    last group (T not a multiple of 128) takes its amax over the tokens it has. Rows where
    ``m_indices`` (optional int32 ``[T]``) is -1 count as zero."""
    tokens = x.shape[0]
    if m_indices is not None:
        x = x.masked_fill((m_indices < 0).unsqueeze(1), 0)
    groups = ceil_div(tokens, group_size)
    xt = F.pad(x.float().t(), (0, groups * group_size - tokens))  # [C, T_pad]; zeros: no amax
    q, s = per_token_group_quant(xt, group_size, pow2_scale)
    return q[:, :tokens].contiguous(), s


def transpose_token_group_requant(q: torch.Tensor, s: torch.Tensor, m_indices=None,
                                  group_size: int = kScaleBlock, pow2_scale: bool = False):
    """An fp8 ``[T, C]`` operand with 1x128 scales along channels ``[T, C/128]`` -> dequantised
    (``dequant_rows``), rows with ``m_indices == -1`` zeroed, then ``transpose_token_group_quant``."""
    return transpose_token_group_quant(dequant_rows(q, s), group_size, pow2_scale, m_indices)


def silu_mul_backward(d_act: torch.Tensor, h: torch.Tensor):
    """Backward of ``act = silu(gate) * up``: ``d_act [M, I]``, ``h [M, 2I]`` (gate | up) ->
    ``(d_h [M, 2I], act [M, I])`` in fp32 (float64 stays float64), every operation rounded once in
    this order (the kernel's, bit for bit on the GPU, where torch's exp is the device expf)::

        sig = 1 / (1 + exp(-g));  silu = g * sig;  act = silu * u
        d_up = dA * silu;         d_gate = ((dA * u) * sig) * (1 + g * (1 - sig))
    """
    compute = torch.promote_types(h.dtype, torch.float32)
    gate, up = h.to(compute).chunk(2, dim=-1)  # [M, I] each
    d_act = d_act.to(compute)
    sig = torch.reciprocal(torch.exp(-gate) + 1)
    silu = gate * sig
    d_gate = d_act * up * sig * (gate * (1 - sig) + 1)
    d_up = d_act * silu
    return torch.cat([d_gate, d_up], dim=-1), silu * up


def silu_and_mul_backward_quant(d_act: torch.Tensor, h: torch.Tensor,
                                group_size: int = kScaleBlock, pow2_scale: bool = False):
    """``silu_mul_backward`` then the three quantisations its consumers read:
    ``(dh [M, 2I] 1x128 along channels, dh^T [2I, M] along tokens, act^T [I, M] along tokens)``,
    each an (fp8, fp32 scales) pair with contiguous scales."""
    d_h, act = silu_mul_backward(d_act, h)
    return (per_token_group_quant(d_h, group_size, pow2_scale),
            transpose_token_group_quant(d_h, group_size, pow2_scale),
            transpose_token_group_quant(act, group_size, pow2_scale))


def dequant_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp8 ``[.., K]`` with 1x128 scales ``[.., K/128]`` -> fp32."""
    return q.float() * s.repeat_interleave(q.shape[-1] // s.shape[-1], dim=-1)


def dequant_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp8 ``[.., N, K]`` with 128x128 scales ``[.., ceil(N/128), K/128]`` -> fp32."""
    n = q.shape[-2]
    s_rows = s.repeat_interleave(kScaleBlock, dim=-2)[..., :n, :]
    return q.float() * s_rows.repeat_interleave(kScaleBlock, dim=-1)


def _expand_block_scales(sb: torch.Tensor, n: int) -> torch.Tensor:
    """128x128 weight scales ``[ceil(N/128), K/128]`` -> one scale row per output column ``[N, K/128]``."""
    return sb.repeat_interleave(kScaleBlock, dim=0)[:n]


def blockscaled_mm(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb_rows: torch.Tensor
                   ) -> torch.Tensor:
    """fp32 ``[M, N] = sum_kb (qa_kb . qb_kb^T) * sa[:, kb] * sb_rows[:, kb]``.

    ``qa [M, K]`` / ``qb [N, K]`` fp8; ``sa [M, K/128]`` and ``sb_rows [N, K/128]`` one scale per
    row per 128-wide K block (expand 128x128 weight scales first).
    """
    m, k = qa.shape
    n = qb.shape[0]
    acc = torch.zeros(m, n, dtype=torch.float32, device=qa.device)
    af, bf = qa.float(), qb.float()
    for kb in range(k // kScaleBlock):
        cols = slice(kb * kScaleBlock, (kb + 1) * kScaleBlock)
        acc += (af[:, cols] @ bf[:, cols].t()) * sa[:, kb, None] * sb_rows[None, :, kb]
    return acc


def fp8_gemm_nt(a, sa, b, sb, out: torch.Tensor) -> torch.Tensor:
    """``out [M, N] bf16 = (a . sa)(b . sb)^T``; a ``[M, K]`` 1x128 scales, b ``[N, K]`` 128x128 scales."""
    out.copy_(blockscaled_mm(a, sa, b, _expand_block_scales(sb, b.shape[0])))
    return out


def m_grouped_contiguous(a, sa, b, sb, m_indices: torch.Tensor, out: torch.Tensor, *,
                         zero_padding: bool = False) -> torch.Tensor:
    """Rows of expert e (``m_indices == e``) times ``b[e]``; padding rows (-1) are not written,
    or with ``zero_padding`` set to zero."""
    if zero_padding:
        out.masked_fill_((m_indices < 0).unsqueeze(1), 0)
    for e in torch.unique(m_indices).tolist():
        if e < 0:
            continue
        rows = (m_indices == e).nonzero().squeeze(1)
        out[rows] = blockscaled_mm(a[rows], sa[rows], b[e],
                                   _expand_block_scales(sb[e], b.shape[1])).to(out.dtype)
    return out


def m_grouped_contiguous_offsets(a, sa, b, sb, offsets: torch.Tensor,
                                 out: torch.Tensor) -> torch.Tensor:
    """Rows [offsets[e], offsets[e+1]) times ``b[e]`` (all of them); rows >= offsets[E] untouched."""
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = blockscaled_mm(a[lo:hi], sa[lo:hi], b[e],
                                        _expand_block_scales(sb[e], b.shape[1])).to(out.dtype)
    return out


def m_grouped_masked(a, sa, b, sb, masked_m: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[e, :masked_m[e]] = a[e, :masked_m[e]] . b[e]^T``; rows beyond are not written."""
    for e, m in enumerate(masked_m.tolist()):
        if m > 0:
            out[e, :m] = blockscaled_mm(a[e, :m], sa[e, :m], b[e],
                                        _expand_block_scales(sb[e], b.shape[1])).to(out.dtype)
    return out


def k_grouped_tn(a, sa, b, sb, offsets: torch.Tensor, out: torch.Tensor, *,
                 accumulate: bool = True) -> torch.Tensor:
    """Weight gradients: ``out[e] += a[:, seg_e] . b[:, seg_e]^T`` (fp32); ``accumulate=False``:
    ``out[e] = ...`` (zeros for an expert without tokens; bf16 ``out``: only this form).

    ``a [N, T]`` (dY transposed) and ``b [K, T]`` (X transposed), both with 1x128 scales along
    tokens (``[N, T/128]``, ``[K, T/128]``); ``offsets [E + 1]`` token offsets, multiples of 128.
    """
    if not accumulate:
        out.zero_()
    bounds = offsets.tolist()
    for e in range(len(bounds) - 1):
        t0, t1 = bounds[e], bounds[e + 1]
        if t1 > t0:
            g0, g1 = t0 // kScaleBlock, t1 // kScaleBlock
            product = blockscaled_mm(a[:, t0:t1], sa[:, g0:g1], b[:, t0:t1], sb[:, g0:g1])
            if out.dtype == torch.float32:
                out[e] += product
            else:  # bf16, overwriting: the fp32 sum rounded once
                out[e] = product
    return out


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """``1 - 2 sum(xy) / sum(x^2 + y^2)`` in float64: 0 for equal tensors, 2 for ``y = -x``."""
    x, y = x.detach().double(), y.detach().double()
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


def unquantised_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The product the FP8 GEMM approximates, ``a @ b^T`` in fp32 (accuracy tests)."""
    return a.float() @ b.float().t()


def masked_row_mask(m_max: int, masked_m: torch.Tensor) -> torch.Tensor:
    """Boolean ``[E, m_max]``: the rows a masked-layout op writes (``row < masked_m[e]``)."""
    rows = torch.arange(m_max, device=masked_m.device)
    return rows[None, :] < masked_m[:, None]
