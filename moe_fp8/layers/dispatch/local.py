"""The single-GPU dispatcher: no communication, only the permutation (an EP group of one).

It can also stand for one rank's share of an expert-parallel layer without the exchange
(``expert_offset``/``num_experts_local``): pairs routed to other experts are skipped, which is
how the benchmark measures "one GPU holding 32 of 256 experts".

Host syncs: ``dispatch_contiguous`` reads ``M_sum`` back once (the layout's size depends on the
routing) with ``contiguous_rows="exact"``; ``"upper_bound"`` sizes the layout for any routing (no
sync; the extra rows, up to E_loc x 127, are padding the GEMMs skip); ``"auto"`` (default) takes
the bound on a GPU and the exact size on the CPU (the references' cost follows the rows). The bound
measured faster at every size on an H100, with the same bits: 4539 -> 4113 us per prefill layer
at 4096 tokens (2026-12-05); 256 / 512 / 1024 / 2048 / 4096 tokens -66 / -33 / -198 / -162 / -108 us
(session 33, ``experiments/contiguous_rows_ab.py``; until then the sizes below ~2032 tokens on 32
experts synced). With ``num_valid_tokens`` (the graph runner's prefill-sized steps) the bound is
taken always. The masked pair never syncs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..layouts import (CombineIndex, ContiguousLayout, MaskedBuffers, MaskedLayout,
                       contiguous_index, local_expert_ids, masked_index,
                       masked_index_from_global, upper_bound_rows,
                       local_expert_ids_with_shared)
from ..permute import (combine_index_contiguous, combine_index_masked, decode_gather_wanted,
                       dispatch_masked_small, permute_contiguous, permute_masked,
                       unpermute_combine)
from ..router import fused_router_switch_on
from .base import Dispatcher


@dataclass
class LocalHandle:
    combine: CombineIndex  # where each (token, slot) result lives and its weight
    num_tokens: int  # T_local
    y_rows_shape: tuple  # the experts' output the combine expects: (M_sum, H) or (E_loc, M_max, H)
    pair_kept: Optional[torch.Tensor] = None  # bool [T, k]: the pair has a row (contiguous layout)
    num_valid: Optional[torch.Tensor] = None  # int64 device scalar (masked, decode runner): the
    # combine skips the tokens at or past it

    def check(self, y_rows: torch.Tensor) -> None:
        if tuple(y_rows.shape) != self.y_rows_shape:
            raise ValueError(f"y_rows must be {list(self.y_rows_shape)}, got {tuple(y_rows.shape)}")


class LocalDispatcher(Dispatcher):
    def __init__(self, num_experts_global: int, hidden_size: int, top_k: int, *,
                 num_experts_local: Optional[int] = None, expert_offset: int = 0,
                 pow2_scale: bool = False, contiguous_rows: str = "auto"):
        if contiguous_rows not in ("auto", "exact", "upper_bound"):
            raise ValueError(f"contiguous_rows must be 'auto', 'exact' or 'upper_bound', got {contiguous_rows!r}")
        if num_experts_local is None:
            num_experts_local = num_experts_global
        if isinstance(num_experts_local, bool) or not isinstance(num_experts_local, int) \
                or num_experts_local <= 0:
            raise ValueError(f"num_experts_local must be a positive int, got {num_experts_local!r}")
        self.num_experts_global = num_experts_global
        self.num_experts_local = num_experts_local
        self.expert_offset = expert_offset
        if not 0 <= expert_offset <= num_experts_global - self.num_experts_local:
            raise ValueError(f"expert_offset {expert_offset} + num_experts_local "
                             f"{self.num_experts_local} exceeds num_experts_global {num_experts_global}")
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.pow2_scale = pow2_scale
        self.contiguous_rows = contiguous_rows

    # ------------------------------------------------------------------ contiguous
    def dispatch_contiguous(self, x_local, topk_idx, topk_weights, *, num_valid_tokens=None,
                            shared_expert: bool = False):
        """``num_valid_tokens`` (an int64 device scalar, the graph runner's prefill-sized steps):
        every shape is fixed by T instead — the layout sized by its upper bound whatever
        ``contiguous_rows`` says, so nothing syncs and the step can be captured — and the tokens
        at or past it are routed nowhere (no rows; the combine leaves their output rows as they
        were). ``shared_expert``: every token also goes to local expert ``E_loc`` at weight 1 (the
        shared expert stacked after the routed ones, ``MoE``'s fold): the layout has ``E_loc + 1``
        experts and the combine sums ``k + 1`` rows per token."""
        xq, xs = self.tokens_in(x_local)
        self.check_routing(xq.shape[0], topk_idx, topk_weights)
        experts, top_k = self.num_experts_local, self.top_k
        if shared_expert:
            local_ids, topk_weights = local_expert_ids_with_shared(
                topk_idx, topk_weights, self.expert_offset, experts, num_valid_tokens)
            experts, top_k = experts + 1, top_k + 1
        else:
            local_ids = local_expert_ids(topk_idx, self.expert_offset, experts, num_valid_tokens)
        rows = None
        bound = num_valid_tokens is not None or self.contiguous_rows == "upper_bound" or (
            self.contiguous_rows == "auto" and xq.is_cuda)
        if bound:
            rows = upper_bound_rows(local_ids.numel(), experts)
        index = contiguous_index(local_ids, experts, rows)
        a, sa, row_token, row_slot = permute_contiguous(xq, xs, index, top_k)
        layout = ContiguousLayout(a, sa, index.m_indices, row_token, row_slot,
                                  index.tokens_per_expert, index.num_rows)
        handle = LocalHandle(combine_index_contiguous(index, topk_weights), xq.shape[0],
                             (index.num_rows, self.hidden_size),
                             index.pair_kept.view(topk_weights.shape),
                             num_valid=num_valid_tokens if isinstance(num_valid_tokens, torch.Tensor)
                             else None)
        return layout, handle

    def combine_contiguous(self, y_rows, handle: LocalHandle, *, add=None, out=None):
        handle.check(y_rows)
        return unpermute_combine(y_rows, handle.combine, add=add, out=out,
                                 num_valid=handle.num_valid)

    # ------------------------------------------------------------------ masked
    def dispatch_masked(self, x_local, topk_idx, topk_weights, *, max_tokens_per_expert: int,
                        num_valid_tokens=None, out: Optional[MaskedBuffers] = None):
        xq, xs = self.tokens_in(x_local)
        self.check_routing(xq.shape[0], topk_idx, topk_weights)
        m_max, out = self._masked_buffers(xq, max_tokens_per_expert, out)
        # NOTE: the masked index kernel writing the combine index too (4 fewer kernels per decode
        # graph) is new since the last GPU run: it rides on the router kernels' switch until then
        weights = topk_weights if fused_router_switch_on() else None
        # MOE_FP8_DECODE_GATHER: no fp8 row copied; the layout names the rows' tokens instead
        gather = decode_gather_wanted(xq, self.expected_rows(xq.shape[0]))
        small = dispatch_masked_small(xq, xs, topk_idx, weights, self.expert_offset,
                                      self.num_experts_local, m_max, num_valid_tokens, out.a, out.sa,
                                      copy_rows=not gather)
        if small is not None:
            index, row_token, row_slot = small
        else:
            index = masked_index_from_global(topk_idx, self.expert_offset, self.num_experts_local,
                                             m_max, weights, num_valid_tokens)
            if index is None:
                local_ids = local_expert_ids(topk_idx, self.expert_offset, self.num_experts_local,
                                             num_valid_tokens)
                index = masked_index(local_ids, self.num_experts_local, m_max, weights)
            row_token, row_slot = permute_masked(xq, xs, index, self.top_k, out.a, out.sa,
                                                 copy_rows=not gather)
        layout, handle = self._masked_result(xq.shape[0], index, row_token, row_slot, out,
                                             topk_weights, m_max, num_valid_tokens)
        if gather:
            layout.token_source = (xq, row_token)
        return layout, handle

    def _masked_buffers(self, xq, max_tokens_per_expert, out):
        """-> (M_max, the layout's buffers: ``out`` checked, or new ones)."""
        m_max = self.check_max_tokens_per_expert(max_tokens_per_expert)
        if out is None:
            out = MaskedBuffers.allocate(self.num_experts_local, m_max, self.hidden_size, xq.device)
        elif tuple(out.a.shape) != (self.num_experts_local + 1, m_max, self.hidden_size):
            raise ValueError(f"out.a must be [E_loc + 1, M_max, H] = "
                             f"{[self.num_experts_local + 1, m_max, self.hidden_size]}, got {tuple(out.a.shape)}")
        return m_max, out

    def _masked_result(self, num_tokens, index, row_token, row_slot, out, topk_weights, m_max,
                       num_valid_tokens):
        experts = self.num_experts_local
        layout = MaskedLayout(out.a[:experts], out.sa[:experts], index.masked_m,
                              self.expected_m(num_tokens), row_token, row_slot, index.num_overflow,
                              self.expected_rows(num_tokens))
        handle = LocalHandle(combine_index_masked(index, topk_weights, m_max), num_tokens,
                             (self.num_experts_local, m_max, self.hidden_size),
                             num_valid=num_valid_tokens if isinstance(num_valid_tokens, torch.Tensor)
                             else None)
        return layout, handle

    def combine_masked(self, y_rows, handle: LocalHandle, *, add=None, out=None):
        handle.check(y_rows)
        return unpermute_combine(y_rows.flatten(0, 1), handle.combine, add=add, out=out,
                                 num_valid=handle.num_valid)
