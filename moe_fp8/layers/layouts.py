"""Routing metadata and the two token layouts the grouped GEMMs read.

Vocabulary (used by every dispatcher):

* a *pair* is one (token, top-k slot): ``T * k`` pairs per step; pair ``p`` is token ``p // k``,
  slot ``p % k``.
* expert ids here are **local** (``0 .. E_loc - 1``, ``E_loc = num_experts_local``); the id
  ``E_loc`` is the *skip* sentinel: a pair routed to another rank's expert, or belonging to a
  token beyond ``num_valid_tokens`` (decode's static buffers). Skipped pairs get no row, weight 0.
* a *row* is one pair's place in the layout: the GEMMs see rows, the combine maps them back.

The index builders below are sort-based: one stable sort of the pairs by expert, then the
row of every pair is ``segment_start[expert] + rank within the expert``. No Python loop over
experts; the masked builder never syncs with the host (CUDA-graph safe); the contiguous builder
syncs once, to size ``M_sum``, unless the caller passes ``num_rows``.

Fused kernels (the default for tensors on an sm_90 GPU): both builders run the counting-sort
kernels of ``moe_fp8/gemm/include/permute.cuh`` instead of ~35 (contiguous) / ~12 (masked) torch
ops, with identical results (integers; the sort is stable in both). Verified and measured on an
H200 (tests/test_permute_gpu.py, benchmarks/bench_permute.py: prefill layer 5.51 -> 4.36 ms at
4096 tokens). ``MOE_FP8_FUSED_PERMUTE=0`` selects the torch code below (any other value, or
unset: fused); CPU tensors and other GPUs always run torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..gemm.layout import align, empty_act_scales, kSegmentAlign
from . import router as _router
from .switches import kernels_enabled, switch_on

FP8 = torch.float8_e4m3fn


kFusedEnv = "MOE_FP8_FUSED_PERMUTE"
kMaskedIndexMaxPairs = 1 << 16  # the masked index kernel is one CTA: beyond this, torch is faster
# The decode dispatch's index from the router's global ids in one launch: the masked index kernel
# maps them to local ids itself (no local-id kernel) and sets the permute's row maps to -1 (no
# torch.full kernel): two kernels fewer on the decode graph's router branch (8 kernels, ~31 us
# before the routed GEMMs at one token, H100 2026-12-05). On: with the route-sigmoid switch,
# decode 1 token 183 -> 179 us, same bits (H100, 2026-12-05, session 9).
kFusedDecodeIndexEnv = "MOE_FP8_FUSED_DECODE_INDEX"
kFusedDecodeIndexDefault = True


def fused_switch_on() -> bool:
    """The environment switch alone: ``MOE_FP8_FUSED_PERMUTE=0`` turns the fused kernels off."""
    return switch_on(kFusedEnv, default=True)


def fused_enabled(t: torch.Tensor) -> bool:
    """True when the fused permute/index/combine kernels should run for tensors like ``t``:
    ``t`` on an sm_90 GPU, ``MOE_FP8_FUSED_PERMUTE`` not ``0``, not inside ``torch.compile``."""
    return kernels_enabled(t, kFusedEnv, default=True)


def _permute_kernels():
    from ..gemm.kernels import permute as kernels
    return kernels


def _expect(name: str, t: torch.Tensor, dtype: torch.dtype, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


@dataclass
class ContiguousLayout:
    """Prefill / training layout: every local expert's rows in one segment padded to 128 rows."""
    a: torch.Tensor  # fp8 [M_sum, H]: token rows grouped by local expert
    sa: torch.Tensor  # fp32 [M_sum, H/128], MN-major (moe_fp8.gemm.layout): 1x128 scales of a
    m_indices: torch.Tensor  # int32 [M_sum]: local expert of each row, -1 for padding rows
    row_token: torch.Tensor  # int64 [M_sum]: token (row of x_local) each row came from, -1 padding
    row_slot: torch.Tensor  # int64 [M_sum]: top-k slot each row came from, -1 padding
    tokens_per_expert: torch.Tensor  # int64 [E_loc] on the device: real rows per local expert
    num_rows: int  # M_sum (host int), a multiple of 128

    def __post_init__(self) -> None:
        _expect("a", self.a, FP8, 2)
        _expect("sa", self.sa, torch.float32, 2)
        _expect("m_indices", self.m_indices, torch.int32, 1)
        _expect("row_token", self.row_token, torch.int64, 1)
        _expect("row_slot", self.row_slot, torch.int64, 1)
        _expect("tokens_per_expert", self.tokens_per_expert, torch.int64, 1)
        if self.num_rows % kSegmentAlign or self.a.shape[0] != self.num_rows:
            raise ValueError(f"a must have num_rows = {self.num_rows} rows (a multiple of "
                             f"{kSegmentAlign}), got shape {tuple(self.a.shape)}")
        for name in ("sa", "m_indices", "row_token", "row_slot"):
            if getattr(self, name).shape[0] != self.num_rows:
                raise ValueError(f"{name} must have {self.num_rows} rows, got "
                                 f"{tuple(getattr(self, name).shape)}")


@dataclass
class MaskedLayout:
    """Decode layout: a fixed ``[E_loc, M_max]`` block of rows per step; only the first
    ``masked_m[e]`` rows of expert e are real. Shapes never depend on the routing."""
    a: torch.Tensor  # fp8 [E_loc, M_max, H]: rows of expert e in a[e, :masked_m[e]]
    sa: torch.Tensor  # fp32 [E_loc, M_max, H/128], MN-major batched: 1x128 scales of a
    masked_m: torch.Tensor  # int32 [E_loc] on the device: real rows per local expert (<= M_max)
    expected_m: int  # host int: typical masked_m (a tile-choice hint for the GEMM, never a bound)
    row_token: torch.Tensor  # int64 [E_loc, M_max]: source token of each row, -1 unused rows
    row_slot: torch.Tensor  # int64 [E_loc, M_max]: source top-k slot of each row, -1 unused rows
    num_overflow: torch.Tensor  # int64 [] on the device: pairs dropped because an expert had > M_max
    # host float: the mean rows per local expert of a batch this size, unrounded (0.0: unknown;
    # expected_m is its ceiling); kernels choose by it where a whole row matters (fused SwiGLU)
    expected_rows: float = 0.0
    # (x_fp8 [T, H], row_token) when the dispatch left the rows in ``a`` unwritten
    # (MOE_FP8_DECODE_GATHER): row m of expert e is x_fp8[row_token[e, m]]; ``sa`` is written
    token_source: Optional[tuple] = None

    def __post_init__(self) -> None:
        _expect("a", self.a, FP8, 3)
        _expect("sa", self.sa, torch.float32, 3)
        _expect("masked_m", self.masked_m, torch.int32, 1)
        _expect("row_token", self.row_token, torch.int64, 2)
        _expect("row_slot", self.row_slot, torch.int64, 2)
        experts, m_max = self.a.shape[:2]
        if self.masked_m.shape[0] != experts or tuple(self.row_token.shape) != (experts, m_max):
            raise ValueError(f"masked_m [E_loc] and row_token [E_loc, M_max] must match a "
                             f"{tuple(self.a.shape)}")
        if isinstance(self.expected_m, bool) or not isinstance(self.expected_m, int) or self.expected_m <= 0:
            raise ValueError(f"expected_m must be a positive host int, got {self.expected_m!r}")

    @property
    def max_tokens_per_expert(self) -> int:
        return self.a.shape[1]


@dataclass
class CombineIndex:
    """Where each pair's expert output lives, for the weighted un-permute."""
    slot_row: torch.Tensor  # int64 [T, k]: row of the flattened expert output holding pair (t, j); 0 if skipped
    slot_weight: torch.Tensor  # fp32 [T, k]: the pair's combine weight, 0 if skipped

    def __post_init__(self) -> None:
        _expect("slot_row", self.slot_row, torch.int64, 2)
        _expect("slot_weight", self.slot_weight, torch.float32, 2)


def _kernel_valid_count(num_valid_tokens, like: torch.Tensor) -> bool:
    """Whether the local-id kernels take ``num_valid_tokens``: None, a host int, or an int64
    one-element tensor on ``like``'s device."""
    return not isinstance(num_valid_tokens, torch.Tensor) or (
        num_valid_tokens.dtype == torch.int64 and num_valid_tokens.numel() == 1
        and num_valid_tokens.device == like.device)


def local_expert_ids(topk_idx: torch.Tensor, expert_offset: int, num_experts_local: int,
                     num_valid_tokens: torch.Tensor | int | None = None) -> torch.Tensor:
    """Global ids ``[T, k]`` -> local ids, the skip sentinel ``E_loc`` for other ranks' experts
    and for tokens at or beyond ``num_valid_tokens`` (an int or a device scalar tensor).
    With ``MOE_FP8_FUSED_ROUTER=1`` on sm_90: one kernel (``router.cuh``: local_ids_kernel)."""
    if topk_idx.numel() and _router.fused_router_enabled(topk_idx):
        kernels = _router.kernels()
        if kernels.supports_local_ids(topk_idx) and _kernel_valid_count(num_valid_tokens, topk_idx):
            return kernels.local_ids(topk_idx, expert_offset, num_experts_local, num_valid_tokens)
    local = topk_idx.long() - expert_offset
    skip = (local < 0) | (local >= num_experts_local)
    if num_valid_tokens is not None:
        token = torch.arange(topk_idx.shape[0], device=topk_idx.device)
        skip = skip | (token >= num_valid_tokens).unsqueeze(1)
    return local.masked_fill(skip, num_experts_local)


def local_expert_ids_with_shared(topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                                 expert_offset: int, num_experts_local: int,
                                 num_valid_tokens: torch.Tensor | int | None = None):
    """``local_expert_ids`` then ``with_shared_expert``: -> (ids int64 ``[T, k + 1]``, weights
    fp32 ``[T, k + 1]``). With the router kernels: one kernel (local_ids_shared_kernel)."""
    if topk_idx.numel() and _router.fused_router_enabled(topk_idx):
        kernels = _router.kernels()
        if kernels.supports_local_ids_shared(topk_idx, topk_weights) and \
                _kernel_valid_count(num_valid_tokens, topk_idx):
            return kernels.local_ids_shared(topk_idx, topk_weights, expert_offset,
                                            num_experts_local, num_valid_tokens)
    local = local_expert_ids(topk_idx, expert_offset, num_experts_local, num_valid_tokens)
    return with_shared_expert(local, topk_weights, num_experts_local, num_valid_tokens)


def with_shared_expert(local_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts_local: int,
                       num_valid_tokens: torch.Tensor | int | None = None):
    """Local ids ``[T, k]`` (skip sentinel ``E_loc``) and weights ``[T, k]`` -> ``[T, k + 1]`` of
    each: the shared expert folded in as local expert ``E_loc`` (every token routed to it at
    weight 1, tokens at or past ``num_valid_tokens`` skipped), the skip sentinel now ``E_loc + 1``."""
    tokens = local_ids.shape[0]
    shared = local_ids.new_full((tokens, 1), num_experts_local)
    if num_valid_tokens is not None:
        token = torch.arange(tokens, device=local_ids.device).unsqueeze(1)
        shared = shared.masked_fill(token >= num_valid_tokens, num_experts_local + 1)
    routed = local_ids.masked_fill(local_ids == num_experts_local, num_experts_local + 1)
    weights = torch.cat([topk_weights.float(), topk_weights.new_ones(tokens, 1, dtype=torch.float32)], 1)
    return torch.cat([routed, shared], 1), weights


def _sorted_pairs(expert_of_pair: torch.Tensor, buckets: int):
    """Stable sort of the pairs by expert -> (order, sorted expert, rank within expert, counts)."""
    sorted_expert, order = torch.sort(expert_of_pair, stable=True)  # [P], [P]
    counts = torch.zeros(buckets, dtype=torch.int64, device=expert_of_pair.device)
    counts.scatter_add_(0, expert_of_pair, torch.ones_like(expert_of_pair))  # [buckets]
    first = torch.cumsum(counts, 0) - counts  # [buckets] first sorted position of each expert
    rank = torch.arange(order.numel(), device=order.device) - first[sorted_expert]  # [P]
    return order, sorted_expert, rank, counts


@dataclass
class ContiguousIndex:
    m_indices: torch.Tensor  # int32 [M_sum]
    row_pair: torch.Tensor  # int64 [M_sum]: pair id of each row, -1 padding
    pair_row: torch.Tensor  # int64 [P]: row of each pair, 0 for skipped pairs
    pair_kept: torch.Tensor  # bool [P]: the pair has a row
    tokens_per_expert: torch.Tensor  # int64 [E_loc]
    num_rows: int


def contiguous_index(local_ids: torch.Tensor, num_experts_local: int,
                     num_rows: int | None = None) -> ContiguousIndex:
    """Rows of the contiguous layout for local ids ``[T, k]`` (sentinel = skip).

    ``num_rows=None`` reads the exact ``M_sum`` back from the device: the one host sync of the
    prefill path (the GEMM's output size depends on the routing). Pass an upper bound, e.g.
    ``align(T * k + E_loc * 127, 128)``, to avoid it; the extra rows are padding.
    """
    pairs = local_ids.reshape(-1)  # [P]
    if num_rows is not None and num_rows % kSegmentAlign:
        raise ValueError(f"num_rows must be a multiple of {kSegmentAlign}, got {num_rows}")
    if pairs.numel() and fused_enabled(pairs):
        kernels = _permute_kernels()
        ids = pairs.long().contiguous()
        if kernels.supports_index(ids, num_experts_local):
            m_indices, row_pair, pair_row, pair_kept, tokens_per_expert, num_rows = \
                kernels.contiguous_index(ids, num_experts_local, num_rows)
            return ContiguousIndex(m_indices, row_pair, pair_row, pair_kept, tokens_per_expert,
                                   num_rows)
    order, sorted_expert, rank, counts = _sorted_pairs(pairs, num_experts_local + 1)
    tokens_per_expert = counts[:num_experts_local]
    segment = (tokens_per_expert + kSegmentAlign - 1) // kSegmentAlign * kSegmentAlign  # [E_loc]
    segment_start = torch.cumsum(segment, 0) - segment  # [E_loc]
    if num_rows is None:
        num_rows = int(segment.sum())  # host sync: sizes M_sum
    kept_sorted = sorted_expert < num_experts_local
    segment_start = torch.cat([segment_start, segment_start.new_full((1,), num_rows)])
    row_sorted = torch.where(kept_sorted, segment_start[sorted_expert] + rank,
                             torch.full_like(rank, num_rows))  # [P]; num_rows = the trash slot
    device = pairs.device
    m_indices = torch.full((num_rows + 1,), -1, dtype=torch.int32, device=device)
    m_indices[row_sorted] = sorted_expert.to(torch.int32)
    row_pair = torch.full((num_rows + 1,), -1, dtype=torch.int64, device=device)
    row_pair[row_sorted] = order
    pair_row = torch.empty_like(pairs)
    pair_row[order] = torch.where(kept_sorted, row_sorted, torch.zeros_like(row_sorted))
    pair_kept = pairs < num_experts_local
    return ContiguousIndex(m_indices[:num_rows], row_pair[:num_rows], pair_row, pair_kept,
                           tokens_per_expert, num_rows)


@dataclass
class MaskedIndex:
    masked_m: torch.Tensor  # int32 [E_loc]
    pair_expert: torch.Tensor  # int64 [P]: expert bucket of each pair (E_loc = trash)
    pair_rank: torch.Tensor  # int64 [P]: row within the bucket (0 in the trash bucket)
    pair_kept: torch.Tensor  # bool [P]: the pair has a real row
    num_overflow: torch.Tensor  # int64 []
    # the combine index of the same pass (fused kernel given topk_weights), else None:
    slot_row: Optional[torch.Tensor] = None  # int64 [P]: e * m_max + rank, 0 if dropped
    slot_weight: Optional[torch.Tensor] = None  # fp32 [P]: the pair's weight, 0 if dropped


def _index_kernel_ids(pairs: torch.Tensor, num_experts_local: int) -> Optional[torch.Tensor]:
    """The masked index kernel's int64 ids for ``pairs [P]``, or None where it does not run
    (switched off, not on sm_90, beyond its limits)."""
    if pairs.numel() > kMaskedIndexMaxPairs or not fused_enabled(pairs):
        return None
    ids = pairs.long().contiguous()
    return ids if _permute_kernels().supports_index(ids, num_experts_local) else None


def _kernel_weights(topk_weights: Optional[torch.Tensor], pairs: torch.Tensor):
    """The top-k weights as the masked index kernel's ``[P]`` combine weights, or None where it
    cannot take them (then the combine index is built later from the weights)."""
    if topk_weights is not None and topk_weights.dtype == torch.float32 and \
            topk_weights.is_contiguous() and topk_weights.numel() == pairs.numel() and \
            topk_weights.device == pairs.device and \
            not (torch.is_grad_enabled() and topk_weights.requires_grad):
        return topk_weights.reshape(-1)
    return None


def masked_index(local_ids: torch.Tensor, num_experts_local: int, m_max: int,
                 topk_weights: Optional[torch.Tensor] = None) -> MaskedIndex:
    """Rows of the masked layout for local ids ``[T, k]`` (sentinel = skip). No host sync.

    Pairs beyond ``m_max`` in one expert are dropped into the trash bucket and counted in
    ``num_overflow`` (cannot happen when ``m_max >= T``: a token picks an expert at most once).
    ``topk_weights`` fp32 ``[T, k]`` (optional): the fused kernel then also writes the combine
    index (``slot_row``/``slot_weight``, what ``permute.combine_index_masked`` would compute from
    the same weights) in the same pass; the torch path leaves them None.
    """
    pairs = local_ids.reshape(-1)  # [P]
    ids = _index_kernel_ids(pairs, num_experts_local)
    if ids is not None:
        weights = _kernel_weights(topk_weights, pairs)
        return MaskedIndex(*_permute_kernels().masked_index(ids, num_experts_local, m_max, weights))
    order, sorted_expert, rank, counts = _sorted_pairs(pairs, num_experts_local + 1)
    pair_expert = torch.empty_like(pairs)
    pair_expert[order] = sorted_expert
    pair_rank = torch.empty_like(pairs)
    pair_rank[order] = rank
    real = pair_expert < num_experts_local
    kept = real & (pair_rank < m_max)
    num_overflow = (real & ~kept).sum()
    pair_expert = torch.where(kept, pair_expert, torch.full_like(pair_expert, num_experts_local))
    pair_rank = torch.where(kept, pair_rank, torch.zeros_like(pair_rank))
    masked_m = counts[:num_experts_local].clamp(max=m_max).to(torch.int32)
    return MaskedIndex(masked_m, pair_expert, pair_rank, kept, num_overflow)


def masked_index_from_global(topk_idx: torch.Tensor, expert_offset: int, num_experts_local: int,
                             m_max: int, topk_weights: Optional[torch.Tensor] = None,
                             num_valid_tokens=None) -> Optional[MaskedIndex]:
    """``masked_index(local_expert_ids(topk_idx, expert_offset, num_experts_local,
    num_valid_tokens), num_experts_local, m_max, topk_weights)`` in one kernel launch
    (``MOE_FP8_FUSED_DECODE_INDEX=1``). None where that kernel does not
    apply (switch off, not on sm_90, limits, ``num_valid_tokens`` not None or an int64 device
    scalar): the caller then takes the two steps."""
    inputs = masked_index_kernel_inputs(topk_idx, num_experts_local, topk_weights, num_valid_tokens)
    if inputs is None:
        return None
    ids, weights, valid = inputs
    fields = _permute_kernels().masked_index(ids, num_experts_local, m_max, weights,
                                             id_offset=expert_offset, top_k=topk_idx.shape[1],
                                             num_valid=valid)
    return MaskedIndex(*fields)


def masked_index_kernel_inputs(topk_idx: torch.Tensor, num_experts_local: int,
                               topk_weights: Optional[torch.Tensor], num_valid_tokens):
    """The global-id masked index kernel's ``(ids [P], weights [P] or None, num_valid 0-d or
    None)`` where ``MOE_FP8_FUSED_DECODE_INDEX`` is on and that kernel applies, else None
    (``masked_index_from_global``; the small-dispatch kernel of layers.permute takes the same)."""
    pairs = topk_idx.reshape(-1)
    valid = global_index_valid_count(num_valid_tokens, pairs.device)
    if valid is False or pairs.numel() == 0 or topk_idx.dim() != 2:
        return None
    ids = _index_kernel_ids(pairs, num_experts_local)
    if ids is None:
        return None
    return ids, _kernel_weights(topk_weights, pairs), valid


def global_index_valid_count(num_valid_tokens, device):
    """The global-id index kernels' valid-count argument (None, or the int64 device scalar as a
    0-d tensor), or False where they do not run (``MOE_FP8_FUSED_DECODE_INDEX`` off, or a count
    that is not an int64 scalar on ``device``)."""
    if not switch_on(kFusedDecodeIndexEnv, kFusedDecodeIndexDefault):
        return False
    valid = num_valid_tokens
    if valid is None:
        return None
    if not (isinstance(valid, torch.Tensor) and valid.dtype == torch.int64 and valid.numel() == 1
            and valid.device == device):
        return False
    return valid.reshape(())


def upper_bound_rows(num_pairs: int, num_experts_local: int) -> int:
    """An ``M_sum`` that fits any routing of ``num_pairs`` pairs (no host sync needed)."""
    return align(num_pairs + num_experts_local * (kSegmentAlign - 1), kSegmentAlign)


@dataclass
class MaskedBuffers:
    """Storage a masked dispatch writes into (static across CUDA-graph replays)."""
    a: torch.Tensor  # fp8 [E_loc + 1, M_max, H]; expert E_loc is the trash bucket of skipped pairs
    sa: torch.Tensor  # fp32 [E_loc + 1, M_max, H/128], MN-major batched

    @classmethod
    def allocate(cls, num_experts_local: int, m_max: int, hidden: int, device) -> "MaskedBuffers":
        a = torch.zeros(num_experts_local + 1, m_max, hidden, dtype=FP8, device=device)
        sa = empty_act_scales(m_max, hidden // 128, num_experts_local + 1, device=device)
        sa.fill_(1.0)  # unused rows stay finite
        return cls(a, sa)
