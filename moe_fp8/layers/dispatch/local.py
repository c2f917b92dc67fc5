"""The single-GPU dispatcher: no communication, only the permutation (an EP group of one).

It can also stand for one rank's share of an expert-parallel layer without the exchange
(``expert_offset``/``num_experts_local``): pairs routed to other experts are skipped, which is
how the benchmark measures "one GPU holding 32 of 256 experts".

Host syncs: ``dispatch_contiguous`` reads ``M_sum`` back once (the layout's size depends on the
routing) unless built with ``contiguous_rows="upper_bound"``; the masked pair never syncs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..layouts import (CombineIndex, ContiguousLayout, MaskedBuffers, MaskedLayout,
                       contiguous_index, local_expert_ids, masked_index, upper_bound_rows)
from ..permute import (combine_index_contiguous, combine_index_masked, permute_contiguous,
                       permute_masked, quantize_tokens, unpermute_combine)
from .base import Dispatcher, TokensIn


@dataclass
class LocalHandle:
    combine: CombineIndex  # where each (token, slot) result lives and its weight
    num_tokens: int  # T_local


class LocalDispatcher(Dispatcher):
    def __init__(self, num_experts_global: int, hidden_size: int, top_k: int, *,
                 num_experts_local: Optional[int] = None, expert_offset: int = 0,
                 pow2_scale: bool = False, contiguous_rows: str = "exact"):
        if contiguous_rows not in ("exact", "upper_bound"):
            raise ValueError(f"contiguous_rows must be 'exact' or 'upper_bound', got {contiguous_rows!r}")
        self.num_experts_global = num_experts_global
        self.num_experts_local = num_experts_local or num_experts_global
        self.expert_offset = expert_offset
        if not 0 <= expert_offset <= num_experts_global - self.num_experts_local:
            raise ValueError(f"expert_offset {expert_offset} + num_experts_local "
                             f"{self.num_experts_local} exceeds num_experts_global {num_experts_global}")
        self.hidden_size = hidden_size
        self.top_k = top_k
        self.pow2_scale = pow2_scale
        self.contiguous_rows = contiguous_rows

    # ------------------------------------------------------------------ helpers
    def _quantized(self, x_local: TokensIn):
        if isinstance(x_local, (tuple, list)):
            return x_local
        if x_local.dim() != 2 or x_local.shape[1] != self.hidden_size:
            raise ValueError(f"x_local must be [T, {self.hidden_size}], got {tuple(x_local.shape)}")
        return quantize_tokens(x_local, self.pow2_scale)

    def _check_routing(self, xq, topk_idx, topk_weights) -> None:
        expected = (xq.shape[0], self.top_k)
        if tuple(topk_idx.shape) != expected or tuple(topk_weights.shape) != expected:
            raise ValueError(f"topk_idx and topk_weights must be {list(expected)} ([T, top_k]), got "
                             f"{tuple(topk_idx.shape)} and {tuple(topk_weights.shape)}")
        if topk_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"topk_idx must be int32/int64, got {topk_idx.dtype}")

    # ------------------------------------------------------------------ contiguous
    def dispatch_contiguous(self, x_local, topk_idx, topk_weights):
        xq, xs = self._quantized(x_local)
        self._check_routing(xq, topk_idx, topk_weights)
        local_ids = local_expert_ids(topk_idx, self.expert_offset, self.num_experts_local)
        rows = None
        if self.contiguous_rows == "upper_bound":
            rows = upper_bound_rows(local_ids.numel(), self.num_experts_local)
        index = contiguous_index(local_ids, self.num_experts_local, rows)
        a, sa, row_token, row_slot = permute_contiguous(xq, xs, index, self.top_k)
        layout = ContiguousLayout(a, sa, index.m_indices, row_token, row_slot,
                                  index.tokens_per_expert, index.num_rows)
        return layout, LocalHandle(combine_index_contiguous(index, topk_weights), xq.shape[0])

    def combine_contiguous(self, y_rows, handle: LocalHandle, *, add=None):
        return unpermute_combine(y_rows, handle.combine, add=add)

    # ------------------------------------------------------------------ masked
    def dispatch_masked(self, x_local, topk_idx, topk_weights, *, max_tokens_per_expert: int,
                        num_valid_tokens=None, out: Optional[MaskedBuffers] = None):
        xq, xs = self._quantized(x_local)
        self._check_routing(xq, topk_idx, topk_weights)
        m_max = max_tokens_per_expert
        if out is None:
            out = MaskedBuffers.allocate(self.num_experts_local, m_max, self.hidden_size, xq.device)
        elif tuple(out.a.shape) != (self.num_experts_local + 1, m_max, self.hidden_size):
            raise ValueError(f"out.a must be [E_loc + 1, M_max, H] = "
                             f"{[self.num_experts_local + 1, m_max, self.hidden_size]}, got {tuple(out.a.shape)}")
        local_ids = local_expert_ids(topk_idx, self.expert_offset, self.num_experts_local,
                                     num_valid_tokens)
        index = masked_index(local_ids, self.num_experts_local, m_max)
        row_token, row_slot = permute_masked(xq, xs, index, self.top_k, out.a, out.sa)
        experts = self.num_experts_local
        layout = MaskedLayout(out.a[:experts], out.sa[:experts], index.masked_m,
                              self.expected_m(xq.shape[0]), row_token, row_slot, index.num_overflow)
        handle = LocalHandle(combine_index_masked(index, topk_weights, m_max), xq.shape[0])
        return layout, handle

    def combine_masked(self, y_rows, handle: LocalHandle, *, add=None, out=None):
        return unpermute_combine(y_rows.flatten(0, 1), handle.combine, add=add, out=out)
