"""Expert parallelism over ``torch.distributed`` all-to-all: NCCL on GPUs, gloo on CPU.

Placement: contiguous blocks (``moe_fp8.layers.placement``): rank r holds global experts
``r * E_loc .. (r + 1) * E_loc - 1``. Every rank routes its own tokens ``x_local [T_local, H]``;
``R`` is the EP group size.

What travels: tokens are quantised (1x128, ``per_token_group_quant_fp8``) **before** they leave,
and a token goes to a rank **once**, however many of its k experts that rank holds (DeepEP does
the same): the receiver fans the row out to its local experts and, in the combine, reduces the
token's local experts (weighted) into one row that travels back. fp8 bytes, scales and
metadata travel together, one packed uint8 row per (token, destination): the metadata carries
the token's k global expert ids (int32; "none" is -1 in decode, E in prefill) and k weights
(fp32) — and, in prefill, the row each pair takes in its destination's layout — so the receiver
needs nothing else.

Prefill (contiguous layout), any batch, ranks may hold different ``T_local``. One host sync,
one payload transfer per direction, no per-expert loop; every index is built on the device:

1. routing tables on the source (device): pairs per global expert, and the tokens for each rank
   (``[E + 1 + R]`` int64). ONE ``all_to_all_single`` sends this table to every rank (async), so
   each rank knows every rank's counts; while it flies the source quantises (bf16 input), ranks
   each pair within its expert (one stable sort), builds the send order (a cumsum + a
   ``searchsorted``) and packs one record per token into ``[T, row]`` uint8:
   ``[H fp8 | H/128 fp32 scales | k expert ids | k destination-layout rows | k fp32 weights]``.
2. from the counts every source computes, on the device, the row each of its pairs takes in
   its destination's contiguous layout: segment start of the expert (segments padded to 128)
   + the pairs earlier sources send to it + the pair's rank at the source. **The one host sync**
   reads back ``[send splits | receive splits | M_sum]`` (``2R + 1`` ints; NCCL and gloo need
   split sizes on the host, and ``M_sum`` sizes the layout); on CUDA it is an async copy into
   pinned memory plus an event, waited for after the packing kernels have been issued.
3. ONE ``all_to_all_single`` of the packed rows (gathered by the send order, viewed as 8-byte
   words), rows grouped by destination rank, tokens in order within a rank. While it flies:
   the combine's source index and the layout's index buffers.
4. the receiver scatters the slot ids and local expert ids of its local pairs to their rows
   (``row_pair``, ``m_indices``: one ``scatter_`` each) and gathers the fp8 rows and the scales
   into the layout (one ``index_select`` each). Rows arrive
   ordered (source rank, token), so the layout equals the local dispatcher's over the
   concatenation of every rank's tokens, bit for bit.
5. combine: per received row, ``sum_j w_j * y(row, j)`` over its local slots (one
   ``embedding_bag``: fp32 accumulation, no gathered copy, rounded once to ``combine_dtype``), the
   reverse ``all_to_all_single`` (splits swapped; ``add`` is copied beside the returned rows
   while it flies), then on the source ``out[t] = add[t] + sum_r returned(t, r)`` as one more
   ``embedding_bag`` over ``[padding | returned | add]`` (``padding_idx`` for ranks a token skipped;
   fp32, rounded once, a fixed order: deterministic, unlike an atomic ``index_add``).

Wire bytes per row: ``H + 4 H/128 + 12 k`` out, ``2 H`` (bf16) back.

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
* combine: per received row, the weighted reduce over its local experts (``embedding_bag``) into
  ``[R * T, H]`` (rows of tokens that did not pick this rank reduce to 0), ONE equal-split
  ``all_to_all_single`` back, then ``out[t] = add[t] + sum_r returned[r, t]`` (fixed order).
  Wire bytes per rank per step: ``R * T * (H + 4 H/128 + 8 k)`` out, ``R * T * 2 H`` back.

Transports: NCCL (CUDA tensors) and gloo (CPU tensors) both implement ``all_to_all_single`` with
uneven splits and empty splits; neither carries float8, so fp8 travels as uint8. Kernels run on
the current stream; prefill issues its collectives with ``async_op=True`` and joins NCCL's stream
(``work.wait()``) only after the kernels that do not need the result, which then overlap the
transfer. ``op_counter.OpCounter`` counts ops, host syncs and collectives per call: the
CPU proxy of ``benchmarks/bench_ep.py --cpu``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...gemm.layout import kSegmentAlign
from ...gemm.validate import debug_mode
from ..layouts import (FP8, CombineIndex, ContiguousLayout, MaskedBuffers, MaskedLayout,
                       masked_index)
from ..permute import combine_index_masked, permute_masked, permute_rows, unpermute_combine
from ..placement import ExpertPlacement
from .base import Dispatcher

kBackends = ("auto", "torch", "deepep")
assert kSegmentAlign & (kSegmentAlign - 1) == 0, "segment padding below uses a power-of-two mask"


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
    """One packed row: ``[H fp8 | H/128 fp32 scales | meta_words int32]``. Decode's metadata is
    ``[k ids | k weights]`` (``meta_words = 2k``, the default); prefill's is
    ``[k ids | k destination-layout rows | k weights]`` (``3k``)."""
    hidden: int
    top_k: int
    meta_words: int = 0

    def __post_init__(self) -> None:
        self.meta_words = self.meta_words or 2 * self.top_k

    @property
    def groups(self) -> int:
        return self.hidden // 128

    @property
    def nbytes(self) -> int:
        """The payload (fp8 | scales | metadata) rounded up to 16 bytes: the permute kernels read
        the received rows in place with 16-byte vector loads (any H, any top-k)."""
        payload = self.hidden + 4 * self.groups + 4 * self.meta_words
        return (payload + 15) // 16 * 16

    @property
    def word_dtype(self) -> torch.dtype:
        """The integer that tiles a row: gathers and copies move 8-byte words, not bytes."""
        return torch.int64

    def views(self, rows: torch.Tensor):
        """uint8 ``[..., nbytes]`` -> (fp8 ``[..., H]``, fp32 ``[..., H/128]``, int32 ``[..., meta_words]``)."""
        h, g = self.hidden, self.groups
        meta = h + 4 * g
        return (rows[..., :h].view(FP8), rows[..., h:meta].view(torch.float32),
                rows[..., meta:meta + 4 * self.meta_words].view(torch.int32))


# ---------------------------------------------------------------------------- handles

@dataclass
class ContiguousHandle:
    send_token: torch.Tensor  # int64 [S_send]: source token of each sent row (grouped by rank)
    send_splits: List[int]  # host: rows sent to each rank
    recv_splits: List[int]  # host: rows received from each rank
    recv_index: torch.Tensor  # int32 [S_recv, k]: row of y_rows of each local slot of a received row, else 0
    recv_weight: torch.Tensor  # fp32 [S_recv, k]: that slot's weight, 0 for other ranks' slots
    source_index: torch.Tensor  # int64 [T, R + 1] rows of [padding | returned | add]: row of (token,
    #                             rank) among the returned rows (1 + send position), 0 (the padding row)
    #                             if the token skipped the rank; column R: 1 + S_send + t, add[t]
    num_rows: int  # M_sum of the layout

    @property
    def num_send(self) -> int:
        return self.send_token.shape[0]


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
        self.row_format = RowFormat(self.hidden_size, self.top_k)  # decode
        self.prefill_format = RowFormat(self.hidden_size, self.top_k, 3 * self.top_k)

    # ------------------------------------------------------------------ sizes
    def max_tokens_per_expert(self, max_tokens_local: int) -> int:
        """One row per (source rank, token) at most: ``R * T`` rows can never overflow."""
        return self.ep_size * max_tokens_local

    def expected_m(self, num_tokens_local: int) -> int:
        """Mean rows per local expert: ``R * T * k / E`` (every rank sends T tokens)."""
        rows = self.ep_size * num_tokens_local * self.top_k
        return max(1, -(-rows // self.num_experts_global))

    # ------------------------------------------------------------------ checks
    def _check_routing(self, xq: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """``Dispatcher.check_routing`` (shapes, dtypes, the id range on CPU tensors or in debug
        mode) + float weights (they travel as fp32 bits)."""
        self.check_routing(xq.shape[0], topk_idx, topk_weights)
        if not topk_weights.is_floating_point():
            raise TypeError(f"topk_weights must be a float tensor, got {topk_weights.dtype}")

    def _all_to_all(self, out, inp, out_splits=None, in_splits=None, *, async_op: bool = False):
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=async_op)

    # ------------------------------------------------------------------ shared pieces
    def _weighted_rows(self, y_rows: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
        """``out[i] = sum_j weight[i, j] * y_rows[index[i, j]]`` -> ``[N, H]`` of ``dtype``.

        ``embedding_bag`` (sum, per-sample weights): accumulates in fp32 and rounds once, without
        materialising the gathered ``[N, k, H]`` rows (the weights are rounded to ``y_rows``'
        dtype first, as the batched matmul of ``permute.unpermute_combine`` does). Slots with
        weight 0 point at a real row (finite by the contract). A wider ``dtype`` than ``y_rows``
        (fp32 partials) goes through ``unpermute_combine``, which computes in fp32.
        """
        rows = index.shape[0]
        if rows == 0:
            return torch.empty(0, y_rows.shape[1], dtype=dtype, device=y_rows.device)
        if dtype == y_rows.dtype:
            return F.embedding_bag(index, y_rows, per_sample_weights=weight.to(dtype), mode="sum")
        out = torch.empty(rows, y_rows.shape[1], dtype=dtype, device=y_rows.device)
        return unpermute_combine(y_rows, CombineIndex(index.long(), weight), out=out)

    @staticmethod
    def _start_read_back(values: torch.Tensor):
        """The prefill's one host sync, split in two: start the copy of ``values`` to the host
        now (CUDA: async into pinned memory + an event) and read it in ``_finish_read_back``, so
        the host issues more kernels while the copy lands instead of idling from here on."""
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return host, ready
        return values, None

    @staticmethod
    def _finish_read_back(pending) -> List[int]:
        host, ready = pending
        if ready is not None:
            ready.synchronize()
        return host.tolist()

    # ------------------------------------------------------------------ prefill
    def dispatch_contiguous(self, x_local, topk_idx, topk_weights):
        xq, _ = self.check_tokens(x_local)  # before any collective: a bad argument fails on its own rank
        self._check_routing(xq, topk_idx, topk_weights)
        ranks, experts, experts_local, top_k = self.ep_size, self.num_experts_global, \
            self.num_experts_local, self.top_k
        me, fmt = self.ep_rank, self.prefill_format
        tokens, device = xq.shape[0], xq.device
        pairs = tokens * top_k
        # --- 1. routing tables (device): [pairs per global expert | no expert | tokens per rank]
        expert = topk_idx.to(torch.int64).clamp(-1, experts).remainder_(experts + 1)  # [T, k]; E = none
        flat = expert.view(-1)
        sorted_expert, order = torch.sort(flat, stable=True)  # pairs by expert, (token, slot) order kept
        first = torch.searchsorted(sorted_expert, torch.arange(experts + 2, device=device))  # [E + 2]
        table = torch.empty(experts + 1 + ranks, dtype=torch.int64, device=device)
        torch.sub(first[1:], first[:-1], out=table[:experts + 1])  # pairs per expert
        dest = expert.div(experts_local, rounding_mode="floor")  # [T, k] rank of each pair; R = none
        hit = torch.zeros(tokens, ranks + 1, dtype=torch.bool, device=device).scatter_(1, dest, True)
        hit = hit[:, :ranks]  # [T, R]: token t goes to rank r
        torch.sum(hit, 0, out=table[experts + 1:])
        counts = torch.empty(ranks, table.shape[0], dtype=torch.int64, device=device)  # [source, ...]
        table_out = table.expand(ranks, -1).contiguous()  # referenced until the wait below
        counts_work = self._all_to_all(counts, table_out, async_op=True)
        # --- overlapped with the counts exchange: everything that needs only local data
        xq, xs = self.tokens_in(x_local)  # bf16 input is quantised here, while the counts fly
        within = torch.empty_like(flat)  # each pair's rank among this rank's pairs of its expert
        within[order] = torch.arange(pairs, device=device) - first[sorted_expert]
        # send order: the (rank, token) entries that hit, rank-major, tokens ascending
        hits_before = torch.cumsum(hit.t().reshape(-1), 0)  # [R * T] inclusive count of hits
        entries = ranks * tokens  # send row i holds the entry where the count first reaches i + 1
        send_token = torch.searchsorted(hits_before, torch.arange(1, entries + 1, device=device))
        send_token.remainder_(max(tokens, 1))  # entry -> token; rows >= S_send are cut after the sync
        # one packed record per token: fp8 | scales | ids | layout rows (below) | weights
        records = torch.empty(tokens, fmt.nbytes, dtype=torch.uint8, device=device)
        rec_x, rec_s, rec_meta = fmt.views(records)
        rec_x.view(torch.uint8).copy_(xq.view(torch.uint8))
        rec_s.copy_(xs)
        rec_meta[:, :top_k].copy_(expert)
        rec_meta[:, 2 * top_k:].view(torch.float32).copy_(topk_weights)
        # --- 2. every rank's counts -> the layout geometry (device) and the one read-back
        counts_work.wait()
        del table_out
        expert_pairs = counts[:, :experts]  # [source, E]
        total = expert_pairs.sum(0)  # [E]: rows of each expert's layout segment
        padded = (total + (kSegmentAlign - 1)).bitwise_and_(-kSegmentAlign).view(ranks, experts_local)
        segment_end = torch.cumsum(padded, 1)  # [R, E_loc] within each destination's layout
        base = torch.zeros(experts + 1, dtype=torch.int64, device=device)  # E: no expert (unused)
        torch.add((segment_end - padded).view(-1), expert_pairs[:me].sum(0), out=base[:experts])
        pending = self._start_read_back(torch.cat([counts[me, experts + 1:],  # rows sent to each rank
                                                   counts[:, experts + 1 + me],  # rows received
                                                   segment_end[me, -1:]]))  # M_sum of this rank
        torch.add(base[expert], within.view(tokens, top_k), out=rec_meta[:, top_k:2 * top_k])
        tokens_per_expert = total[me * experts_local:(me + 1) * experts_local]
        # NOTE: the one host sync of prefill: split sizes and M_sum must be host ints.
        host = self._finish_read_back(pending)
        send_splits, recv_splits, num_rows = host[:ranks], host[ranks:2 * ranks], host[2 * ranks]
        num_send, num_recv = sum(send_splits), sum(recv_splits)
        # --- 3. the payload: ONE all-to-all of packed rows
        send_token = send_token[:num_send]
        words = fmt.word_dtype
        send = records.view(words).index_select(0, send_token)  # [S_send, row words]
        recv = torch.empty(num_recv, send.shape[1], dtype=words, device=device)
        payload_work = self._all_to_all(recv, send, recv_splits, send_splits, async_op=True)
        # overlapped with the transfer: the combine's source index over [padding | returned | add]
        source_index = torch.empty(tokens, ranks + 1, dtype=torch.int64, device=device)
        torch.mul(hits_before.view(ranks, tokens).t(), hit, out=source_index[:, :ranks])  # 0: no hit
        source_index[:, ranks].copy_(torch.arange(1 + num_send, 1 + num_send + tokens, device=device))
        # ... and the layout's index buffers (-1 = padding; + a trash row)
        row_pair = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=device)
        m_indices = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=device)
        payload_work.wait()
        # --- 4. received rows -> the contiguous layout: scatters of slot ids, one gather of rows
        recv_x, recv_s, recv_meta = fmt.views(recv.view(torch.uint8))
        recv_ids, recv_rows = recv_meta[:, :top_k], recv_meta[:, top_k:2 * top_k]
        local = recv_ids.div(experts_local, rounding_mode="floor") == me  # [S_recv, k]
        target = torch.where(local, recv_rows, num_rows).view(-1).long()  # other ranks' slots: trash
        row_pair.scatter_(0, target, torch.arange(num_recv * top_k, device=device))
        m_indices.scatter_(0, target, (recv_ids - self.expert_offset).view(-1))
        row_pair, m_indices = row_pair[:num_rows], m_indices[:num_rows]
        # row_pair: slot id (received row * k + slot) of each layout row, -1 on padding; the
        # layer's permute reads the packed rows in place (its kernel on Hopper, 16-byte rows)
        a, sa, row_token, row_slot = permute_rows(recv_x, recv_s, row_pair, top_k)
        if debug_mode():
            self._check_received(local, recv_ids, tokens_per_expert)
        layout = ContiguousLayout(a, sa, m_indices, row_token, row_slot, tokens_per_expert, num_rows)
        recv_weights = recv_meta[:, 2 * top_k:].view(torch.float32)
        handle = ContiguousHandle(send_token, send_splits, recv_splits,
                                  torch.where(local, recv_rows, 0), torch.where(local, recv_weights, 0.0),
                                  source_index, num_rows)
        return layout, handle

    def _check_received(self, local, recv_ids, tokens_per_expert) -> None:
        """Debug mode only (syncs): the rows that arrived per local expert == the counts announced."""
        ids = torch.where(local, recv_ids.long() - self.expert_offset, self.num_experts_local)
        got = torch.zeros(self.num_experts_local + 1, dtype=torch.int64, device=ids.device)
        got.scatter_add_(0, ids.view(-1), torch.ones_like(ids.view(-1)))
        if got[:-1].tolist() != tokens_per_expert.tolist():
            raise RuntimeError(f"rank {self.ep_rank}: received rows per expert {got[:-1].tolist()} "
                               f"!= announced {tokens_per_expert.tolist()}")

    def combine_contiguous(self, y_rows, handle: ContiguousHandle, *, add=None):
        if y_rows.dim() != 2 or tuple(y_rows.shape) != (handle.num_rows, self.hidden_size):
            raise ValueError(f"y_rows must be [M_sum, H] = {[handle.num_rows, self.hidden_size]}, "
                             f"got {tuple(y_rows.shape)}")
        tokens, ranks, hidden = handle.source_index.shape[0], self.ep_size, self.hidden_size
        if add is not None and tuple(add.shape) != (tokens, hidden):
            raise ValueError(f"add must be [T, H] = {[tokens, hidden]}, got {tuple(add.shape)}")
        wire_dtype = self.combine_dtype or y_rows.dtype
        partial = self._weighted_rows(y_rows, handle.recv_index, handle.recv_weight, wire_dtype)
        num_send = handle.num_send
        # [padding row | returned rows | add]: the padding row stands for "no row" in the index,
        # embedding_bag(padding_idx=0) drops it without reading a value from it
        returned = torch.empty(1 + num_send + (tokens if add is not None else 0), hidden,
                               dtype=wire_dtype, device=y_rows.device)
        work = self._all_to_all(returned[1:1 + num_send], partial, handle.send_splits, handle.recv_splits,
                                async_op=True)
        if add is not None:
            returned[1 + num_send:].copy_(add)  # while the partial sums travel
        work.wait()
        columns = ranks + 1 if add is not None else ranks
        out = F.embedding_bag(handle.source_index[:, :columns], returned, mode="sum", padding_idx=0)
        return out.to(y_rows.dtype)

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
        xq, xs = self.tokens_in(x_local)
        self._check_routing(xq, topk_idx, topk_weights)
        ranks, experts_local, top_k = self.ep_size, self.num_experts_local, self.top_k
        tokens, hidden, device = xq.shape[0], self.hidden_size, xq.device
        m_max = self.check_max_tokens_per_expert(max_tokens_per_expert)
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
        index = handle.recv_combine
        partial = self._weighted_rows(y_rows.flatten(0, 1), index.slot_row, index.slot_weight, wire_dtype)
        returned = torch.empty_like(partial)
        self._all_to_all(returned, partial)  # equal splits: T rows per rank
        # fp32 sum over the source ranks (one reduction, fixed order: deterministic), + add, rounded once
        acc = returned.view(ranks, tokens, hidden).sum(0, dtype=torch.float32)
        if add is not None:
            acc += add
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
