"""Token permutation with FP8 quantisation fused in, and the weighted un-permute (combine).

The permute is one quantisation of the T source tokens plus one gather (contiguous) / scatter
(masked) of fp8 rows and their scales (quantising per token before the copy gives bit-identical
rows to quantising after it, at 1/k of the work, and never writes a bf16 copy of the permuted
tokens); the combine is one gather-and-weighted-sum per token.

Two implementations behind the same functions:

* torch (CPU, non-sm_90 GPUs, or ``MOE_FP8_FUSED_PERMUTE=0``): index_select / index_put /
  baddbmm, as below.
* fused kernels (``moe_fp8/gemm/include/permute.cuh``), the default when the tensors are on an
  sm_90 GPU (verified and measured on an H200: tests/test_permute_gpu.py,
  benchmarks/bench_permute.py). The
  permute kernel copies 16-byte vectors of fp8 rows and writes the scales straight into the
  destination's (MN-major) layout, plus row_token/row_slot, in one launch; the combine kernel
  reads each expert row once and writes each output row once (the torch path writes and re-reads
  a ``[n, k, H]`` gathered copy). Results: permute bit-identical to torch (copies); combine
  bit-identical to ``fp32: acc = 0; acc += bf16(w_j) * y_j for j = 0..k-1; acc += add;
  bf16(acc)`` — the math of the torch branch's ``baddbmm``, whose cuBLAS kernel may sum the k
  exact products in another order (then the two differ by one bf16 ulp on rare elements).
  The differentiable branch (training) always runs torch.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import gemm as G
from ..gemm.layout import empty_act_scales
from ..gemm.validate import debug_mode
from .layouts import (CombineIndex, ContiguousIndex, MaskedIndex, fused_enabled,
                      masked_index_kernel_inputs)
from .switches import switch_on, switch_up_to_rows

kCombineChunkElems = 1 << 26  # tokens per combine step: n * k * H <= this (128 MiB of bf16 rows)
# The decode dispatch of at most 256 pairs (32 tokens at top-8) as one kernel: the masked index and
# the permute, every CTA ranking the pairs itself (masked_dispatch_small_kernel): one launch and
# its round trips fewer on the router branch between the route kernel and the routed gate-up GEMM.
# On: with the runner's stage kernel, H100 2026-12-05 (session 11, two rounds), decode 1 / 2 / 4
# tokens 169-172 -> 165 / 267 -> 264 / 377 -> 374 us, no row slower.
kSmallDispatchEnv = "MOE_FP8_SMALL_DISPATCH"
kSmallDispatchDefault = True
# The decode dispatch writes the masked layout's scales and row maps but copies no fp8 row; the
# routed gate-up (the fused SwiGLU GEMM) copies each tile's rows from the unpermuted tokens itself
# (two producer warps, cp.async; gemm_core.cuh kGatherA). On (unset); 0: off. H100, 2026-12-06,
# session 17, 3 interleaved rounds, same bits, against 0: 1 / 8 / 32 / 128 tokens -1.0..+1.1 /
# -1.0..-2.9 / -2.2..-2.9 / -4.9..-10.2 us (four calls), 256 tokens -4.6 (hardware arrivals; a
# first version that waited for its copies one slot late lost 5.4 there). One TMA box per row,
# the version before, cost the 256-token step 324 us (H200). Unset: on up to
# kDecodeGatherMaxRows expected rows per expert (`1` always): a graph runner at prefill sizes
# re-gathers each row once per column tile, slower than TMA boxes of the permuted rows (H100,
# 2026-12-07, session 32, 3 interleaved rounds, same bits, runners at 512 / 1024 / 2048 tokens,
# i.e. 128 / 256 / 512 rows per expert: off -126 / -216 / -414 us of 890 / 1450 / 2570).
kDecodeGatherEnv = "MOE_FP8_DECODE_GATHER"
kDecodeGatherMaxRows = 64.0


def _kernels():
    from ..gemm.kernels import permute as kernels
    return kernels


def _masked_buffers_fit(xq: torch.Tensor, xs: torch.Tensor, a_buf: torch.Tensor,
                        sa_buf: torch.Tensor) -> bool:
    """The masked permute kernels take these tokens and layout buffers."""
    kernels = _kernels()
    return (kernels.supports_permute(xq, xs) and a_buf.is_contiguous() and kernels.aligned16(a_buf)
            and sa_buf.dim() == 3)


def _row_maps(a_buf: torch.Tensor) -> torch.Tensor:
    """int64 ``[2, E_loc + 1, M_max]`` row_token / row_slot, written whole by the kernels."""
    return torch.empty((2, *a_buf.shape[:2]), dtype=torch.int64, device=a_buf.device)


def quantize_tokens(x: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, H]`` bf16 -> ``(fp8 [T, H], fp32 [T, H/128] MN-major)``: 1x128 per-token scales."""
    return G.per_token_group_quant_fp8(x, 128, pow2_scale=pow2_scale)


def permute_contiguous(xq: torch.Tensor, xs: torch.Tensor, index: ContiguousIndex, top_k: int):
    """Gather quantised tokens into the contiguous layout -> ``(a [M_sum, H], sa [M_sum, H/128])``.

    Padding rows copy token 0 (finite values; the GEMM does not read them for output).
    Also returns ``row_token``/``row_slot`` int64 ``[M_sum]`` (-1 on padding rows).
    Fused (module docstring): one kernel, same values, except that the rows and scales of a
    128-row block with no kept row (the tail of a layout sized by its upper bound) are left
    unwritten: no GEMM loads such a block, and the along-token quantisations read padding rows as
    zero.
    """
    return permute_rows(xq, xs, index.row_pair, top_k)


def permute_rows(xq: torch.Tensor, xs: torch.Tensor, row_pair: torch.Tensor, top_k: int):
    """``permute_contiguous`` from the row -> pair map alone: layout row r takes source row
    ``row_pair[r] // top_k`` (its slot ``row_pair[r] % top_k``), -1 = padding. ``xq``/``xs`` may
    be strided views (the expert-parallel receiver passes its packed rows in place)."""
    num_rows, groups = row_pair.shape[0], xs.shape[1]
    if num_rows > 0 and fused_enabled(xq):
        kernels = _kernels()
        if kernels.supports_permute(xq, xs) and row_pair.dtype == torch.int64 and \
                row_pair.is_contiguous():
            a = torch.empty(num_rows, xq.shape[1], dtype=xq.dtype, device=xq.device)
            sa = torch.empty(groups, num_rows, dtype=torch.float32, device=xq.device).t()
            row_meta = torch.empty(2, num_rows, dtype=torch.int64, device=xq.device)
            kernels.permute_contiguous(xq, xs, row_pair, top_k, a, sa, row_meta[0], row_meta[1])
            return a, sa, row_meta[0], row_meta[1]
    valid = row_pair >= 0
    row_token = torch.where(valid, row_pair // top_k, -1)  # [M_sum]
    row_slot = torch.where(valid, row_pair % top_k, -1)  # [M_sum]
    if num_rows == 0:
        return xq[:0], empty_act_scales(0, groups, device=xq.device), row_token, row_slot
    source = row_token.clamp(min=0)  # [M_sum]
    rows = xq.view(torch.uint8)
    if rows.shape[1] % 8 == 0 and rows.stride(0) % 8 == 0 and rows.storage_offset() % 8 == 0:
        rows = rows.view(torch.int64)  # gather 8-byte words, not bytes (8x fewer elements)
    a = torch.index_select(rows, 0, source).view(torch.uint8).view(xq.dtype)  # [M_sum, H] fp8
    # M_sum % 128 == 0, so the MN-major storage [H/128, M_sum] has no row padding
    sa_storage = torch.empty(groups, num_rows, dtype=torch.float32, device=xq.device)
    torch.index_select(xs.t(), 1, source, out=sa_storage)  # xs.t(): [H/128, T] view
    return a, sa_storage.t(), row_token, row_slot


def permute_masked(xq: torch.Tensor, xs: torch.Tensor, index: MaskedIndex, top_k: int,
                   a_buf: torch.Tensor, sa_buf: torch.Tensor, copy_rows: bool = True):
    """Scatter quantised tokens into masked buffers ``a_buf [E_loc + 1, M_max, H]`` /
    ``sa_buf [E_loc + 1, M_max, H/128]`` (last expert = trash for skipped pairs).

    Returns ``row_token``/``row_slot`` int64 ``[E_loc, M_max]`` (-1 on unused rows). No host sync.
    Fused (module docstring): one kernel, same values outside the trash bucket. ``copy_rows=False``:
    ``a_buf`` is left as it was (the scales and row maps are written).
    """
    num_pairs = index.pair_expert.numel()
    if fused_enabled(xq):
        kernels = _kernels()
        pair_meta = (index.pair_expert, index.pair_rank)
        if _masked_buffers_fit(xq, xs, a_buf, sa_buf) and \
                all(t.dtype == torch.int64 and t.is_contiguous() for t in pair_meta) and \
                index.masked_m.dtype == torch.int32 and index.masked_m.is_contiguous() and \
                index.masked_m.numel() == a_buf.shape[0] - 1:
            rows = _row_maps(a_buf)  # -1 past masked_m and in the trash bucket: by the kernel
            kernels.permute_masked(xq, xs, *pair_meta, top_k, a_buf, sa_buf, rows[0], rows[1],
                                   index.masked_m, copy_rows=copy_rows)
            return rows[0, :-1], rows[1, :-1]
    pair_token = torch.arange(num_pairs, device=xq.device) // top_k  # [P]
    where = (index.pair_expert, index.pair_rank)
    if copy_rows:
        a_buf.view(torch.uint8).index_put_(where, xq.view(torch.uint8)[pair_token])
    sa_buf.index_put_(where, xs[pair_token])
    experts_plus_trash, m_max = a_buf.shape[:2]
    row_token = torch.full((experts_plus_trash, m_max), -1, dtype=torch.int64, device=xq.device)
    row_token.index_put_(where, pair_token)
    row_slot = torch.full_like(row_token, -1)
    row_slot.index_put_(where, torch.arange(num_pairs, device=xq.device) % top_k)
    return row_token[:-1], row_slot[:-1]


def dispatch_masked_small(xq: torch.Tensor, xs: torch.Tensor, topk_idx: torch.Tensor,
                          topk_weights: Optional[torch.Tensor], expert_offset: int,
                          num_experts_local: int, m_max: int, num_valid_tokens,
                          a_buf: torch.Tensor, sa_buf: torch.Tensor, copy_rows: bool = True):
    """``masked_index_from_global`` then ``permute_masked`` in one kernel launch where
    ``MOE_FP8_SMALL_DISPATCH=1``, both would run their kernels, and the step has at most
    ``kSmallPairs`` pairs: ``(MaskedIndex, row_token, row_slot)``, the same values; else None
    (the caller takes the two steps)."""
    if not switch_on(kSmallDispatchEnv, kSmallDispatchDefault):
        return None
    kernels = _kernels()
    inputs = masked_index_kernel_inputs(topk_idx, num_experts_local, topk_weights, num_valid_tokens)
    if inputs is None or inputs[0].numel() > kernels.kSmallPairs:
        return None
    if not (_masked_buffers_fit(xq, xs, a_buf, sa_buf)
            and tuple(a_buf.shape[:2]) == (num_experts_local + 1, m_max)):
        return None
    ids, weights, valid = inputs
    rows = _row_maps(a_buf)
    fields = kernels.masked_dispatch_small(ids, num_experts_local, m_max, weights, expert_offset,
                                           topk_idx.shape[1], valid, xq, xs, a_buf, sa_buf,
                                           rows[0], rows[1], copy_rows=copy_rows)
    return MaskedIndex(*fields), rows[0, :-1], rows[1, :-1]


def decode_gather_wanted(xq: torch.Tensor, expected_rows: float) -> bool:
    """Whether the local dispatch leaves the rows unpermuted for the gate-up to gather
    (``MOE_FP8_DECODE_GATHER``; unset: up to kDecodeGatherMaxRows ``expected_rows`` per expert):
    fused kernels on this device, not the debug mode (its checks read the layout's rows), not
    while tracing."""
    return (switch_up_to_rows(kDecodeGatherEnv, expected_rows, kDecodeGatherMaxRows)
            and fused_enabled(xq) and not debug_mode() and not torch.compiler.is_compiling())


def combine_index_contiguous(index: ContiguousIndex, topk_weights: torch.Tensor) -> CombineIndex:
    tokens, top_k = topk_weights.shape
    weight = torch.where(index.pair_kept, topk_weights.reshape(-1).float(), 0.0)
    return CombineIndex(index.pair_row.view(tokens, top_k), weight.view(tokens, top_k))


def combine_index_masked(index: MaskedIndex, topk_weights: torch.Tensor, m_max: int) -> CombineIndex:
    """``index`` built by ``masked_index(..., topk_weights)`` on the fused path already carries
    the combine index (same values, no extra kernels); otherwise computed here."""
    tokens, top_k = topk_weights.shape
    if index.slot_row is not None and index.slot_weight is not None:
        return CombineIndex(index.slot_row.view(tokens, top_k), index.slot_weight.view(tokens, top_k))
    row = torch.where(index.pair_kept, index.pair_expert * m_max + index.pair_rank, 0)
    weight = torch.where(index.pair_kept, topk_weights.reshape(-1).float(), 0.0)
    return CombineIndex(row.view(tokens, top_k), weight.view(tokens, top_k))


def unpermute_combine(y_rows: torch.Tensor, index: CombineIndex, *, add: Optional[torch.Tensor] = None,
                      out: Optional[torch.Tensor] = None,
                      num_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[t] = add[t] + sum_j slot_weight[t, j] * y_rows[slot_row[t, j]]``, rounded once.

    ``y_rows [R, H]``: the experts' output rows flattened (R = M_sum or E_loc * M_max); every row
    a skipped pair points at (row 0, weight 0) must hold finite values. ``add [T, H]`` (shared
    experts' output) optional; ``out [T, H]`` optional (decode's static buffer, or an fp32 buffer).

    Per chunk of tokens: one gather of the k rows of each token ``[n, k, H]`` and one batched
    ``add + w @ rows`` (``baddbmm``: fp32 accumulation inside, one rounding of the result). The
    products run in ``y_rows``' dtype, so the weights are rounded to bf16 first (relative 2^-9,
    the same size as the output's own rounding); with an fp32 ``out`` everything runs in fp32.
    ``num_valid`` (an int64 device scalar, decode runners): the kernel leaves the rows of tokens at
    or past it as they were (nobody reads them); the torch path computes every row.
    """
    tokens, top_k = index.slot_row.shape
    hidden = y_rows.shape[1]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (y_rows, index.slot_weight, add)):
        return _unpermute_combine_differentiable(y_rows, index, add, out)
    dtype = out.dtype if out is not None else y_rows.dtype
    compute = y_rows.dtype if dtype == y_rows.dtype else torch.float32
    if y_rows.shape[0] > 0 and top_k > 0 and tokens > 0 and fused_enabled(y_rows):
        kernels = _kernels()
        if kernels.supports_combine(y_rows, index.slot_row, index.slot_weight, add, out):
            result = out if out is not None else \
                torch.empty(tokens, hidden, dtype=y_rows.dtype, device=y_rows.device)
            valid = num_valid if (isinstance(num_valid, torch.Tensor) and num_valid.dim() == 0
                                  and num_valid.dtype == torch.int64
                                  and num_valid.device == y_rows.device) else None
            kernels.combine(y_rows, index.slot_row, index.slot_weight, add, result, valid)
            return result
    result = out if out is not None and out.dtype == compute else \
        torch.empty(tokens, hidden, dtype=compute, device=y_rows.device)
    if y_rows.shape[0] == 0 or top_k == 0:  # nothing routed here: only the shared part
        if add is not None:
            result.copy_(add)
        else:
            result.zero_()
        tokens = 0
    chunk = max(1, kCombineChunkElems // max(1, top_k * hidden))
    for t0 in range(0, tokens, chunk):
        t1 = min(t0 + chunk, tokens)
        rows = torch.index_select(y_rows, 0, index.slot_row[t0:t1].reshape(-1))  # [n * k, H]
        rows = rows.view(t1 - t0, top_k, hidden).to(compute)  # [n, k, H]
        weights = index.slot_weight[t0:t1].unsqueeze(1).to(compute)  # [n, 1, k]
        target = result[t0:t1].unsqueeze(1)  # [n, 1, H] view of the output
        if add is None:
            torch.bmm(weights, rows, out=target)
        else:
            torch.baddbmm(add[t0:t1].unsqueeze(1).to(compute), weights, rows, out=target)
    if out is None or result is out:
        return result
    return out.copy_(result)


class _Combine(torch.autograd.Function):
    """Training's combine: the forward is the inference combine (the kernel on Hopper: fp32
    accumulation, the weights rounded to ``y_rows``' dtype, one rounding). The backward reads
    each tensor once, without an fp32 copy of the gathered rows:

    * ``d_y_rows[r] = w(r) * d_out[token(r)]`` for the row r of each slot with a nonzero weight
      (skipped slots point at row 0 with weight 0; a weight-0 slot's row gets 0 either way; other
      rows 0): one gather of ``d_out`` rows and one scale, no scatter-add (a row belongs to one
      slot);
    * ``d_weight[t, j] = <d_out[t], y_rows[row(t, j)]>``: the bf16 rows gathered once and a batched
      product with fp32 output (``bmm`` with ``out_dtype`` on CUDA);
    * ``d_add = d_out``.
    """

    @staticmethod
    def forward(ctx, y_rows, slot_row, slot_weight, add):
        ctx.save_for_backward(y_rows, slot_row, slot_weight)
        ctx.add_dtype = add.dtype if add is not None else None
        # (grad mode is off inside forward: this takes the non-differentiable branch)
        return unpermute_combine(y_rows, CombineIndex(slot_row, slot_weight), add=add)

    @staticmethod
    def backward(ctx, d_out):
        y_rows, slot_row, slot_weight = ctx.saved_tensors
        tokens, top_k = slot_row.shape
        d_out = d_out.to(y_rows.dtype).contiguous()
        d_rows = d_weight = None
        if ctx.needs_input_grad[0]:
            # each slot's row; slots without a row (weight 0: skipped slots share row 0 with a
            # real one) go to a trash entry. A scatter, not a boolean mask: no host sync on CUDA
            num_rows = y_rows.shape[0]
            target = torch.where(slot_weight.reshape(-1) != 0, slot_row.reshape(-1), num_rows)
            token = torch.arange(tokens * top_k, device=slot_row.device) // top_k
            row_token = torch.zeros(num_rows + 1, dtype=torch.int64, device=y_rows.device)
            row_token.scatter_(0, target, token)
            row_weight = torch.zeros(num_rows + 1, dtype=y_rows.dtype, device=y_rows.device)
            row_weight.scatter_(0, target, slot_weight.reshape(-1).to(y_rows.dtype))  # as the forward
            d_rows = d_out.index_select(0, row_token[:num_rows]).mul_(row_weight[:num_rows, None])
        if ctx.needs_input_grad[2]:
            gathered = y_rows.index_select(0, slot_row.reshape(-1)).view(tokens, top_k, -1)
            # (skipped slots get <d_out, row 0> here: the caller's where(kept, w, 0) drops it)
            d_weight = _bmm_wide(gathered, d_out.unsqueeze(2)).squeeze(2).to(slot_weight.dtype)
        d_add = d_out.to(ctx.add_dtype) if ctx.needs_input_grad[3] else None
        return d_rows, None, d_weight, d_add


_bmm_out_dtype = [hasattr(torch.ops.aten.bmm, "dtype")]  # bmm(bf16, bf16) -> fp32 on CUDA


def _bmm_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched) accumulated and returned in at least fp32: on CUDA ``bmm`` with
    ``out_dtype`` reads the bf16 operands as they are; otherwise (or if this build lacks it) the
    operands are widened first."""
    wide = torch.promote_types(a.dtype, torch.float32)
    if a.is_cuda and wide != a.dtype and _bmm_out_dtype[0]:
        try:
            return torch.bmm(a, b, out_dtype=wide)
        except (RuntimeError, TypeError, NotImplementedError):
            _bmm_out_dtype[0] = False  # not in this build: widen from now on
    return torch.bmm(a.to(wide), b.to(wide))


def _unpermute_combine_differentiable(y_rows, index: CombineIndex, add, out):
    """Training (autograd reaches the experts' rows, the top-k weights — the router's gradient —
    and ``add``): ``_Combine``; ``out`` (if given) receives a copy."""
    y = _Combine.apply(y_rows, index.slot_row, index.slot_weight, add)
    return y if out is None else out.copy_(y)
