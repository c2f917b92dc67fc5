"""Expert parallelism over ``torch.distributed`` all-to-all: NCCL on GPUs, gloo on CPU.

Placement: contiguous blocks (``moe_fp8.layers.placement``): rank r holds global experts
``r * E_loc .. (r + 1) * E_loc - 1``. Every rank routes its own tokens ``x_local [T_local, H]``;
``R`` is the EP group size.

What travels: tokens are quantised (1x128, ``per_token_group_quant_fp8``) **before** they leave,
and a token goes to a rank **once**, however many of its k experts that rank holds (DeepEP does
the same): the receiver fans the row out to its local experts and, in the combine, reduces the
token's local experts (weighted) into one row that travels back. With the metadata a token's
row carries its k global expert ids (int32, -1 = none) and k weights (fp32), so the receiver
needs nothing else. Per row: ``H`` fp8 bytes + ``4 H/128`` scale bytes + ``8 k`` metadata bytes
out, ``2 H`` (bf16) back.

Prefill (contiguous layout), any batch, ranks may hold different ``T_local``:

1. one ``all_to_all_single`` of an int64 table ``[R, E_loc + 1]`` per destination rank: pairs per
   expert of that rank, and rows (tokens) for that rank. **The one host sync** of the path reads
   this table back (send and receive row counts, and ``M_sum``, which sizes the layout); NCCL and
   gloo need the split sizes on the host.
2. three ``all_to_all_single``: fp8 rows (as uint8), scales ``[S, H/128]`` fp32, metadata
   ``[S, 2k]`` int32, rows grouped by destination rank, tokens in order within a rank.
3. the received rows go into the contiguous layout (``layouts.contiguous_index``: each local
   expert's rows padded to 128, ``m_indices`` -1 on padding).
4. combine: per received row, ``sum_j w_j * y(row, j)`` over its local experts (fp32, rounded once
   to ``combine_dtype``), the reverse ``all_to_all_single`` (splits swapped), then on the source
   ``out[t] = add[t] + sum_r returned(t, r)`` in fp32, rounded once.

Decode (masked layout), fixed shapes, no host sync, capturable in one CUDA graph with NCCL:

* every rank must pass the same static ``T`` (= rows of ``x_local``, e.g. ``DecodeRunner``'s
  ``max_tokens``); ``num_valid_tokens`` marks the live ones (the others send ids -1).
* FIXED splits: rank s sends every destination ``T`` rows, row t = its token t (packed: fp8 |
  scales | ids | weights in one uint8 row of ``H + 4 H/128 + 8 k`` bytes), so ONE
  ``all_to_all_single`` of ``[R * T, row]`` with equal splits moves everything. Capacity math:
  a token goes to a rank at most once, so ``T`` rows per (source, destination) is the worst case of
  any routing: sending all ``T`` is exactly that worst case; nothing can overflow. A local expert
  receives at most one row per (source rank, token): ``M_max = R * T``
  (``max_tokens_per_expert``) can never overflow either.
* the receiver builds the masked layout ``[E_loc, M_max, H]`` on device (``layouts.masked_index``:
  a sort; ``masked_m`` stays on the device).
* combine: per received row, the weighted reduce over its local experts into a static
  ``[R * T, H]`` buffer (rows of tokens that did not pick this rank reduce to 0), ONE equal-split
  ``all_to_all_single`` back, then ``out[t] = add[t] + sum_r returned[r, t]`` (fixed order).
  Wire bytes per rank per step: ``R * T * (H + 4 H/128 + 8 k)`` out, ``R * T * 2 H`` back.

Transports: NCCL (CUDA tensors) and gloo (CPU tensors) both implement ``all_to_all_single`` with
uneven splits and empty splits; neither carries float8, so fp8 travels as uint8. Everything
runs on the current stream (NCCL's own stream is joined by ``work.wait()``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from ...gemm.layout import align, kSegmentAlign
from ...gemm.validate import debug_mode
from ..layouts import (FP8, CombineIndex, ContiguousLayout, MaskedBuffers, MaskedLayout,
                       contiguous_index, masked_index)
from ..permute import (combine_index_contiguous, combine_index_masked, permute_contiguous,
                       permute_masked, quantize_tokens, unpermute_combine)
from ..placement import ExpertPlacement
from .base import Dispatcher, TokensIn

kBackends = ("auto", "torch", "deepep")


# ---------------------------------------------------------------------------- row metadata

def encode_meta(topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                num_valid_tokens=None) -> torch.Tensor:
    """``[T, k]`` global ids + fp32 weights -> int32 ``[T, 2k]`` (ids | weight bits). Tokens at or
    beyond ``num_valid_tokens`` (int or device scalar) get ids -1: no expert, no row."""
    ids = topk_idx.to(torch.int32)
    if num_valid_tokens is not None:
        token = torch.arange(ids.shape[0], device=ids.device)
        ids = ids.masked_fill((token >= num_valid_tokens).unsqueeze(1), -1)
    weights = topk_weights.to(torch.float32).contiguous().view(torch.int32)
    return torch.cat([ids, weights], dim=1)


def decode_meta(meta: torch.Tensor):
    """int32 ``[N, 2k]`` -> (global ids int64 ``[N, k]``, weights fp32 ``[N, k]``)."""
    top_k = meta.shape[1] // 2
    return meta[:, :top_k].long(), meta[:, top_k:].contiguous().view(torch.float32)


@dataclass
class RowFormat:
    """One packed decode row: ``[H fp8 | H/128 fp32 scales | k int32 ids | k fp32 weights]``."""
    hidden: int
    top_k: int

    @property
    def groups(self) -> int:
        return self.hidden // 128

    @property
    def nbytes(self) -> int:  # a multiple of 4 (H % 128 == 0), so the fp32/int32 views line up
        return self.hidden + 4 * self.groups + 8 * self.top_k

    def views(self, rows: torch.Tensor):
        """uint8 ``[..., nbytes]`` -> (fp8 ``[..., H]``, fp32 ``[..., H/128]``, int32 ``[..., 2k]``) views."""
        h, g = self.hidden, self.groups
        return (rows[..., :h].view(FP8), rows[..., h:h + 4 * g].view(torch.float32),
                rows[..., h + 4 * g:].view(torch.int32))


# ---------------------------------------------------------------------------- handles

@dataclass
class ContiguousHandle:
    send_token: torch.Tensor  # int64 [S_send]: source token of each sent row (grouped by rank)
    send_splits: List[int]  # host: rows sent to each rank
    recv_splits: List[int]  # host: rows received from each rank
    recv_combine: CombineIndex  # [S_recv, k]: each received row's rows in y_rows and weights
    source_combine: CombineIndex  # [T, R]: row of (token, rank) in the returned buffer, weight 1/0
    num_rows: int  # M_sum of the layout


@dataclass
class MaskedHandle:
    recv_combine: CombineIndex  # [R * T, k] over y_rows.flatten(0, 1)
    num_tokens: int  # T (static, equal on every rank)
    max_tokens_per_expert: int  # M_max


# ---------------------------------------------------------------------------- the dispatcher

class TorchDistDispatcher(Dispatcher):
    """Dispatcher over an EP process group (see the module docstring for the wire protocol).

    ``combine_dtype``: dtype of the partial sums that travel back (default: ``y_rows``' dtype,
    bf16); ``torch.float32`` doubles the combine bytes and removes one bf16 rounding.
    """

    def __init__(self, cfg, ep_group=None, *, combine_dtype: Optional[torch.dtype] = None,
                 pow2_scale: Optional[bool] = None):
        if not dist.is_initialized():
            raise RuntimeError("TorchDistDispatcher needs torch.distributed initialised "
                               "(init_process_group) before the layer is built")
        self.group = ep_group if ep_group is not None else dist.group.WORLD
        self.placement = ExpertPlacement.from_group(cfg.num_experts, self.group)
        self.ep_size, self.ep_rank = self.placement.ep_size, self.placement.ep_rank
        self.num_experts_global = cfg.num_experts
        self.num_experts_local = self.placement.num_experts_local
        self.expert_offset = self.placement.expert_offset
        self.hidden_size, self.top_k = cfg.hidden_size, cfg.top_k
        self.pow2_scale = cfg.pow2_scale if pow2_scale is None else pow2_scale
        if combine_dtype not in (None, torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"combine_dtype must be None, bf16, fp16 or fp32, got {combine_dtype}")
        self.combine_dtype = combine_dtype
        self.row_format = RowFormat(self.hidden_size, self.top_k)

    # ------------------------------------------------------------------ sizes
    def max_tokens_per_expert(self, max_tokens_local: int) -> int:
        """One row per (source rank, token) at most: ``R * T`` rows can never overflow."""
        return self.ep_size * max_tokens_local

    def expected_m(self, num_tokens_local: int) -> int:
        """Mean rows per local expert: ``R * T * k / E`` (every rank sends T tokens)."""
        rows = self.ep_size * num_tokens_local * self.top_k
        return max(1, -(-rows // self.num_experts_global))

    # ------------------------------------------------------------------ checks
    def _quantized(self, x_local: TokensIn):
        if isinstance(x_local, (tuple, list)):
            xq, xs = x_local
            if xq.dtype != FP8 or xs.dtype != torch.float32:
                raise TypeError(f"x_local pair must be (float8_e4m3fn, float32), got ({xq.dtype}, {xs.dtype})")
            if tuple(xs.shape) != (xq.shape[0], self.hidden_size // 128):
                raise ValueError(f"x_local scales must be [T, {self.hidden_size // 128}], got {tuple(xs.shape)}")
        elif not isinstance(x_local, torch.Tensor):
            raise TypeError(f"x_local must be a tensor or an (fp8, scales) pair, got {type(x_local).__name__}")
        else:
            xq = x_local
        if xq.dim() != 2 or xq.shape[1] != self.hidden_size:
            raise ValueError(f"x_local must be [T, {self.hidden_size}], got {tuple(xq.shape)}")
        if isinstance(x_local, torch.Tensor):
            return quantize_tokens(x_local, self.pow2_scale)
        return xq, xs

    def _check_routing(self, xq: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> None:
        expected = (xq.shape[0], self.top_k)
        if tuple(topk_idx.shape) != expected or tuple(topk_weights.shape) != expected:
            raise ValueError(f"topk_idx and topk_weights must be {list(expected)} ([T, top_k]), got "
                             f"{tuple(topk_idx.shape)} and {tuple(topk_weights.shape)}")
        if topk_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"topk_idx must be int32/int64, got {topk_idx.dtype}")
        if not topk_weights.is_floating_point():
            raise TypeError(f"topk_weights must be a float tensor, got {topk_weights.dtype}")

    def _all_to_all(self, out, inp, out_splits=None, in_splits=None) -> None:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)

    # ------------------------------------------------------------------ prefill
    def dispatch_contiguous(self, x_local, topk_idx, topk_weights):
        xq, xs = self._quantized(x_local)
        self._check_routing(xq, topk_idx, topk_weights)
        ranks, experts_local, top_k = self.ep_size, self.num_experts_local, self.top_k
        tokens, hidden, device = xq.shape[0], self.hidden_size, xq.device
        # --- routing tables on the source (device; no sync)
        pair_rank = self.placement.expert_rank(topk_idx)  # [T, k]; R = no expert
        token_in_rank = torch.zeros(tokens, ranks + 1, dtype=torch.bool, device=device)
        token_in_rank.scatter_(1, pair_rank, True)
        token_in_rank = token_in_rank[:, :ranks]  # [T, R]
        ids = topk_idx.long().reshape(-1)
        valid = (ids >= 0) & (ids < self.num_experts_global)
        expert_pairs = torch.zeros(self.num_experts_global + 1, dtype=torch.int64, device=device)
        expert_pairs.scatter_add_(0, torch.where(valid, ids, self.num_experts_global), torch.ones_like(ids))
        send_table = torch.cat([expert_pairs[:-1].view(ranks, experts_local),
                                token_in_rank.sum(0).view(ranks, 1)], dim=1)  # [R, E_loc + 1]
        recv_table = torch.empty_like(send_table)
        self._all_to_all(recv_table, send_table)
        # NOTE: the one host sync of prefill: split sizes and M_sum must be host ints.
        counts = torch.cat([send_table[:, experts_local], recv_table.reshape(-1)]).tolist()
        send_splits = counts[:ranks]
        recv_rows = [counts[ranks + r * (experts_local + 1):ranks + (r + 1) * (experts_local + 1)]
                     for r in range(ranks)]
        recv_splits = [row[experts_local] for row in recv_rows]
        rows_per_expert = [sum(row[e] for row in recv_rows) for e in range(experts_local)]
        num_rows = sum(align(c, kSegmentAlign) for c in rows_per_expert)
        num_send, num_recv = sum(send_splits), sum(recv_splits)
        # --- send order: (rank, token) entries with token_in_rank, rank-major, tokens ascending
        entry = torch.arange(ranks * tokens, device=device)
        in_rank = token_in_rank.t().reshape(-1)  # [R * T]
        send_entry = torch.sort(torch.where(in_rank, entry, ranks * tokens)).values[:num_send]
        send_token = send_entry % max(tokens, 1)  # [S_send]
        entry_row = torch.zeros(ranks * tokens, dtype=torch.int64, device=device)
        entry_row[send_entry] = torch.arange(num_send, device=device)
        source_combine = CombineIndex(entry_row.view(ranks, tokens).t().contiguous(),
                                      token_in_rank.to(torch.float32))
        # --- the exchange: fp8 bytes, scales, metadata
        meta = encode_meta(topk_idx, topk_weights)  # [T, 2k]
        send_x = xq.view(torch.uint8).index_select(0, send_token)  # [S_send, H]
        send_s = xs.index_select(0, send_token).contiguous()  # [S_send, H/128]
        send_meta = meta.index_select(0, send_token)  # [S_send, 2k]
        recv_x = torch.empty(num_recv, hidden, dtype=torch.uint8, device=device)
        recv_s = torch.empty(num_recv, hidden // 128, dtype=torch.float32, device=device)
        recv_meta = torch.empty(num_recv, 2 * top_k, dtype=torch.int32, device=device)
        for out, inp in ((recv_x, send_x), (recv_s, send_s), (recv_meta, send_meta)):
            self._all_to_all(out, inp, recv_splits, send_splits)
        # --- the layout of the received rows
        recv_ids, recv_weights = decode_meta(recv_meta)
        index = contiguous_index(self.placement.to_local(recv_ids), experts_local, num_rows)
        if debug_mode() and index.tokens_per_expert.tolist() != rows_per_expert:
            raise RuntimeError(f"rank {self.ep_rank}: received rows per expert "
                               f"{index.tokens_per_expert.tolist()} != announced {rows_per_expert}")
        a, sa, row_token, row_slot = permute_contiguous(recv_x.view(FP8), recv_s, index, top_k)
        layout = ContiguousLayout(a, sa, index.m_indices, row_token, row_slot,
                                  index.tokens_per_expert, num_rows)
        handle = ContiguousHandle(send_token, send_splits, recv_splits,
                                  combine_index_contiguous(index, recv_weights), source_combine, num_rows)
        return layout, handle

    def combine_contiguous(self, y_rows, handle: ContiguousHandle, *, add=None):
        if y_rows.dim() != 2 or tuple(y_rows.shape) != (handle.num_rows, self.hidden_size):
            raise ValueError(f"y_rows must be [M_sum, H] = {[handle.num_rows, self.hidden_size]}, "
                             f"got {tuple(y_rows.shape)}")
        wire_dtype = self.combine_dtype or y_rows.dtype
        num_recv, num_send = sum(handle.recv_splits), sum(handle.send_splits)
        partial = torch.empty(num_recv, self.hidden_size, dtype=wire_dtype, device=y_rows.device)
        unpermute_combine(y_rows, handle.recv_combine, out=partial)  # [S_recv, H]
        returned = torch.empty(num_send, self.hidden_size, dtype=wire_dtype, device=y_rows.device)
        self._all_to_all(returned, partial, handle.send_splits, handle.recv_splits)
        tokens = handle.source_combine.slot_row.shape[0]
        out = torch.empty(tokens, self.hidden_size, dtype=y_rows.dtype, device=y_rows.device)
        return unpermute_combine(returned, handle.source_combine, add=add, out=out)

    # ------------------------------------------------------------------ decode
    def _check_same_tokens(self, tokens: int, device) -> None:
        """Debug mode only: fixed splits need the same static T on every rank (else NCCL hangs)."""
        both = torch.tensor([tokens, -tokens], dtype=torch.int64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        if both.tolist() != [tokens, -tokens]:
            raise ValueError(f"dispatch_masked needs the same number of x_local rows on every rank; "
                             f"rank {self.ep_rank} has {tokens}, the group spans "
                             f"[{-both[1].item()}, {both[0].item()}]")

    def dispatch_masked(self, x_local, topk_idx, topk_weights, *, max_tokens_per_expert: int,
                        num_valid_tokens=None, out: Optional[MaskedBuffers] = None):
        xq, xs = self._quantized(x_local)
        self._check_routing(xq, topk_idx, topk_weights)
        ranks, experts_local, top_k = self.ep_size, self.num_experts_local, self.top_k
        tokens, hidden, device = xq.shape[0], self.hidden_size, xq.device
        m_max = max_tokens_per_expert
        if isinstance(m_max, bool) or not isinstance(m_max, int) or m_max <= 0:
            raise ValueError(f"max_tokens_per_expert must be a positive int, got {m_max!r}")
        if out is None:
            out = MaskedBuffers.allocate(experts_local, m_max, hidden, device)
        elif tuple(out.a.shape) != (experts_local + 1, m_max, hidden):
            raise ValueError(f"out.a must be [E_loc + 1, M_max, H] = {[experts_local + 1, m_max, hidden]}, "
                             f"got {tuple(out.a.shape)}")
        if debug_mode():
            self._check_same_tokens(tokens, device)
        fmt = self.row_format
        # --- pack each token once, replicated into every destination's slot t (fixed splits)
        send = torch.empty(ranks, tokens, fmt.nbytes, dtype=torch.uint8, device=device)
        send_x, send_s, send_meta = fmt.views(send)  # [R, T, H], [R, T, H/128], [R, T, 2k]
        send_x.view(torch.uint8).copy_(xq.view(torch.uint8).expand(ranks, tokens, hidden))
        send_s.copy_(xs.expand(ranks, tokens, fmt.groups))
        send_meta.copy_(encode_meta(topk_idx, topk_weights, num_valid_tokens).expand(ranks, tokens, 2 * top_k))
        recv = torch.empty_like(send)
        self._all_to_all(recv, send)  # equal splits: T rows per rank
        recv_x, recv_s, recv_meta = fmt.views(recv.view(ranks * tokens, fmt.nbytes))
        recv_ids, recv_weights = decode_meta(recv_meta)
        index = masked_index(self.placement.to_local(recv_ids), experts_local, m_max)
        row_token, row_slot = permute_masked(recv_x, recv_s, index, top_k, out.a, out.sa)
        layout = MaskedLayout(out.a[:experts_local], out.sa[:experts_local], index.masked_m,
                              self.expected_m(tokens), row_token, row_slot, index.num_overflow)
        handle = MaskedHandle(combine_index_masked(index, recv_weights, m_max), tokens, m_max)
        return layout, handle

    def combine_masked(self, y_rows, handle: MaskedHandle, *, add=None, out=None):
        expected = (self.num_experts_local, handle.max_tokens_per_expert, self.hidden_size)
        if tuple(y_rows.shape) != expected:
            raise ValueError(f"y_rows must be [E_loc, M_max, H] = {list(expected)}, got {tuple(y_rows.shape)}")
        ranks, tokens, hidden = self.ep_size, handle.num_tokens, self.hidden_size
        wire_dtype = self.combine_dtype or y_rows.dtype
        partial = torch.empty(ranks * tokens, hidden, dtype=wire_dtype, device=y_rows.device)
        unpermute_combine(y_rows.flatten(0, 1), handle.recv_combine, out=partial)
        returned = torch.empty_like(partial)
        self._all_to_all(returned, partial)  # equal splits: T rows per rank
        acc = add.to(torch.float32, copy=True) if add is not None else \
            torch.zeros(tokens, hidden, dtype=torch.float32, device=y_rows.device)
        for rank in range(ranks):  # fixed order: deterministic, same as the contiguous path
            acc += returned[rank * tokens:(rank + 1) * tokens].float()
        if out is None:
            return acc.to(y_rows.dtype)
        return out.copy_(acc)


# ---------------------------------------------------------------------------- factory

def make_dispatcher(cfg, ep_group=None, backend: str = "auto", **kwargs) -> Dispatcher:
    """The dispatcher of ``cfg`` over ``ep_group``.

    ``ep_group=None``: the local (one-GPU) dispatcher, as in ``moe_fp8.layers.dispatch``.
    ``backend``: ``"torch"`` (this module), ``"deepep"`` (``deepep.DeepEPDispatcher``; needs
    ``deep_ep``), ``"auto"``: env ``MOE_FP8_EP_BACKEND`` if set, else ``"torch"``. DeepEP is
    opt-in because its buffers must be sized for the largest batch (normal mode: NVLink peers;
    low-latency mode: NVSHMEM/IBGDA), which only the caller knows.
    """
    if backend not in kBackends:
        raise ValueError(f"backend must be one of {kBackends}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("MOE_FP8_EP_BACKEND", "torch") or "torch"
        if backend not in kBackends[1:]:
            raise ValueError(f"MOE_FP8_EP_BACKEND must be 'torch' or 'deepep', got {backend!r}")
    if ep_group is None:
        from .local import LocalDispatcher
        return LocalDispatcher(cfg.num_experts, cfg.hidden_size, cfg.top_k, pow2_scale=cfg.pow2_scale)
    if backend == "deepep":
        from .deepep import DeepEPDispatcher
        return DeepEPDispatcher(cfg, ep_group, **kwargs)
    return TorchDistDispatcher(cfg, ep_group, **kwargs)
