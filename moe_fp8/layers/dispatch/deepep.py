"""DeepEP backend: ``deep_ep.Buffer`` moves the tokens, our layouts and combine weights stay the same.

Which DeepEP call serves which path:

* prefill: ``Buffer.get_dispatch_layout`` + ``Buffer.dispatch`` (normal mode, NVLink) with the
  tokens already FP8 (``(fp8 [T, H], fp32 [T, H/128])``). DeepEP returns, per received token,
  ``recv_topk_idx [S, k]`` as **local** expert ids (-1 = an expert of another rank),
  ``recv_topk_weights [S, k]`` and ``num_recv_tokens_per_expert_list`` (a host list: DeepEP has
  already waited for the counts on the CPU: that is this path's host sync).
  ``contiguous_from_normal`` turns them into our ``ContiguousLayout``.
* prefill combine: DeepEP's normal ``Buffer.combine`` is an **unweighted** sum over ranks, so the
  weighted reduce over a token's local experts happens here first (``unpermute_combine`` with the
  received weights, the same as the torch.distributed backend); DeepEP then adds the per-rank
  partials on the source rank, and the shared experts' ``add`` is added last.
* decode: ``Buffer.low_latency_dispatch`` quantises bf16 tokens itself and returns
  ``packed_recv_x`` (fp8 ``[E_loc, R * T_max, H]``, scales fp32 of the same shape with the last
  two dims column-major, i.e. our MN-major batched layout) and ``packed_recv_count`` int32
  ``[E_loc]``: already the masked layout (``masked_from_low_latency``), ``M_max = R * T_max``.
* decode combine: ``Buffer.low_latency_combine`` is **weighted** (it takes ``topk_idx`` and
  ``topk_weights``), so the expert rows go in as they are.

The conversions are pure functions, tested on CPU with tensors shaped as DeepEP returns them
(``tests/test_deepep_convert.py``, which also drives this dispatcher through an in-process fake
of the Buffer API). This module imports without ``deep_ep``; building a Buffer needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch

from ...gemm.layout import align, is_mn_major, kSegmentAlign, to_mn_major
from ..layouts import (FP8, CombineIndex, ContiguousLayout, MaskedLayout, contiguous_index)
from ..permute import (combine_index_contiguous, permute_contiguous, quantize_tokens,
                       unpermute_combine)
from ..placement import ExpertPlacement
from .base import Dispatcher, TokensIn


def deep_ep_available() -> bool:
    import importlib
    try:
        importlib.import_module("deep_ep")  # its import loads deep_ep_cpp: a real check
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------- conversions

def contiguous_from_normal(recv_x, recv_topk_idx: torch.Tensor, recv_topk_weights: torch.Tensor,
                           num_recv_tokens_per_expert_list: List[int]):
    """Normal-mode ``Buffer.dispatch`` outputs -> ``(ContiguousLayout, CombineIndex [S, k])``.

    ``recv_x = (fp8 [S, H], fp32 [S, H/128])``; ``recv_topk_idx`` int ``[S, k]`` local ids, -1 for
    other ranks' experts (their weights are ignored, whatever DeepEP left there);
    ``num_recv_tokens_per_expert_list`` host ints ``[E_loc]`` (exact or already aligned: only
    ``M_sum = sum(align(count, 128))`` is read from it, so no device sync here).
    """
    recv_xq, recv_xs = recv_x
    experts_local = len(num_recv_tokens_per_expert_list)
    top_k = recv_topk_idx.shape[1]
    local_ids = recv_topk_idx.long()
    local_ids = torch.where((local_ids >= 0) & (local_ids < experts_local), local_ids, experts_local)
    num_rows = sum(align(int(c), kSegmentAlign) for c in num_recv_tokens_per_expert_list)
    index = contiguous_index(local_ids, experts_local, num_rows)
    a, sa, row_token, row_slot = permute_contiguous(recv_xq, recv_xs, index, top_k)
    layout = ContiguousLayout(a, sa, index.m_indices, row_token, row_slot, index.tokens_per_expert, num_rows)
    return layout, combine_index_contiguous(index, recv_topk_weights.float())


def normal_combine_input(y_rows: torch.Tensor, recv_combine: CombineIndex) -> torch.Tensor:
    """``y_rows [M_sum, H]`` -> ``[S, H]`` bf16: each received token's weighted sum over its local
    experts, the input of DeepEP's (unweighted) normal combine."""
    return unpermute_combine(y_rows, recv_combine).to(torch.bfloat16)


def masked_from_low_latency(packed_recv_x, packed_recv_count: torch.Tensor, expected_m: int,
                            packed_recv_src_info: Optional[torch.Tensor] = None) -> MaskedLayout:
    """``Buffer.low_latency_dispatch`` outputs -> ``MaskedLayout`` (no copy when ``M_max % 4 == 0``).

    ``packed_recv_x = (fp8 [E_loc, M_max, H], fp32 [E_loc, M_max, H/128] with the last two dims
    column-major)``; ``packed_recv_count`` int ``[E_loc]`` = ``masked_m``;
    ``packed_recv_src_info`` int32 ``[E_loc, M_max]`` (the handle's first item): each row's token
    index on its source rank, used for ``row_token`` (the source rank is not kept; ``row_slot``
    is -1: DeepEP does not return it).
    """
    a, sa = packed_recv_x
    experts_local, m_max = a.shape[:2]
    # NOTE: DeepEP's column-major scales are our MN-major layout when M_max is a multiple of 4
    # (16-byte TMA strides); otherwise the GEMM would copy them anyway, so copy once here.
    sa = sa if is_mn_major(sa) else to_mn_major(sa)
    masked_m = packed_recv_count.to(torch.int32)
    live = torch.arange(m_max, device=a.device)[None, :] < masked_m[:, None].long()  # [E_loc, M_max]
    if packed_recv_src_info is not None:
        row_token = torch.where(live, packed_recv_src_info.long(), -1)
    else:
        row_token = torch.full((experts_local, m_max), -1, dtype=torch.int64, device=a.device)
    row_slot = torch.full_like(row_token, -1)
    num_overflow = torch.zeros((), dtype=torch.int64, device=a.device)  # DeepEP sizes M_max = R * T_max
    return MaskedLayout(a, sa, masked_m, expected_m, row_token, row_slot, num_overflow)


def dequantize_tokens(xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``(fp8 [T, H], fp32 [T, H/128])`` -> bf16 ``[T, H]`` (for DeepEP's low-latency dispatch,
    which takes bf16 and quantises itself: rows then match ours to one fp8 rounding, not bits)."""
    return (xq.float() * xs.float().repeat_interleave(128, dim=1)).to(torch.bfloat16)


def add_shared(combined: torch.Tensor, add: Optional[torch.Tensor], out: Optional[torch.Tensor] = None):
    """``combined + add`` in fp32, rounded once; into ``out`` if given."""
    result = combined if add is None else (combined.float() + add.float()).to(combined.dtype)
    return result if out is None else out.copy_(result)


# ---------------------------------------------------------------------------- handles

@dataclass
class NormalHandle:
    deep_handle: Any  # DeepEP's dispatch handle (for Buffer.combine)
    recv_combine: CombineIndex  # [S, k]: rows of each received token in y_rows, with weights
    num_rows: int


@dataclass
class LowLatencyHandle:
    deep_handle: Any  # DeepEP's low-latency handle (for Buffer.low_latency_combine)
    topk_idx: torch.Tensor  # int64 [T, k] as dispatched (-1 for tokens beyond num_valid_tokens)
    topk_weights: torch.Tensor  # fp32 [T, k]
    max_tokens_per_expert: int


# ---------------------------------------------------------------------------- the dispatcher

class DeepEPDispatcher(Dispatcher):
    """Dispatcher on DeepEP buffers. ``max_tokens_per_rank``: the low-latency capacity
    (``num_max_dispatch_tokens_per_rank``, the same on every rank; decode batches must not exceed
    it); ``buffer`` / ``low_latency_buffer``: existing ``deep_ep.Buffer`` objects (or fakes with
    the same methods), built lazily from ``ep_group`` when not given.

    ``dispatch_masked(out=...)`` is ignored: DeepEP returns its own receive buffers (stable
    across CUDA-graph replays as DeepEP documents), so nothing is copied into ours.
    """

    def __init__(self, cfg, ep_group=None, *, max_tokens_per_rank: int = 128, buffer=None,
                 low_latency_buffer=None):
        self.group = ep_group
        source = buffer if buffer is not None else low_latency_buffer
        if source is not None:
            ep_size, ep_rank = source.group_size, source.rank
        else:
            if not deep_ep_available():
                raise ImportError("the 'deepep' EP backend needs the deep_ep package "
                                  "(https://github.com/deepseek-ai/DeepEP); use backend='torch'")
            import torch.distributed as dist
            ep_size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
        self.placement = ExpertPlacement(cfg.num_experts, ep_size, ep_rank)
        self.ep_size, self.ep_rank = ep_size, ep_rank
        self.num_experts_global = cfg.num_experts
        self.num_experts_local = self.placement.num_experts_local
        self.expert_offset = self.placement.expert_offset
        self.hidden_size, self.top_k, self.pow2_scale = cfg.hidden_size, cfg.top_k, cfg.pow2_scale
        if isinstance(max_tokens_per_rank, bool) or not isinstance(max_tokens_per_rank, int) \
                or max_tokens_per_rank <= 0:
            raise ValueError(f"max_tokens_per_rank must be a positive int, got {max_tokens_per_rank!r}")
        self.max_tokens_per_rank = max_tokens_per_rank
        self._buffer, self._ll_buffer = buffer, low_latency_buffer

    # ------------------------------------------------------------------ buffers
    def normal_buffer(self):
        if self._buffer is None:
            from deep_ep import Buffer
            hidden_bytes = self.hidden_size * 2  # the combine moves bf16, the larger of the two
            nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, self.ep_size)
                            for config in (Buffer.get_dispatch_config(self.ep_size),
                                           Buffer.get_combine_config(self.ep_size)))
            self._buffer = Buffer(self.group, nvl_bytes, 0)
        return self._buffer

    def low_latency_buffer(self):
        if self._ll_buffer is None:
            from deep_ep import Buffer
            rdma_bytes = Buffer.get_low_latency_rdma_size_hint(
                self.max_tokens_per_rank, self.hidden_size, self.ep_size, self.num_experts_global)
            self._ll_buffer = Buffer(self.group, 0, rdma_bytes, low_latency_mode=True,
                                     num_qps_per_rank=self.num_experts_local)
        return self._ll_buffer

    # ------------------------------------------------------------------ sizes
    def max_tokens_per_expert(self, max_tokens_local: int) -> int:
        """DeepEP's fixed low-latency layout: ``R * max_tokens_per_rank`` rows per local expert."""
        if max_tokens_local > self.max_tokens_per_rank:
            raise ValueError(f"{max_tokens_local} tokens per rank exceed this DeepEP dispatcher's "
                             f"max_tokens_per_rank={self.max_tokens_per_rank}")
        return self.ep_size * self.max_tokens_per_rank

    def expected_rows(self, num_tokens_local: int) -> float:
        return self.ep_size * num_tokens_local * self.top_k / self.num_experts_global

    def expected_m(self, num_tokens_local: int) -> int:
        rows = self.ep_size * num_tokens_local * self.top_k
        return max(1, -(-rows // self.num_experts_global))

    # ------------------------------------------------------------------ checks
    def _routing(self, tokens: int, topk_idx, topk_weights, num_valid_tokens=None):
        self.check_routing(tokens, topk_idx, topk_weights)
        idx = topk_idx.long()
        if num_valid_tokens is not None:
            token = torch.arange(tokens, device=idx.device)
            idx = idx.masked_fill((token >= num_valid_tokens).unsqueeze(1), -1)
        return idx, topk_weights.float()

    def _tokens(self, x_local: TokensIn):
        xq = x_local[0] if isinstance(x_local, (tuple, list)) else x_local
        if not isinstance(xq, torch.Tensor) or xq.dim() != 2 or xq.shape[1] != self.hidden_size:
            raise ValueError(f"x_local must be [T, {self.hidden_size}] (or an fp8 pair of it), got "
                             f"{tuple(xq.shape) if isinstance(xq, torch.Tensor) else type(xq).__name__}")
        return xq.shape[0]

    # ------------------------------------------------------------------ prefill (normal mode)
    def dispatch_contiguous(self, x_local, topk_idx, topk_weights):
        tokens = self._tokens(x_local)
        xq, xs = x_local if isinstance(x_local, (tuple, list)) else quantize_tokens(x_local, self.pow2_scale)
        if xq.dtype != FP8:
            raise TypeError(f"x_local pair must hold float8_e4m3fn values, got {xq.dtype}")
        idx, weights = self._routing(tokens, topk_idx, topk_weights)
        buffer = self.normal_buffer()
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, self.num_experts_global)
        recv_x, recv_idx, recv_weights, per_expert_list, deep_handle, _ = buffer.dispatch(
            (xq, xs.contiguous()), topk_idx=idx, topk_weights=weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert)
        layout, recv_combine = contiguous_from_normal(recv_x, recv_idx, recv_weights, per_expert_list)
        return layout, NormalHandle(deep_handle, recv_combine, layout.num_rows)

    def combine_contiguous(self, y_rows, handle: NormalHandle, *, add=None):
        if tuple(y_rows.shape) != (handle.num_rows, self.hidden_size):
            raise ValueError(f"y_rows must be [M_sum, H] = {[handle.num_rows, self.hidden_size]}, "
                             f"got {tuple(y_rows.shape)}")
        partial = normal_combine_input(y_rows, handle.recv_combine)  # weights applied here
        combined, _, _ = self.normal_buffer().combine(partial, handle.deep_handle)  # unweighted sum
        return add_shared(combined, add).to(y_rows.dtype)

    # ------------------------------------------------------------------ decode (low-latency mode)
    def dispatch_masked(self, x_local, topk_idx, topk_weights, *, max_tokens_per_expert: int,
                        num_valid_tokens=None, out=None):
        tokens = self._tokens(x_local)
        m_max = self.max_tokens_per_expert(tokens)
        if max_tokens_per_expert != m_max:
            raise ValueError(f"max_tokens_per_expert must be {m_max} (R * max_tokens_per_rank: DeepEP's "
                             f"fixed layout), got {max_tokens_per_expert}")
        x_bf16 = dequantize_tokens(*x_local) if isinstance(x_local, (tuple, list)) else x_local.to(torch.bfloat16)
        idx, weights = self._routing(tokens, topk_idx, topk_weights, num_valid_tokens)
        # power-of-two scales: DeepEP's round_scale (fp32 scales kept; not use_ue8m0, which packs them)
        kwargs = {"round_scale": True} if self.pow2_scale else {}
        recv_x, recv_count, deep_handle, _, _ = self.low_latency_buffer().low_latency_dispatch(
            x_bf16, idx, self.max_tokens_per_rank, self.num_experts_global, use_fp8=True, **kwargs)
        layout = masked_from_low_latency(recv_x, recv_count, self.expected_m(tokens), deep_handle[0])
        return layout, LowLatencyHandle(deep_handle, idx, weights, m_max)

    def combine_masked(self, y_rows, handle: LowLatencyHandle, *, add=None, out=None):
        expected = (self.num_experts_local, handle.max_tokens_per_expert, self.hidden_size)
        if tuple(y_rows.shape) != expected:
            raise ValueError(f"y_rows must be [E_loc, M_max, H] = {list(expected)}, got {tuple(y_rows.shape)}")
        combined, _, _ = self.low_latency_buffer().low_latency_combine(
            y_rows.to(torch.bfloat16).contiguous(), handle.topk_idx, handle.topk_weights,
            handle.deep_handle)  # weighted by DeepEP
        return add_shared(combined, add, out)
