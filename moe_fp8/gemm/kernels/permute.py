"""Host side of include/permute.cuh: routing metadata, permute and combine for the MoE layer.

The layer wrappers (``moe_fp8.layers.layouts`` / ``moe_fp8.layers.permute``) decide when these run
(tensors on an sm_90 GPU, ``MOE_FP8_FUSED_PERMUTE`` not ``0``, shapes supported: ``supports_*``) and
validate; these functions take checked tensors and pre-allocated outputs and only launch.

* ``contiguous_index(ids, num_experts, num_rows)``: ids int64 ``[P]`` (local expert per pair, any
  other value = skip). Three launches (count per 2048-pair chunk, one-CTA scan, stable rank) and,
  when ``num_rows is None``, one host read of ``M_sum`` between scan and rank (the prefill path's
  only sync). Returns ``(m_indices int32 [M_sum], row_pair int64 [M_sum], pair_row int64 [P],
  pair_kept bool [P], tokens_per_expert int64 [E], num_rows)`` — the torch builder's values.
* ``masked_index(ids, num_experts, m_max, weights=None, *, id_offset=0, top_k=1, num_valid=None)``:
  one launch, one CTA, no sync. ``ids`` local (sentinel E), or global ids of
  ``[T, top_k]`` pairs with this rank's experts at ``[id_offset, id_offset + E)`` and
  ``num_valid`` an int64 device scalar (tokens at or beyond it skip): the local-id mapping in the
  same launch. Returns
  ``(masked_m int32 [E], pair_expert int64 [P], pair_rank int64 [P], pair_kept bool [P],
  num_overflow int64 [], slot_row, slot_weight)``; with ``weights`` fp32 ``[P]`` contiguous the
  last two are the combine index (int64 ``[P]`` row ``e * m_max + rank`` / fp32 ``[P]`` weight,
  both 0 for dropped pairs), else None.
* ``permute_contiguous(xq, xs, row_pair, top_k, a, sa, row_token, row_slot)``: xq fp8 ``[T, H]``
  (16-byte aligned rows, any row stride), xs fp32 ``[T, H/128]`` any strides; a ``[M_sum, H]``,
  sa ``[M_sum, H/128]`` any strides (MN-major gives sector-complete scale writes),
  row_token/row_slot int64 ``[M_sum]``.
* ``permute_masked(xq, xs, pair_expert, pair_rank, top_k, a_buf, sa_buf, row_token, row_slot,
  masked_m)``: a_buf ``[E + 1, M_max, H]`` contiguous, sa_buf ``[E + 1, M_max,
  H/128]`` any strides, row_token/row_slot int64 ``[E + 1, M_max]`` contiguous (written whole:
  -1 at or past masked_m and in the trash bucket), masked_m int32 ``[E]`` (the index's); pairs in
  the trash bucket E are not copied.
* ``masked_dispatch_small(ids, num_experts, m_max, weights, id_offset, top_k, num_valid, xq, xs,
  a_buf, sa_buf, row_token, row_slot)``: ``masked_index`` (global ids) then ``permute_masked`` in
  one launch for ``0 < P <= kSmallPairs``; returns ``masked_index``'s tuple.
  ``copy_rows=False`` (also ``permute_masked``): scales and row maps only, no fp8 row.
* ``stage_rows(src, dst, count)``: ``dst[:n].copy_(src); count.fill_(n)`` in one launch.
* ``combine(y_rows, slot_row, slot_weight, add, out, num_valid=None)``: y_rows bf16 ``[R, H]``,
  slot_row int64 ``[T, k]``, slot_weight fp32 ``[T, k]``, add bf16 ``[T, H]`` or None, out bf16
  ``[T, H]``; all contiguous. ``out = bf16(sum_j bf16(w_j) * y[row_j] + add)`` in fp32, slots in
  order. ``num_valid``: None, or an int64 device scalar: rows of tokens at or past it are left
  untouched (a decode runner replayed with fewer tokens).

Every launch is graph-capturable; grids depend only on P, M_sum, T and H (host ints).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..jit import KernelSource, get_kernel, i32, i64, register_bundled

kHeader = "permute.cuh"
# permute.cuh constants (keep in sync)
kMaxExperts = 256
kPairsPerCta = 2048
kCountThreads = 256
kRankThreads = 512
kPermuteThreads = 256
kRowsPerCta = kPermuteThreads // 32
kSmallPairs = kPermuteThreads  # masked_dispatch_small_kernel: pairs of one call at most
kFillRowsPerThread = 4  # small dispatch: row-map rows each thread fills with -1 at most
kStageThreads = 256  # stage_rows_kernel
kStageMaxCtas = 132  # a grid-stride loop beyond one CTA per SM of an H100
kCombineThreads = 128
kVectorBytes = 16
kBf16PerVector = 8


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


@functools.lru_cache(maxsize=None)
def count_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::permute::count_experts_kernel<{kCountThreads}>")


@functools.lru_cache(maxsize=None)
def scan_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::permute::scan_experts_kernel<{kCountThreads}>")


@functools.lru_cache(maxsize=None)
def rank_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::permute::contiguous_rank_kernel<{kRankThreads}>")


@functools.lru_cache(maxsize=None)
def masked_index_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::permute::masked_index_kernel<{kRankThreads}>")


@functools.lru_cache(maxsize=None)
def permute_source(masked: bool) -> KernelSource:
    """A warp per row."""
    return KernelSource(kHeader, f"moe_fp8::permute::permute_rows_kernel<{_bool(masked)}>")


@functools.lru_cache(maxsize=None)
def masked_dispatch_small_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::permute::masked_dispatch_small_kernel<{kPermuteThreads}>")


@functools.lru_cache(maxsize=None)
def stage_source() -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::permute::stage_rows_kernel<{kStageThreads}>")


@functools.lru_cache(maxsize=None)
def combine_source(has_add: bool) -> KernelSource:
    return KernelSource(kHeader, f"moe_fp8::permute::combine_kernel<{_bool(has_add)}>")


@register_bundled
def bundled_sources() -> list[KernelSource]:
    """Every variant the layer can launch (10 kernels)."""
    return [count_source(), scan_source(), rank_source(), masked_index_source(),
            permute_source(False), permute_source(True),
            masked_dispatch_small_source(), stage_source(),
            combine_source(False),
            combine_source(True)]


def _kernel(src: KernelSource, like: torch.Tensor):
    return get_kernel(src, like.device.index if like.device.index is not None else None)


def _ceil_div(x: int, y: int) -> int:
    return -(-x // y)


# ----------------------------------------------------------------------------- applicability

def aligned16(*tensors: Optional[torch.Tensor]) -> bool:
    return all(t is None or t.data_ptr() % kVectorBytes == 0 for t in tensors)


def supports_index(ids: torch.Tensor, num_experts: int) -> bool:
    """The index kernels' limits: int64 ids, 1 <= E <= 256 (shared-memory tables), P < 2^31."""
    return (ids.dtype == torch.int64 and ids.is_contiguous() and 1 <= num_experts <= kMaxExperts
            and ids.numel() < 2 ** 31 - kPairsPerCta)


def supports_permute(xq: torch.Tensor, xs: torch.Tensor) -> bool:
    """fp8 rows of 16-byte multiples (any 16-byte row stride), fp32 scales of any strides."""
    return (xq.dim() == 2 and xq.element_size() == 1 and xq.shape[1] % kVectorBytes == 0
            and xq.stride(1) == 1 and xq.stride(0) % kVectorBytes == 0
            and xs.dim() == 2 and xs.dtype == torch.float32 and xs.shape[0] == xq.shape[0]
            and xq.shape[0] > 0 and aligned16(xq))


def supports_combine(y_rows: torch.Tensor, slot_row: torch.Tensor, slot_weight: torch.Tensor,
                     add: Optional[torch.Tensor], out: Optional[torch.Tensor]) -> bool:
    """bf16 rows, bf16 result (the torch branch's bf16 math), contiguous, 16-byte aligned."""
    bf16 = torch.bfloat16
    ok = (y_rows.dtype == bf16 and y_rows.dim() == 2 and y_rows.is_contiguous()
          and y_rows.shape[1] % kBf16PerVector == 0
          and slot_row.dtype == torch.int64 and slot_row.is_contiguous()
          and slot_weight.dtype == torch.float32 and slot_weight.is_contiguous()
          and slot_row.shape[0] < 2 ** 31)
    for t in (add, out):
        ok = ok and (t is None or (t.dtype == bf16 and t.is_contiguous()
                                   and tuple(t.shape) == (slot_row.shape[0], y_rows.shape[1])))
    return ok and aligned16(y_rows, add, out)


# ----------------------------------------------------------------------------- index

def contiguous_index(ids: torch.Tensor, num_experts: int, num_rows: Optional[int]):
    """See the module docstring. ``ids`` int64 ``[P]``, P > 0."""
    device, num_pairs = ids.device, ids.numel()
    ctas = _ceil_div(num_pairs, kPairsPerCta)
    scratch = torch.empty(ctas * num_experts + num_experts + 1, dtype=torch.int32, device=device)
    cta_counts, segment_start = scratch[:ctas * num_experts], scratch[ctas * num_experts:]
    small = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    tokens_per_expert, m_sum = small[:num_experts], small[num_experts:]
    _kernel(count_source(), ids).launch(ctas, kCountThreads, 0, [
        ids, i32(num_pairs), i32(num_experts), cta_counts])
    _kernel(scan_source(), ids).launch(1, kCountThreads, 0, [
        cta_counts, i32(ctas), i32(num_experts), tokens_per_expert, segment_start, m_sum])
    if num_rows is None:
        num_rows = int(m_sum.item())  # host sync: sizes M_sum (the one of the prefill path)
    m_indices = torch.empty(num_rows, dtype=torch.int32, device=device)
    row_pair = torch.empty(num_rows, dtype=torch.int64, device=device)
    pair_row = torch.empty(num_pairs, dtype=torch.int64, device=device)
    pair_kept = torch.empty(num_pairs, dtype=torch.bool, device=device)
    _kernel(rank_source(), ids).launch(ctas, kRankThreads, 0, [
        ids, i32(num_pairs), i32(num_experts), cta_counts, segment_start, tokens_per_expert,
        i32(num_rows), m_indices, row_pair, pair_row, pair_kept])
    return m_indices, row_pair, pair_row, pair_kept, tokens_per_expert, num_rows


def _masked_index_outputs(num_pairs: int, num_experts: int, with_weights: bool, device):
    """The masked index's outputs, allocated: (masked_m, pair_expert, pair_rank, pair_kept,
    num_overflow, slot_row, slot_weight); the int64 fields share one buffer."""
    masked_m = torch.empty(num_experts, dtype=torch.int32, device=device)
    rows = 3 if with_weights else 2
    pair_meta = torch.empty(rows * num_pairs + 1, dtype=torch.int64, device=device)
    pair_expert, pair_rank = pair_meta[:num_pairs], pair_meta[num_pairs:2 * num_pairs]
    num_overflow = pair_meta[rows * num_pairs]  # a 0-d view
    pair_kept = torch.empty(num_pairs, dtype=torch.bool, device=device)
    slot_row = pair_meta[2 * num_pairs:3 * num_pairs] if with_weights else None
    slot_weight = torch.empty(num_pairs, dtype=torch.float32, device=device) if with_weights else None
    return masked_m, pair_expert, pair_rank, pair_kept, num_overflow, slot_row, slot_weight


def masked_index(ids: torch.Tensor, num_experts: int, m_max: int,
                 weights: Optional[torch.Tensor] = None, *, id_offset: int = 0, top_k: int = 1,
                 num_valid: Optional[torch.Tensor] = None):
    """See the module docstring. ``ids`` int64 ``[P]`` (P may be 0)."""
    device, num_pairs = ids.device, ids.numel()
    fields = _masked_index_outputs(num_pairs, num_experts, weights is not None, device)
    masked_m, pair_expert, pair_rank, pair_kept, num_overflow, slot_row, slot_weight = fields
    _kernel(masked_index_source(), ids).launch(1, kRankThreads, 0, [
        ids, i32(num_pairs), i32(num_experts), i32(m_max), i64(id_offset), i32(top_k), num_valid,
        masked_m, pair_expert, pair_rank, pair_kept, num_overflow, weights,
        slot_row, slot_weight])
    return fields


# ----------------------------------------------------------------------------- permute

def _scale_strides(s: torch.Tensor) -> list:
    """(batch, row, group) element strides of scales ``[.., M, G]``."""
    return [i64(s.stride(0) if s.dim() == 3 else 0), i64(s.stride(-2)), i64(s.stride(-1))]


def permute_contiguous(xq, xs, row_pair, top_k, a, sa, row_token, row_slot) -> None:
    num_rows, hidden = a.shape
    if num_rows == 0:
        return
    _kernel(permute_source(False), xq).launch(_ceil_div(num_rows, kRowsPerCta), kPermuteThreads, 0, [
        xq, xs, row_pair, None, a, sa, row_token, row_slot, None, i32(num_rows), i32(top_k),
        i32(hidden // kVectorBytes), i64(xq.stride(0) // kVectorBytes), i32(xs.shape[1]), i32(0),
        i32(-1), i64(xs.stride(0)), i64(xs.stride(1)), *_scale_strides(sa)])


def permute_masked(xq, xs, pair_expert, pair_rank, top_k, a_buf, sa_buf, row_token,
                   row_slot, masked_m, copy_rows: bool = True) -> None:
    """``copy_rows=False``: the scales and row maps only, no fp8 row (the decode gate-up then
    gathers the rows from ``xq`` itself: ``fp8_gemm.m_grouped_masked_swiglu(gather=...)``)."""
    num_pairs = pair_expert.numel()
    m_max, hidden = a_buf.shape[1], a_buf.shape[2]
    # a warp per pair, 8 per CTA; at least one CTA (the row maps)
    grid = max(1, _ceil_div(num_pairs, kRowsPerCta))
    _kernel(permute_source(True), xq).launch(grid, kPermuteThreads, 0, [
        xq, xs, pair_expert, pair_rank, a_buf, sa_buf, row_token, row_slot, masked_m, i32(num_pairs),
        i32(top_k), i32(hidden // kVectorBytes if copy_rows else 0),
        i64(xq.stride(0) // kVectorBytes),
        i32(xs.shape[1]), i32(m_max), i32(a_buf.shape[0] - 1),  # the last bucket is the trash
        i64(xs.stride(0)), i64(xs.stride(1)), *_scale_strides(sa_buf)])


def small_dispatch_copy_args(xq, xs, a_buf, sa_buf, row_token, row_slot,
                             copy_rows: bool = True) -> list:
    """The copy half of the small-dispatch kernels' arguments (permute.cuh ``SmallDispatch``, from
    ``gX`` on), as ``masked_dispatch_small`` passes them (``copy_rows=False``:
    no fp8 row is copied, as ``permute_masked`` takes it)."""
    return [xq, xs, a_buf, sa_buf, row_token, row_slot,
            i32(a_buf.shape[2] // kVectorBytes if copy_rows else 0),
            i64(xq.stride(0) // kVectorBytes), i32(xs.shape[1]), i64(xs.stride(0)),
            i64(xs.stride(1)), *_scale_strides(sa_buf)]


def small_dispatch_grid(num_pairs: int, num_experts: int, m_max: int) -> int:
    """CTAs of the small-dispatch kernels (permute.cuh masked_dispatch_small_body): one per
    kRowsPerCta pairs, and enough that each thread writes at most kFillRowsPerThread rows of the
    -1 fill of the [E + 1, M_max] row maps (a 256-token runner's one-token step left all 8448 rows
    to its one CTA, on the router branch)."""
    fill = _ceil_div((num_experts + 1) * m_max, kPermuteThreads * kFillRowsPerThread)
    return max(_ceil_div(num_pairs, kRowsPerCta), fill)


def masked_dispatch_small(ids, num_experts, m_max, weights, id_offset, top_k, num_valid, xq, xs,
                          a_buf, sa_buf, row_token, row_slot, copy_rows: bool = True):
    """``masked_index`` (global ids, ``id_offset``, ``top_k``, ``num_valid`` as there) followed by
    ``permute_masked`` in one launch, for ``0 < P <= kSmallPairs`` pairs (every CTA ranks them all
    itself). Arguments as those two take them; returns ``masked_index``'s tuple."""
    device, num_pairs = ids.device, ids.numel()
    assert 0 < num_pairs <= kSmallPairs
    fields = _masked_index_outputs(num_pairs, num_experts, weights is not None, device)
    masked_m, pair_expert, pair_rank, pair_kept, num_overflow, slot_row, slot_weight = fields
    _kernel(masked_dispatch_small_source(), ids).launch(
        small_dispatch_grid(num_pairs, num_experts, m_max), kPermuteThreads, 0, [
        ids, i32(num_pairs), i32(num_experts), i32(m_max), i64(id_offset), i32(top_k), num_valid,
        masked_m, pair_expert, pair_rank, pair_kept, num_overflow, weights, slot_row, slot_weight,
        *small_dispatch_copy_args(xq, xs, a_buf, sa_buf, row_token, row_slot, copy_rows)])
    return fields


def stage_rows(src: torch.Tensor, dst: torch.Tensor, count: torch.Tensor) -> None:
    """``dst[:n].copy_(src); count.fill_(n)`` in one launch: ``src`` / ``dst`` the same dtype,
    contiguous, 16-byte aligned, ``n = src.shape[0] <= dst.shape[0]`` rows of 16-byte multiples;
    ``count`` an int64 device scalar."""
    vectors = src.numel() * src.element_size() // kVectorBytes
    grid = max(1, min(_ceil_div(vectors, kStageThreads), kStageMaxCtas))
    _kernel(stage_source(), dst).launch(grid, kStageThreads, 0, [
        src, dst, i64(vectors), count, i64(src.shape[0])])


# ----------------------------------------------------------------------------- combine

def combine(y_rows, slot_row, slot_weight, add, out, num_valid=None) -> None:
    tokens, top_k = slot_row.shape
    vectors = y_rows.shape[1] // kBf16PerVector
    if tokens == 0 or vectors == 0:
        return
    grid = (tokens, _ceil_div(vectors, kCombineThreads))
    _kernel(combine_source(add is not None), y_rows).launch(grid, kCombineThreads, 0, [
        y_rows, slot_row, slot_weight, add, out, num_valid, i32(top_k), i32(vectors)])
