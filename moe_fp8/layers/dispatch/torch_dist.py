"""Expert parallelism over ``torch.distributed`` all-to-all: NCCL on GPUs, gloo on CPU.

Placement: contiguous blocks (``moe_fp8.layers.placement``): rank r holds global experts
``r * E_loc .. (r + 1) * E_loc - 1``. Every rank routes its own tokens ``x_local [T_local, H]``;
``R`` is the EP group size.

What travels: tokens are quantised (1x128, ``per_token_group_quant_fp8``) **before** they leave,
and a token goes to a rank **once**, however many of its k experts that rank holds (DeepEP does
the same): the receiver fans the row out to its local experts and, in the combine, reduces the
token's local experts (weighted) into one row that travels back. fp8 bytes, scales and
metadata travel together, one packed uint8 row per (token, destination) (``RowFormat``): the
token's k global expert ids (int32; "none" is -1 in decode, E in prefill) and k weights (fp32),
so the receiver needs nothing else.

Prefill (contiguous layout), any batch, ranks may hold different ``T_local``. One host sync,
one payload transfer per direction, no per-expert loop; every index is built on the device:

1. routing table on the source (device): pairs per global expert and tokens per rank
   (``[E + 1 + R]`` int64). ONE ``all_to_all_single`` sends it to every rank (async), so each
   rank knows every rank's counts; while it flies the source quantises (bf16 input), builds the
   send order (a cumsum + a ``searchsorted``) and packs one record per token into ``[T, row]``.
2. **The one host sync** reads back ``[send splits | receive splits | M_sum]`` (``2R + 1`` ints;
   NCCL and gloo need split sizes on the host, and ``M_sum``, the padded rows arriving per local
   expert, sizes the layout), after the send side's kernels have all been issued.
3. ONE ``all_to_all_single`` of the packed rows (gathered by the send order, viewed as 8-byte
   words), rows grouped by source rank, tokens in order within a rank.
4. the receiver builds the layout exactly as the one-GPU layer does: local ids of the received
   rows -> ``layouts.contiguous_index`` (its stable count/scan/rank kernels on Hopper, given the
   ``M_sum`` already read back: no second sync) -> ``permute.permute_rows``, which reads the
   packed rows in place. Rows arrive ordered (source rank, token), so the layout equals the
   local dispatcher's over the concatenation of every rank's tokens, bit for bit.
5. combine: per received row, ``sum_j w_j * y(row, j)`` over its local slots, the reverse
   ``all_to_all_single`` (splits swapped), then on the source ``out[t] = add[t] + sum_r
   returned(t, r)`` (a zero row for the ranks a token skipped). Both sums are
   ``permute.unpermute_combine`` (the layer's combine kernel on Hopper): fp32, a fixed order
   (deterministic, unlike an atomic ``index_add``), rounded once each.

Wire bytes per row: ``H + 4 H/128 + 8 k`` (padded to 16) out, ``2 H`` (bf16) back.

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
* combine: per received row, the weighted reduce over its local experts into ``[R * T, H]``
  (rows of tokens that did not pick this rank reduce to 0), ONE equal-split
  ``all_to_all_single`` back, then ``out[t] = add[t] + sum_r returned[r, t]`` (fixed order);
  both sums are ``unpermute_combine`` as in prefill.
  Wire bytes per rank per step: ``R * T * (H + 4 H/128 + 8 k)`` out, ``R * T * 2 H`` back.

Transports: NCCL (CUDA tensors) and gloo (CPU tensors) both implement ``all_to_all_single`` with
uneven splits and empty splits; neither carries float8, so fp8 travels as uint8. Kernels run on
the current stream; prefill issues the counts exchange with ``async_op=True`` and joins NCCL's
stream (``work.wait()``) only after the packing kernels, which then overlap it (a blocking NCCL
collective does not block the host either: it orders the streams). ``op_counter.OpCounter`` counts ops, host syncs and collectives per call: the
CPU proxy of ``benchmarks/bench_ep.py --cpu``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from ...gemm.layout import kSegmentAlign
from ...gemm.jit.env import lookup
from ...gemm.validate import debug_mode
from ..layouts import (FP8, CombineIndex, ContiguousLayout, MaskedBuffers, MaskedLayout, contiguous_index,
                       masked_index)
from ..permute import combine_index_masked, permute_masked, permute_rows, unpermute_combine
from ..placement import ExpertPlacement
from ..router import fused_router_switch_on
from ..switches import kernels_enabled, switch_on
from .base import Dispatcher

kBackends = ("auto", "torch", "deepep")
assert kSegmentAlign & (kSegmentAlign - 1) == 0, "segment padding below uses a power-of-two mask"


kFusedEpEnv = "MOE_FP8_FUSED_EP"
kFusedEpDefault = False  # flip once a GPU run has verified and measured the ep_send kernels


def fused_ep_enabled(t: torch.Tensor) -> bool:
    """True when the send sides of the exchanges run on the ep_send kernels (prefill: routing
    table, records, send order; decode: the replicated packing) for tensors like ``t``: an sm_90
    GPU, ``MOE_FP8_FUSED_EP=1``, not inside ``torch.compile`` tracing."""
    return kernels_enabled(t, kFusedEpEnv, kFusedEpDefault)


kPipelineEnv = "MOE_FP8_EP_PIPELINE"
kPipelineDefault = False  # flip once a GPU run shows the pipelined combine faster
kPipelineChunks = 4  # chunks per peer: the reduce of chunk c + 1 overlaps the transfer of chunk c


def _chunks(begin: int, end: int, parts: int = kPipelineChunks):
    """``parts`` contiguous ranges covering ``[begin, end)`` (empty ones included: both sides of a
    pair then issue the same sequence)."""
    size = end - begin
    return [(begin + size * i // parts, begin + size * (i + 1) // parts) for i in range(parts)]


def _index_rows(index: CombineIndex, begin: int, end: int) -> CombineIndex:
    return CombineIndex(index.slot_row[begin:end], index.slot_weight[begin:end])


def _ep_send_kernels():
    from ...gemm.kernels import ep_send
    return ep_send


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


@dataclass
class RowFormat:
    """One packed row: ``[H fp8 | H/128 fp32 scales | k int32 global ids | k fp32 weights]``, the
    same for prefill (no expert = E) and decode (no expert = -1)."""
    hidden: int
    top_k: int

    @property
    def meta_words(self) -> int:
        return 2 * self.top_k

    @property
    def groups(self) -> int:
        return self.hidden // 128

    @property
    def payload_bytes(self) -> int:
        """fp8 | scales | metadata, before the padding."""
        return self.hidden + 4 * self.groups + 4 * self.meta_words

    @property
    def nbytes(self) -> int:
        """The payload rounded up to 16 bytes: the permute kernels read the received rows in
        place with 16-byte vector loads (any H, any top-k)."""
        return (self.payload_bytes + 15) // 16 * 16

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


# ---------------------------------------------------------------------------- send side (torch)
# The prefill's step 1 in torch ops: the reference of include/ep_send.cuh (same values).

def routing_table(topk_idx: torch.Tensor, experts: int, experts_per_rank: int, ranks: int):
    """-> (table int64 ``[E + 1 + R]``: pairs per global expert, "no expert" at E, tokens per rank;
    the ids with E for "no expert" int64 ``[T, k]``; hit bool ``[T, R]``: token t goes to rank r)."""
    tokens, device = topk_idx.shape[0], topk_idx.device
    expert = topk_idx.to(torch.int64).clamp(-1, experts).remainder_(experts + 1)  # [T, k]; E = none
    table = torch.zeros(experts + 1 + ranks, dtype=torch.int64, device=device)
    table[:experts + 1].index_add_(0, expert.view(-1), table.new_ones(()).expand(expert.numel()))
    dest = expert.div(experts_per_rank, rounding_mode="floor")  # [T, k] rank of each pair; R = none
    hit = torch.zeros(tokens, ranks + 1, dtype=torch.bool, device=device).scatter_(1, dest, True)
    hit = hit[:, :ranks]
    torch.sum(hit, 0, out=table[experts + 1:])
    return table, expert, hit


def send_order(hit: torch.Tensor):
    """hit ``[T, R]`` -> (send_token int64 ``[R * T]``: the tokens that hit rank r, ascending,
    rank-major, the first ``hit.sum()`` rows valid; the combine's source index ``[T, R]``: row 1 +
    send position of (t, r), weight 1; row 0 (a zero row), weight 0 where t skips r)."""
    tokens, ranks = hit.shape
    device = hit.device
    hits_before = torch.cumsum(hit.t().reshape(-1), 0)  # [R * T] inclusive count of hits
    entries = ranks * tokens  # send row i holds the entry where the count first reaches i + 1
    send_token = torch.searchsorted(hits_before, torch.arange(1, entries + 1, device=device))
    send_token.remainder_(max(tokens, 1))  # entry -> token; rows >= S_send are cut after the sync
    source_row = torch.empty(tokens, ranks, dtype=torch.int64, device=device)  # contiguous: the
    torch.mul(hits_before.view(ranks, tokens).t(), hit, out=source_row)  # combine kernel's index
    source_weight = torch.empty(tokens, ranks, dtype=torch.float32, device=device)
    source_weight.copy_(hit)
    return send_token, CombineIndex(source_row, source_weight)


def pack_records(fmt: "RowFormat", xq: torch.Tensor, xs: torch.Tensor, expert: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
    """One packed row per token ``[T, fmt.nbytes]``: fp8 | scales | ids (E = none) | weights (the
    padding bytes are left as they are)."""
    records = torch.empty(xq.shape[0], fmt.nbytes, dtype=torch.uint8, device=xq.device)
    rec_x, rec_s, rec_meta = fmt.views(records)
    rec_x.view(torch.uint8).copy_(xq.view(torch.uint8))
    rec_s.copy_(xs)
    rec_meta[:, :fmt.top_k].copy_(expert)
    rec_meta[:, fmt.top_k:].view(torch.float32).copy_(topk_weights)
    return records


def pack_replicated(fmt: "RowFormat", xq: torch.Tensor, xs: torch.Tensor, topk_idx: torch.Tensor,
                    topk_weights: torch.Tensor, num_valid_tokens, send: torch.Tensor) -> None:
    """Decode's fixed-split send buffer ``send [R, T, fmt.nbytes]``: slot t of every destination
    holds token t's record, ids -1 from ``num_valid_tokens`` on (the padding bytes are left as
    they are). The reference of ep_send.cuh's replicate_pack_kernel."""
    ranks, tokens = send.shape[:2]
    send_x, send_s, send_meta = fmt.views(send)  # [R, T, H], [R, T, H/128], [R, T, 2k]
    send_x.view(torch.uint8).copy_(xq.view(torch.uint8).expand(ranks, tokens, fmt.hidden))
    send_s.copy_(xs.expand(ranks, tokens, fmt.groups))
    send_meta.copy_(encode_meta(topk_idx, topk_weights, num_valid_tokens)
                    .expand(ranks, tokens, fmt.meta_words))


# ---------------------------------------------------------------------------- handles

@dataclass
class ContiguousHandle:
    send_token: torch.Tensor  # int64 [S_send]: source token of each sent row (grouped by rank)
    send_splits: List[int]  # host: rows sent to each rank
    recv_splits: List[int]  # host: rows received from each rank
    recv_combine: CombineIndex  # [S_recv, k] over y_rows: each received row's local slots (others: row 0, weight 0)
    source_combine: CombineIndex  # [T, R] over [zero row | returned rows]: row 1 + send position of
    #                               (token, rank), weight 1; row 0, weight 0 where the token skipped the rank
    num_rows: int  # M_sum of the layout

    @property
    def num_send(self) -> int:
        return self.send_token.shape[0]


@dataclass
class MaskedHandle:
    recv_combine: CombineIndex  # [R * T, k] over y_rows.flatten(0, 1)
    source_sum: CombineIndex  # [T, R] over the returned rows [R * T, H]: row r * T + t, weight 1
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
        # point-to-point ops name peers by their global rank (the group may be a subgroup)
        self.global_ranks = [dist.get_global_rank(self.group, r) for r in range(self.ep_size)]
        self.num_experts_global = cfg.num_experts
        self.num_experts_local = self.placement.num_experts_local
        self.expert_offset = self.placement.expert_offset
        self.hidden_size, self.top_k = cfg.hidden_size, cfg.top_k
        self.pow2_scale = cfg.pow2_scale if pow2_scale is None else pow2_scale
        if combine_dtype not in (None, torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"combine_dtype must be None, bf16, fp16 or fp32, got {combine_dtype}")
        self.combine_dtype = combine_dtype
        self.row_format = RowFormat(self.hidden_size, self.top_k)
        self._source_sum_cache = {}  # (T, device) -> decode's static source-sum index

    # ------------------------------------------------------------------ sizes
    def max_tokens_per_expert(self, max_tokens_local: int) -> int:
        """One row per (source rank, token) at most: ``R * T`` rows can never overflow."""
        return self.ep_size * max_tokens_local

    def expected_rows(self, num_tokens_local: int) -> float:
        return self.ep_size * num_tokens_local * self.top_k / self.num_experts_global

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
    def _weighted_rows(self, y_rows: torch.Tensor, index: CombineIndex, dtype: torch.dtype) -> torch.Tensor:
        """``out[i] = sum_j weight[i, j] * y_rows[row[i, j]]`` -> ``[N, H]`` of ``dtype``: the
        layer's combine (``permute.unpermute_combine``; its kernel on Hopper: each row read once,
        fp32 accumulation, one rounding). Slots with weight 0 point at a finite row."""
        out = torch.empty(index.slot_row.shape[0], y_rows.shape[1], dtype=dtype, device=y_rows.device)
        return unpermute_combine(y_rows, index, out=out)

    # ------------------------------------------------------------------ prefill
    def _exchange_counts(self, table: torch.Tensor):
        """Start the all-to-all that gives every rank every rank's routing table -> (counts
        ``[source, E + 1 + R]``, work, the send buffer, referenced until the wait)."""
        ranks = self.ep_size
        counts = torch.empty(ranks, table.shape[0], dtype=torch.int64, device=table.device)
        table_out = table.expand(ranks, -1).contiguous()
        return counts, self._all_to_all(counts, table_out, async_op=True), table_out

    def _send_side_torch(self, x_local, topk_idx, topk_weights):
        """Step 1 in torch ops -> (counts, counts work (in flight), its send buffer, records
        ``[T, row]``, send_token ``[R * T]`` (the first S_send valid), the combine's source index)."""
        table, expert, hit = routing_table(topk_idx, self.num_experts_global, self.num_experts_local,
                                           self.ep_size)
        counts, counts_work, table_out = self._exchange_counts(table)
        # overlapped with the counts exchange: everything that needs only local data
        xq, xs = self.tokens_in(x_local)  # bf16 input is quantised here, while the counts fly
        send_token, source = send_order(hit)
        records = pack_records(self.row_format, xq, xs, expert, topk_weights)
        return counts, counts_work, table_out, records, send_token, source

    def _send_side_fused(self, xq, xs, ids, weights):
        """Step 1 on the two ep_send kernels (same values as ``_send_side_torch``): the routing
        table and the records, the counts exchange, then the send order while it flies."""
        ranks, experts, tokens, device = self.ep_size, self.num_experts_global, ids.shape[0], ids.device
        kernels = _ep_send_kernels()
        table = torch.zeros(experts + 1 + ranks, dtype=torch.int64, device=device)
        records = torch.empty(tokens, self.row_format.nbytes, dtype=torch.uint8, device=device)
        cta_counts = kernels.route_pack(ids, weights, xq, xs, records, table, self.num_experts_local, ranks)
        counts, counts_work, table_out = self._exchange_counts(table)
        send_token = torch.empty(ranks * tokens, dtype=torch.int64, device=device)
        source = CombineIndex(torch.empty(tokens, ranks, dtype=torch.int64, device=device),
                              torch.empty(tokens, ranks, dtype=torch.float32, device=device))
        kernels.send_order(ids, table, cta_counts, self.num_experts_local, ranks, send_token,
                           source.slot_row, source.slot_weight)
        return counts, counts_work, table_out, records, send_token, source

    def _fused_send_inputs(self, x_local, topk_idx, topk_weights):
        """-> ((xq, xs, int64 ids, fp32 weights) when the ep_send kernels apply, else None;
        the tokens for the torch path: ``x_local``, or its quantised pair if already made)."""
        if not fused_ep_enabled(topk_idx) or topk_idx.shape[0] == 0:
            return None, x_local
        xq, xs = self.tokens_in(x_local)
        ids = topk_idx.to(torch.int64).contiguous()
        weights = topk_weights.to(torch.float32).contiguous()
        if not _ep_send_kernels().supports(ids, weights, xq, xs, self.num_experts_global, self.ep_size):
            return None, (xq, xs)
        return (xq, xs, ids, weights), (xq, xs)

    def dispatch_contiguous(self, x_local, topk_idx, topk_weights):
        xq, _ = self.check_tokens(x_local)  # before any collective: a bad argument fails on its own rank
        self._check_routing(xq, topk_idx, topk_weights)
        ranks, experts, experts_local, top_k = self.ep_size, self.num_experts_global, \
            self.num_experts_local, self.top_k
        me, fmt, device = self.ep_rank, self.row_format, xq.device
        # --- 1. routing table, counts exchange (async), records, send order, source index
        fused, x_local = self._fused_send_inputs(x_local, topk_idx, topk_weights)
        if fused is not None:
            counts, counts_work, table_out, records, send_token, source = self._send_side_fused(*fused)
        else:
            counts, counts_work, table_out, records, send_token, source = \
                self._send_side_torch(x_local, topk_idx, topk_weights)
        # --- 2. every rank's counts -> the one read-back: [rows sent | rows received | M_sum]
        counts_work.wait()
        del table_out
        mine = counts[:, me * experts_local:(me + 1) * experts_local].sum(0)  # [E_loc] pairs arriving
        padded = (mine + (kSegmentAlign - 1)).bitwise_and_(-kSegmentAlign)
        # NOTE: the one host sync of prefill: split sizes and M_sum must be host ints.
        host = torch.cat([counts[me, experts + 1:], counts[:, experts + 1 + me],
                          padded.sum().view(1)]).tolist()
        send_splits, recv_splits, num_rows = host[:ranks], host[ranks:2 * ranks], host[2 * ranks]
        num_send, num_recv = sum(send_splits), sum(recv_splits)
        # --- 3. the payload: ONE all-to-all of packed rows
        send_token = send_token[:num_send]
        words = fmt.word_dtype
        send = records.view(words).index_select(0, send_token)  # [S_send, row words]
        recv = torch.empty(num_recv, send.shape[1], dtype=words, device=device)
        self._all_to_all(recv, send, recv_splits, send_splits)
        # --- 4. received rows -> the contiguous layout. Rows arrive ordered (source rank, token),
        # so ranking the local pairs of the received rows stably is the local dispatcher's layout
        # over the concatenation of every rank's tokens; M_sum is already known (no second sync).
        recv_x, recv_s, recv_meta = fmt.views(recv.view(torch.uint8))
        index = contiguous_index(self.placement.to_local(recv_meta[:, :top_k]), experts_local, num_rows)
        # the layer's permute reads the packed rows in place (its kernel on Hopper, 16-byte rows)
        a, sa, row_token, row_slot = permute_rows(recv_x, recv_s, index.row_pair, top_k)
        if debug_mode():
            self._check_received(index.tokens_per_expert, mine)
        layout = ContiguousLayout(a, sa, index.m_indices, row_token, row_slot, index.tokens_per_expert,
                                  num_rows)
        recv_weights = recv_meta[:, top_k:].view(torch.float32)
        handle = ContiguousHandle(send_token, send_splits, recv_splits,
                                  CombineIndex(index.pair_row.view(num_recv, top_k),
                                               torch.where(index.pair_kept.view(num_recv, top_k),
                                                           recv_weights, 0.0)),
                                  source, num_rows)
        return layout, handle

    def _check_received(self, arrived, announced) -> None:
        """Debug mode only (syncs): the pairs that arrived per local expert == the counts the
        sources announced before the transfer (a mismatch would misplace rows in the layout)."""
        if arrived.tolist() != announced.tolist():
            raise RuntimeError(f"rank {self.ep_rank}: received pairs per expert {arrived.tolist()} "
                               f"!= announced {announced.tolist()}")

    def combine_contiguous(self, y_rows, handle: ContiguousHandle, *, add=None):
        if y_rows.dim() != 2 or tuple(y_rows.shape) != (handle.num_rows, self.hidden_size):
            raise ValueError(f"y_rows must be [M_sum, H] = {[handle.num_rows, self.hidden_size]}, "
                             f"got {tuple(y_rows.shape)}")
        tokens, hidden = handle.source_combine.slot_row.shape[0], self.hidden_size
        if add is not None and tuple(add.shape) != (tokens, hidden):
            raise ValueError(f"add must be [T, H] = {[tokens, hidden]}, got {tuple(add.shape)}")
        wire_dtype = self.combine_dtype or y_rows.dtype
        # [zero row | returned rows]: the zero row stands for the ranks a token skipped (weight 0)
        returned = torch.empty(1 + handle.num_send, hidden, dtype=wire_dtype, device=y_rows.device)
        returned[0].zero_()
        if switch_on(kPipelineEnv, kPipelineDefault):
            self._return_partials_pipelined(y_rows, handle, returned[1:])
        else:
            partial = self._weighted_rows(y_rows, handle.recv_combine, wire_dtype)
            self._all_to_all(returned[1:], partial, handle.send_splits, handle.recv_splits)
        out = torch.empty(tokens, hidden, dtype=y_rows.dtype, device=y_rows.device)
        return unpermute_combine(returned, handle.source_combine, add=add, out=out)

    def _return_partials_pipelined(self, y_rows, handle: ContiguousHandle, returned) -> None:
        """The combine's exchange in steps and chunks: at step s a rank sends the partial sums
        for the rows that rank ``me + s`` sent it and receives what it sent rank ``me - s``, chunk
        by chunk, each chunk sent as soon as it is reduced, so the reduce of the next chunk
        overlaps the transfer of this one; the rows this rank sent itself are reduced last,
        straight into ``returned``, without a transfer. Same rows, same values as the one
        all-to-all.

        NOTE: NCCL runs each ``batch_isend_irecv`` group on the group's communicator, one after
        another on one stream, like a collective: a group may only wait for groups the other ranks
        issue at the same (step, chunk). Sending to ``me + s`` while receiving from ``me - s``
        makes every rank's group (s, c) match exactly its partners' group (s, c); pairing a send
        and a receive with the same peer deadlocks from 3 ranks on (rank 0 would wait for rank 1's
        second group behind its first, which waits for rank 2, which waits for rank 0)."""
        ranks, me, index = self.ep_size, self.ep_rank, handle.recv_combine
        recv_off = [0] + list(itertools.accumulate(handle.recv_splits))  # partials for each source
        send_off = [0] + list(itertools.accumulate(handle.send_splits))  # what each rank returns
        works = []
        for step in range(1, ranks):
            to, frm = (me + step) % ranks, (me - step) % ranks
            for (r0, r1), (s0, s1) in zip(_chunks(recv_off[to], recv_off[to + 1]),
                                          _chunks(send_off[frm], send_off[frm + 1])):
                ops = []  # empty chunks are empty on the partner's side too: both skip them
                if r1 > r0:
                    part = self._weighted_rows(y_rows, _index_rows(index, r0, r1), returned.dtype)
                    ops.append(dist.P2POp(dist.isend, part, self.global_ranks[to], group=self.group))
                if s1 > s0:
                    ops.append(dist.P2POp(dist.irecv, returned[s0:s1], self.global_ranks[frm],
                                          group=self.group))
                if ops:
                    works += dist.batch_isend_irecv(ops)
        r0, r1, s0 = recv_off[me], recv_off[me + 1], send_off[me]  # rows to itself: no transfer
        if r1 > r0:
            unpermute_combine(y_rows, _index_rows(index, r0, r1), out=returned[s0:s0 + r1 - r0])
        for work in works:
            work.wait()

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
        if tokens and fused_ep_enabled(xq) and \
                _ep_send_kernels().supports_replicate(topk_idx, topk_weights, xq, xs, num_valid_tokens):
            _ep_send_kernels().replicate_pack(topk_idx, topk_weights, xq, xs, num_valid_tokens, send)
        else:
            pack_replicated(fmt, xq, xs, topk_idx, topk_weights, num_valid_tokens, send)
        recv = torch.empty_like(send)
        self._all_to_all(recv, send)  # equal splits: T rows per rank
        recv_x, recv_s, recv_meta = fmt.views(recv.view(ranks * tokens, fmt.nbytes))
        recv_weights = recv_meta[:, top_k:].contiguous().view(torch.float32)
        # NOTE: with the weights the index kernel also writes the combine index (no extra
        # kernels); not yet run on a GPU, so it rides on the router kernels' switch (as in
        # LocalDispatcher) until a device run has verified it
        index = masked_index(self.placement.to_local(recv_meta[:, :top_k]), experts_local, m_max,
                             recv_weights if fused_router_switch_on() else None)
        row_token, row_slot = permute_masked(recv_x, recv_s, index, top_k, out.a, out.sa)
        layout = MaskedLayout(out.a[:experts_local], out.sa[:experts_local], index.masked_m,
                              self.expected_m(tokens), row_token, row_slot, index.num_overflow,
                              self.expected_rows(tokens))
        handle = MaskedHandle(combine_index_masked(index, recv_weights, m_max),
                              self._source_sum_index(tokens, device), m_max)
        return layout, handle

    def _source_sum_index(self, tokens: int, device) -> CombineIndex:
        """Decode's ``out[t] = add[t] + sum_r returned[r * T + t]`` as a combine index ``[T, R]``
        (rows ``r * T + t``, weights 1): static for a given T, so built once outside a capture."""
        key = (tokens, str(device))
        index = self._source_sum_cache.get(key)
        if index is None:
            ranks = self.ep_size
            row = torch.arange(ranks * tokens, device=device).view(ranks, tokens).t().contiguous()
            index = CombineIndex(row, torch.ones(tokens, ranks, dtype=torch.float32, device=device))
            capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
            if not capturing:  # a tensor made during a capture lives in the graph's pool
                self._source_sum_cache[key] = index
        return index

    def combine_masked(self, y_rows, handle: MaskedHandle, *, add=None, out=None):
        expected = (self.num_experts_local, handle.max_tokens_per_expert, self.hidden_size)
        if tuple(y_rows.shape) != expected:
            raise ValueError(f"y_rows must be [E_loc, M_max, H] = {list(expected)}, got {tuple(y_rows.shape)}")
        wire_dtype = self.combine_dtype or y_rows.dtype
        partial = self._weighted_rows(y_rows.flatten(0, 1), handle.recv_combine, wire_dtype)
        returned = torch.empty_like(partial)
        self._all_to_all(returned, partial)  # equal splits: T rows per rank
        # sum over the source ranks in a fixed order (deterministic), + add, fp32, rounded once
        if out is None:
            out = torch.empty(handle.source_sum.slot_row.shape[0], self.hidden_size, dtype=y_rows.dtype, device=y_rows.device)
        return unpermute_combine(returned, handle.source_sum, add=add, out=out)


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
        backend = lookup("MOE_FP8_EP_BACKEND", "torch") or "torch"
        if backend not in kBackends[1:]:
            raise ValueError(f"MOE_FP8_EP_BACKEND must be 'torch' or 'deepep', got {backend!r}")
    if ep_group is None:
        from .local import LocalDispatcher
        return LocalDispatcher(cfg.num_experts, cfg.hidden_size, cfg.top_k, pow2_scale=cfg.pow2_scale)
    if backend == "deepep":
        from .deepep import DeepEPDispatcher
        return DeepEPDispatcher(cfg, ep_group, **kwargs)
    return TorchDistDispatcher(cfg, ep_group, **kwargs)
