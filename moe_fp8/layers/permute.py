"""Token permutation with FP8 quantisation fused in, and the weighted un-permute (combine).

NOTE: these are the torch versions, written as the kernels will be: the permute is one
quantisation of the T source tokens plus one gather (contiguous) / scatter (masked) of fp8 rows
and their scales (quantising per token before the copy gives bit-identical rows to quantising
after it, at 1/k of the work, and never writes a bf16 copy of the permuted tokens); the combine
is one gather-and-weighted-sum per token. FUSED KERNEL GOES HERE: both are memory-bound passes
that a single kernel each can do at copy bandwidth (reading x once / y_rows once).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import gemm as G
from ..gemm.layout import empty_act_scales
from .layouts import CombineIndex, ContiguousIndex, MaskedIndex

kOneShotCombineElems = 1 << 24  # T*k*H up to this: one [T, k, H] fp32 gather (64 MiB), else k passes


def quantize_tokens(x: torch.Tensor, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [T, H]`` bf16 -> ``(fp8 [T, H], fp32 [T, H/128] MN-major)``: 1x128 per-token scales."""
    return G.per_token_group_quant_fp8(x, 128, pow2_scale=pow2_scale)


def permute_contiguous(xq: torch.Tensor, xs: torch.Tensor, index: ContiguousIndex, top_k: int):
    """Gather quantised tokens into the contiguous layout -> ``(a [M_sum, H], sa [M_sum, H/128])``.

    Padding rows copy token 0 (finite values; the GEMM does not read them for output).
    Also returns ``row_token``/``row_slot`` int64 ``[M_sum]`` (-1 on padding rows).
    """
    num_rows, groups = index.num_rows, xs.shape[1]
    valid = index.row_pair >= 0
    row_token = torch.where(valid, index.row_pair // top_k, -1)  # [M_sum]
    row_slot = torch.where(valid, index.row_pair % top_k, -1)  # [M_sum]
    if num_rows == 0:
        return xq[:0], empty_act_scales(0, groups, device=xq.device), row_token, row_slot
    source = row_token.clamp(min=0)  # [M_sum]
    a = torch.index_select(xq.view(torch.uint8), 0, source).view(xq.dtype)  # [M_sum, H] fp8 bytes
    # M_sum % 128 == 0, so the MN-major storage [H/128, M_sum] has no row padding
    sa_storage = torch.empty(groups, num_rows, dtype=torch.float32, device=xq.device)
    torch.index_select(xs.t(), 1, source, out=sa_storage)  # xs.t(): [H/128, T] view
    return a, sa_storage.t(), row_token, row_slot


def permute_masked(xq: torch.Tensor, xs: torch.Tensor, index: MaskedIndex, top_k: int,
                   a_buf: torch.Tensor, sa_buf: torch.Tensor):
    """Scatter quantised tokens into masked buffers ``a_buf [E_loc + 1, M_max, H]`` /
    ``sa_buf [E_loc + 1, M_max, H/128]`` (last expert = trash for skipped pairs).

    Returns ``row_token``/``row_slot`` int64 ``[E_loc, M_max]`` (-1 on unused rows). No host sync.
    """
    num_pairs = index.pair_expert.numel()
    pair_token = torch.arange(num_pairs, device=xq.device) // top_k  # [P]
    where = (index.pair_expert, index.pair_rank)
    a_buf.view(torch.uint8).index_put_(where, xq.view(torch.uint8)[pair_token])
    sa_buf.index_put_(where, xs[pair_token])
    experts_plus_trash, m_max = a_buf.shape[:2]
    row_token = torch.full((experts_plus_trash, m_max), -1, dtype=torch.int64, device=xq.device)
    row_token.index_put_(where, pair_token)
    row_slot = torch.full_like(row_token, -1)
    row_slot.index_put_(where, torch.arange(num_pairs, device=xq.device) % top_k)
    return row_token[:-1], row_slot[:-1]


def combine_index_contiguous(index: ContiguousIndex, topk_weights: torch.Tensor) -> CombineIndex:
    tokens, top_k = topk_weights.shape
    weight = torch.where(index.pair_kept, topk_weights.reshape(-1).float(), 0.0)
    return CombineIndex(index.pair_row.view(tokens, top_k), weight.view(tokens, top_k))


def combine_index_masked(index: MaskedIndex, topk_weights: torch.Tensor, m_max: int) -> CombineIndex:
    tokens, top_k = topk_weights.shape
    row = torch.where(index.pair_kept, index.pair_expert * m_max + index.pair_rank, 0)
    weight = torch.where(index.pair_kept, topk_weights.reshape(-1).float(), 0.0)
    return CombineIndex(row.view(tokens, top_k), weight.view(tokens, top_k))


def unpermute_combine(y_rows: torch.Tensor, index: CombineIndex, *, add: Optional[torch.Tensor] = None,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[t] = add[t] + sum_j slot_weight[t, j] * y_rows[slot_row[t, j]]`` in fp32, rounded once.

    ``y_rows [R, H]`` bf16: the experts' output rows flattened (R = M_sum or E_loc * M_max); every
    row a skipped pair points at (row 0, weight 0) must hold finite values. ``add [T, H]``
    (shared experts' output) optional; ``out [T, H]`` optional (decode's static buffer).
    """
    tokens, top_k = index.slot_row.shape
    hidden = y_rows.shape[1]
    acc = add.to(torch.float32, copy=True) if add is not None else torch.zeros(tokens, hidden,
                                                        dtype=torch.float32, device=y_rows.device)
    if tokens and y_rows.shape[0]:
        if tokens * top_k * hidden <= kOneShotCombineElems:
            # small batches (decode): one gather + one batched FMA, few kernels in the graph
            rows = torch.index_select(y_rows, 0, index.slot_row.view(-1)).view(tokens, top_k, hidden)
            acc.unsqueeze(1).baddbmm_(index.slot_weight.unsqueeze(1), rows.float())
        else:
            for slot in range(top_k):  # large batches: k gather-FMAs of [T, H], no [T, k, H] copy
                rows = torch.index_select(y_rows, 0, index.slot_row[:, slot])  # [T, H]
                acc.addcmul_(rows.float(), index.slot_weight[:, slot, None])
    if out is None:
        return acc.to(y_rows.dtype)
    return out.copy_(acc)
